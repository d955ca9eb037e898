//! Shared set-up for the integration tests in `tests/`: clients for LocalStack (or whatever the
//! standard AWS environment points at), unique resource names, and waiting on resources.
//!
//! The tests need a running LocalStack (`localstack/up.sh`) and, for later suites, PostgreSQL and
//! MariaDB (`localstack/databases.sh`); the README's test command starts them all. A missing
//! service is a test failure with a message saying what to start, never a skip.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::Credentials;
use aws_sdk_kinesis::types::StreamStatus;

/// Where the tests look for LocalStack when `AWS_ENDPOINT_URL` is not set.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// AWS configuration for the tests: the standard chain, with LocalStack's endpoint, a region and
/// dummy credentials filled in where the environment gives none.
pub async fn aws_config() -> SdkConfig {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned());
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
