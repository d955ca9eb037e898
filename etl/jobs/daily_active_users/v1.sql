-- Daily active users: distinct non-empty user ids with at least one event that day, per platform
-- and over all platforms (the row whose platform is 'ALL': a user on two platforms counts once).
SELECT
  platform,
  COUNT(DISTINCT CASE WHEN user_id <> '' THEN user_id END) AS users,
  COUNT(DISTINCT CASE WHEN device_id <> '' THEN device_id END) AS devices,
  COUNT(*) AS events
FROM events
WHERE dt = '{{dt}}'
GROUP BY platform
UNION ALL
SELECT
  'ALL' AS platform,
  COUNT(DISTINCT CASE WHEN user_id <> '' THEN user_id END) AS users,
  COUNT(DISTINCT CASE WHEN device_id <> '' THEN device_id END) AS devices,
  COUNT(*) AS events
FROM events
WHERE dt = '{{dt}}'
