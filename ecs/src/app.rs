//! The run loop of the `consumer` binary: the worker with the delivery pipeline, and
//! its HTTP endpoints beside it:
//! - `GET /live` (liveness): 200 while the process answers at all; restart it when this fails.
//! - `GET /ready` (readiness): 200 while the worker runs (settings, stream and sinks checked,
//!   leases being taken), 503 before and after.
//! - `GET /health`: 200 while the worker runs and nothing below has lasted longer than
//!   `--unhealthy-after-ms` (`KTK_UNHEALTHY_AFTER_MS`, 60 s by default); otherwise 503 with one
//!   reason per condition, each a sentence with how long it has lasted and the latest error:
//!   - a sink has failed every write (`"sink s3 has failed every write for 75 s: ..."`);
//!   - the lease table has failed every scan, or every renewal of a held lease has failed
//!     (DynamoDB unreachable, the table gone);
//!   - the worker has held no lease while the table had leases it could take (unowned or
//!     expired); a worker with none because live workers hold them all (more tasks than shards) is
//!     healthy;
//!   - every Kinesis call (`ListShards`, `GetShardIterator`, `GetRecords`, `SubscribeToShard`) has
//!     failed (the stream deleted or unreachable).
//!
//!   The worker's conditions are defined by `ktk_consumer::WorkerSnapshot::unhealthy_reasons`.
//!   Both answers carry the pipeline's counts and the worker's view (`"worker"`: leases held, in
//!   the table, free to take, workers seen, and how long ago the latest lease-table scan and
//!   Kinesis call succeeded).
//! - `GET /metrics`: the Prometheus text.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ktk_consumer::{Worker, WorkerReport, WorkerSnapshot, WorkerStatus};
use ktk_pipeline::postgres::StoreConfig;
use ktk_pipeline::{Pipeline, PipelineStats};
use tokio_util::sync::CancellationToken;

use crate::processor::DeliveryProcessor;
use crate::settings::Settings;

/// What `/health` reports: whether the worker runs, and its live status.
#[derive(Debug, Default)]
pub struct Health {
    running: AtomicBool,
    worker: WorkerStatus,
}

impl Health {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

/// Runs the worker with the delivery pipeline until `shutdown` resolves, serving `/health` and
/// `/metrics` (the Prometheus text `metrics` renders) on `listener`. Returns the worker's report
/// and the pipeline's counts.
pub async fn run(
    settings: Settings,
    aws: &aws_config::SdkConfig,
    listener: tokio::net::TcpListener,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(WorkerReport, PipelineStats), Box<dyn std::error::Error>> {
    let worker_config = settings.worker_config()?;
    // Nothing (lease table, store tables) is created for a stream that is not there.
    check_stream(aws, &settings.stream).await?;
    let sinks = settings.sinks.connect(aws, StoreConfig::default()).await?;
    let pipeline = Pipeline::new(settings.pipeline_config(), sinks.all())?;
    let factory = {
        let (pipeline, stream) = (pipeline.clone(), settings.stream.clone());
        move |shard: &str| DeliveryProcessor::new(&pipeline, &stream, shard)
    };
    let worker = Worker::new(worker_config, aws, factory)?;
    let health = Arc::new(Health { running: AtomicBool::new(false), worker: worker.status() });
    let stop = CancellationToken::new();
    let server = {
        let unhealthy_after = std::time::Duration::from_millis(settings.unhealthy_after_ms);
        let app = router(Arc::clone(&health), pipeline.clone(), metrics, unhealthy_after);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        })
    };
    let worker_stop = CancellationToken::new();
    {
        let worker_stop = worker_stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            worker_stop.cancel();
        });
    }
    health.running.store(true, Ordering::Relaxed);
    let result = worker.run(worker_stop).await;
    health.running.store(false, Ordering::Relaxed);
    stop.cancel();
    let _ = server.await;
    sinks.close().await;
    Ok((result?, pipeline.stats()))
}

/// Why the stream cannot be consumed, found before anything is created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Kinesis says there is no such stream: nothing was created, and the process exits.
    #[error(
        "the stream {stream} (--stream / KTK_STREAM) does not exist; create it or fix the name (nothing was created)"
    )]
    Missing { stream: String },
    /// The stream could not be described (no access, Kinesis unreachable) after every attempt.
    #[error(
        "cannot describe the stream {stream} (--stream / KTK_STREAM) after {attempts} attempts: {message} (nothing was created)"
    )]
    Unreachable { stream: String, attempts: u32, message: String },
}

/// Attempts at DescribeStreamSummary before [`check_stream`] gives up on an error other than a
/// missing stream (throttling, a network error): about 7 s in all.
const STREAM_CHECK_ATTEMPTS: u32 = 4;

/// Checks that `stream` (a name or an ARN) exists, with DescribeStreamSummary: a missing stream
/// is an error at once; any other error is retried a few times ([`STREAM_CHECK_ATTEMPTS`]), then
/// is an error too.
pub async fn check_stream(aws: &aws_config::SdkConfig, stream: &str) -> Result<(), StreamError> {
    use aws_sdk_kinesis::error::ProvideErrorMetadata as _;
    let kinesis = aws_sdk_kinesis::Client::new(aws);
    let mut pause = std::time::Duration::from_millis(500);
    for attempt in 1..=STREAM_CHECK_ATTEMPTS {
        let request = kinesis.describe_stream_summary();
        let request = if stream.starts_with("arn:") { request.stream_arn(stream) } else { request.stream_name(stream) };
        let error = match request.send().await {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        let service = error.into_service_error();
        if service.is_resource_not_found_exception() {
            return Err(StreamError::Missing { stream: stream.to_owned() });
        }
        let message = service.message().map(str::to_owned).unwrap_or_else(|| service.to_string());
        if attempt == STREAM_CHECK_ATTEMPTS {
            return Err(StreamError::Unreachable { stream: stream.to_owned(), attempts: attempt, message });
        }
        tracing::warn!(
            stream,
            attempt,
            "cannot describe the stream: {message}; trying again in {pause:?} ({} attempts left)",
            STREAM_CHECK_ATTEMPTS - attempt
        );
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    Ok(())
}

/// Why the consumer is unhealthy: the worker does not run, a sink has failed every write for
/// longer than `unhealthy_after`, or the worker is (see
/// [`WorkerSnapshot::unhealthy_reasons`]: the lease table, leases it should hold, the stream).
/// Empty when healthy.
pub fn unhealthy_reasons(
    running: bool,
    worker: &WorkerSnapshot,
    pipeline: &Pipeline,
    unhealthy_after: std::time::Duration,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if !running {
        reasons.push("the worker is not running".to_owned());
    } else {
        reasons.extend(worker.unhealthy_reasons(tokio::time::Instant::now(), unhealthy_after));
    }
    for writes in pipeline.sink_writes() {
        let Some(since) = writes.failing_since else { continue };
        let failing = since.elapsed();
        if failing > unhealthy_after {
            reasons.push(format!(
                "sink {} has failed every write for {} s: {}",
                writes.sink,
                failing.as_secs(),
                writes.last_error.as_deref().unwrap_or("unknown error")
            ));
        }
    }
    reasons
}

fn router(
    health: Arc<Health>,
    pipeline: Pipeline,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    unhealthy_after: std::time::Duration,
) -> axum::Router {
    use axum::http::StatusCode;
    let ready = Arc::clone(&health);
    axum::Router::new()
        .route("/live", axum::routing::get(|| async { "live" }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let running = ready.is_running();
                async move {
                    if running {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "the worker is not running")
                    }
                }
            }),
        )
        .route(
            "/health",
            axum::routing::get(move || {
                let (health, pipeline) = (Arc::clone(&health), pipeline.clone());
                async move {
                    let stats = pipeline.stats();
                    let worker = health.worker.snapshot();
                    let reasons = unhealthy_reasons(health.is_running(), &worker, &pipeline, unhealthy_after);
                    let status = if !health.is_running() {
                        "stopped"
                    } else if reasons.is_empty() {
                        "ok"
                    } else {
                        "unhealthy"
                    };
                    let body = serde_json::json!({
                        "status": status,
                        "reasons": reasons,
                        "events_delivered": stats.events_delivered,
                        "duplicates": stats.duplicates(),
                        "duplicates_resent": stats.duplicates_resent(),
                        "duplicates_reread": stats.duplicates_reread,
                        "dead_letters": stats.dead_letters,
                        "sink_errors": stats.sink_errors,
                        "worker": worker_json(&worker),
                        "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                    });
                    let code = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    (code, axum::Json(body))
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { metrics.map(|m| m.render()).unwrap_or_default() }
            }),
        )
}

/// The worker's view in `/health`: counts, and how long ago things last worked (milliseconds;
/// `null` for never).
fn worker_json(worker: &WorkerSnapshot) -> serde_json::Value {
    let now = tokio::time::Instant::now();
    let ago = |at: Option<tokio::time::Instant>| at.map(|at| now.saturating_duration_since(at).as_millis() as u64);
    serde_json::json!({
        "leases_held": worker.leases_held,
        "leases_in_table": worker.leases_in_table,
        "leases_takeable": worker.leases_takeable,
        "workers_seen": worker.workers_seen,
        "last_scan_ms_ago": ago(worker.lease_scans.last_success),
        "last_kinesis_success_ms_ago": ago(worker.kinesis.last_success),
    })
}
