//! Runs the real `ktk leases` against LocalStack: a lease table written through
//! `ktk_consumer::lease::LeaseTable` (take, checkpoint, shard end) is printed as an aligned table
//! and as JSON Lines, with how far behind each checkpoint is when a stream is given; items that
//! are not leases are counted on stderr; a missing table exits 1. LocalStack must be running
//! (`localstack/up.sh`): these tests fail, never skip, without it.

use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use ktk_consumer::lease::{ExtendedSequenceNumber, Lease, LeaseTable, TableSetup};
use ktk_tests::{create_stream, delete_stream, kinesis, unique_name};
use serde_json::Value;
use tokio::process::Command;

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest one `ktk leases` run may take before the test kills it and fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

async fn ktk(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_ktk"))
        .args(args)
        .envs(ktk_tests::child_aws_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ktk starts");
    match tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.expect("ktk runs"),
        Err(_) => panic!("`ktk {}` did not finish within {RUN_TIMEOUT:?}", args.join(" ")),
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn shard(n: u32) -> String {
    format!("shardId-{n:012}")
}

/// A lease table and a stream whose shards the leases are for, deleted at the end.
struct Setup {
    dynamodb: aws_sdk_dynamodb::Client,
    kinesis: aws_sdk_kinesis::Client,
    table_name: String,
    stream: String,
    /// The sequence number of the record put into shard 0, where its lease is checkpointed.
    sequence_number: String,
}

impl Setup {
    /// Leases, as a consumer of a 2-shard stream that used to be one shard (shard 9, finished)
    /// would have written them:
    /// - shard 9: finished by worker-a (SHARD_END), children shards 0 and 1;
    /// - shard 0: child of 9, taken by worker-a, checkpointed at a record inside an aggregate
    ///   (sub-sequence 2), then taken over by worker-b (one owner switch);
    /// - shard 1: child of 9, not taken yet (TRIM_HORIZON, no owner);
    ///
    /// plus an item of another kind (a KCL 3.x worker metrics item).
    async fn new() -> Setup {
        let dynamodb = ktk_tests::dynamodb().await;
        let kinesis = kinesis().await;
        let config = ktk_tests::aws_config().await;
        let table_name = unique_name("ktk-leases");
        let stream = unique_name("ktk-leases");
        create_stream(&kinesis, &stream, 2).await;
        let table = LeaseTable::new(&config, &table_name);
        assert_eq!(table.ensure_table().await.expect("ensure_table"), TableSetup::Created);

        let put = kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key("k")
            .explicit_hash_key("0")
            .data(Blob::new(b"record".to_vec()))
            .send()
            .await
            .expect("put record");
        assert_eq!(put.shard_id(), shard(0));
        let sequence_number = put.sequence_number().to_owned();

        let finished = Lease::new(shard(9), ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(table.create_if_absent(&finished).await.expect("create"));
        let finished = table.take(&finished, "worker-a").await.expect("take");
        let children: BTreeSet<String> = [shard(0), shard(1)].into();
        table.checkpoint_shard_end(&finished, &children).await.expect("shard end");

        let first = Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON).with_parents([shard(9)]);
        assert!(table.create_if_absent(&first).await.expect("create"));
        let first = table.take(&first, "worker-a").await.expect("take");
        let at = ExtendedSequenceNumber::at(&sequence_number, 2).expect("valid");
        let first = table.checkpoint(&first, at).await.expect("checkpoint");
        table.take(&first, "worker-b").await.expect("take over");

        let second = Lease::new(shard(1), ExtendedSequenceNumber::TRIM_HORIZON).with_parents([shard(9)]);
        assert!(table.create_if_absent(&second).await.expect("create"));

        dynamodb
            .put_item()
            .table_name(&table_name)
            .item("leaseKey", AttributeValue::S("worker-metrics-1".into()))
            .item("entityType", AttributeValue::S("WORKER_METRICS".into()))
            .send()
            .await
            .expect("put a non-lease item");
        Setup { dynamodb, kinesis, table_name, stream, sequence_number }
    }

    async fn cleanup(self) {
        let _ = self.dynamodb.delete_table().table_name(&self.table_name).send().await;
        delete_stream(&self.kinesis, &self.stream).await;
    }
}

/// Runs `test` with a fresh [`Setup`], cleaning up whatever happened.
async fn with_setup<F: Future<Output = ()> + Send + 'static>(test: impl FnOnce(String, String, String) -> F) {
    let setup = Setup::new().await;
    let test = test(setup.table_name.clone(), setup.stream.clone(), setup.sequence_number.clone());
    let result = tokio::spawn(tokio::time::timeout(TEST_TIMEOUT, test)).await;
    setup.cleanup().await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
    }
}

/// The table's rows as cells (no cell contains spaces), after checking the columns line up: each
/// column starts at the same offset in every row, or (numbers, aligned right) ends there.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let rows: Vec<Vec<String>> = lines.iter().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    for row in &rows {
        assert_eq!(row.len(), rows[0].len(), "every row has every column:\n{text}");
    }
    for (c, name) in rows[0].iter().enumerate() {
        let numeric = matches!(name.as_str(), "counter" | "owner_switches" | "behind_ms");
        let edges: BTreeSet<usize> = lines
            .iter()
            .zip(&rows)
            .map(|(line, row)| {
                // The c-th cell's start: skip the cells before it.
                let mut offset = 0;
                for cell in &row[..c] {
                    offset += line[offset..].find(cell.as_str()).expect("cell") + cell.len();
                }
                let start = offset + line[offset..].find(row[c].as_str()).expect("cell");
                if numeric { start + row[c].len() } else { start }
            })
            .collect();
        assert_eq!(edges.len(), 1, "column {name} is aligned:\n{text}");
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_shows_every_lease_and_how_far_behind_it_is() {
    with_setup(|table, stream, sequence_number| async move {
        let output = ktk(&["leases", "--table", &table]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let rows = table_rows(&stdout(&output));
        let checkpoint = format!("{sequence_number}/2");
        let (s0, s1, s9) = (shard(0), shard(1), shard(9));
        let children = format!("{s0},{s1}");
        let expected = [
            ["shard", "owner", "counter", "checkpoint", "parents", "children", "owner_switches"],
            [&s0, "worker-b", "3", &checkpoint, &s9, "-", "1"],
            [&s1, "-", "0", "TRIM_HORIZON", &s9, "-", "0"],
            [&s9, "worker-a", "2", "SHARD_END", "-", &children, "0"],
        ];
        assert_eq!(rows, expected, "{}", stdout(&output));
        let errors = stderr(&output);
        assert!(errors.contains("1 item(s)") && errors.contains("worker-metrics-1"), "{errors}");
        assert!(errors.contains("WORKER_METRICS"), "the reason is given: {errors}");

        let output = ktk(&["leases", "--table", &table, "--stream", &stream]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let rows = table_rows(&stdout(&output));
        assert_eq!(rows[0].last().map(String::as_str), Some("behind_ms"));
        assert_eq!(rows.len(), 4);
        for row in &rows[1..3] {
            let behind = row.last().expect("cell");
            assert!(behind.parse::<u64>().is_ok(), "an unfinished shard's distance behind is a number: {row:?}");
        }
        assert_eq!(rows[3].last().map(String::as_str), Some("-"), "a finished shard is not measured");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_prints_one_object_per_lease() {
    with_setup(|table, stream, sequence_number| async move {
        let output = ktk(&["leases", "--table", &table, "--json", "--stream", &stream]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let leases: Vec<Value> =
            stdout(&output).lines().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
        assert_eq!(leases.len(), 3, "{}", stdout(&output));
        let first = &leases[0];
        assert_eq!(first["shard"], shard(0));
        assert_eq!(first["owner"], "worker-b");
        assert_eq!(first["checkpoint_owner"], Value::Null);
        assert_eq!(first["counter"], 3);
        assert_eq!(first["checkpoint"], sequence_number.as_str());
        assert_eq!(first["checkpoint_sub_sequence_number"], 2);
        assert_eq!(first["parents"], serde_json::json!([shard(9)]));
        assert_eq!(first["children"], serde_json::json!([]));
        assert_eq!(first["owner_switches"], 1);
        assert!(first["behind_ms"].is_u64(), "{first}");
        assert!(first.get("behind_error").is_none(), "{first}");

        assert_eq!(leases[1]["shard"], shard(1));
        assert_eq!(leases[1]["owner"], Value::Null);
        assert_eq!(leases[1]["checkpoint"], "TRIM_HORIZON");
        assert!(leases[1]["behind_ms"].is_u64(), "{}", leases[1]);

        assert_eq!(leases[2]["shard"], shard(9));
        assert_eq!(leases[2]["checkpoint"], "SHARD_END");
        assert_eq!(leases[2]["children"], serde_json::json!([shard(0), shard(1)]));
        assert_eq!(leases[2]["behind_ms"], Value::Null);

        // Without --stream there is no behind_ms at all.
        let output = ktk(&["leases", "--table", &table, "--json"]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        for line in stdout(&output).lines() {
            let lease: Value = serde_json::from_str(line).expect("JSON");
            assert!(lease.get("behind_ms").is_none(), "{lease}");
        }

        // A stream the shards are not in: the table is printed, the failures said, exit 1.
        let missing = unique_name("ktk-leases-no-stream");
        let output = ktk(&["leases", "--table", &table, "--stream", &missing]).await;
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let rows = table_rows(&stdout(&output));
        assert_eq!(rows[1].last().map(String::as_str), Some("?"));
        assert_eq!(rows[2].last().map(String::as_str), Some("?"));
        assert!(stderr(&output).contains(&shard(0)) && stderr(&output).contains(&missing), "{}", stderr(&output));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_exits_1() {
    let _ = ktk_tests::dynamodb().await;
    let table = unique_name("ktk-leases-missing");
    let output = ktk(&["leases", "--table", &table]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let errors = stderr(&output);
    assert!(errors.contains(&table) && errors.contains("does not exist"), "{errors}");
    assert!(output.stdout.is_empty(), "{}", stdout(&output));

    let output = ktk(&["leases"]).await;
    assert_eq!(output.status.code(), Some(2), "--table is required: {}", stderr(&output));
}
