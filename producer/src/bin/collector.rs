//! `collector`: the Event API (`POST /v1/events`) in front of a Kinesis stream.
//!
//! Settings come from flags or their `KTK_*` environment variables (see [`Settings`]; `collector
//! --help` lists them), AWS settings from the standard chain. The write keys are read at start
//! (a document that cannot be read or used stops it with status 1), again every
//! `--keys-reload-secs`, and on SIGHUP. `/metrics` and `/health` are served on `--admin-listen`,
//! apart from the public `--listen`. Stops cleanly on SIGTERM or SIGINT: no new connections, open
//! requests finish, the producer flushes, exit status 0. A bad setting exits with status 2 and
//! names the flag or variable.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ktk_producer::Producer;
use ktk_producer::collector::{self, Collector, KeySetting, KeySource, Keys, LogFormat, Settings};
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
    // First of all, so that SIGTERM during the start-up is a clean stop, not the default death.
    let shutdown = shutdown_signal();
    let hangups = hangups();
    let prometheus = install_prometheus()?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    // The keys and both addresses first: nothing is started when one of them is wrong.
    let source = match settings.keys {
        KeySetting::File(path) => KeySource::File(path),
        KeySetting::Secret(id) => KeySource::Secret { id, client: aws_sdk_secretsmanager::Client::new(&aws) },
    };
    let keys = Keys::new(source.load().await?);
    metrics::gauge!("collector_keys").set(keys.current().len() as f64);
    info!(
        source = %source.describe(),
        keys = keys.current().len(),
        anonymous = keys.current().allows_anonymous(),
        "write keys loaded"
    );
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen, KTK_LISTEN): {e}", settings.listen))?;
    let admin = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--admin-listen, KTK_ADMIN_LISTEN): {e}", settings.admin_listen))?;
    let producer = Producer::new(settings.producer, &aws).await?;
    let collector = Collector::new(producer, settings.collector, keys.clone(), Some(prometheus));

    let reload_now = Arc::new(tokio::sync::Notify::new());
    let reloading = tokio::spawn(collector::keys::keep_loading(source, keys, settings.keys_reload, reload_now.clone()));
    let hangups = tokio::spawn(reload_on_sighup(hangups, reload_now));
    info!(address = %settings.admin_listen, "admin routes (/metrics, /health) listening");
    let admin_router = collector.admin_router();
    let admin_server = tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, admin_router).await {
            error!("the admin listener stopped: {e}");
        }
    });
    let served = collector::serve(listener, collector, shutdown).await;
    for task in [reloading, hangups, admin_server] {
        task.abort();
    }
    served?;
    info!("stopped");
    Ok(())
}

/// SIGHUP, from now on (its default action would end the process).
#[cfg(unix)]
fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| error!("cannot listen for SIGHUP (the keys are still read every --keys-reload-secs): {e}"))
        .ok()
}

#[cfg(not(unix))]
fn hangups() -> Option<()> {
    None
}

/// Asks for the keys to be read again at every SIGHUP.
#[cfg(unix)]
async fn reload_on_sighup(hangups: Option<tokio::signal::unix::Signal>, now: Arc<tokio::sync::Notify>) {
    let Some(mut hangups) = hangups else { return };
    while hangups.recv().await.is_some() {
        info!("SIGHUP received: reading the write keys again");
        now.notify_one();
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_hangups: Option<()>, _now: Arc<tokio::sync::Notify>) {}

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

/// Resolves at the first SIGTERM (what ECS and Kubernetes send) or SIGINT (Ctrl-C). The
/// handlers are installed when this is called, not when the future is first polled: a signal that
/// comes while the collector is still starting is kept, and stops it as soon as it serves.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                error!("cannot listen for {name}: {e}");
                None
            }
        };
        let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt.take()) => info!("SIGINT received"),
                () = wait(terminate.take()) => info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
        info!("Ctrl-C received");
    }
}
