//! A `collector` process for the tests: started with a stream and write keys, posted to,
//! scraped, stopped.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::child_aws_env;
use crate::consumer_support::{consumer_binary, free_port};

/// Longest any step waits.
const BOUND: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A running `collector` binary, killed when dropped.
#[derive(Debug)]
pub struct CollectorProcess {
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`: the Event API.
    pub public: String,
    /// `http://127.0.0.1:<port>`: `/health` and `/metrics`.
    pub admin: String,
    /// A client with the tests' timeout.
    pub http: reqwest::Client,
}

impl CollectorProcess {
    pub async fn start(stream: &str, keys: (&str, String), reload_secs: u64) -> Self {
        let binary = consumer_binary().with_file_name("collector");
        assert!(binary.exists(), "{} is missing: run `cargo build -p ktk-producer`", binary.display());
        let mut command = tokio::process::Command::new(&binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KTK_") {
                command.env_remove(name);
            }
        }
        let (port, admin_port) = (free_port(), free_port());
        let child = command
            .env("KTK_STREAM", stream)
            .env("KTK_LISTEN", format!("127.0.0.1:{port}"))
            .env("KTK_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env(keys.0, keys.1)
            .env("KTK_KEYS_RELOAD_SECS", reload_secs.to_string())
            .env("KTK_RECORD_MAX_BUFFERED_MS", "20")
            .envs(child_aws_env())
            .kill_on_drop(true)
            .spawn()
            .expect("start the collector");
        let collector = CollectorProcess {
            child,
            public: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            http: reqwest::Client::builder().timeout(BOUND).build().expect("client"),
        };
        let started = Instant::now();
        while collector.http.get(format!("{}/health", collector.admin)).send().await.is_err()
            || collector.http.get(format!("{}/health", collector.public)).send().await.is_err()
        {
            assert!(started.elapsed() < BOUND, "the collector never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        collector
    }

    /// Posts one event with `key` (none: no key); the status.
    pub async fn post(&self, key: Option<&str>, id: &str) -> u16 {
        let body = json!({"events": [{"eventId": id, "type": "EVENT_TYPE_PAGE_VIEW", "deviceId": "d-1",
                                       "occurredAtMs": now_ms(), "appId": "spoofed"}]});
        let mut request = self.http.post(format!("{}/v1/events?wait=acked", self.public)).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.expect("an answer").status().as_u16()
    }

    /// Waits until posting with `key` answers `status`.
    pub async fn until(&self, key: &str, status: u16, id: &str) {
        let started = Instant::now();
        loop {
            let got = self.post(Some(key), id).await;
            if got == status {
                return;
            }
            assert!(started.elapsed() < BOUND, "{key:.6}...: still {got}, not {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.expect("an answer").text().await.expect("text")
    }

    pub async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
        assert!(killed.success());
        let status = tokio::time::timeout(BOUND, self.child.wait()).await.expect("exits in time").expect("status");
        assert_eq!(status.code(), Some(0));
    }
}

impl CollectorProcess {
    /// Posts a batch (`{"events": [...]}`, proto3 JSON) with `key`, waiting for Kinesis to
    /// acknowledge it; the status and the answer.
    pub async fn post_batch(&self, key: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/v1/events?wait=acked", self.public))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("an answer");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// The `/metrics` URL.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.admin)
    }
}
