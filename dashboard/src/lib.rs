//! The real-time dashboard (`ktk dashboard`): one web page over the real-time store and the
//! consumers' and collector's Prometheus metrics.
//!
//! - **Audience**: events per bucket by type and by platform, viewers per bucket, titles watched
//!   now (distinct viewers with a play or heartbeat in the last minute), top titles today (plays
//!   since midnight UTC), new and returning users.
//! - **Segments**: binge watchers, ad completers, ad skippers and multi-platform users, each with
//!   its SQL shown, over the range and per bucket ([`store::SEGMENTS`]; the same definitions as the
//!   daily ETL's `user_segments` job).
//! - **Pipeline**: events per second received, accepted and delivered, delivery delay p50/p99
//!   (collector receipt to `stored_at`), lag per shard, duplicates dropped per minute by cause
//!   (`resent` by clients or producers, `reread` after a takeover), dead letters by reason, sink
//!   errors.
//!
//! # HTTP
//! `GET /` is the page; `GET /assets/dashboard.js` and `/assets/dashboard.css` its bundle (uPlot
//! and the page's script, built from the npm registry by `dashboard/web/scripts/setup.sh` and
//! embedded at compile time: the page needs nothing from the internet). The page polls
//! `GET /api/audience`, `/api/segments` and `/api/pipeline` with `?range=` one of
//! [`RANGES`] (seconds); `GET /api/info` says what the dashboard reads.
//!
//! # Bounds
//! Each answer is computed at most once per [`Dashboard::reuse`] per endpoint and range (the
//! refresh interval, or a 360th of the range when that is longer: a day's charts are computed at
//! most every 4 minutes), whoever asks and however many ask at once: concurrent requests wait for
//! the one computation. The top titles of the day, which read the whole day whatever the range,
//! are computed apart, at most once per [`DashboardConfig::day_refresh`], for every range. Each
//! computation is a few bounded, indexed queries on a two-connection read-only pool (see
//! [`store`]). The server takes
//! at most [`MAX_CONCURRENT_REQUESTS`] requests at a time. It is an operator's tool: it listens
//! on loopback unless told otherwise and has no login, so put it behind an authenticating proxy
//! before exposing it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

pub mod metrics;
pub mod store;

pub use metrics::{Metrics, ScrapeConfig};
pub use store::{Dialect, Store, StoreError, Window};

mod bundle {
    include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
}

/// The ranges the page offers, in seconds: 15 minutes, 1 hour, 6 hours, 24 hours.
pub const RANGES: [i64; 4] = [900, 3600, 6 * 3600, 24 * 3600];
/// Requests served at once; more wait.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;
/// The longest an answer may take to compute before the request fails.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("index.html");

/// What the dashboard shows and how often it refreshes.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// How long an answer is reused, and how often the page asks again.
    pub refresh: Duration,
    /// A title for the page (the stream or the environment).
    pub title: String,
    /// How long the top titles of the day are reused (they read the whole day's plays).
    pub day_refresh: Duration,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            refresh: Duration::from_secs(5),
            title: "ktk".to_owned(),
            day_refresh: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Panel {
    Audience,
    Segments,
    Pipeline,
}

type Slot = Arc<Mutex<Option<(Instant, Arc<Value>)>>>;

/// The top titles of a day (its midnight, in seconds) and when they were computed.
type DaySlot = Mutex<Option<(Instant, i64, Arc<Value>)>>;

/// The dashboard's state: the store, the metrics, the answers cached.
#[derive(Debug)]
pub struct Dashboard {
    store: Store,
    metrics: Metrics,
    config: DashboardConfig,
    cache: std::sync::Mutex<HashMap<(Panel, i64), Slot>>,
    day: DaySlot,
    computed: AtomicU64,
}

impl Dashboard {
    pub fn new(store: Store, metrics: Metrics, config: DashboardConfig) -> Arc<Self> {
        Arc::new(Dashboard {
            store,
            metrics,
            config,
            cache: std::sync::Mutex::new(HashMap::new()),
            day: Mutex::new(None),
            computed: AtomicU64::new(0),
        })
    }

    /// How many answers were computed (not served from the cache) so far.
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// How long an answer over `range` seconds is reused: the refresh interval, or a 360th of
    /// the range (the width of a bucket at most) when that is longer.
    pub fn reuse(&self, range: i64) -> Duration {
        self.config.refresh.max(Duration::from_secs((range.max(0) as u64) / 360))
    }

    /// The top titles of the day that ends at `now`: reused for [`DashboardConfig::day_refresh`].
    async fn top_titles_today(&self, now: i64) -> Result<Arc<Value>, String> {
        let midnight = now.div_euclid(86400) * 86400;
        let mut slot = self.day.lock().await;
        if let Some((at, day, value)) = slot.as_ref()
            && *day == midnight
            && at.elapsed() < self.config.day_refresh
        {
            return Ok(Arc::clone(value));
        }
        let titles = self.store.top_titles_today(now).await.map_err(|e| e.to_string())?;
        let value = Arc::new(serde_json::to_value(titles).map_err(|e| e.to_string())?);
        *slot = Some((Instant::now(), midnight, Arc::clone(&value)));
        Ok(value)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The router: the page, its bundle and the API.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/assets/dashboard.js", get(|| async { asset(bundle::BUNDLE_JS, "text/javascript; charset=utf-8") }))
            .route("/assets/dashboard.css", get(|| async { asset(bundle::BUNDLE_CSS, "text/css; charset=utf-8") }))
            .route("/api/info", get(info))
            .route("/api/audience", get(|s, q| panel(s, q, Panel::Audience)))
            .route("/api/segments", get(|s, q| panel(s, q, Panel::Segments)))
            .route("/api/pipeline", get(|s, q| panel(s, q, Panel::Pipeline)))
            .route("/healthz", get(|| async { "ok" }))
            .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
            .with_state(Arc::clone(self))
    }

    /// Serves the router on `listener` until `shutdown` resolves, scraping the metrics meanwhile.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let scraper = tokio::spawn(self.metrics.clone().run());
        let app = self.router();
        let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        scraper.abort();
        result
    }

    /// The answer of `panel` over the last `range` seconds: cached, or computed once for everyone
    /// who asks meanwhile.
    async fn answer(&self, panel: Panel, range: i64) -> Arc<Value> {
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(cache.entry((panel, range)).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some((at, value)) = slot.as_ref()
            && at.elapsed() < self.reuse(range)
        {
            return Arc::clone(value);
        }
        self.computed.fetch_add(1, Ordering::Relaxed);
        // The end of the current second: windows end after everything stored so far.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64 + 1;
        let computed: Result<Value, String> = async {
            let to_json = |v: serde_json::Result<Value>| v.map_err(|e| e.to_string());
            match panel {
                Panel::Audience => {
                    let audience = self
                        .store
                        .audience_parts(&Window::ending(now, range, min_step(range)), false)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut value = to_json(serde_json::to_value(audience))?;
                    value["top_titles_today"] = Value::clone(&*self.top_titles_today(now).await?);
                    Ok(value)
                }
                Panel::Segments => {
                    let window = Window::ending(now, range, range / 12);
                    let segments = self.store.segments(&window).await.map_err(|e| e.to_string())?;
                    to_json(serde_json::to_value(segments))
                }
                Panel::Pipeline => {
                    // The metrics are worth showing while the store is down.
                    let store = self.store.pipeline(&Window::ending(now, range, min_step(range))).await;
                    let metrics = self.metrics.has_targets().then(|| self.metrics.view(range));
                    Ok(match store {
                        Ok(store) => json!({ "store": store, "metrics": metrics }),
                        Err(e) => json!({ "store": null, "store_error": e.to_string(), "metrics": metrics }),
                    })
                }
            }
        }
        .await;
        // A failure is kept as long as an answer, so a store that is down is not asked again by
        // every request.
        let value = Arc::new(computed.unwrap_or_else(|e| json!({ "error": e })));
        *slot = Some((Instant::now(), Arc::clone(&value)));
        value
    }
}

/// The smallest bucket of a range's charts: 10 s up to 15 minutes, a minute beyond.
fn min_step(range: i64) -> i64 {
    if range <= 900 { 10 } else { 60 }
}

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
        .into_response()
}

fn asset(bytes: Option<&'static [u8]>, content_type: &'static str) -> Response {
    match bytes {
        Some(bytes) => ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], bytes).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "the dashboard's bundle was not built into this binary: run dashboard/web/scripts/setup.sh, then build again",
        )
            .into_response(),
    }
}

async fn info(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let store = &dashboard.store;
    axum::Json(json!({
        "title": dashboard.config.title,
        "store": store.target(),
        "dialect": store.dialect(),
        "table": store.table(),
        "metrics": dashboard.metrics.view(0).targets,
        "refresh_ms": dashboard.config.refresh.as_millis() as u64,
        "ranges": RANGES,
        "bundled": bundle::BUNDLE_JS.is_some(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct RangeQuery {
    range: Option<i64>,
}

async fn panel(State(dashboard): State<Arc<Dashboard>>, query: Query<RangeQuery>, panel: Panel) -> Response {
    let range = query.range.unwrap_or(3600);
    if !RANGES.contains(&range) {
        let message = format!("range must be one of {RANGES:?} (seconds)");
        return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": message }))).into_response();
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, dashboard.answer(panel, range)).await {
        Ok(value) => {
            let status = if value.get("error").is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(Value::clone(&value))).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": format!("no answer within {ANSWER_TIMEOUT:?}") })),
        )
            .into_response(),
    }
}
