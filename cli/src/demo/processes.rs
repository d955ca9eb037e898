//! The processes `ktk demo` runs (one `collector`, two `consumer`s): each on its own port with its
//! own log file, configured only by the variables the demo sets (any `KTK_*` of the demo's own
//! environment is removed, so a stray setting cannot change what the report means). Readiness,
//! health and metrics come over HTTP; a stop is SIGTERM (the graceful stop both binaries
//! implement), then SIGKILL if the process outlives its grace.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

/// How long one `/health` or `/metrics` call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running child process with an HTTP port.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Service {
    /// Starts `program` with exactly the `KTK_*` variables given (others of the environment, AWS
    /// settings included, are inherited); standard output and error go to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        vars: &[(String, String)],
        port: u16,
        log_dir: &Path,
    ) -> Result<Self, String> {
        let log = log_dir.join(format!("{name}.log"));
        let file = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let file_too = file.try_clone().map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KTK_") {
                command.env_remove(key);
            }
        }
        let child = command
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(file_too))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", program.display()))?;
        Ok(Service { name: name.to_owned(), port, log, child, status: None })
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until `GET /health` answers 200, the process ends, or `timeout` passes.
    pub async fn wait_ready(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited during start-up ({status})", self.name));
            }
            let url = format!("http://127.0.0.1:{}/health", self.port);
            if let Ok(response) = http.get(&url).timeout(PROBE_TIMEOUT).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not answer {url} within {} s", self.name, timeout.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits up to `grace` for the process to end; then kills it. Returns the
    /// exit status, and whether it had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.exited() {
            return (Some(status), false);
        }
        if let Some(pid) = self.child.id()
            && let Err(error) = terminate(pid)
        {
            eprintln!("ktk demo: cannot send SIGTERM to {} (pid {pid}): {error}", self.name);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.status = Some(status);
                (Some(status), false)
            }
            Ok(Err(_)) | Err(_) => {
                let _ = self.child.kill().await;
                self.status = self.child.try_wait().ok().flatten();
                (self.status, true)
            }
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

#[cfg(unix)]
fn terminate(pid: u32) -> io::Result<()> {
    use rustix::process::{Pid, Signal, kill_process};
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| io::Error::other("not a process id"))?;
    kill_process(pid, Signal::TERM).map_err(io::Error::from)
}

#[cfg(not(unix))]
fn terminate(_pid: u32) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no SIGTERM on this system"))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// `GET /health` of the process on `port`, as JSON (whatever its status code).
pub async fn health(http: &reqwest::Client, port: u16) -> Option<Value> {
    let response = http.get(format!("http://127.0.0.1:{port}/health")).timeout(PROBE_TIMEOUT).send().await.ok()?;
    response.json().await.ok()
}

/// `GET /metrics` of the process on `port` (Prometheus text).
pub async fn metrics(http: &reqwest::Client, port: u16) -> Option<String> {
    let response = http.get(format!("http://127.0.0.1:{port}/metrics")).timeout(PROBE_TIMEOUT).send().await.ok()?;
    response.text().await.ok()
}

/// The samples of metric `name` in a Prometheus text: (labels, value).
fn samples<'a>(text: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once('}')?,
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        Some((labels, value.split_whitespace().next()?.parse::<f64>().ok()?))
    })
}

/// The `MillisBehindLatest` gauges of a Prometheus text, by shard.
pub fn millis_behind(text: &str) -> BTreeMap<String, f64> {
    samples(text, "MillisBehindLatest")
        .map(|(labels, value)| {
            let shard = labels
                .split(',')
                .find_map(|pair| pair.trim().strip_prefix("shard=\""))
                .map(|s| s.trim_end_matches('"').to_owned())
                .unwrap_or_default();
            (shard, value)
        })
        .collect()
}

/// The leases a consumer holds: the sum of its `CurrentLeases` gauges.
pub fn current_leases(text: &str) -> u64 {
    samples(text, "CurrentLeases").map(|(_, value)| value.max(0.0) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_behind_is_read_per_shard() {
        let text = "# TYPE MillisBehindLatest gauge\n\
                    MillisBehindLatest{stream=\"s\",shard=\"shardId-000000000000\"} 1200\n\
                    MillisBehindLatest{stream=\"s\",shard=\"shardId-000000000001\"} 0\n\
                    MillisBehindLatestX 5\n\
                    RecordsProcessed{stream=\"s\",shard=\"shardId-000000000000\"} 77\n";
        let behind = millis_behind(text);
        assert_eq!(behind.len(), 2, "{behind:?}");
        assert_eq!(behind.get("shardId-000000000000"), Some(&1200.0));
        assert_eq!(behind.get("shardId-000000000001"), Some(&0.0));
    }

    #[test]
    fn current_leases_are_summed() {
        let text = "CurrentLeases{stream=\"s\",worker=\"a\"} 2\nTotalLeases{stream=\"s\",worker=\"a\"} 4\n";
        assert_eq!(current_leases(text), 2);
        assert_eq!(current_leases("CurrentLeases 3\n"), 3);
        assert_eq!(current_leases(""), 0);
    }
}
