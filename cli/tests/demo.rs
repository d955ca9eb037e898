//! Runs the real `ktk demo`, short (8 s at 200 events/s), against LocalStack and PostgreSQL with
//! the `collector` and `consumer` binaries of the same target directory, and checks its exit
//! status and its report: nothing lost, the counts add up, S3 and the store agree, every poison
//! record became a dead letter, every injected duplicate was dropped, and the run cleaned up after
//! itself. LocalStack (`localstack/up.sh`) and PostgreSQL (`localstack/databases.sh`) must be
//! running: without them the test fails, it never skips.
//!
//! `cargo test --workspace` builds `collector` and `consumer` next to `ktk` (their packages' own
//! tests need them); run alone (`cargo test -p ktk-cli --test demo`), the test builds them when
//! they are missing. Binaries already there are used as they are.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ktk_tests::{child_aws_env, kinesis};
use tokio::process::Command;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Far more than the run takes (about 15 s): a guard, not a measurement.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// Makes sure `collector` and `consumer` are next to `ktk`, building them if not.
fn sibling_binaries() {
    let dir = Path::new(env!("CARGO_BIN_EXE_ktk")).parent().expect("ktk is in a directory").to_path_buf();
    let missing = |dir: &Path| -> Vec<PathBuf> {
        ["collector", "consumer"]
            .iter()
            .map(|name| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX)))
            .filter(|path| !path.is_file())
            .collect()
    };
    if missing(&dir).is_empty() {
        return;
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let target = dir.parent().expect("the profile directory is in the target directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "-p", "ktk-producer", "--bin", "collector", "-p", "ktk-ecs", "--bin", "consumer"])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == "release" {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building collector and consumer failed ({status})");
    let still = missing(&dir);
    assert!(
        still.is_empty(),
        "{still:?} missing after the build: build them into {} (cargo build -p ktk-producer --bin collector \
         -p ktk-ecs --bin consumer)",
        dir.display()
    );
}

async fn postgres() -> sqlx::PgPool {
    let url = database_url();
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url}: {e}. Start it with `localstack/databases.sh` (or set \
                 DATABASE_URL); this test never skips."
            )
        })
}

/// The whole numbers in a line, commas removed ("sent 1,623 = delivered 1,598" gives 1623, 1598).
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !(c.is_ascii_digit() || c == ','))
        .map(|token| token.replace(',', ""))
        .filter(|token| !token.is_empty())
        .filter_map(|token| token.parse().ok())
        .collect()
}

/// The number right after `word` in `text`.
fn number_after(text: &str, word: &str) -> u64 {
    let rest = text.split_once(word).map(|(_, rest)| rest).unwrap_or_else(|| panic!("no {word:?} in {text:?}"));
    numbers(rest).first().copied().unwrap_or_else(|| panic!("no number after {word:?} in {text:?}"))
}

/// The text after a report label ("  lost           0 (...)" gives "0 (...)").
fn field<'a>(report: &'a str, label: &str) -> &'a str {
    report
        .lines()
        .find_map(|line| line.strip_prefix("  ").and_then(|l| l.strip_prefix(label)).filter(|r| r.starts_with(' ')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label:?} line in the output:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_delivers_every_accepted_event_exactly_once_and_reports_it() {
    let kinesis = kinesis().await;
    let pool = postgres().await;
    sibling_binaries();

    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_ktk"))
        .args(["demo", "--duration", "8s", "--rate", "200", "--postgres-url", &database_url()])
        .envs(child_aws_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ktk starts");
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ktk demo did not finish within {RUN_TIMEOUT:?}"))
        .expect("ktk runs");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("{stdout}");
    eprintln!("{stderr}");
    println!("ktk demo took {took:?}");
    assert!(output.status.success(), "ktk demo failed ({}):\n{stdout}\n{stderr}", output.status);

    // Live progress: a line a second while sending, then while draining.
    let progress: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(progress.iter().filter(|l| l.contains("sending")).count() >= 5, "progress lines:\n{stdout}");
    assert!(progress.iter().all(|l| l.contains("delivered") && l.contains("dead letters")), "{progress:?}");

    let report = stdout.split("ktk demo report").nth(1).unwrap_or_else(|| panic!("no report:\n{stdout}"));
    assert!(field(report, "result").starts_with("OK"), "{report}");
    assert_eq!(numbers(field(report, "lost")).first(), Some(&0), "nothing lost:\n{report}");

    // sent = delivered + duplicates + rejected + lost, with lost 0.
    let accounting = numbers(field(report, "accounting"));
    let [sent, delivered, duplicates, rejected, lost] = accounting[..] else {
        panic!("accounting line: {accounting:?}\n{report}")
    };
    assert_eq!(sent, delivered + duplicates + rejected + lost, "{report}");
    assert_eq!(lost, 0);
    assert!(sent >= 1_500, "8 s at 200 events/s sends about 1,600 events: {sent}");
    assert_eq!(numbers(field(report, "delivered")).first(), Some(&delivered), "the store's count: {report}");
    let accepted = numbers(field(report, "accepted"));
    assert_eq!(accepted.first().copied(), Some(delivered + duplicates), "accepted = delivered + duplicates: {report}");
    assert_eq!(accepted.get(1).copied(), Some(delivered), "accepted unique = delivered: {report}");
    assert!(rejected > 0, "malformed events are sent and refused: {report}");
    assert!(field(report, "rejected").contains("each malformed on purpose"), "{report}");

    // Duplicates: injected through the collector, all dropped by the consumers as resent (records
    // read again after a lease hand-off are counted apart, as re-read).
    let duplicate_counts = numbers(field(report, "duplicates"));
    let [injected, .., dropped, resent, reread] = duplicate_counts[..] else {
        panic!("duplicates line: {duplicate_counts:?}\n{report}")
    };
    assert_eq!(injected, duplicates);
    assert!(injected > 0, "duplicates are injected: {report}");
    assert_eq!(dropped, resent + reread, "dropped = resent + re-read: {report}");
    assert!(resent >= injected, "every injected duplicate dropped as resent: {report}");

    // Dead letters: every poison record, in both sinks.
    let dead = field(report, "dead letters");
    let (of, poison) = (numbers(dead)[0], numbers(dead)[1]);
    assert!(poison > 0 && of == poison, "every poison record a dead letter: {report}");
    assert_eq!(number_after(dead, "PostgreSQL "), poison, "{report}");
    assert_eq!(number_after(dead, "S3 "), poison, "{report}");

    // S3 holds the same events as the store; the store answered the top titles and platforms.
    assert!(field(report, "S3").contains("the same as the store"), "{report}");
    assert!(field(report, "top titles").starts_with("1. "), "{report}");
    assert!(field(report, "platforms").contains("events from"), "{report}");
    assert!(field(report, "processes").contains("exit status 0"), "{report}");

    // Cleaned up: the stream is gone (or going) and the table dropped.
    let header = stdout.split("ktk demo report").next().unwrap_or_default();
    let stream = field(header, "stream").split_whitespace().next().expect("stream name").to_owned();
    let table = field(header, "PostgreSQL").rsplit("table ").next().expect("table name").trim().to_owned();
    match kinesis.describe_stream_summary().stream_name(&stream).send().await {
        Err(_) => {}
        Ok(summary) => {
            let status = summary.stream_description_summary().map(|s| s.stream_status().clone());
            assert_eq!(status, Some(aws_sdk_kinesis::types::StreamStatus::Deleting), "stream {stream} left behind");
        }
    }
    let table_left: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("\"{table}\""))
        .fetch_one(&pool)
        .await
        .expect("look the table up");
    assert!(!table_left, "table {table} left behind");
}
