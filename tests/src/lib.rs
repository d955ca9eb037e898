//! Shared set-up for the integration tests in `tests/`: clients for LocalStack (or whatever the
//! standard AWS environment points at), unique resource names, and waiting on resources.
//!
//! The tests need a running LocalStack (`localstack/up.sh`) and, for later suites, PostgreSQL and
//! MariaDB (`localstack/databases.sh`); the README's test command starts them all. A missing
//! service is a test failure with a message saying what to start, never a skip.

use std::time::Duration;

pub mod collector_support;
pub mod consumer_support;
pub mod store_support;
pub mod worker_support;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::Credentials;
use aws_sdk_kinesis::types::StreamStatus;

/// Where the tests look for LocalStack when `AWS_ENDPOINT_URL` is not set.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// Where the tests look for the flaky LocalStack when `KTK_FLAKY_ENDPOINT_URL` is not set.
pub const DEFAULT_FLAKY_ENDPOINT: &str = "http://127.0.0.1:4567";

/// How to start the flaky LocalStack, for error messages.
pub const FLAKY_START: &str = "KTK_LOCALSTACK_PORT=4567 KINESIS_ERROR_PROBABILITY=0.3 localstack/up.sh";

/// AWS configuration for the tests: the standard chain, with LocalStack's endpoint, a region and
/// dummy credentials filled in where the environment gives none.
pub async fn aws_config() -> SdkConfig {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned());
    config_for(endpoint).await
}

/// Like [`aws_config`], but for the second, flaky LocalStack (`KTK_FLAKY_ENDPOINT_URL`, default
/// port 4567), started with `KINESIS_ERROR_PROBABILITY=0.3`: about 30% of its `PutRecord` and
/// `PutRecords` calls fail with `ProvisionedThroughputExceededException` (for `PutRecords`, every
/// entry of the call). Every other call (`CreateStream`, `ListShards`, `GetRecords`...) works as usual.
pub async fn flaky_aws_config() -> SdkConfig {
    let endpoint = std::env::var("KTK_FLAKY_ENDPOINT_URL").unwrap_or_else(|_| DEFAULT_FLAKY_ENDPOINT.to_owned());
    config_for(endpoint).await
}

/// Like [`aws_config`], but for another endpoint (a proxy in front of LocalStack, say).
pub async fn aws_config_at(endpoint: &str) -> SdkConfig {
    config_for(endpoint.to_owned()).await
}

async fn config_for(endpoint: String) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).endpoint_url(endpoint).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_timeout(Duration::from_secs(30))
            .build(),
    );
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
        loader = loader.region(Region::from_static("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() && std::env::var_os("AWS_PROFILE").is_none() {
        loader = loader.credentials_provider(Credentials::new("test", "test", None, None, "ktk-tests"));
    }
    loader.load().await
}

/// The AWS settings for a child process (the `ktk` binary, a worker process):  LocalStack's endpoint, a region and dummy
/// credentials, unless the environment already gives them.
pub fn child_aws_env() -> Vec<(&'static str, String)> {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let region = std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION"));
    vec![
        ("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL", DEFAULT_ENDPOINT)),
        ("AWS_REGION", region.unwrap_or_else(|_| "us-east-1".to_owned())),
        ("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID", "test")),
        ("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY", "test")),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// A Kinesis client, after checking that the endpoint answers; panics with what to do if not.
pub async fn kinesis() -> aws_sdk_kinesis::Client {
    let config = aws_config().await;
    let client = aws_sdk_kinesis::Client::new(&config);
    if let Err(error) = client.list_streams().limit(1).send().await {
        panic!(
            "Kinesis is not reachable at {}: {}. Start LocalStack with `localstack/up.sh` \
             (or set AWS_ENDPOINT_URL); these tests never skip.",
            config.endpoint_url().unwrap_or(DEFAULT_ENDPOINT),
            aws_sdk_kinesis::error::DisplayErrorContext(&error)
        );
    }
    client
}

/// A DynamoDB client, after checking that the endpoint answers; panics with what to do if not.
pub async fn dynamodb() -> aws_sdk_dynamodb::Client {
    let config = aws_config().await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    if let Err(error) = client.list_tables().limit(1).send().await {
        panic!(
            "DynamoDB is not reachable at {}: {}. Start LocalStack with `localstack/up.sh` \
             (or set AWS_ENDPOINT_URL); these tests never skip.",
            config.endpoint_url().unwrap_or(DEFAULT_ENDPOINT),
            aws_sdk_dynamodb::error::DisplayErrorContext(&error)
        );
    }
    client
}

/// A Kinesis client for the flaky LocalStack (see [`flaky_aws_config`]), after checking that it
/// answers; panics with how to start it if not.
pub async fn flaky_kinesis() -> aws_sdk_kinesis::Client {
    let config = flaky_aws_config().await;
    let client = aws_sdk_kinesis::Client::new(&config);
    if let Err(error) = client.list_streams().limit(1).send().await {
        panic!(
            "the flaky Kinesis is not reachable at {}: {}. Start it with `{FLAKY_START}` (scripts/test.sh \
             does; or set KTK_FLAKY_ENDPOINT_URL); these tests never skip.",
            config.endpoint_url().unwrap_or(DEFAULT_FLAKY_ENDPOINT),
            aws_sdk_kinesis::error::DisplayErrorContext(&error)
        );
    }
    client
}

/// A resource name no other test run uses: `<prefix>-<random>`.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// Creates a provisioned stream with `shards` shards and waits until it is active.
pub async fn create_stream(client: &aws_sdk_kinesis::Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {}", aws_sdk_kinesis::error::DisplayErrorContext(&e)));
    for _ in 0..300 {
        let summary = client.describe_stream_summary().stream_name(name).send().await;
        if let Ok(summary) = summary
            && summary.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream {name} did not become active within 30 s");
}

/// Deletes a stream, ignoring errors: cleanup must not mask a test's own failure.
pub async fn delete_stream(client: &aws_sdk_kinesis::Client, name: &str) {
    let _ = client.delete_stream().stream_name(name).enforce_consumer_deletion(true).send().await;
}

/// One user record as read back from a stream, deaggregated.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: bytes::Bytes,
    pub aggregated: bool,
    /// Whether the record's hash key (explicit, or of its partition key) is in its shard's range.
    pub in_shard_range: bool,
}

/// Reads every shard of `stream` (closed ones to their end, open ones until caught up) from the
/// trim horizon, and deaggregates. Per shard, records come in stream order.
pub async fn read_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<StoredRecord> {
    use aws_sdk_kinesis::types::ShardIteratorType;
    use ktk_proto::aggregation::Deaggregator;
    use ktk_proto::keys::{HashKeyRange, effective_hash_key};

    let listing = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let mut out = Vec::new();
    for shard in listing.shards() {
        let range = shard.hash_key_range().expect("range");
        let range = HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).expect("decimal range");
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("shard iterator")
            .shard_iterator;
        let mut quiet_reads = 0;
        while let Some(current) = iterator.take() {
            let page = client.get_records().shard_iterator(current).limit(10_000).send().await.expect("get records");
            let caught_up = page.millis_behind_latest() == Some(0);
            if page.records().is_empty() && caught_up {
                quiet_reads += 1;
                if quiet_reads >= 2 {
                    break;
                }
            }
            for record in page.records() {
                let data = bytes::Bytes::copy_from_slice(record.data().as_ref());
                let kinesis_key = record.partition_key().unwrap_or_default();
                let unpacked = Deaggregator::new().deaggregate(data, kinesis_key, None);
                for user in unpacked.records {
                    let hash = effective_hash_key(&user.partition_key, user.explicit_hash_key.as_deref()).ok();
                    out.push(StoredRecord {
                        shard_id: shard.shard_id().to_owned(),
                        sequence_number: record.sequence_number().to_owned(),
                        sub_sequence_number: user.sub_sequence_number,
                        partition_key: user.partition_key.to_string(),
                        explicit_hash_key: user.explicit_hash_key.map(|k| k.to_string()),
                        aggregated: user.aggregated,
                        in_shard_range: hash.is_some_and(|h| range.contains(h)),
                        data: user.data,
                    });
                }
            }
            // A closed shard read to its end has no next iterator.
            iterator = page.next_shard_iterator;
        }
    }
    out
}

/// Data that says which record it is: `<key>|<index>|`, padded with dots to `size` bytes.
pub fn numbered_data(key: &str, index: usize, size: usize) -> Vec<u8> {
    let mut data = format!("{key}|{index:07}|").into_bytes();
    data.resize(size.max(data.len()), b'.');
    data
}

/// The index in data made by [`numbered_data`].
pub fn index_in(data: &[u8]) -> usize {
    let text = std::str::from_utf8(data).expect("numbered data is UTF-8");
    text.split('|').nth(1).and_then(|n| n.parse().ok()).expect("numbered data has an index")
}

/// Every index in `0..n` stored exactly once (records made with [`numbered_data`]).
pub fn assert_exactly_once(stored: &[StoredRecord], n: usize) {
    let mut seen = vec![0u32; n];
    for r in stored {
        seen[index_in(&r.data)] += 1;
    }
    let missing: Vec<usize> = (0..n).filter(|i| seen[*i] == 0).take(10).collect();
    let doubled: Vec<usize> = (0..n).filter(|i| seen[*i] > 1).take(10).collect();
    assert!(missing.is_empty() && doubled.is_empty(), "missing {missing:?}, doubled {doubled:?} (first ten)");
    assert_eq!(stored.len(), n);
}

/// Waits (up to 30 s) until the stream is ACTIVE again after a reshard.
pub async fn wait_stream_active(client: &aws_sdk_kinesis::Client, stream: &str) {
    use aws_sdk_kinesis::types::StreamStatus;
    for _ in 0..300 {
        let summary = client.describe_stream_summary().stream_name(stream).send().await.expect("describe");
        if summary.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream {stream} did not become active again");
}

/// (shard id, start, end) of the open shards.
pub async fn open_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, u128, u128)> {
    let listing = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let mut shards: Vec<(String, u128, u128)> = listing
        .shards()
        .iter()
        .filter(|s| s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none())
        .map(|s| {
            let r = s.hash_key_range().expect("range");
            (
                s.shard_id().to_owned(),
                r.starting_hash_key().parse().expect("u128"),
                r.ending_hash_key().parse().expect("u128"),
            )
        })
        .collect();
    shards.sort_by_key(|s| s.1);
    shards
}
