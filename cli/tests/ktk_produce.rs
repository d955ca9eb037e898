//! Runs the real `ktk produce` against LocalStack: records piped in come back from the stream's
//! shards exactly once, the summary adds up, and bad input or a missing stream gives the
//! documented exit status. LocalStack must be running (`localstack/up.sh`): these tests fail,
//! never skip, without it.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use ktk_tests::{create_stream, delete_stream, kinesis, read_stream, unique_name};
use serde_json::Value;

const SHARDS: i32 = 2;
const RECORDS: usize = 5_000;
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `ktk produce ARGS` with `stdin` piped in (from a thread, so a full pipe cannot block us).
async fn ktk_produce(args: &[&str], stdin: Vec<u8>) -> Output {
    let args: Vec<String> = ["produce"].iter().chain(args).map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ktk"))
            .args(&args)
            .envs(ktk_tests::child_aws_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ktk starts");
        let mut input = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || input.write_all(&stdin));
        let output = child.wait_with_output().expect("ktk runs");
        writer.join().expect("writer thread").expect("write stdin");
        output
    })
    .await
    .expect("ktk task")
}

fn summary(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "one summary line on stdout: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("summary is JSON ({e}): {stdout}"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every user record in the stream, deaggregated (`ktk_tests::read_stream`: GetRecords on every
/// shard from the trim horizon, then the KPL deaggregator): (partition key, data). Each must be on
/// the shard its hash key belongs to.
async fn read_back(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, Bytes)> {
    let records = read_stream(client, stream).await;
    let misplaced: Vec<_> = records.iter().filter(|r| !r.in_shard_range).map(|r| &r.partition_key).collect();
    assert!(misplaced.is_empty(), "records outside their shard's hash range: {misplaced:?}");
    records.into_iter().map(|r| (r.partition_key, r.data)).collect()
}

/// Creates a fresh stream, runs `test` on it, and deletes it whatever happened.
async fn with_stream<F: Future<Output = ()> + Send + 'static>(
    prefix: &str,
    test: impl FnOnce(aws_sdk_kinesis::Client, String) -> F,
) {
    let client = kinesis().await;
    let stream = unique_name(prefix);
    create_stream(&client, &stream, SHARDS).await;
    let result = tokio::spawn(tokio::time::timeout(TEST_TIMEOUT, test(client.clone(), stream.clone()))).await;
    delete_stream(&client, &stream).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
    }
}

fn assert_clean_summary(summary: &Value, records: usize) {
    assert_eq!(summary["lines"], records as u64, "{summary}");
    assert_eq!(summary["user_records"], records as u64, "{summary}");
    assert_eq!(summary["malformed_lines"], 0, "{summary}");
    assert_eq!(summary["failures"], 0, "{summary}");
    assert_eq!(summary["expired"], 0, "{summary}");
    let kinesis_records = summary["kinesis_records"].as_u64().expect("kinesis_records");
    assert!(kinesis_records > 0 && kinesis_records < records as u64, "records were aggregated: {summary}");
    assert!(summary["put_records_calls"].as_u64().expect("calls") >= 1, "{summary}");
    assert!(summary["user_records_per_kinesis_record"].as_f64().expect("ratio") > 1.0, "{summary}");
    assert!(summary["elapsed_seconds"].as_f64().expect("elapsed") > 0.0, "{summary}");
    assert!(summary["user_records_per_second"].as_f64().expect("rate") > 0.0, "{summary}");
    // The adaptive concurrency over the run: it starts at MaxConnections (24).
    let first = &summary["concurrency"][0];
    assert_eq!((first["t"].as_f64(), first["limit"].as_u64()), (Some(0.0), Some(24)), "{summary}");
    assert_eq!(first["request_timeout_ms"], 6_000, "{summary}");
    let limit = summary["concurrency_limit"].as_u64().expect("concurrency_limit");
    assert!((1..=24).contains(&limit), "{summary}");
    assert_eq!(summary["concurrency_limit_highest"], 24, "{summary}");
    assert!(
        summary["timed_out_calls"].is_u64()
            && summary["late_answers"].is_u64()
            && summary["abandoned_calls"].is_u64()
            && summary["resent_after_timeout"].is_u64(),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_are_put_aggregated_and_read_back_exactly_once() {
    with_stream("ktk-produce-json", |client, stream| async move {
        let mut expected = HashMap::new();
        let mut input = String::new();
        for i in 0..RECORDS {
            let id = format!("rec-{i:05}");
            let key = format!("user-{}", i % 97);
            let mut data = id.clone().into_bytes();
            data.resize(20 + (i * 31) % 300, b'.');
            input += &format!("{{\"partition_key\":\"{key}\",\"data\":\"{}\"}}\n", STANDARD.encode(&data));
            expected.insert(id, key);
        }
        let output = ktk_produce(&["--stream", &stream, "--summary-json"], input.into_bytes()).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_clean_summary(&summary(&output), RECORDS);
        assert!(stderr(&output).contains("5000 user records put"), "{}", stderr(&output));
        assert!(stderr(&output).contains("PutRecords calls in flight: at most"), "{}", stderr(&output));

        let mut seen: HashMap<String, usize> = HashMap::new();
        for (key, data) in read_back(&client, &stream).await {
            let id = String::from_utf8_lossy(&data).trim_end_matches('.').to_owned();
            assert_eq!(expected.get(&id), Some(&key), "record {id} with key {key}");
            *seen.entry(id).or_default() += 1;
        }
        assert_eq!(seen.len(), RECORDS, "every record arrives");
        let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
        assert!(duplicates.is_empty(), "records seen more than once: {duplicates:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_are_keyed_by_their_field_and_read_back_exactly_once() {
    with_stream("ktk-produce-lines", |client, stream| async move {
        // Lines keyed by a string field, by a number field, and lines without one (random keys).
        let mut expected: HashMap<String, Option<String>> = HashMap::new();
        let mut input = String::new();
        for i in 0..RECORDS {
            let (line, key) = match i % 10 {
                0 => (format!("plain text line {i}"), None),
                1 => (format!(r#"{{"seq": {i}, "user_id": {}}}"#, i % 7), Some((i % 7).to_string())),
                2 => (format!(r#"{{"seq": {i}, "other": "no key here"}}"#), None),
                _ => (
                    format!(r#"{{"user_id": "u-{}", "seq": {i}, "n": [1, 2]}}"#, i % 50),
                    Some(format!("u-{}", i % 50)),
                ),
            };
            input += &line;
            input += if i % 3 == 0 { "\r\n" } else { "\n" };
            expected.insert(line, key);
        }
        let args = ["--stream", &stream, "--lines", "--key-field", "user_id", "--summary-json"];
        let output = ktk_produce(&args, input.into_bytes()).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_clean_summary(&summary(&output), RECORDS);

        let mut seen: HashMap<String, usize> = HashMap::new();
        for (key, data) in read_back(&client, &stream).await {
            let line = String::from_utf8(data.to_vec()).expect("the line's bytes, terminator stripped");
            match expected.get(&line) {
                Some(Some(want)) => assert_eq!(&key, want, "{line}"),
                Some(None) => {
                    let uuid = uuid::Uuid::parse_str(&key).unwrap_or_else(|_| panic!("random key for {line}: {key}"));
                    assert_eq!(uuid.get_version_num(), 4);
                }
                None => panic!("unexpected record {line:?}"),
            }
            *seen.entry(line).or_default() += 1;
        }
        assert_eq!(seen.len(), RECORDS, "every line arrives");
        assert!(seen.values().all(|n| *n == 1), "a line arrived more than once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_fail_the_run_but_the_other_records_are_put() {
    with_stream("ktk-produce-bad", |client, stream| async move {
        let good =
            |i: usize| format!("{{\"partition_key\":\"k{i}\",\"data\":\"{}\"}}", STANDARD.encode(format!("ok-{i}")));
        let mut lines: Vec<String> = (0..200).map(good).collect();
        // Line 3: not JSON. Line 7: well formed, but larger than a Kinesis record may be, so the
        // producer refuses it.
        lines.insert(2, "{oops".into());
        let too_large = STANDARD.encode(vec![b'x'; 1024 * 1024 + 1]);
        lines.insert(6, format!("{{\"partition_key\":\"big\",\"data\":\"{too_large}\"}}"));
        let output = ktk_produce(&["--stream", &stream, "--summary-json"], lines.join("\n").into_bytes()).await;
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let err = stderr(&output);
        assert!(err.contains("line 3: not a user record object"), "{err}");
        assert!(err.contains("line 7: not put: record of"), "{err}");
        let summary = summary(&output);
        assert_eq!(
            (summary["malformed_lines"].as_u64(), summary["failures"].as_u64()),
            (Some(1), Some(1)),
            "{summary}"
        );
        assert_eq!(summary["user_records"], 200, "{summary}");

        let mut got: Vec<String> = read_back(&client, &stream)
            .await
            .into_iter()
            .map(|(_, d)| String::from_utf8_lossy(&d).into_owned())
            .collect();
        got.sort();
        let mut want: Vec<String> = (0..200).map(|i| format!("ok-{i}")).collect();
        want.sort();
        assert_eq!(got, want);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_usage_error_that_names_it() {
    // Make sure LocalStack answers, so the failure below is about the stream.
    let _client = kinesis().await;
    let stream = unique_name("ktk-produce-missing");
    let output = ktk_produce(&["--stream", &stream], b"{\"partition_key\":\"k\",\"data\":\"eA==\"}\n".to_vec()).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains(&format!("cannot use stream \"{stream}\"")), "{err}");
    assert!(err.contains("ResourceNotFound"), "{err}");
}

#[tokio::test]
async fn bad_options_are_usage_errors() {
    for args in [&["--stream", "s", "--key-field", "id"][..], &["--stream", "s", "--rate-limit", "0"], &["--lines"]] {
        let output = ktk_produce(args, Vec::new()).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
    }
    let output = ktk_produce(&["--stream", "s", "--rate-limit", "0"], Vec::new()).await;
    assert!(stderr(&output).contains("rate_limit_percent"), "{}", stderr(&output));
}
