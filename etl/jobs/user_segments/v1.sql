-- User segments of the day: one row per (segment, user). Users without a user id are left out.
--   binge_watcher   played 3 or more distinct titles within one session
--   ad_completer    completed at least one ad and skipped none
--   ad_skipper      skipped at least one ad
--   multi_platform  sent events from 2 or more platforms
WITH per_user AS (
  SELECT
    user_id,
    COUNT(DISTINCT platform) AS platforms,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_COMPLETE' THEN 1 ELSE 0 END) AS ad_completes,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_SKIP' THEN 1 ELSE 0 END) AS ad_skips
  FROM events
  WHERE dt = '{{dt}}' AND user_id <> ''
  GROUP BY user_id
),
binge AS (
  SELECT DISTINCT user_id
  FROM (
    SELECT user_id, session_id, COUNT(DISTINCT content_id) AS titles
    FROM events
    WHERE dt = '{{dt}}' AND type = 'EVENT_TYPE_PLAY' AND user_id <> '' AND content_id <> ''
    GROUP BY user_id, session_id
  ) AS sessions
  WHERE titles >= 3
)
SELECT 'binge_watcher' AS segment, user_id FROM binge
UNION ALL
SELECT 'ad_completer' AS segment, user_id FROM per_user WHERE ad_completes > 0 AND ad_skips = 0
UNION ALL
SELECT 'ad_skipper' AS segment, user_id FROM per_user WHERE ad_skips > 0
UNION ALL
SELECT 'multi_platform' AS segment, user_id FROM per_user WHERE platforms >= 2
