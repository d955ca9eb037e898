-- Ad completion per platform. Rates are of ad starts, rounded to 4 decimals, null for a platform
-- with no ad start that day.
WITH ads AS (
  SELECT
    platform,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_START' THEN 1 ELSE 0 END) AS ad_starts,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_COMPLETE' THEN 1 ELSE 0 END) AS ad_completes,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_SKIP' THEN 1 ELSE 0 END) AS ad_skips,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_IMPRESSION' THEN 1 ELSE 0 END) AS ad_impressions,
    SUM(CASE WHEN type = 'EVENT_TYPE_AD_CLICK' THEN 1 ELSE 0 END) AS ad_clicks
  FROM events
  WHERE dt = '{{dt}}'
    AND type IN (
      'EVENT_TYPE_AD_START', 'EVENT_TYPE_AD_COMPLETE', 'EVENT_TYPE_AD_SKIP',
      'EVENT_TYPE_AD_IMPRESSION', 'EVENT_TYPE_AD_CLICK'
    )
  GROUP BY platform
)
SELECT
  platform,
  ad_starts,
  ad_completes,
  ad_skips,
  ad_impressions,
  ad_clicks,
  CASE WHEN ad_starts > 0 THEN ROUND(CAST(ad_completes AS DOUBLE) / ad_starts, 4) END AS completion_rate,
  CASE WHEN ad_starts > 0 THEN ROUND(CAST(ad_skips AS DOUBLE) / ad_starts, 4) END AS skip_rate
FROM ads
