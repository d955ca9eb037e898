//! Runs the real `ktk tail` against LocalStack: every user record put (plain or in KPL aggregates)
//! is printed exactly once with its shard, sequence and sub-sequence numbers; `--events` decodes
//! events.v1; `--limit` stops early; across a split, the records of each partition key come out
//! in the order they were put, with or without `--follow`. LocalStack must be running
//! (`localstack/up.sh`): these tests fail, never skip, without it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Output, Stdio};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ktk_proto::aggregation::{Aggregator, AggregatorConfig, KinesisRecord, UserRecord};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::{create_stream, delete_stream, kinesis, unique_name, wait_stream_active};
use prost::Message as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest one `ktk tail` run may take before the test kills it and fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn spawn_ktk(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ktk"))
        .args(args)
        .envs(ktk_tests::child_aws_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ktk starts")
}

/// Runs `ktk ARGS` to its end (killed, and the test failed, after [`RUN_TIMEOUT`]).
async fn ktk(args: &[&str]) -> Output {
    match tokio::time::timeout(RUN_TIMEOUT, spawn_ktk(args).wait_with_output()).await {
        Ok(output) => output.expect("ktk runs"),
        // Dropping the child killed it.
        Err(_) => panic!("`ktk {}` did not finish within {RUN_TIMEOUT:?}", args.join(" ")),
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON lines on stdout, after checking that the run succeeded.
fn lines(output: &Output) -> Vec<Value> {
    assert!(output.status.success(), "ktk tail failed ({}): {}", output.status, stderr(output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// Creates a fresh stream, runs `test` on it, and deletes it whatever happened.
async fn with_stream<F: Future<Output = ()> + Send + 'static>(
    prefix: &str,
    shards: i32,
    test: impl FnOnce(aws_sdk_kinesis::Client, String) -> F,
) {
    let client = kinesis().await;
    let stream = unique_name(prefix);
    create_stream(&client, &stream, shards).await;
    let result = tokio::spawn(tokio::time::timeout(TEST_TIMEOUT, test(client.clone(), stream.clone()))).await;
    delete_stream(&client, &stream).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
    }
}

/// A user record as `ktk tail` should print it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expected {
    shard: String,
    sequence_number: String,
    sub_sequence_number: u64,
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Vec<u8>,
    aggregated: bool,
}

impl Expected {
    fn from_line(line: &Value) -> Expected {
        let text = |field: &str| line[field].as_str().unwrap_or_else(|| panic!("{field} in {line}")).to_owned();
        Expected {
            shard: text("shard"),
            sequence_number: text("sequence_number"),
            sub_sequence_number: line["sub_sequence_number"].as_u64().expect("sub_sequence_number"),
            partition_key: text("partition_key"),
            explicit_hash_key: line.get("explicit_hash_key").map(|_| text("explicit_hash_key")),
            data: STANDARD.decode(text("data")).expect("base64 data"),
            aggregated: line["aggregated"].as_bool().expect("aggregated"),
        }
    }
}

/// Puts one Kinesis record; returns where it went (shard, sequence number).
async fn put(client: &aws_sdk_kinesis::Client, stream: &str, record: &KinesisRecord) -> (String, String) {
    let output = client
        .put_record()
        .stream_name(stream)
        .partition_key(&record.partition_key)
        .set_explicit_hash_key(record.explicit_hash_key.clone())
        .data(Blob::new(record.data.to_vec()))
        .send()
        .await
        .expect("put record");
    (output.shard_id().to_owned(), output.sequence_number().to_owned())
}

/// Puts `records` as one KPL aggregate (or a plain record if there is one); returns what `ktk
/// tail` should print for them.
async fn put_user_records(client: &aws_sdk_kinesis::Client, stream: &str, records: Vec<UserRecord>) -> Vec<Expected> {
    let mut aggregator = Aggregator::new(AggregatorConfig::default());
    for record in &records {
        aggregator.try_add(record.clone()).expect("fits in one aggregate");
    }
    let kinesis_record = aggregator.finish().expect("records were added");
    let aggregated = kinesis_record.is_aggregated();
    let (shard, sequence_number) = put(client, stream, &kinesis_record).await;
    records
        .into_iter()
        .enumerate()
        .map(|(i, record)| Expected {
            shard: shard.clone(),
            sequence_number: sequence_number.clone(),
            sub_sequence_number: i as u64,
            partition_key: record.partition_key().to_owned(),
            // A plain record's explicit hash key only routes it; it is not stored with it.
            explicit_hash_key: if aggregated { record.explicit_hash_key().map(str::to_owned) } else { None },
            data: record.data().to_vec(),
            aggregated,
        })
        .collect()
}

fn user_record(key: &str, data: impl Into<Vec<u8>>) -> UserRecord {
    UserRecord::new(key, data.into()).expect("valid record")
}

/// Sequence numbers compare as numbers; without leading zeros, the longer is the larger.
fn sequence_key(line: &Value) -> (usize, String, u64) {
    let sequence = line["sequence_number"].as_str().expect("sequence_number");
    (sequence.len(), sequence.to_owned(), line["sub_sequence_number"].as_u64().expect("sub_sequence_number"))
}

/// Within each shard, lines come in stream order.
fn assert_shard_order(lines: &[Value]) {
    let mut last: HashMap<&str, (usize, String, u64)> = HashMap::new();
    for line in lines {
        let shard = line["shard"].as_str().expect("shard");
        let key = sequence_key(line);
        if let Some(previous) = last.get(shard) {
            assert!(*previous < key, "shard {shard} out of order: {previous:?} then {key:?}");
        }
        last.insert(shard, key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_printed_once_with_its_shard_and_position() {
    with_stream("ktk-tail-all", 3, |client, stream| async move {
        let mut expected = Vec::new();
        for i in 0..30 {
            // Plain records, keyed to land on every shard.
            let data = format!("plain-{i}");
            expected.extend(put_user_records(&client, &stream, vec![user_record(&format!("key-{i}"), data)]).await);
        }
        for i in 0..10 {
            // Aggregates of 1 to 40 user records with many keys (one with an explicit hash key).
            let mut records: Vec<UserRecord> = (0..(i * 4 + 1))
                .map(|j| {
                    user_record(&format!("agg-key-{}", (i * 7 + j) % 23), format!("agg-{i}-{j}").repeat(j % 5 + 1))
                })
                .collect();
            if i == 3 {
                let with_hash = records[1].clone().with_explicit_hash_key((u128::MAX / 3).to_string()).expect("valid");
                records[1] = with_hash;
            }
            expected.extend(put_user_records(&client, &stream, records).await);
        }
        let output = ktk(&["tail", "--stream", &stream, "--from", "trim-horizon"]).await;
        let lines = lines(&output);
        assert_shard_order(&lines);
        for line in &lines {
            assert!(line["approximate_arrival_ms"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000), "{line}");
        }
        let mut printed: Vec<Expected> = lines.iter().map(Expected::from_line).collect();
        printed.sort();
        expected.sort();
        assert_eq!(printed.len(), expected.len());
        assert_eq!(printed, expected);
        let shards: BTreeSet<&str> = printed.iter().map(|r| r.shard.as_str()).collect();
        assert_eq!(shards.len(), 3, "the records were spread over every shard: {shards:?}");
        assert!(printed.iter().any(|r| r.explicit_hash_key.is_some()), "an explicit hash key was printed");
        assert!(printed.iter().any(|r| r.aggregated) && printed.iter().any(|r| !r.aggregated));
    })
    .await;
}

fn event(i: usize) -> Event {
    Event {
        event_id: format!("event-{i}"),
        r#type: EventType::Play as i32,
        occurred_at_ms: 1_700_000_000_000 + i as i64,
        user_id: format!("user-{}", i % 3),
        device_id: "device-1".into(),
        platform: Platform::Roku as i32,
        attributes: [("rank".to_owned(), i.to_string())].into(),
        ..Event::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_decoded_and_other_data_is_kept_with_an_error() {
    with_stream("ktk-tail-events", 2, |client, stream| async move {
        let mut events = HashMap::new();
        for i in 0..5 {
            let e = event(i);
            put_user_records(&client, &stream, vec![user_record(&e.user_id, e.encode_to_vec())]).await;
            events.insert(e.event_id.clone(), e);
        }
        let aggregate: Vec<UserRecord> = (5..12)
            .map(|i| {
                let e = event(i);
                let record = user_record(&e.user_id, e.encode_to_vec());
                events.insert(e.event_id.clone(), e);
                record
            })
            .collect();
        put_user_records(&client, &stream, aggregate).await;
        // Not a protobuf message: 0xff starts a field with an invalid wire type.
        let garbage = vec![0xff, 0xff, 0xff];
        put_user_records(&client, &stream, vec![user_record("garbage", garbage.clone())]).await;

        let output = ktk(&["tail", "--stream", &stream, "--events"]).await;
        let lines = lines(&output);
        assert_eq!(lines.len(), events.len() + 1, "{lines:?}");
        let mut decoded = 0;
        for line in &lines {
            if line["partition_key"] == "garbage" {
                assert_eq!(line["data"], STANDARD.encode(&garbage), "{line}");
                assert!(line["error"].as_str().is_some_and(|e| e.contains("events.v1")), "{line}");
                assert!(line.get("event").is_none(), "{line}");
                continue;
            }
            assert!(line.get("data").is_none() && line.get("error").is_none(), "{line}");
            let id = line["event"]["eventId"].as_str().unwrap_or_else(|| panic!("eventId in {line}"));
            let expected = serde_json::to_value(&events[id]).expect("events serialize");
            assert_eq!(line["event"], expected);
            assert_eq!(line["event"]["type"], "EVENT_TYPE_PLAY");
            assert_eq!(
                line["event"]["occurredAtMs"],
                (1_700_000_000_000 + id[6..].parse::<i64>().expect("n")).to_string()
            );
            decoded += 1;
        }
        assert_eq!(decoded, events.len());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_stops_after_n_records() {
    with_stream("ktk-tail-limit", 2, |client, stream| async move {
        let records: Vec<UserRecord> = (0..40).map(|i| user_record(&format!("k{i}"), format!("r{i}"))).collect();
        put_user_records(&client, &stream, records).await;
        for i in 0..10 {
            put_user_records(&client, &stream, vec![user_record(&format!("p{i}"), format!("p{i}"))]).await;
        }
        let output = ktk(&["tail", "--stream", &stream, "--limit", "7"]).await;
        assert_eq!(lines(&output).len(), 7);
        let output = ktk(&["tail", "--stream", &stream, "--limit", "0"]).await;
        assert_eq!(lines(&output).len(), 0);
        let output = ktk(&["tail", "--stream", &stream, "--limit", "1000"]).await;
        assert_eq!(lines(&output).len(), 50);
    })
    .await;
}

/// Data that says which record it is: `<key>|<index>`.
fn numbered(key: &str, index: usize) -> Vec<u8> {
    format!("{key}|{index}").into_bytes()
}

fn key_and_index(line: &Value) -> (String, usize) {
    let data = STANDARD.decode(line["data"].as_str().expect("data")).expect("base64");
    let text = String::from_utf8(data).expect("UTF-8");
    let (key, index) = text.split_once('|').expect("numbered data");
    (key.to_owned(), index.parse().expect("index"))
}

/// Every `(key, index)` in `0..per_key` for each key printed exactly once, and each key's
/// indices in increasing order.
fn assert_complete_and_ordered_per_key(lines: &[Value], keys: &[String], per_key: usize) {
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for line in lines {
        let (key, index) = key_and_index(line);
        assert_eq!(line["partition_key"], key.as_str(), "{line}");
        seen.entry(key).or_default().push(index);
    }
    for key in keys {
        let indices = seen.get(key).map(Vec::as_slice).unwrap_or_default();
        let expected: Vec<usize> = (0..per_key).collect();
        assert_eq!(indices, expected, "key {key}: every record once, in the order put");
    }
    assert_eq!(seen.len(), keys.len());
}

/// Splits `shard` in the middle of its hash-key range and waits for the stream to be ACTIVE
/// again; returns the children.
async fn split(client: &aws_sdk_kinesis::Client, stream: &str, shard: &str) -> Vec<String> {
    let shards = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let range = shards
        .shards()
        .iter()
        .find(|s| s.shard_id() == shard)
        .and_then(|s| s.hash_key_range())
        .expect("the shard and its range");
    let start: u128 = range.starting_hash_key().parse().expect("decimal");
    let end: u128 = range.ending_hash_key().parse().expect("decimal");
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard)
        .new_starting_hash_key((start / 2 + end / 2 + 1).to_string())
        .send()
        .await
        .expect("split shard");
    wait_stream_active(client, stream).await;
    let shards = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let children: Vec<String> = shards
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(shard))
        .map(|s| s.shard_id().to_owned())
        .collect();
    assert_eq!(children.len(), 2, "split {shard} into two: {children:?}");
    children
}

/// Puts records `from..to` of every key, each key's records in order, alternating plain records
/// and small aggregates (an aggregate holds one key's consecutive records).
async fn put_numbered(client: &aws_sdk_kinesis::Client, stream: &str, keys: &[String], from: usize, to: usize) {
    let mut index = from;
    let mut round = 0;
    while index < to {
        let batch = if round % 2 == 0 { 1 } else { 3.min(to - index) };
        for key in keys {
            let records = (index..index + batch).map(|i| user_record(key, numbered(key, i))).collect();
            put_user_records(client, stream, records).await;
        }
        index += batch;
        round += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_split_parents_come_before_children_for_each_key() {
    with_stream("ktk-tail-split", 2, |client, stream| async move {
        let keys: Vec<String> = (0..12).map(|k| format!("key-{k}")).collect();
        put_numbered(&client, &stream, &keys, 0, 8).await;
        let children = split(&client, &stream, "shardId-000000000000").await;
        put_numbered(&client, &stream, &keys, 8, 16).await;

        let output = ktk(&["tail", "--stream", &stream, "--from", "trim-horizon"]).await;
        let lines = lines(&output);
        assert_shard_order(&lines);
        assert_complete_and_ordered_per_key(&lines, &keys, 16);
        let in_children = lines.iter().filter(|l| children.iter().any(|c| l["shard"] == c.as_str())).count();
        assert!(in_children > 0, "records were put into the children {children:?}");
        let in_parent = lines.iter().filter(|l| l["shard"] == "shardId-000000000000").count();
        assert!(in_parent > 0, "records were put into the parent");
    })
    .await;
}

/// Reads JSON lines from `lines` until `into` holds `n` of them.
async fn read_lines(lines: &mut Lines<BufReader<ChildStdout>>, into: &mut Vec<Value>, n: usize) {
    let reading = async {
        while into.len() < n {
            match lines.next_line().await.expect("read stdout") {
                Some(line) => {
                    into.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
                }
                None => panic!("ktk tail ended after {} of {n} lines", into.len()),
            }
        }
    };
    if tokio::time::timeout(RUN_TIMEOUT, reading).await.is_err() {
        panic!("only {} of {n} lines within {RUN_TIMEOUT:?}", into.len());
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_reads_new_records_across_a_split_until_sigterm() {
    with_stream("ktk-tail-follow", 2, |client, stream| async move {
        let keys: Vec<String> = (0..8).map(|k| format!("key-{k}")).collect();
        put_numbered(&client, &stream, &keys, 0, 4).await;
        let mut child = spawn_ktk(&["tail", "--stream", &stream, "--follow"]);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut lines = Vec::new();
        read_lines(&mut stdout, &mut lines, keys.len() * 4).await;

        // The parent ends while it is being followed: its children (new to the run) are found
        // and read from their first record.
        let children = split(&client, &stream, "shardId-000000000000").await;
        put_numbered(&client, &stream, &keys, 4, 10).await;
        read_lines(&mut stdout, &mut lines, keys.len() * 10).await;

        let pid = child.id().expect("running").to_string();
        let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(killed.success());
        let status = tokio::time::timeout(RUN_TIMEOUT, child.wait()).await.expect("ends on SIGTERM").expect("wait");
        assert!(status.success(), "SIGTERM ends a followed tail with success: {status}");
        // Nothing more after what was waited for: no record twice.
        if let Some(line) = stdout.next_line().await.expect("read stdout") {
            panic!("an extra line: {line}");
        }
        assert_shard_order(&lines);
        assert_complete_and_ordered_per_key(&lines, &keys, 10);
        assert!(lines.iter().any(|l| children.iter().any(|c| l["shard"] == c.as_str())), "children were read");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_and_bad_options_are_reported() {
    let _ = kinesis().await;
    let output = ktk(&["tail", "--stream", &unique_name("ktk-tail-missing")]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("not found"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());

    let output = ktk(&["tail", "--stream", "s", "--from", "latest", "--timestamp", "1700000000000"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let output = ktk(&["tail", "--stream", "s", "--from", "at-timestamp"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let output = ktk(&["tail", "--stream", "s", "--timestamp", "yesterday"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("RFC 3339"), "{}", stderr(&output));
}
