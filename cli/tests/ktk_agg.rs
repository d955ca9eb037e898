//! Runs the real `ktk` binary: exit codes, stderr line numbers, and the sample file round trip.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn ktk(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ktk"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ktk starts");
    child.stdin.take().expect("stdin").write_all(stdin).expect("write stdin");
    child.wait_with_output().expect("ktk runs")
}

const SAMPLE: &str = include_str!("../../examples/user-records.jsonl");

#[test]
fn sample_file_round_trips_through_encode_and_decode() {
    let encoded = ktk(&["agg", "encode"], SAMPLE.as_bytes());
    assert!(encoded.status.success(), "{}", String::from_utf8_lossy(&encoded.stderr));
    let kinesis_lines = String::from_utf8(encoded.stdout.clone()).expect("utf8");
    // 300 records of ~300 bytes: several 51,200-byte aggregates.
    assert!(kinesis_lines.lines().count() >= 2, "{kinesis_lines}");

    let decoded = ktk(&["agg", "decode"], &encoded.stdout);
    assert!(decoded.status.success(), "{}", String::from_utf8_lossy(&decoded.stderr));
    let out: Vec<serde_json::Value> = String::from_utf8(decoded.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let input: Vec<serde_json::Value> = SAMPLE.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(out.len(), input.len());
    for (got, want) in out.iter().zip(&input) {
        assert_eq!(got["partition_key"], want["partition_key"]);
        assert_eq!(got["data"], want["data"]);
        assert_eq!(got["aggregated"], true);
    }
}

#[test]
fn malformed_lines_fail_the_run_but_not_the_other_lines() {
    let input = b"{\"partition_key\":\"a\",\"data\":\"eA==\"}\nnot json\n{\"partition_key\":\"b\",\"data\":\"eQ==\"}\n";
    let out = ktk(&["agg", "encode"], input);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: "), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.contains("\"user_records\":2"), "{stdout}");
}

#[test]
fn bad_settings_are_usage_errors() {
    let out = ktk(&["agg", "encode", "--max-size", "10"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max aggregate size 10"));
}
