//! `collector`: the Event API (`POST /v1/events`) in front of a Kinesis stream.
//!
//! Settings come from flags or their `KTK_*` environment variables (see [`Settings`]; `collector
//! --help` lists them), AWS settings from the standard chain. Stops cleanly on SIGTERM or SIGINT:
//! no new connections, open requests finish, the producer flushes, exit status 0. A bad setting
//! exits with status 2 and names the flag or variable.

use std::process::ExitCode;
use std::time::Duration;

use ktk_producer::Producer;
use ktk_producer::collector::{self, Collector, LogFormat, Settings};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Latency buckets (seconds) for `collector_request_duration_seconds`: from a fast accept to a
/// `?wait=acked` that sat through retries.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    init_logs(settings.log_format);
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = install_prometheus()?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let producer = Producer::new(settings.producer, &aws).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen, KTK_LISTEN): {e}", settings.listen))?;
    let collector = Collector::new(producer, settings.collector, Some(prometheus));
    collector::serve(listener, collector, shutdown_signal()).await?;
    info!("stopped");
    Ok(())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs that cannot be written are lost, never a panic (see `ktk_settings::stdio`).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ktk_settings::stdio::lossy_stdout)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
}

fn install_prometheus() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("collector_request_duration_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    // Without the exporter's HTTP listener nobody else drains histogram buffers; do it here.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Resolves at the first SIGTERM (what ECS and Kubernetes send) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => info!("SIGINT received"),
        () = terminate => info!("SIGTERM received"),
    }
}
