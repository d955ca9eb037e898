//! `ktk dashboard`: serves the real-time dashboard (the `ktk-dashboard` crate) over a store and
//! the `/metrics` of the consumers and the collector, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ktk_dashboard::{Dashboard, DashboardConfig, Metrics, ScrapeConfig, Store};

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// The real-time store: postgres://user:password@host:port/database or
    /// mysql://user:password@host:port/database (MariaDB, MySQL, SingleStore).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    store: String,
    /// The events table the consumers write (its dead letters are in <table>_dead_letters).
    #[arg(long, value_name = "NAME", default_value = "events")]
    table: String,
    /// A Prometheus /metrics URL of a consumer or the collector (repeat for each process).
    #[arg(long = "metrics", value_name = "URL")]
    metrics: Vec<String>,
    /// Where to listen. Loopback by default: the dashboard has no login.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// How often the page refreshes and the answers are recomputed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1000..=600_000))]
    refresh_ms: u64,
    /// How often the top titles of the day (a read of the whole day's plays) are recomputed, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    day_refresh_ms: u64,
    /// How often the /metrics URLs are scraped, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    scrape_ms: u64,
    /// The page's title (a stream or an environment name).
    #[arg(long, value_name = "TEXT", default_value = "ktk")]
    title: String,
}

/// Builds the dashboard of `args` (no connection is opened yet). Must be called within a Tokio
/// runtime.
pub fn dashboard(args: &DashboardArgs) -> Result<std::sync::Arc<Dashboard>, String> {
    let store = Store::connect_lazy(&args.store, &args.table).map_err(|e| e.to_string())?;
    for url in &args.metrics {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--metrics {url}: expected an http:// or https:// URL"));
        }
    }
    let interval = Duration::from_millis(args.scrape_ms);
    // An hour of history at any interval.
    let history = (3_600_000 / args.scrape_ms.max(1)) as usize + 1;
    let metrics = Metrics::new(ScrapeConfig { targets: args.metrics.clone(), interval, history });
    let config = DashboardConfig {
        refresh: Duration::from_millis(args.refresh_ms),
        title: args.title.clone(),
        day_refresh: Duration::from_millis(args.day_refresh_ms),
    };
    Ok(Dashboard::new(store, metrics, config))
}

pub fn main(args: DashboardArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ktk dashboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // The pool is built inside the runtime (it starts its maintenance task there).
        let dashboard = match dashboard(&args) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ktk dashboard: {e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = dashboard.store().ping().await {
            // Served anyway: the page says the store is down until it is back.
            eprintln!("ktk dashboard: warning: {e}");
        }
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ktk dashboard: cannot listen on {}: {e}", args.listen);
                return ExitCode::from(2);
            }
        };
        let address = listener.local_addr().map_or_else(|_| args.listen.to_string(), |a| a.to_string());
        eprintln!(
            "ktk dashboard: http://{address}/ (store {}, table {}, {} metrics source(s)); Ctrl-C stops it",
            dashboard.store().target(),
            args.table,
            args.metrics.len()
        );
        let shutdown = async {
            let _ = shutdown_signal().await;
        };
        match dashboard.clone().serve(listener, shutdown).await {
            Ok(()) => {
                dashboard.store().close().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ktk dashboard: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
