//! The demo's dashboard: `ktk-dashboard` served in the demo's own process over its table and the
//! `/metrics` of its collector and consumers, and a screenshot of it taken with headless Chromium
//! at the end of the traffic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ktk_dashboard::{Dashboard, DashboardConfig, Metrics, ScrapeConfig, Store};

/// How often the demo's dashboard scrapes and refreshes.
const REFRESH: Duration = Duration::from_secs(2);
/// The longest Chromium may take for the screenshot.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The browser window: wide enough for three columns of cards, tall enough for the whole page.
const WINDOW: &str = "1440,3200";

/// The dashboard served during a run.
#[derive(Debug)]
pub struct DemoDashboard {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl DemoDashboard {
    /// Serves the dashboard on 127.0.0.1:`port` (0: any free port).
    pub async fn start(
        postgres_url: &str,
        table: &str,
        metrics: Vec<String>,
        port: u16,
        title: &str,
    ) -> Result<Self, String> {
        let store = Store::connect_lazy(postgres_url, table).map_err(|e| e.to_string())?;
        let metrics = Metrics::new(ScrapeConfig { targets: metrics, interval: REFRESH, history: 3600 });
        let config = DashboardConfig { refresh: REFRESH, title: title.to_owned(), day_refresh: REFRESH };
        let dashboard = Dashboard::new(store, metrics, config);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("the dashboard cannot listen on 127.0.0.1:{port}: {e}"))?;
        let address = listener.local_addr().map_err(|e| format!("the dashboard's address: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&dashboard).serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(DemoDashboard { url: format!("http://{address}/"), stop: Some(stop), task })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A full-page screenshot of the dashboard over its last 15 minutes, by headless Chromium
    /// (`$KTK_CHROMIUM`, else /usr/bin/chromium, else `chromium` on the PATH), into `file`.
    pub async fn screenshot(&self, file: &Path) -> Result<(), String> {
        let chromium = chromium().ok_or_else(|| {
            "no Chromium found (set KTK_CHROMIUM, or run dashboard/web/scripts/setup.sh --browser, which installs \
             Debian's chromium)"
                .to_owned()
        })?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(file);
        let profile = std::env::temp_dir().join(format!("ktk-demo-chromium-{}", std::process::id()));
        let mut command = tokio::process::Command::new(&chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={WINDOW}"))
            // Virtual time runs the page's requests and timers to completion before the picture.
            .arg("--virtual-time-budget=15000")
            .arg(format!("--screenshot={}", file.display()))
            .arg(format!("{}#range=900", self.url))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let status = tokio::time::timeout(SCREENSHOT_TIMEOUT, command.status()).await;
        let _ = std::fs::remove_dir_all(&profile);
        match status {
            Err(_) => Err(format!("{} took longer than {SCREENSHOT_TIMEOUT:?}", chromium.display())),
            Ok(Err(e)) => Err(format!("cannot run {}: {e}", chromium.display())),
            Ok(Ok(status)) if !status.success() => Err(format!("{} failed ({status})", chromium.display())),
            Ok(Ok(_)) if !file.is_file() => Err(format!("{} wrote no {}", chromium.display(), file.display())),
            Ok(Ok(_)) => Ok(()),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KTK_CHROMIUM").map(PathBuf::from) {
        return path.is_file().then_some(path);
    }
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .flat_map(|dir| ["chromium", "chromium-browser", "google-chrome"].map(|name| Path::new(dir).join(name)))
        .find(|p| p.is_file())
}
