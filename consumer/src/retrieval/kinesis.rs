//! The Kinesis read calls the consumer makes (`ListShards`, `GetShardIterator`, `GetRecords`),
//! behind [`KinesisReads`] so the worker, the shard syncer and the polling reader run against the
//! real service through the SDK client, and against an in-process fake in unit tests.
//!
//! Retryability is decided here, once per operation, from the SDK's typed service errors.
//! Enhanced fan-out (`SubscribeToShard`, consumer registration) goes through the SDK client
//! directly (see [`crate::retrieval::FanOutReader`]).

use std::collections::BTreeSet;

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::Record;
use futures::future::BoxFuture;
use ktk_proto::keys::HashKeyRange;

use crate::error::{Error, Result};
use crate::retrieval::RetrievalError;
use crate::retrieval::polling::IteratorStart;

/// A shard as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub shard_id: String,
    /// `ParentShardId` and `AdjacentParentShardId` (a merge has two parents).
    pub parents: BTreeSet<String>,
    pub range: HashKeyRange,
    /// Closed shards have an ending sequence number and take no new records.
    pub open: bool,
}

/// One `GetRecords` response.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecordsPage {
    pub(crate) records: Vec<Record>,
    /// `None` once a closed shard has been read to its end.
    pub(crate) next_iterator: Option<String>,
    pub(crate) millis_behind_latest: Option<i64>,
    /// The child shards, when the shard has ended.
    pub(crate) child_shards: Vec<String>,
}

/// A failed `GetRecords`: an expired iterator (get a new one) or anything else.
#[derive(Debug, Clone)]
pub(crate) enum GetRecordsFailure {
    ExpiredIterator,
    Failed(RetrievalError),
}

/// The Kinesis read calls of the consumer. Implemented by [`aws_sdk_kinesis::Client`].
pub(crate) trait KinesisReads: Send + Sync + std::fmt::Debug + 'static {
    /// Every shard of the stream (all pages). Errors are [`Error::ListShards`].
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<Shard>>>;

    /// An iterator for `shard` from `start`; `None` for a closed shard with nothing left to read.
    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a str,
        shard: &'a str,
        start: &'a IteratorStart,
    ) -> BoxFuture<'a, Result<Option<String>, RetrievalError>>;

    /// At most `limit` records from `iterator`.
    fn get_records<'a>(
        &'a self,
        shard: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, GetRecordsFailure>>;
}

/// Every shard of `stream`, all pages.
pub async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<Shard>> {
    KinesisReads::list_shards(client, stream).await
}

impl KinesisReads for aws_sdk_kinesis::Client {
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<Shard>>> {
        Box::pin(async move {
            let list_error = |e: SdkError<ListShardsError>| {
                let retryable = !matches!(
                    &e,
                    SdkError::ServiceError(s) if matches!(
                        s.err(),
                        ListShardsError::ResourceNotFoundException(_)
                            | ListShardsError::AccessDeniedException(_)
                            | ListShardsError::InvalidArgumentException(_)
                    )
                );
                Error::ListShards { stream: stream.to_owned(), message: DisplayErrorContext(&e).to_string(), retryable }
            };
            let mut shards = Vec::new();
            let mut next_token: Option<String> = None;
            loop {
                let request = match &next_token {
                    Some(token) => self.list_shards().next_token(token),
                    None => self.list_shards().stream_name(stream),
                };
                let page = request.send().await.map_err(list_error)?;
                for shard in page.shards() {
                    // A shard skipped here would never get a lease and never be read: refuse instead.
                    let bad_range = |problem: String| Error::ListShards {
                        stream: stream.to_owned(),
                        message: format!("shard {} {problem}", shard.shard_id()),
                        retryable: true,
                    };
                    let range = shard.hash_key_range().ok_or_else(|| bad_range("has no hash key range".into()))?;
                    let range = HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key())
                        .map_err(|e| bad_range(format!("has an invalid hash key range: {e}")))?;
                    let parents =
                        shard.parent_shard_id().into_iter().chain(shard.adjacent_parent_shard_id()).map(str::to_owned);
                    shards.push(Shard {
                        shard_id: shard.shard_id().to_owned(),
                        parents: parents.collect(),
                        range,
                        open: shard.sequence_number_range().is_none_or(|r| r.ending_sequence_number().is_none()),
                    });
                }
                next_token = page.next_token().map(str::to_owned);
                if next_token.is_none() {
                    return Ok(shards);
                }
            }
        })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a str,
        shard: &'a str,
        start: &'a IteratorStart,
    ) -> BoxFuture<'a, Result<Option<String>, RetrievalError>> {
        Box::pin(async move {
            let output = self
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard)
                .shard_iterator_type(start.kind.clone())
                .set_starting_sequence_number(start.sequence_number.clone())
                .set_timestamp(start.timestamp)
                .send()
                .await
                .map_err(|e| get_iterator_error(shard, e))?;
            Ok(output.shard_iterator().map(str::to_owned))
        })
    }

    fn get_records<'a>(
        &'a self,
        shard: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, GetRecordsFailure>> {
        Box::pin(async move {
            match self.get_records().shard_iterator(iterator).limit(limit).send().await {
                Ok(output) => Ok(RecordsPage {
                    millis_behind_latest: output.millis_behind_latest(),
                    next_iterator: output.next_shard_iterator().map(str::to_owned),
                    child_shards: output.child_shards().iter().map(|c| c.shard_id().to_owned()).collect(),
                    records: output.records,
                }),
                Err(SdkError::ServiceError(e)) if matches!(e.err(), GetRecordsError::ExpiredIteratorException(_)) => {
                    Err(GetRecordsFailure::ExpiredIterator)
                }
                Err(error) => Err(GetRecordsFailure::Failed(get_records_error(shard, error))),
            }
        })
    }
}

fn get_records_error(shard: &str, error: SdkError<GetRecordsError>) -> RetrievalError {
    let shard = shard.to_owned();
    let message = DisplayErrorContext(&error).to_string();
    match &error {
        SdkError::ServiceError(e) => match e.err() {
            GetRecordsError::ProvisionedThroughputExceededException(_) | GetRecordsError::KmsThrottlingException(_) => {
                RetrievalError::Throttled { shard }
            }
            GetRecordsError::ResourceNotFoundException(_) => RetrievalError::NotFound { shard, message },
            GetRecordsError::AccessDeniedException(_) | GetRecordsError::KmsAccessDeniedException(_) => {
                RetrievalError::AccessDenied { shard, message }
            }
            other => RetrievalError::Other {
                shard,
                code: other.code().unwrap_or("ServiceError").to_owned(),
                message,
                retryable: !matches!(other, GetRecordsError::InvalidArgumentException(_)),
            },
        },
        _ => RetrievalError::Other { shard, code: "TransportError".into(), message, retryable: true },
    }
}

fn get_iterator_error(shard: &str, error: SdkError<GetShardIteratorError>) -> RetrievalError {
    let shard = shard.to_owned();
    let message = DisplayErrorContext(&error).to_string();
    match &error {
        SdkError::ServiceError(e) => match e.err() {
            GetShardIteratorError::ProvisionedThroughputExceededException(_) => RetrievalError::Throttled { shard },
            GetShardIteratorError::ResourceNotFoundException(_) => RetrievalError::NotFound { shard, message },
            GetShardIteratorError::AccessDeniedException(_) => RetrievalError::AccessDenied { shard, message },
            other => RetrievalError::Other {
                shard,
                code: other.code().unwrap_or("ServiceError").to_owned(),
                message,
                retryable: !matches!(other, GetShardIteratorError::InvalidArgumentException(_)),
            },
        },
        _ => RetrievalError::Other { shard, code: "TransportError".into(), message, retryable: true },
    }
}
