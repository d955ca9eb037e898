//! The two Kinesis calls the producer makes, behind a trait so the engine can be driven by a
//! fake in unit tests and by a no-op sink in benchmarks. [`AwsKinesis`] is the real one.
//!
//! Retryability is decided here, once, from the SDK's typed service errors.

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use futures::future::BoxFuture;
use ktk_proto::keys::HashKeyRange;

/// One entry of a `PutRecords` call.
#[derive(Debug, Clone)]
pub struct Entry {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
}

/// What Kinesis said about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Put { shard_id: String, sequence_number: String },
    Failed { code: String, message: String },
}

/// How a failed call (or entry) should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after a backoff (timeouts, connection errors, 5xx, unknown errors).
    Yes,
    /// Throttled: try again after a backoff, unless `fail_if_throttled`.
    Throttled,
    /// Retrying cannot help (missing stream, access denied, invalid argument, KMS key unusable).
    No,
}

/// A whole call that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub code: String,
    pub message: String,
    pub retry: Retry,
}

/// The code of a call that got no answer in time (the producer's timeout or the SDK's).
pub const REQUEST_TIMEOUT: &str = "RequestTimeout";

impl CallError {
    /// Whether the call got no answer in time. Such a call may still have been written: its
    /// records are sent again, and may be in the stream twice.
    pub fn is_timeout(&self) -> bool {
        self.code == REQUEST_TIMEOUT
    }
}

/// An open or closed shard, as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard_id: String,
    pub range: HashKeyRange,
    /// Closed shards (split or merged away) have an ending sequence number and take no writes.
    pub open: bool,
}

/// The Kinesis calls the producer needs.
pub trait KinesisApi: Send + Sync + 'static {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<Entry>,
    ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>>;
    /// Every shard of the stream (all pages).
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>>;
}

/// The real Kinesis, through the AWS SDK. `PutRecords` goes through a client with the SDK's
/// retries off (the producer retries per record); `ListShards` uses the SDK's standard retries.
#[derive(Debug, Clone)]
pub struct AwsKinesis {
    put_client: aws_sdk_kinesis::Client,
    list_client: aws_sdk_kinesis::Client,
}

impl AwsKinesis {
    /// Clients from a configuration loaded from the standard chain (`aws_config::load_defaults`).
    pub fn new(config: &SdkConfig) -> Self {
        let put_config = aws_sdk_kinesis::config::Builder::from(config).retry_config(RetryConfig::disabled()).build();
        AwsKinesis {
            put_client: aws_sdk_kinesis::Client::from_conf(put_config),
            list_client: aws_sdk_kinesis::Client::new(config),
        }
    }

    pub fn into_arc(self) -> Arc<dyn KinesisApi> {
        Arc::new(self)
    }
}

fn is_arn(stream: &str) -> bool {
    stream.starts_with("arn:")
}

impl KinesisApi for AwsKinesis {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<Entry>,
    ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
        Box::pin(async move {
            let mut request = self.put_client.put_records();
            request = if is_arn(stream) { request.stream_arn(stream) } else { request.stream_name(stream) };
            for entry in entries {
                let built = PutRecordsRequestEntry::builder()
                    .partition_key(entry.partition_key)
                    .set_explicit_hash_key(entry.explicit_hash_key)
                    .data(Blob::new(Vec::from(entry.data)))
                    .build()
                    .map_err(|e| CallError { code: "InvalidEntry".into(), message: e.to_string(), retry: Retry::No })?;
                request = request.records(built);
            }
            let output = request.send().await.map_err(classify_put_error)?;
            Ok(output
                .records()
                .iter()
                .map(|r| match (r.shard_id(), r.sequence_number(), r.error_code()) {
                    (Some(shard), Some(seq), None) => {
                        EntryResult::Put { shard_id: shard.to_owned(), sequence_number: seq.to_owned() }
                    }
                    (_, _, code) => EntryResult::Failed {
                        code: code.unwrap_or("MissingResult").to_owned(),
                        message: r.error_message().unwrap_or_default().to_owned(),
                    },
                })
                .collect())
        })
    }

    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
        Box::pin(async move {
            let mut shards = Vec::new();
            let mut next_token: Option<String> = None;
            loop {
                // With a token, ListShards takes nothing else (the token names the stream).
                let request = match &next_token {
                    Some(token) => self.list_client.list_shards().next_token(token),
                    None if is_arn(stream) => self.list_client.list_shards().stream_arn(stream),
                    None => self.list_client.list_shards().stream_name(stream),
                };
                let page = request.send().await.map_err(classify_list_error)?;
                for shard in page.shards() {
                    let range = shard.hash_key_range().ok_or_else(|| CallError {
                        code: "MissingHashKeyRange".into(),
                        message: format!("shard {} has no hash key range", shard.shard_id()),
                        retry: Retry::Yes,
                    })?;
                    let range =
                        HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).map_err(|e| {
                            CallError { code: "InvalidHashKeyRange".into(), message: e.to_string(), retry: Retry::No }
                        })?;
                    let open = shard.sequence_number_range().is_none_or(|r| r.ending_sequence_number().is_none());
                    shards.push(ShardInfo { shard_id: shard.shard_id().to_owned(), range, open });
                }
                next_token = page.next_token().map(str::to_owned);
                if next_token.is_none() {
                    return Ok(shards);
                }
            }
        })
    }
}

fn classify_put_error(error: SdkError<PutRecordsError>) -> CallError {
    let retry = match &error {
        SdkError::ServiceError(e) => match e.err() {
            PutRecordsError::ProvisionedThroughputExceededException(_) | PutRecordsError::KmsThrottlingException(_) => {
                Retry::Throttled
            }
            PutRecordsError::ResourceNotFoundException(_)
            | PutRecordsError::InvalidArgumentException(_)
            | PutRecordsError::AccessDeniedException(_)
            | PutRecordsError::KmsAccessDeniedException(_)
            | PutRecordsError::KmsDisabledException(_)
            | PutRecordsError::KmsInvalidStateException(_)
            | PutRecordsError::KmsNotFoundException(_)
            | PutRecordsError::KmsOptInRequired(_) => Retry::No,
            other => retry_for_code(other.code()),
        },
        // Timeouts, connection failures and unparsable responses: the call may work next time.
        _ => Retry::Yes,
    };
    call_error(&error, retry)
}

fn classify_list_error(error: SdkError<ListShardsError>) -> CallError {
    let retry = match &error {
        SdkError::ServiceError(e) => match e.err() {
            ListShardsError::LimitExceededException(_) => Retry::Throttled,
            ListShardsError::ResourceNotFoundException(_)
            | ListShardsError::InvalidArgumentException(_)
            | ListShardsError::AccessDeniedException(_) => Retry::No,
            other => retry_for_code(other.code()),
        },
        _ => Retry::Yes,
    };
    call_error(&error, retry)
}

/// Errors the SDK does not model: throttling by its generic codes; anything else is retried until
/// the record's TTL runs out (an expired token, say, can be refreshed meanwhile).
fn retry_for_code(code: Option<&str>) -> Retry {
    match code {
        Some("ThrottlingException" | "Throttling" | "LimitExceededException" | "RequestLimitExceeded") => {
            Retry::Throttled
        }
        Some("ValidationException" | "SerializationException" | "UnrecognizedClientException") => Retry::No,
        _ => Retry::Yes,
    }
}

fn call_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    error: &SdkError<E, R>,
    retry: Retry,
) -> CallError {
    let code = match error {
        SdkError::TimeoutError(_) => REQUEST_TIMEOUT.to_owned(),
        SdkError::DispatchFailure(_) => "ConnectionError".to_owned(),
        SdkError::ResponseError(_) => "ResponseError".to_owned(),
        SdkError::ServiceError(e) => e.err().code().unwrap_or("ServiceError").to_owned(),
        _ => "SdkError".to_owned(),
    };
    CallError { code, message: DisplayErrorContext(error).to_string(), retry }
}

/// How to treat one failed entry of a `PutRecords` response.
pub(crate) fn retry_for_entry(code: &str) -> Retry {
    match code {
        "ProvisionedThroughputExceededException" | "KMSThrottlingException" => Retry::Throttled,
        // InternalFailure and anything new: retry until the TTL says stop.
        _ => Retry::Yes,
    }
}

/// A `KinesisApi` that accepts everything instantly: for measuring the producer's own cost.
#[derive(Debug, Default, Clone)]
pub struct NoopKinesis {
    shards: usize,
}

impl NoopKinesis {
    /// A pretend stream of `shards` evenly split shards.
    pub fn new(shards: usize) -> Self {
        NoopKinesis { shards: shards.max(1) }
    }
}

/// `count` shards splitting the hash-key space evenly, named as Kinesis names them.
pub fn even_shards(count: usize) -> Vec<ShardInfo> {
    let count = count.max(1) as u128;
    let width = u128::MAX / count;
    (0..count)
        .map(|i| ShardInfo {
            shard_id: format!("shardId-{i:012}"),
            range: HashKeyRange { start: i * width, end: if i + 1 == count { u128::MAX } else { (i + 1) * width - 1 } },
            open: true,
        })
        .collect()
}

impl KinesisApi for NoopKinesis {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        entries: Vec<Entry>,
    ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
        Box::pin(async move {
            let shards = even_shards(self.shards);
            Ok(entries
                .iter()
                .enumerate()
                .map(|(i, entry)| {
                    let hash =
                        ktk_proto::keys::effective_hash_key(&entry.partition_key, entry.explicit_hash_key.as_deref())
                            .unwrap_or_default();
                    let shard =
                        shards.iter().find(|s| s.range.contains(hash)).map_or("shardId-000000000000", |s| &s.shard_id);
                    EntryResult::Put { shard_id: shard.to_owned(), sequence_number: format!("{i}") }
                })
                .collect())
        })
    }

    fn list_shards<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
        Box::pin(async move { Ok(even_shards(self.shards)) })
    }
}

/// Gives the engine a way to time out a call without caring which implementation it is.
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(CallError {
            code: REQUEST_TIMEOUT.into(),
            message: format!("no answer within {} ms", timeout.as_millis()),
            retry: Retry::Yes,
        }),
    }
}
