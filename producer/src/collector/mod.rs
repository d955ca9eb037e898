//! The Event API: the HTTP service apps (iOS, Android, Fire TV, Roku, web...) send analytics
//! events to. It validates each event of a batch, stamps it with the server's receive time and
//! puts it into a [`Producer`], one `events.v1.Event` (binary protobuf) per user record,
//! partitioned by `user_id` (or `device_id` for anonymous viewers) so each user's events stay in
//! order on one shard. The `collector` binary is a thin `main` over [`serve`].
//!
//! # Layout
//! - this file: [`Collector`] (the shared state), [`serve`] (the accept loop under the connection
//!   cap, until the shutdown future resolves; then drain connections and flush the producer);
//! - `connection.rs`: one HTTP/1.1 connection, with the header, idle and write timeouts;
//! - `routes.rs`: the HTTP routes, CORS, body decoding and the response;
//! - [`keys`]: write keys, their apps, allowed origins and rate limits, and their reloading;
//! - `validate.rs`: the per-event contract ([`RejectCode`] lists every reason);
//! - `config.rs`: [`CollectorConfig`], and [`Settings`], what the binary reads from its flags and
//!   environment;
//! - `log_limit.rs`: warnings written at most once per interval, with a count of the rest.
//!
//! # `POST /v1/events`
//! First the caller: the request's write key (`Authorization: Bearer <key>`, or `?key=<key>` for
//! `navigator.sendBeacon`) must be one of the [`keys`] in force, or absent when the keys document
//! allows anonymous callers; otherwise 401 (`missing_key`, `unknown_key`, `bad_authorization`)
//! with `WWW-Authenticate: Bearer`. A request from a web page (an `Origin` header) whose origin
//! the key does not list is answered 403 `origin_not_allowed`. A key over its rate is answered
//! 429 `rate_limited` with `Retry-After` (its bucket is checked before the body is read and
//! charged the batch's event count after). None of these reads the events.
//!
//! The body is an `events.v1.EventBatch`, as binary protobuf (`Content-Type:
//! application/x-protobuf`) or as canonical proto3 JSON (`application/json`, or `text/plain`, which
//! `navigator.sendBeacon` can send without a CORS preflight; lowerCamelCase or proto field names,
//! enums by name or number, 64-bit integers as strings or numbers). Any other content type is
//! answered 415; a body over the limit 413 `body_too_large`; a batch of more than
//! [`max_events_per_request`](CollectorConfig::with_max_events_per_request) events 413
//! `too_many_events`; an event larger than
//! [`max_event_bytes`](CollectorConfig::with_max_event_bytes) 413 `event_too_large`; a body that
//! has not arrived whole within the [body timeout](CollectorConfig::with_body_timeout) 408
//! `body_timeout` (and the connection is closed); a body that cannot be decoded 400. Those answers
//! are `{"error": "<code>", "reason": "<what to fix>"}`.
//!
//! Otherwise each event is checked (see `validate.rs`), stamped with the server's receive time
//! and the key's app id (`received_at_ms`, `app_id`: what the client put there is replaced), and
//! the valid ones are put into the producer in batch order with one `try_put_batch`, which never waits. The answer is:
//!
//! ```json
//! {
//!   "accepted": 2,
//!   "rejected": [
//!     {"index": 1, "event_id": "e-2", "code": "missing_user_and_device",
//!      "reason": "user_id and device_id are both missing; at least one is needed", "retryable": false}
//!   ],
//!   "results": [
//!     {"index": 0, "event_id": "e-1", "shard_id": "shardId-000000000000",
//!      "sequence_number": "49654...", "sub_sequence_number": 0}
//!   ]
//! }
//! ```
//!
//! - `index` is the event's position in the batch; `accepted + rejected.len()` is the batch size
//!   and `rejected` is in index order. `code` is the reason as a [`RejectCode`]. The answer never
//!   grows with what a client sent beyond the events' count: `event_id` is echoed only when it is
//!   a valid id (empty when it is missing or over [`MAX_EVENT_ID_CHARS`]), and a `reason` is cut
//!   at 200 characters.
//! - `accepted` counts the events the producer took: from then on they are the producer's to
//!   deliver (it retries until the record TTL; a failure after the answer is logged with the
//!   event id and counted in `collector_events_failed`).
//! - `?wait=acked` waits until Kinesis has acknowledged every accepted event: `accepted` then
//!   counts acknowledged events, `results` (present only in this mode) says where each landed
//!   (sequence and sub-sequence number together are the event's unique position in the stream),
//!   and events the producer failed are moved to `rejected` with code `put_failed` and the
//!   producer's error message.
//! - `retryable` says whether sending the event again can succeed. An app resends exactly the
//!   rejected events that are retryable, and never the accepted ones (the pipeline deduplicates
//!   on `event_id`, but a resend still costs).
//!
//! Status: 200 when the batch was read (even if every event was rejected as invalid). 503 with
//! `Retry-After` when the producer is full or shutting down: the events before that point stay
//! accepted, and every valid event from there on is rejected with `producer_full` /
//! `shutting_down` without being tried (taking a later event of a user whose earlier event was
//! turned away would put the earlier one's resend after it on the stream). 503 too, with `?wait=acked`, when no event got into Kinesis and some failed in a
//! way a retry can fix (throttling, shutdown, TTL). And 503 when more than
//! [`max_concurrent_requests`](CollectorConfig::with_max_concurrent_requests) requests whose bodies
//! have arrived are already being handled.
//!
//! # Connections
//! [`serve`] accepts at most [`max_connections`](CollectorConfig::with_max_connections) at once;
//! further ones wait in the listen backlog. A client has the
//! [header timeout](CollectorConfig::with_header_timeout) to send a request's head (from the
//! opening, or from the first byte of a later request), then the body timeout for its body; a
//! kept-alive connection waiting for its next request is closed after the
//! [idle timeout](CollectorConfig::with_idle_timeout). A connection whose client takes nothing
//! of what is written to it for the [write timeout](CollectorConfig::with_write_timeout) is
//! dropped. A request holds one of the concurrency
//! permits only from the moment its body has arrived, so clients that send slowly hold
//! connections, which are many and time out, not the permits valid requests need.
//!
//! # CORS
//! Every answer to a page (a request with `Origin`) carries `Vary: Origin`; when some key allows
//! that origin it also carries `Access-Control-Allow-Origin` (the origin) and
//! `Access-Control-Expose-Headers: retry-after`, errors included, so the page can read why it was
//! refused. `OPTIONS /v1/events` from such an origin (a preflight) is answered 204 with
//! `Access-Control-Allow-Methods: POST`, `Access-Control-Allow-Headers: authorization,
//! content-type` and `Access-Control-Max-Age: 7200`; from any other origin 403. A preflight
//! carries no key, so it is answered for the union of every key's origins; the request that
//! follows is then held to its own key's.
//!
//! # `GET /health`; the admin routes
//! `/health` on the public listener is 200 `{"status":"ok"}`, and 503
//! `{"status":"shutting_down"}` once shutdown has begun (for a load balancer). The operational
//! routes are a separate [`Collector::admin_router`], which the binary serves on
//! `--admin-listen`: `/metrics` renders the Prometheus handle given to [`Collector::new`] (404
//! without one), and `/health` adds the number of keys, whether anonymous callers are taken and
//! the last keys reload error (`null` while the source reads).
//!
//! # Metrics (through the `metrics` facade)
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `collector_events_received` | counter | |
//! | `collector_events_accepted` | counter | (taken by the producer) |
//! | `collector_events_rejected` | counter | reason (a [`RejectCode`]) |
//! | `collector_events_failed` | counter | (taken, then failed by the producer) |
//! | `collector_request_duration_seconds` | histogram | route, status |
//! | `collector_requests_refused` | counter | reason (`missing_key`, `unknown_key`, `bad_authorization`, `origin_not_allowed`, `rate_limited`) |
//! | `collector_connections_timed_out` | counter | phase (`header`, `body`, `idle`, `write`) |
//! | `collector_accept_errors` | counter | |
//! | `collector_keys` | gauge | (keys in force after the last reload) |
//! | `collector_keys_reloads` | counter | (changed documents put in force) |
//! | `collector_keys_reload_errors` | counter | (documents that could not be read or used) |
//!
//! # Logs
//! Warnings that can repeat with every request (events turned away because the producer is full
//! or shutting down, failed `accept` calls) are written at most once per 10 s per kind, with the
//! number held back since the last line (`suppressed`), and keys reload errors at most once a
//! minute; the metrics count every occurrence. Refused keys are counted, never logged, and no
//! key is ever written to a log or an answer.
//!
//! # Bounded memory
//! The collector keeps nothing between requests. A connection holds at most one request head
//! (32 KiB). Request bodies are read into buffers that grow as their bytes arrive (a declared
//! `Content-Length` reserves nothing), and every byte of those buffers is first taken from one
//! budget shared by all connections,
//! [`max_body_bytes_in_flight`](CollectorConfig::with_max_body_bytes_in_flight) (256 MiB by
//! default); a request that would go over it is answered 503 `busy` with `Retry-After`, and its
//! body's share is held until the request is done (its decoded events take about as much).
//! A request being handled holds at most `max_events_per_request` decoded events, each at most
//! `max_event_bytes` as protobuf, and at most `max_concurrent_requests` are handled at once. The
//! event count of a protobuf body is checked on its wire format before anything is decoded, and
//! a JSON body's `events` are read no further than the limit. `bench/collector-load/` measures
//! the peak RSS under the worst mix of requests it builds.
//! Without `?wait=acked`, one task per request watches its receipts; each such task holds at
//! least one record still outstanding in the producer, so there are never more of them than the
//! producer's outstanding-records limit.

mod config;
mod connection;
pub mod keys;
mod log_limit;
mod routes;
mod validate;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use log_limit::{LogLimit, WARNING_INTERVAL};

pub use config::{CollectorConfig, KeySetting, LogFormat, Settings};
pub use keys::{AuthError, KeySet, KeySource, Keys, KeysError};
pub use validate::{
    MAX_EVENT_ID_CHARS, MAX_FUTURE_SKEW, MAX_TYPE_NAME_CHARS, RejectCode, Rejection, UNKNOWN_TYPE_ATTRIBUTE,
};

use crate::producer::{Producer, ProducerStats};

/// The Event API's state: the producer, the settings and the metrics handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Collector {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    producer: Producer,
    config: CollectorConfig,
    keys: Keys,
    prometheus: Option<PrometheusHandle>,
    shutting_down: AtomicBool,
    /// One permit per `POST /v1/events` being handled (taken once its body has arrived).
    requests: Semaphore,
    /// One permit per byte of request bodies held in memory, taken as the bytes arrive.
    body_bytes: Arc<Semaphore>,
    /// The `producer_full` / `shutting_down` warning, at most once per interval.
    turned_away_warnings: LogLimit,
    /// The warning for accepted events that failed later, at most once per interval.
    failed_later_warnings: LogLimit,
}

impl Collector {
    /// The Event API over `producer`, for the callers `keys` lets in (see [`keys`]; reload them
    /// with [`keys::keep_loading`] or [`Keys::replace`]). `prometheus` is what the admin
    /// `GET /metrics` renders: the binary installs a global recorder and passes its handle; a
    /// library user or a test may pass none.
    pub fn new(producer: Producer, config: CollectorConfig, keys: Keys, prometheus: Option<PrometheusHandle>) -> Self {
        Collector {
            shared: Arc::new(Shared {
                requests: Semaphore::new(config.max_concurrent_requests.clamp(1, Semaphore::MAX_PERMITS)),
                body_bytes: Arc::new(Semaphore::new(config.max_body_bytes_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
                producer,
                config,
                keys,
                prometheus,
                shutting_down: AtomicBool::new(false),
                turned_away_warnings: LogLimit::new(WARNING_INTERVAL),
                failed_later_warnings: LogLimit::new(WARNING_INTERVAL),
            }),
        }
    }

    pub fn producer(&self) -> &Producer {
        &self.shared.producer
    }

    pub fn config(&self) -> &CollectorConfig {
        &self.shared.config
    }

    /// The write keys in force.
    pub fn keys(&self) -> &Keys {
        &self.shared.keys
    }

    /// The public routes (`POST`/`OPTIONS /v1/events`, `GET /health`), to serve with [`serve`]
    /// or to nest in a bigger application.
    pub fn router(&self) -> Router {
        routes::router(self.clone())
    }

    /// The operational routes (`GET /metrics`, `GET /health`), for a listen address apps cannot
    /// reach (the binary's `--admin-listen`).
    pub fn admin_router(&self) -> Router {
        routes::admin_router(self.clone())
    }

    fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Relaxed)
    }
}

/// Serves the Event API on `listener` until `shutdown` resolves; then stops accepting
/// connections, lets open ones finish their requests (up to the drain timeout), shuts the
/// producer down (sending what it holds, up to the flush timeout) and returns its statistics.
///
/// Each connection is served by HTTP/1.1 with the header, body and idle timeouts of the
/// [`CollectorConfig`]; at most [`max_connections`](CollectorConfig::with_max_connections) are
/// open at once, and further ones wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    collector: Collector,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<ProducerStats> {
    let address = listener.local_addr()?;
    info!(%address, stream = %collector.producer().config().stream(), "Event API listening");
    let config = collector.config().clone();
    let cap = config.max_connections.clamp(1, MAX_CONNECTION_PERMITS.min(Semaphore::MAX_PERMITS));
    let connections = Arc::new(Semaphore::new(cap));
    let (stopping, stopping_rx) = watch::channel(false);
    let timeouts =
        connection::Timeouts { header: config.header_timeout, idle: config.idle_timeout, write: config.write_timeout };
    let router = collector.router();
    let accept_errors = LogLimit::new(WARNING_INTERVAL);
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        // A place under the connection cap first: while there is none, new connections wait in
        // the listen backlog instead of being accepted and then starved.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    counter!("collector_accept_errors").increment(1);
                    if let Some(suppressed) = accept_errors.admit() {
                        warn!(suppressed, "cannot accept a connection: {e}");
                    }
                    // Out of file descriptors, most likely: give open connections time to close.
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection::serve_connection(stream, router.clone(), timeouts, stopping_rx.clone(), permit));
    }
    collector.shared.shutting_down.store(true, Ordering::Relaxed);
    info!("shutting down: no new connections; open ones may finish their requests");
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a permit until it ends: all of them back means all connections closed.
    let drained =
        tokio::time::timeout(config.drain_timeout, connections.acquire_many(u32::try_from(cap).unwrap_or(u32::MAX)))
            .await;
    if drained.is_err() {
        warn!(
            timeout_ms = config.drain_timeout.as_millis() as u64,
            open = cap - connections.available_permits(),
            "connections still open after the drain timeout; leaving them"
        );
    }
    let stats = collector.producer().shutdown(config.flush_timeout).await;
    info!(
        received = stats.user_records_received,
        put = stats.user_records_put,
        failed = stats.user_records_failed,
        expired = stats.user_records_expired,
        kinesis_records = stats.kinesis_records_put,
        put_records_calls = stats.put_records_calls,
        retries = stats.retries,
        throttled = stats.throttled,
        "producer flushed and stopped"
    );
    Ok(stats)
}

/// Most connection permits: what `Semaphore::acquire_many` can wait for at once.
const MAX_CONNECTION_PERMITS: usize = u32::MAX as usize;
/// After a failed `accept`, how long the loop waits before the next.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
