-- Daily active users (v2: with sessions): distinct non-empty user ids, device ids and session ids
-- with at least one event that day, per platform and over all platforms (platform 'ALL').
SELECT
  platform,
  COUNT(DISTINCT CASE WHEN user_id <> '' THEN user_id END) AS users,
  COUNT(DISTINCT CASE WHEN device_id <> '' THEN device_id END) AS devices,
  COUNT(DISTINCT CASE WHEN session_id <> '' THEN session_id END) AS sessions,
  COUNT(*) AS events
FROM events
WHERE dt = '{{dt}}'
GROUP BY platform
UNION ALL
SELECT
  'ALL' AS platform,
  COUNT(DISTINCT CASE WHEN user_id <> '' THEN user_id END) AS users,
  COUNT(DISTINCT CASE WHEN device_id <> '' THEN device_id END) AS devices,
  COUNT(DISTINCT CASE WHEN session_id <> '' THEN session_id END) AS sessions,
  COUNT(*) AS events
FROM events
WHERE dt = '{{dt}}'
