//! `consumer`: the delivery pipeline as an ECS task. Reads a stream with leases shared among
//! every task of the application, decodes and deduplicates events, writes batches to S3 and the
//! real-time stores, and checkpoints after they acknowledged. Settings are flags or their `KTK_*`
//! environment variables (`consumer --help`; see `ktk_ecs::settings`); AWS settings come from the
//! standard chain.
//! SIGTERM (an ECS stop) stops taking work, abandons the batch being filled, releases every lease
//! and exits 0 well within ECS's 30 s stop timeout. A bad setting exits 2 naming the variable.

use std::process::ExitCode;
use std::time::Duration;

use ktk_ecs::{LogFormat, Settings, app};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// The buckets (seconds) of `DeliveryDelaySeconds`, from the collector's receipt of an event to
/// its write in a sink: from sub-second real-time delivery to the quarter hour of a catch-up.
const DELIVERY_DELAY_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

#[tokio::main]
async fn main() -> ExitCode {
    // A bad value is one line naming the flag and its variable, exit status 2.
    let settings: Settings = ktk_pipeline::settings::parse_or_exit();
    if let Err(e) = settings.worker_config() {
        ktk_settings::stdio::eprint_line(&format!("consumer: {e}"));
        return ExitCode::from(2);
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs that cannot be written are lost, never a panic (see `ktk_settings::stdio`).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ktk_settings::stdio::lossy_stdout)
        .log_internal_errors(false);
    match settings.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    // Histograms as Prometheus histograms (buckets), not summaries: quantiles over every task.
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("DeliveryDelaySeconds".to_owned()), DELIVERY_DELAY_BUCKETS);
    let metrics = match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => {
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(e) => {
            error!("cannot install the Prometheus recorder: {e}");
            None
        }
    };
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {} (KTK_LISTEN): {e}", settings.listen);
            return ExitCode::from(2);
        }
    };
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    match app::run(settings, &aws, listener, metrics, shutdown_signal()).await {
        Ok((report, stats)) => {
            info!(?report, ?stats, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at the first SIGTERM (what ECS sends) or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                }
            }
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
