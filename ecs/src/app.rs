//! The run loop of the `consumer` binary: the worker with the delivery pipeline, and
//! `GET /health` and `GET /metrics` beside it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ktk_consumer::{Worker, WorkerReport};
use ktk_pipeline::postgres::StoreConfig;
use ktk_pipeline::{Pipeline, PipelineStats};
use tokio_util::sync::CancellationToken;

use crate::processor::DeliveryProcessor;
use crate::settings::Settings;

/// What `/health` reports.
#[derive(Debug, Default)]
pub struct Health {
    running: AtomicBool,
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
    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let server = {
        let app = router(Arc::clone(&health), pipeline.clone(), metrics);
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

fn router(
    health: Arc<Health>,
    pipeline: Pipeline,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> axum::Router {
    axum::Router::new()
        .route(
            "/health",
            axum::routing::get(move || {
                let (health, pipeline) = (Arc::clone(&health), pipeline.clone());
                async move {
                    let stats = pipeline.stats();
                    let body = serde_json::json!({
                        "status": if health.is_running() { "ok" } else { "stopped" },
                        "events_delivered": stats.events_delivered,
                        "duplicates": stats.duplicates(),
                        "dead_letters": stats.dead_letters,
                        "sink_errors": stats.sink_errors,
                        "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                    });
                    let status = if health.is_running() {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, axum::Json(body))
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
