//! The AWS resources of a demo run: the stream, the bucket (and the run's prefix in it) and the
//! consumers' lease table. Created at the start, deleted at the end unless `--keep`.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::types::StreamStatus;
use futures::StreamExt as _;

/// How long a new stream may take to become active.
const STREAM_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates a provisioned stream with `shards` shards and waits until it is active.
pub async fn create_stream(client: &aws_sdk_kinesis::Client, name: &str, shards: u32) -> Result<(), String> {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(i32::try_from(shards).unwrap_or(i32::MAX))
        .send()
        .await
        .map_err(|e| format!("cannot create stream {name}: {}", DisplayErrorContext(&e)))?;
    let deadline = Instant::now() + STREAM_ACTIVE_TIMEOUT;
    loop {
        let summary = client.describe_stream_summary().stream_name(name).send().await;
        if let Ok(summary) = summary
            && summary.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("stream {name} did not become active within {} s", STREAM_ACTIVE_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn delete_stream(client: &aws_sdk_kinesis::Client, name: &str) -> Result<(), String> {
    client
        .delete_stream()
        .stream_name(name)
        .enforce_consumer_deletion(true)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot delete stream {name}: {}", DisplayErrorContext(&e)))
}

/// Creates the bucket; `Ok(false)` when it exists already and is ours.
pub async fn create_bucket(client: &aws_sdk_s3::Client, name: &str, region: Option<&str>) -> Result<bool, String> {
    use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
    let mut request = client.create_bucket().bucket(name);
    // us-east-1 is the one region that takes no location constraint.
    if let Some(region) = region.filter(|r| *r != "us-east-1") {
        request = request.create_bucket_configuration(
            CreateBucketConfiguration::builder().location_constraint(BucketLocationConstraint::from(region)).build(),
        );
    }
    match request.send().await {
        Ok(_) => Ok(true),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_bucket_already_owned_by_you()) => Ok(false),
        Err(error) => Err(format!("cannot create bucket {name}: {}", DisplayErrorContext(&error))),
    }
}

/// Deletes every object under `prefix`; returns how many.
pub async fn delete_prefix(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<usize, String> {
    let mut keys = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| format!("cannot list s3://{bucket}/{prefix}: {}", DisplayErrorContext(&e)))?;
        keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
    }
    let deleted = keys.len();
    let mut deletions = futures::stream::iter(keys)
        .map(|key| async move {
            client
                .delete_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| format!("cannot delete s3://{bucket}/{key}: {}", DisplayErrorContext(&e)))
        })
        .buffer_unordered(16);
    while let Some(result) = deletions.next().await {
        result?;
    }
    Ok(deleted)
}

pub async fn delete_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> Result<(), String> {
    client
        .delete_bucket()
        .bucket(bucket)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot delete bucket {bucket}: {}", DisplayErrorContext(&e)))
}

/// Deletes the lease table (absent is fine: the consumers may not have created it).
pub async fn delete_lease_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), String> {
    match client.delete_table().table_name(table).send().await {
        Ok(_) => Ok(()),
        Err(error) if error.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => Ok(()),
        Err(error) => Err(format!("cannot delete lease table {table}: {}", DisplayErrorContext(&error))),
    }
}
