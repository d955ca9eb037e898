//! Running the `consumer` binary (the ECS task) from tests: start it with the test's settings,
//! read its `/health` and `/metrics`, stop it with SIGTERM or SIGKILL, and how much memory it
//! used.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// PostgreSQL as the machines running the tests have it (`DATABASE_URL` overrides).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// The `consumer` binary of ktk-ecs, built by `cargo test --workspace` next to the running
/// test's own executable.
pub fn consumer_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let binary = dir.join("consumer");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p ktk-ecs --bin consumer` first)",
        binary.display()
    );
    binary
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
}

/// Settings for one consumer process, with the fast lease timings of the tests and a 2 s batch
/// window; `env` adds or overrides `KTK_*` variables.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub application: String,
    pub worker: String,
    pub bucket: String,
    pub prefix: String,
    pub table: String,
    pub database_url: String,
    pub env: Vec<(String, String)>,
}

impl ConsumerSpec {
    pub fn new(stream: &str, application: &str, worker: &str, bucket: &str, prefix: &str, table: &str) -> Self {
        ConsumerSpec {
            stream: stream.to_owned(),
            application: application.to_owned(),
            worker: worker.to_owned(),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            table: table.to_owned(),
            database_url: database_url(),
            env: Vec::new(),
        }
    }

    pub fn with_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }
}

/// A running `consumer` process.
#[derive(Debug)]
pub struct ConsumerProcess {
    pub child: Child,
    pub port: u16,
    pub name: String,
}

impl ConsumerProcess {
    pub fn spawn(spec: &ConsumerSpec) -> Self {
        Self::spawn_with_output(spec, Stdio::null(), Stdio::inherit())
    }

    /// [`spawn`](Self::spawn) with the child's standard output and error given.
    pub fn spawn_with_output(spec: &ConsumerSpec, stdout: Stdio, stderr: Stdio) -> Self {
        let port = free_port();
        let mut command = Command::new(consumer_binary());
        // Exactly the settings below: the consumer refuses `KTK_*` variables it does not know.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KTK_") {
                command.env_remove(name);
            }
        }
        let child = command
            .env("KTK_STREAM", &spec.stream)
            .env("KTK_APPLICATION", &spec.application)
            .env("KTK_WORKER_ID", &spec.worker)
            .env("KTK_S3_BUCKET", &spec.bucket)
            .env("KTK_S3_PREFIX", &spec.prefix)
            .env("KTK_S3_PATH_STYLE", "true")
            .env("KTK_POSTGRES_URL", &spec.database_url)
            .env("KTK_STORE_TABLE", &spec.table)
            .env("KTK_BATCH_WINDOW_MS", "2000")
            // A window closes 1.5 s after its end: on a loaded 2-core machine a record stamped
            // inside a window can become readable well after the window ends, and a live
            // consumer that closed the window already would cut it into a batch of its own.
            .env("KTK_BATCH_GRACE_MS", "1500")
            .env("KTK_FAILOVER_MS", "3000")
            .env("KTK_RENEW_MS", "1000")
            .env("KTK_TAKING_MS", "2000")
            .env("KTK_DISCOVERY_MS", "250")
            .env("KTK_SHARD_SYNC_MS", "5000")
            .env("KTK_PARENT_POLL_MS", "500")
            .env("KTK_IDLE_MS", "300")
            .env("KTK_LISTEN", format!("127.0.0.1:{port}"))
            .env("KTK_LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(crate::child_aws_env())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start consumer");
        ConsumerProcess { child, port, name: spec.worker.clone() }
    }

    /// `/health` as JSON, or `None` while the process does not answer.
    pub async fn health(&self) -> Option<serde_json::Value> {
        let response = reqwest::get(format!("http://127.0.0.1:{}/health", self.port)).await.ok()?;
        response.json().await.ok()
    }

    /// A number from `/health` (0 while it does not answer).
    pub async fn health_count(&self, field: &str) -> u64 {
        self.health().await.and_then(|h| h[field].as_u64()).unwrap_or(0)
    }

    /// The sum of the Prometheus samples of `metric` whose labels contain every `labels` pair.
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let text = reqwest::get(url).await.expect("GET /metrics").text().await.expect("metrics text");
        sum_samples(&text, metric, labels)
    }

    /// Peak resident memory (`VmHWM`) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = Command::new("kill").args([signal, &pid]).status().await.expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGTERM, then the exit status (asserted 0 within `within`).
    pub async fn stop(mut self, within: Duration) {
        self.signal("-TERM").await;
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {within:?} of SIGTERM", self.name))
            .expect("status");
        assert!(status.success(), "{} exits 0 on SIGTERM: {status:?}", self.name);
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(mut self) {
        self.signal("-KILL").await;
        let _ = self.child.wait().await;
    }
}

/// Sums the samples of a Prometheus text exposition that match.
pub fn sum_samples(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (name_labels, value) = line.rsplit_once(' ')?;
            let (name, label_text) = match name_labels.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (name_labels, ""),
            };
            if name != metric {
                return None;
            }
            let all = labels.iter().all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            if all { value.parse::<f64>().ok() } else { None }
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

#[cfg(test)]
mod tests {
    use super::sum_samples;

    #[test]
    fn sums_only_the_matching_samples() {
        let text = "# TYPE S3Objects counter\nS3Objects{bucket=\"b\",outcome=\"created\"} 3\n\
                    S3Objects{bucket=\"b\",outcome=\"identical\"} 5\nS3Objects{bucket=\"c\",outcome=\"identical\"} 2\n\
                    Other 7\n";
        assert_eq!(sum_samples(text, "S3Objects", &[("outcome", "identical")]), 7.0);
        assert_eq!(sum_samples(text, "S3Objects", &[("bucket", "b")]), 8.0);
        assert_eq!(sum_samples(text, "S3Objects", &[]), 10.0);
        assert_eq!(sum_samples(text, "Other", &[]), 7.0);
        assert_eq!(sum_samples(text, "Missing", &[]), 0.0);
    }
}
