-- Plays per title per day. A play is an EVENT_TYPE_PLAY event; a complete, EVENT_TYPE_COMPLETE.
-- The title's name is the greatest non-empty content_title its events carried that day (one
-- deterministic choice when clients disagree).
SELECT
  content_id,
  MAX(CASE WHEN content_title <> '' THEN content_title END) AS content_title,
  SUM(CASE WHEN type = 'EVENT_TYPE_PLAY' THEN 1 ELSE 0 END) AS plays,
  SUM(CASE WHEN type = 'EVENT_TYPE_COMPLETE' THEN 1 ELSE 0 END) AS completes,
  COUNT(DISTINCT CASE WHEN type = 'EVENT_TYPE_PLAY' AND user_id <> '' THEN user_id END) AS viewers,
  COUNT(DISTINCT CASE WHEN type = 'EVENT_TYPE_PLAY' AND device_id <> '' THEN device_id END) AS devices
FROM events
WHERE dt = '{{dt}}'
  AND type IN ('EVENT_TYPE_PLAY', 'EVENT_TYPE_COMPLETE')
  AND content_id <> ''
GROUP BY content_id
