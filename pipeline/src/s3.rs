//! The S3 sink: each [`Batch`] becomes a few immutable objects, partitioned by the events' date and
//! hour; and the reader that lists a prefix and yields each event once.
//!
//! # Layout of a bucket
//! ```text
//! <prefix>/events/dt=YYYY-MM-DD/hour=HH/<stream>-<shard>-<first seq>-<first sub>-<last seq>-<last sub>.parquet
//! <prefix>/events/dt=YYYY-MM-DD/hour=HH/<same name>.jsonl.gz             (S3Format::JsonLinesGzip)
//! <prefix>/dead-letters/dt=YYYY-MM-DD/<same name>.jsonl.gz
//! ```
//! Events are partitioned by their `occurred_at_ms` (UTC), dead letters by their arrival day
//! (`dt=unknown` without one). A batch whose events span several hours becomes one object per
//! hour, all named after the batch's first and last records, so any day or hour can be recomputed
//! from its partition alone and re-reading the same stretch of a shard names the same objects.
//!
//! # Written once, never modified
//! An object's bytes depend only on the batch: no timestamps, random ids or hash-map orders inside
//! (Parquet's `created_by` is [`PARQUET_CREATED_BY`], gzip headers carry mtime 0, JSON objects have
//! sorted keys). Every write is conditional (`If-None-Match: *` on `PutObject` and on
//! `CompleteMultipartUpload`; multipart uploads check with `HeadObject` first so a rewrite uploads
//! nothing): an object that already exists is left as it is and its events are reported as
//! duplicates. Each object carries the MD5 of its bytes in its user metadata ([`DIGEST_METADATA`]),
//! so a rewrite can tell whether the existing object is byte-identical ([`WriteOutcome`]). A
//! batch retried after some of its objects were written counts those objects' events as
//! duplicates too: the sink cannot tell its own earlier attempt from another worker's.
//! Conditional writes need S3's `If-None-Match` support (AWS since August 2024; LocalStack honours
//! it on both calls); the reader and the multipart check need `s3:ListBucket` (without it S3
//! answers 403, not 404, for a missing key).
//!
//! # Formats
//! - Parquet ([`S3Format::Parquet`], the default): one row group; one column per `events.v1.Event`
//!   field (strings; `occurred_at_ms` and `received_at_ms` as UTC millisecond timestamps; enums by
//!   name, or by number for a value this build does not know; `geo_lat`, `geo_lon`, `geo_country`,
//!   `geo_region`, null when the event has no geo; `attributes` as a `MAP<STRING, STRING>`), then
//!   the record's position: `shard_id`, `sequence_number`, `sub_sequence_number` (unsigned) and
//!   `arrival_ms` (timestamp, null when unknown). Pages are zstd-compressed. See
//!   [`PARQUET_SCHEMA`].
//! - gzip JSON Lines ([`S3Format::JsonLinesGzip`]): one object per event,
//!   `{"arrival_ms", "event": <canonical proto3 JSON>, "sequence_number", "shard_id",
//!   "sub_sequence_number"}` (see [`event_line`]); dead letters likewise, `{"arrival_ms", "data"
//!   (base64), "partition_key", "reason", "sequence_number", "shard_id", "sub_sequence_number"}`.
//!   JSON has no NaN or infinity: such a geo coordinate is written as `null` and reads back as 0
//!   (Parquet keeps it).
//!
//! Objects above a threshold ([`DEFAULT_MULTIPART_THRESHOLD`]) go up in parts; a failed multipart
//! upload is aborted, so no parts are left behind to be billed.
//!
//! # Reading back
//! [`read_events`] lists a prefix (every page), reads each events object of either format, and
//! yields each event once (the first copy in key order), counting the other copies as duplicates;
//! [`read_dead_letters`] does the same for dead letters.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::SystemTime;

use aws_config::SdkConfig;
/// The S3 client the sink and the reader take (re-exported so callers name the same SDK version).
pub use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use md5::{Digest, Md5};
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::time::{MS_PER_HOUR, date_and_hour, from_unix_millis as ms_system_time, unix_millis as system_time_ms};
use crate::{Batch, DeadLetter, EventRecord, Sink, SinkError, SinkReport};

/// Objects larger than this go up as multipart uploads (default 8 MiB, the AWS CLI's
/// `multipart_threshold`).
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 8 * MIB;

/// Part size of multipart uploads (default 8 MiB, the AWS CLI's `multipart_chunksize`).
pub const DEFAULT_PART_SIZE: usize = 8 * MIB;

/// The smallest part S3 accepts, except for the last part of an upload
/// (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html>). LocalStack enforces it
/// too (`EntityTooSmall` at `CompleteMultipartUpload`).
pub const MIN_PART_SIZE: usize = 5 * MIB;

/// The largest part S3 accepts (5 GiB).
pub const MAX_PART_SIZE: usize = 5 * 1024 * MIB;

/// The most parts one upload may have (10,000).
pub const MAX_PARTS: usize = 10_000;

/// The `created_by` written into every Parquet footer. Fixed (no library version inside), so that
/// the same batch makes the same bytes whichever build writes it, as long as the encoding is the
/// same.
pub const PARQUET_CREATED_BY: &str = "ktk events.v1";

/// The user-metadata key (`x-amz-meta-ktk-md5`) holding the hex MD5 of an object's bytes.
pub const DIGEST_METADATA: &str = "ktk-md5";

/// The Parquet schema of events objects, in the Parquet message-type syntax. Columns are only
/// ever added (at the end), following the event schema's evolution rules; the reader ignores
/// columns it does not know and leaves fields whose column is missing at their default.
pub const PARQUET_SCHEMA: &str = "
message events_v1 {
  required binary event_id (STRING);
  required binary type (STRING);
  required int64 occurred_at_ms (TIMESTAMP(MILLIS,true));
  required int64 received_at_ms (TIMESTAMP(MILLIS,true));
  required binary user_id (STRING);
  required binary device_id (STRING);
  required binary session_id (STRING);
  required binary platform (STRING);
  required binary app_version (STRING);
  required binary os_version (STRING);
  required binary device_model (STRING);
  required binary content_id (STRING);
  required binary content_title (STRING);
  required int64 position_ms;
  required int64 duration_ms;
  required binary ad_id (STRING);
  required binary ad_break (STRING);
  required binary page (STRING);
  required binary target (STRING);
  required binary error_code (STRING);
  required binary error_message (STRING);
  optional double geo_lat;
  optional double geo_lon;
  optional binary geo_country (STRING);
  optional binary geo_region (STRING);
  required group attributes (MAP) {
    repeated group key_value {
      required binary key (STRING);
      required binary value (STRING);
    }
  }
  required binary schema_version (STRING);
  required binary shard_id (STRING);
  required binary sequence_number (STRING);
  required int64 sub_sequence_number (INTEGER(64,false));
  optional int64 arrival_ms (TIMESTAMP(MILLIS,true));
}
";

const MIB: usize = 1024 * 1024;
/// zstd level 3: zstd's own default, a good ratio at a speed that keeps up with a shard.
const PARQUET_ZSTD_LEVEL: i32 = 3;
/// Parts of one multipart upload in flight at once.
const PART_UPLOAD_CONCURRENCY: usize = 4;
/// Objects fetched at once by the reader.
const READ_CONCURRENCY: usize = 8;
const EVENTS_DIR: &str = "events";
const DEAD_LETTERS_DIR: &str = "dead-letters";

/// How events objects are written. The reader reads both, told apart by the key's extension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum S3Format {
    /// Parquet, typed columns, zstd pages (`.parquet`).
    #[default]
    Parquet,
    /// gzip-compressed JSON Lines, the event in canonical proto3 JSON (`.jsonl.gz`).
    JsonLinesGzip,
}

impl S3Format {
    /// The key's extension, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            S3Format::Parquet => "parquet",
            S3Format::JsonLinesGzip => "jsonl.gz",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            S3Format::Parquet => "application/vnd.apache.parquet",
            // Not `Content-Encoding: gzip`: clients would unpack it on download and the object
            // would no longer be what its name says.
            S3Format::JsonLinesGzip => "application/gzip",
        }
    }

    fn of_key(key: &str) -> Option<S3Format> {
        [S3Format::Parquet, S3Format::JsonLinesGzip]
            .into_iter()
            .find(|format| key.strip_suffix(format.extension()).is_some_and(|rest| rest.ends_with('.')))
    }
}

/// An S3 client from the standard AWS configuration. `force_path_style` puts the bucket in the path
/// (`http://host/bucket/key`) instead of the host name: what S3-compatible servers reached by IP
/// address or `localhost` (LocalStack, MinIO) need.
pub fn client(config: &SdkConfig, force_path_style: bool) -> Client {
    Client::from_conf(aws_sdk_s3::config::Builder::from(config).force_path_style(force_path_style).build())
}

/// Where and how an [`S3Sink`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3SinkConfig {
    bucket: String,
    prefix: String,
    format: S3Format,
    multipart_threshold: usize,
    part_size: usize,
    force_path_style: bool,
}

impl S3SinkConfig {
    /// Objects in `bucket` under `prefix` (leading and trailing slashes are dropped; empty for the
    /// bucket's root), as Parquet, multipart above 8 MiB in 8 MiB parts, virtual-host addressing.
    pub fn new(bucket: impl Into<String>, prefix: impl AsRef<str>) -> Self {
        S3SinkConfig {
            bucket: bucket.into(),
            prefix: prefix.as_ref().trim_matches('/').to_owned(),
            format: S3Format::default(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            force_path_style: false,
        }
    }

    /// The format of events objects (default Parquet).
    pub fn with_format(mut self, format: S3Format) -> Self {
        self.format = format;
        self
    }

    /// Objects larger than this many bytes go up in parts (default 8 MiB; 0 sends every object
    /// through a multipart upload).
    pub fn with_multipart_threshold(mut self, bytes: usize) -> Self {
        self.multipart_threshold = bytes;
        self
    }

    /// Bytes per part of a multipart upload, 5 MiB to 5 GiB (default 8 MiB; values outside are
    /// moved to the nearest bound). Raised further for an object that would need more than
    /// 10,000 parts.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        self
    }

    /// Path-style addressing for the client [`S3Sink::new`] builds (see [`client`]; default off).
    pub fn with_path_style(mut self, force_path_style: bool) -> Self {
        self.force_path_style = force_path_style;
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn format(&self) -> S3Format {
        self.format
    }

    /// Whether the client [`S3Sink::new`] builds uses path-style addressing.
    pub fn path_style(&self) -> bool {
        self.force_path_style
    }

    pub fn multipart_threshold(&self) -> usize {
        self.multipart_threshold
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }
}

/// What went wrong talking to S3 or with an object's bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// The bucket is not there. Retrying does not help until someone creates it.
    #[error("S3 bucket {bucket:?} does not exist; create it, or check the bucket name and the AWS region")]
    NoSuchBucket { bucket: String },
    /// The credentials in use may not do this.
    #[error(
        "access denied to S3 {operation} on s3://{bucket}/{key}: {message}; grant s3:PutObject, s3:GetObject, \
         s3:ListBucket and s3:AbortMultipartUpload on the bucket"
    )]
    AccessDenied { operation: &'static str, bucket: String, key: String, message: String },
    /// Any other failed call: throttling, a 5xx, the network (retryable), or a request S3 refused.
    #[error("S3 {operation} on s3://{bucket}/{key} failed: {message}")]
    Request { operation: &'static str, bucket: String, key: String, message: String, retryable: bool },
    /// A batch could not be encoded (a bug, not a condition of the service).
    #[error("cannot encode {key}: {message}")]
    Encode { key: String, message: String },
    /// An object is not what its name says (not Parquet of this schema, not gzip JSON Lines).
    #[error("s3://{bucket}/{key} cannot be read as an events or dead-letter object: {message}")]
    Decode { bucket: String, key: String, message: String },
}

impl S3Error {
    /// Whether the same call may work if made again.
    pub fn is_retryable(&self) -> bool {
        match self {
            S3Error::Request { retryable, .. } => *retryable,
            S3Error::NoSuchBucket { .. }
            | S3Error::AccessDenied { .. }
            | S3Error::Encode { .. }
            | S3Error::Decode { .. } => false,
        }
    }
}

impl From<S3Error> for SinkError {
    fn from(error: S3Error) -> Self {
        let retryable = error.is_retryable();
        SinkError::classified("s3", error.to_string(), retryable)
    }
}

/// One object a batch becomes: its key, its bytes, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub key: String,
    pub body: Bytes,
    pub events: u64,
    pub dead_letters: u64,
}

/// What a write found at an object's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The object was created.
    Created,
    /// An object was already there and was left as it is. `identical`: its recorded digest (or,
    /// for an object without one, its length) matches the bytes this write would have written.
    AlreadyExisted { identical: bool },
}

/// What happened to one object of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectWrite {
    pub key: String,
    pub bytes: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub outcome: WriteOutcome,
    /// Parts of the multipart upload, or 0 for a single `PutObject` (or an upload not needed).
    pub parts: usize,
}

/// What [`S3Sink::write_batch`] did, object by object (in key order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchWrite {
    pub objects: Vec<ObjectWrite>,
}

impl BatchWrite {
    /// Events in created objects are written; events in objects that were already there are
    /// duplicates.
    pub fn report(&self) -> SinkReport {
        let mut report = SinkReport::default();
        for object in &self.objects {
            match object.outcome {
                WriteOutcome::Created => report.written += object.events,
                WriteOutcome::AlreadyExisted { .. } => report.duplicates += object.events,
            }
        }
        report
    }
}

/// The S3 [`Sink`]: see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct S3Sink {
    client: Client,
    config: S3SinkConfig,
}

impl S3Sink {
    /// A sink with its own client, built from the standard AWS configuration and the config's
    /// addressing style, with the SDK's retries turned off: the pipeline writes a failed batch
    /// again with its own backoff, and one retry layer must not stack on another.
    pub fn new(sdk_config: &SdkConfig, config: S3SinkConfig) -> Self {
        let client = Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk_config)
                .force_path_style(config.force_path_style)
                .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
                .build(),
        );
        S3Sink { client, config }
    }

    /// A sink on a client built elsewhere (its addressing style is the client's).
    pub fn with_client(client: Client, config: S3SinkConfig) -> Self {
        S3Sink { client, config }
    }

    pub fn config(&self) -> &S3SinkConfig {
        &self.config
    }

    /// The objects `batch` becomes (pure: no call to S3).
    pub fn objects(&self, batch: &Batch) -> Result<Vec<S3Object>, S3Error> {
        encode_batch(batch, &self.config.prefix, self.config.format)
    }

    /// Writes the batch's objects, each only if its key is free.
    ///
    /// Encoding runs on the calling task: a batch of a few thousand events takes milliseconds.
    pub async fn write_batch(&self, batch: &Batch) -> Result<BatchWrite, S3Error> {
        let mut written = BatchWrite::default();
        for object in self.objects(batch)? {
            let (outcome, parts) = self.put_once(&object).await?;
            let label = match outcome {
                WriteOutcome::Created => "created",
                WriteOutcome::AlreadyExisted { identical: true } => "identical",
                WriteOutcome::AlreadyExisted { identical: false } => "different",
            };
            // `identical`: a batch written again after a crash or a hand-off found its object
            // already there with the same bytes; `different` would mean batches are not
            // reproducible and needs a look.
            metrics::counter!("S3Objects", "bucket" => self.config.bucket.clone(), "outcome" => label).increment(1);
            match outcome {
                WriteOutcome::Created => {
                    debug!(key = %object.key, bytes = object.body.len(), parts, "S3 object written")
                }
                WriteOutcome::AlreadyExisted { identical: true } => {
                    debug!(key = %object.key, "S3 object already written, byte-identical")
                }
                WriteOutcome::AlreadyExisted { identical: false } => warn!(
                    key = %object.key,
                    "S3 object already exists with other bytes; kept as it is (objects are never modified), \
                     its events counted as duplicates"
                ),
            }
            written.objects.push(ObjectWrite {
                bytes: object.body.len() as u64,
                events: object.events,
                dead_letters: object.dead_letters,
                outcome,
                parts,
                key: object.key,
            });
        }
        Ok(written)
    }

    async fn put_once(&self, object: &S3Object) -> Result<(WriteOutcome, usize), S3Error> {
        let digest = hex_md5(&object.body);
        if object.body.len() > self.config.multipart_threshold {
            // A rewrite after a crash is common: look first rather than upload megabytes for nothing.
            if let Some(existing) = self.head(&object.key).await? {
                return Ok((existing.outcome(&digest, object.body.len()), 0));
            }
            return self.put_multipart(object, &digest).await;
        }
        let put = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(&object.key)
            .content_type(content_type_of(&object.key))
            .metadata(DIGEST_METADATA, &digest)
            .if_none_match("*")
            .body(ByteStream::from(object.body.clone()))
            .send()
            .await;
        match put {
            Ok(_) => Ok((WriteOutcome::Created, 0)),
            Err(error) if is_precondition_failed(&error) => {
                Ok((self.existing(&object.key, &digest, object.body.len()).await?, 0))
            }
            Err(error) => Err(request_error("PutObject", &self.config.bucket, &object.key, &error)),
        }
    }

    async fn put_multipart(&self, object: &S3Object, digest: &str) -> Result<(WriteOutcome, usize), S3Error> {
        let bucket = &self.config.bucket;
        let key = &object.key;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .content_type(content_type_of(key))
            .metadata(DIGEST_METADATA, digest)
            .send()
            .await
            .map_err(|error| request_error("CreateMultipartUpload", bucket, key, &error))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(S3Error::Request {
                operation: "CreateMultipartUpload",
                bucket: bucket.clone(),
                key: key.clone(),
                message: "the response has no upload id".into(),
                retryable: true,
            });
        };
        let part_size = self.config.part_size.max(object.body.len().div_ceil(MAX_PARTS));
        let result = self.upload_and_complete(object, upload_id, part_size).await;
        if !matches!(result, Ok(Completion::Completed)) {
            // A failed or refused upload keeps its parts (and bills them) until it is aborted.
            let abort = self.client.abort_multipart_upload().bucket(bucket).key(key).upload_id(upload_id).send().await;
            if let Err(error) = abort {
                warn!(
                    %key, upload_id, error = %DisplayErrorContext(&error),
                    "could not abort a multipart upload; its parts stay until a lifecycle rule \
                     (AbortIncompleteMultipartUpload) removes them"
                );
            }
        }
        let parts = object.body.len().div_ceil(part_size).max(1);
        match result? {
            Completion::Completed => Ok((WriteOutcome::Created, parts)),
            // Another writer completed the same object between our look and our completion.
            Completion::KeyTaken => Ok((self.existing(key, digest, object.body.len()).await?, parts)),
        }
    }

    /// Uploads the parts and completes the upload, unless the key was taken meanwhile.
    async fn upload_and_complete(
        &self,
        object: &S3Object,
        upload_id: &str,
        part_size: usize,
    ) -> Result<Completion, S3Error> {
        let bucket = &self.config.bucket;
        let key = &object.key;
        let body = &object.body;
        let count = body.len().div_ceil(part_size).max(1);
        let parts: Vec<CompletedPart> = futures::stream::iter(0..count)
            .map(|index| async move {
                let chunk = body.slice(index * part_size..((index + 1) * part_size).min(body.len()));
                let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
                let uploaded = self
                    .client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(chunk))
                    .send()
                    .await
                    .map_err(|error| request_error("UploadPart", bucket, key, &error))?;
                Ok::<_, S3Error>(CompletedPart::builder().part_number(number).set_e_tag(uploaded.e_tag).build())
            })
            .buffered(PART_UPLOAD_CONCURRENCY)
            .try_collect()
            .await?;
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .if_none_match("*")
            .send()
            .await;
        match completed {
            Ok(_) => Ok(Completion::Completed),
            Err(error) if is_precondition_failed(&error) => Ok(Completion::KeyTaken),
            Err(error) => Err(request_error("CompleteMultipartUpload", bucket, key, &error)),
        }
    }

    /// The object at `key` was there when a conditional write was refused: compares it with what
    /// would have been written.
    async fn existing(&self, key: &str, digest: &str, len: usize) -> Result<WriteOutcome, S3Error> {
        match self.head(key).await? {
            Some(existing) => Ok(existing.outcome(digest, len)),
            // Deleted in between: the events are not in S3 any more, so the batch must be written
            // again.
            None => Err(S3Error::Request {
                operation: "HeadObject",
                bucket: self.config.bucket.clone(),
                key: key.to_owned(),
                message: "the object existed when the write was refused, and is gone now; write the batch again".into(),
                retryable: true,
            }),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<Existing>, S3Error> {
        let bucket = &self.config.bucket;
        match self.client.head_object().bucket(bucket).key(key).send().await {
            Ok(head) => Ok(Some(Existing {
                digest: head.metadata().and_then(|m| m.get(DIGEST_METADATA)).cloned(),
                len: head.content_length().and_then(|n| u64::try_from(n).ok()),
            })),
            // HEAD has no body, so a missing bucket is a bare 404 too; the write that follows
            // tells it apart (NoSuchBucket).
            Err(error) if error.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(error) => Err(request_error("HeadObject", bucket, key, &error)),
        }
    }
}

impl Sink for S3Sink {
    fn name(&self) -> &str {
        "s3"
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        Box::pin(async move { Ok(self.write_batch(batch).await?.report()) })
    }
}

/// How a multipart upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    Completed,
    /// `If-None-Match: *` refused the completion: another writer created the object meanwhile.
    KeyTaken,
}

#[derive(Debug)]
struct Existing {
    digest: Option<String>,
    len: Option<u64>,
}

impl Existing {
    fn outcome(&self, digest: &str, len: usize) -> WriteOutcome {
        let identical = match &self.digest {
            Some(existing) => existing == digest,
            None => self.len == Some(len as u64),
        };
        WriteOutcome::AlreadyExisted { identical }
    }
}

fn content_type_of(key: &str) -> &'static str {
    S3Format::of_key(key).unwrap_or(S3Format::JsonLinesGzip).content_type()
}

fn hex_md5(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn is_precondition_failed<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    error.code() == Some("PreconditionFailed") || error.raw_response().is_some_and(|r| r.status().as_u16() == 412)
}

/// Retryability of every S3 call, decided here from the service's answer.
fn request_error<E>(operation: &'static str, bucket: &str, key: &str, error: &SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = DisplayErrorContext(error).to_string();
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    let request = |retryable| S3Error::Request {
        operation,
        bucket: bucket.clone(),
        key: key.clone(),
        message: message.clone(),
        retryable,
    };
    match error {
        SdkError::ServiceError(_) => {}
        // Timeouts, connections that failed or broke, responses that did not parse.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => return request(true),
        SdkError::ConstructionFailure(_) => return request(false),
        _ => return request(true),
    }
    let status = error.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    match error.code() {
        Some("NoSuchBucket") => S3Error::NoSuchBucket { bucket },
        Some(
            "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AllAccessDisabled" | "AccountProblem",
        ) => S3Error::AccessDenied { operation, bucket, key, message },
        // Throttling, S3 being unwell, a conflicting conditional write still in flight, a clock
        // that drifted (the SDK corrects its skew on the next attempt).
        Some(
            "SlowDown"
            | "RequestTimeout"
            | "InternalError"
            | "ServiceUnavailable"
            | "ConditionalRequestConflict"
            | "OperationAborted"
            | "RequestTimeTooSkewed"
            | "ExpiredToken",
        ) => request(true),
        _ => request(status >= 500 || status == 429 || status == 408 || status == 409),
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and partitions

fn object_name(batch: &Batch, extension: &str) -> String {
    let (first, first_sub) = &batch.first;
    let (last, last_sub) = &batch.last;
    format!("{}-{}-{first}-{first_sub}-{last}-{last_sub}.{extension}", batch.stream, batch.shard_id)
}

fn join_key(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() { rest.to_owned() } else { format!("{prefix}/{rest}") }
}

/// The key of the events object of `batch` for the hour of `occurred_at_ms`.
pub fn events_key(prefix: &str, batch: &Batch, occurred_at_ms: i64, format: S3Format) -> String {
    let (date, hour) = date_and_hour(occurred_at_ms);
    let name = object_name(batch, format.extension());
    join_key(prefix.trim_matches('/'), &format!("{EVENTS_DIR}/dt={date}/hour={hour:02}/{name}"))
}

/// The key of the dead-letter object of `batch` for the day of `arrival` (`dt=unknown` for none).
pub fn dead_letters_key(prefix: &str, batch: &Batch, arrival: Option<SystemTime>) -> String {
    let date = arrival.map(|time| date_and_hour(system_time_ms(time)).0).unwrap_or_else(|| "unknown".to_owned());
    let name = object_name(batch, S3Format::JsonLinesGzip.extension());
    join_key(prefix.trim_matches('/'), &format!("{DEAD_LETTERS_DIR}/dt={date}/{name}"))
}

/// What an object under a sink's prefix holds, from its key: the directory before its `dt=`
/// segment, and its extension.
fn object_kind(key: &str) -> Option<(ObjectKind, S3Format)> {
    let format = S3Format::of_key(key)?;
    let segments: Vec<&str> = key.split('/').collect();
    let dt = segments.iter().rposition(|segment| segment.starts_with("dt="))?;
    match *segments.get(dt.checked_sub(1)?)? {
        EVENTS_DIR => Some((ObjectKind::Events, format)),
        DEAD_LETTERS_DIR if format == S3Format::JsonLinesGzip => Some((ObjectKind::DeadLetters, format)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    Events,
    DeadLetters,
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// The objects `batch` becomes under `prefix`: one events object per hour of `occurred_at_ms`
/// (events in batch order), one dead-letter object per arrival day; in key order.
pub fn encode_batch(batch: &Batch, prefix: &str, format: S3Format) -> Result<Vec<S3Object>, S3Error> {
    let mut objects = Vec::new();
    let mut hours: BTreeMap<i64, Vec<&EventRecord>> = BTreeMap::new();
    for record in &batch.events {
        hours.entry(record.event.occurred_at_ms.div_euclid(MS_PER_HOUR)).or_default().push(record);
    }
    for records in hours.values() {
        let key = events_key(prefix, batch, records[0].event.occurred_at_ms, format);
        let body = match format {
            S3Format::Parquet => encode_parquet(records),
            S3Format::JsonLinesGzip => gzip_lines(records.iter().map(|record| event_line(record))),
        }
        .map_err(|message| S3Error::Encode { key: key.clone(), message })?;
        objects.push(S3Object { key, body: Bytes::from(body), events: records.len() as u64, dead_letters: 0 });
    }
    let mut days: BTreeMap<String, Vec<&DeadLetter>> = BTreeMap::new();
    for letter in &batch.dead_letters {
        days.entry(dead_letters_key(prefix, batch, letter.arrival)).or_default().push(letter);
    }
    for (key, letters) in days {
        let body = gzip_lines(letters.iter().map(|letter| dead_letter_line(letter)))
            .map_err(|message| S3Error::Encode { key: key.clone(), message })?;
        objects.push(S3Object { key, body: Bytes::from(body), events: 0, dead_letters: letters.len() as u64 });
    }
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(objects)
}

/// The JSON Lines object of one event: its position and the event in canonical proto3 JSON, every
/// object's keys sorted (the event's `attributes` map has no order of its own).
pub fn event_line(record: &EventRecord) -> Result<Value, serde_json::Error> {
    Ok(json!({
        "arrival_ms": record.arrival.map(system_time_ms),
        "event": event_json(&record.event)?,
        "sequence_number": record.sequence_number,
        "shard_id": record.shard_id,
        "sub_sequence_number": record.sub_sequence_number,
    }))
}

/// An event in canonical proto3 JSON, with sorted keys. An enum value this build does not know is
/// written as its number, as proto3 JSON prescribes (the generated serializer refuses it), so an
/// event from a newer client is kept whole.
pub fn event_json(event: &Event) -> Result<Value, serde_json::Error> {
    let unknown_type = EventType::try_from(event.r#type).is_err();
    let unknown_platform = Platform::try_from(event.platform).is_err();
    let mut value = if unknown_type || unknown_platform {
        let mut known = event.clone();
        if unknown_type {
            known.r#type = 0;
        }
        if unknown_platform {
            known.platform = 0;
        }
        let mut value = serde_json::to_value(&known)?;
        if let Value::Object(fields) = &mut value {
            if unknown_type {
                fields.insert("type".into(), event.r#type.into());
            }
            if unknown_platform {
                fields.insert("platform".into(), event.platform.into());
            }
        }
        value
    } else {
        serde_json::to_value(event)?
    };
    value.sort_all_objects();
    Ok(value)
}

/// Reads [`event_json`]'s output (or any proto3 JSON of an event), keeping enum values given as
/// numbers this build does not know.
pub fn event_from_json(value: &Value) -> Result<Event, serde_json::Error> {
    let mut event: Event = serde_json::from_value(value.clone())?;
    let number = |name: &str| value.get(name).and_then(Value::as_i64).and_then(|n| i32::try_from(n).ok());
    if let Some(number) = number("type") {
        event.r#type = number;
    }
    if let Some(number) = number("platform") {
        event.platform = number;
    }
    Ok(event)
}

fn dead_letter_line(letter: &DeadLetter) -> Result<Value, serde_json::Error> {
    Ok(json!({
        "arrival_ms": letter.arrival.map(system_time_ms),
        "data": base64::engine::general_purpose::STANDARD.encode(&letter.data),
        "partition_key": letter.partition_key,
        "reason": letter.reason,
        "sequence_number": letter.sequence_number,
        "shard_id": letter.shard_id,
        "sub_sequence_number": letter.sub_sequence_number,
    }))
}

fn gzip_lines(lines: impl Iterator<Item = Result<Value, serde_json::Error>>) -> Result<Vec<u8>, String> {
    // mtime 0 and no file name: the header holds nothing that changes between writes.
    let mut gzip = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    for line in lines {
        serde_json::to_writer(&mut gzip, &line.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        gzip.write_all(b"\n").map_err(|e| e.to_string())?;
    }
    gzip.finish().map_err(|e| e.to_string())
}

fn enum_name(value: i32, name: Option<&'static str>) -> String {
    // A value this build does not know keeps its number (the schema's evolution rule 3).
    name.map(str::to_owned).unwrap_or_else(|| value.to_string())
}

fn type_name(value: i32) -> String {
    enum_name(value, EventType::try_from(value).ok().map(|t| t.as_str_name()))
}

fn platform_name(value: i32) -> String {
    enum_name(value, Platform::try_from(value).ok().map(|p| p.as_str_name()))
}

fn writer_properties() -> Result<WriterProperties, ParquetError> {
    Ok(WriterProperties::builder()
        .set_created_by(PARQUET_CREATED_BY.to_owned())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(PARQUET_ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        // Unique per event: a dictionary would only be built to be thrown away.
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .build())
}

fn encode_parquet(records: &[&EventRecord]) -> Result<Vec<u8>, String> {
    write_parquet(records).map_err(|e| e.to_string())
}

fn write_parquet(records: &[&EventRecord]) -> Result<Vec<u8>, ParquetError> {
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
    let mut buffer = Vec::new();
    let mut file = SerializedFileWriter::new(&mut buffer, schema, Arc::new(writer_properties()?))?;
    let mut group = file.next_row_group()?;
    let events: Vec<&Event> = records.iter().map(|r| &r.event).collect();
    let g = &mut group;
    strings(g, events.iter().map(|e| e.event_id.as_str()))?;
    owned_strings(g, events.iter().map(|e| type_name(e.r#type)))?;
    longs(g, events.iter().map(|e| e.occurred_at_ms))?;
    longs(g, events.iter().map(|e| e.received_at_ms))?;
    strings(g, events.iter().map(|e| e.user_id.as_str()))?;
    strings(g, events.iter().map(|e| e.device_id.as_str()))?;
    strings(g, events.iter().map(|e| e.session_id.as_str()))?;
    owned_strings(g, events.iter().map(|e| platform_name(e.platform)))?;
    strings(g, events.iter().map(|e| e.app_version.as_str()))?;
    strings(g, events.iter().map(|e| e.os_version.as_str()))?;
    strings(g, events.iter().map(|e| e.device_model.as_str()))?;
    strings(g, events.iter().map(|e| e.content_id.as_str()))?;
    strings(g, events.iter().map(|e| e.content_title.as_str()))?;
    longs(g, events.iter().map(|e| e.position_ms))?;
    longs(g, events.iter().map(|e| e.duration_ms))?;
    strings(g, events.iter().map(|e| e.ad_id.as_str()))?;
    strings(g, events.iter().map(|e| e.ad_break.as_str()))?;
    strings(g, events.iter().map(|e| e.page.as_str()))?;
    strings(g, events.iter().map(|e| e.target.as_str()))?;
    strings(g, events.iter().map(|e| e.error_code.as_str()))?;
    strings(g, events.iter().map(|e| e.error_message.as_str()))?;

    // Geo: all four columns null when the event has none.
    let geo_levels: Vec<i16> = events.iter().map(|e| i16::from(e.geo.is_some())).collect();
    let geos: Vec<&Geo> = events.iter().filter_map(|e| e.geo.as_ref()).collect();
    let lats: Vec<f64> = geos.iter().map(|geo| geo.lat).collect();
    let lons: Vec<f64> = geos.iter().map(|geo| geo.lon).collect();
    let countries: Vec<ByteArray> = geos.iter().map(|geo| ByteArray::from(geo.country.as_str())).collect();
    let regions: Vec<ByteArray> = geos.iter().map(|geo| ByteArray::from(geo.region.as_str())).collect();
    write_column::<DoubleType, _>(g, &lats, Some(&geo_levels), None)?;
    write_column::<DoubleType, _>(g, &lons, Some(&geo_levels), None)?;
    write_column::<ByteArrayType, _>(g, &countries, Some(&geo_levels), None)?;
    write_column::<ByteArrayType, _>(g, &regions, Some(&geo_levels), None)?;

    // Attributes: a map, entries in key order. Per event, one level entry for an empty map
    // (definition 0), else one per entry (definition 1; repetition 0 opens the event's map).
    let (mut keys, mut values, mut definitions, mut repetitions) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for event in &events {
        let mut entries: Vec<(&String, &String)> = event.attributes.iter().collect();
        entries.sort_unstable();
        if entries.is_empty() {
            definitions.push(0);
            repetitions.push(0);
        }
        for (index, (key, value)) in entries.into_iter().enumerate() {
            keys.push(ByteArray::from(key.as_str()));
            values.push(ByteArray::from(value.as_str()));
            definitions.push(1);
            repetitions.push(i16::from(index > 0));
        }
    }
    write_column::<ByteArrayType, _>(g, &keys, Some(&definitions), Some(&repetitions))?;
    write_column::<ByteArrayType, _>(g, &values, Some(&definitions), Some(&repetitions))?;

    strings(g, events.iter().map(|e| e.schema_version.as_str()))?;
    strings(g, records.iter().map(|r| r.shard_id.as_str()))?;
    strings(g, records.iter().map(|r| r.sequence_number.as_str()))?;
    // The bits of an unsigned 64-bit integer (the column's logical type says so).
    longs(g, records.iter().map(|r| r.sub_sequence_number as i64))?;
    let arrival_levels: Vec<i16> = records.iter().map(|r| i16::from(r.arrival.is_some())).collect();
    let arrivals: Vec<i64> = records.iter().filter_map(|r| r.arrival.map(system_time_ms)).collect();
    write_column::<Int64Type, _>(g, &arrivals, Some(&arrival_levels), None)?;

    group.close()?;
    file.close()?;
    Ok(buffer)
}

fn strings<'a, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = &'a str>,
) -> Result<(), ParquetError> {
    let values: Vec<ByteArray> = values.map(ByteArray::from).collect();
    write_column::<ByteArrayType, W>(group, &values, None, None)
}

fn owned_strings<W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = String>,
) -> Result<(), ParquetError> {
    let values: Vec<ByteArray> = values.map(|value| ByteArray::from(value.into_bytes())).collect();
    write_column::<ByteArrayType, W>(group, &values, None, None)
}

fn longs<W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = i64>,
) -> Result<(), ParquetError> {
    write_column::<Int64Type, W>(group, &values.collect::<Vec<_>>(), None, None)
}

fn write_column<T: DataType, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: &[T::T],
    definitions: Option<&[i16]>,
    repetitions: Option<&[i16]>,
) -> Result<(), ParquetError> {
    let Some(mut column) = group.next_column()? else {
        return Err(ParquetError::General("more columns written than the schema has".into()));
    };
    column.typed::<T>().write_batch(values, definitions, repetitions)?;
    column.close()
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// The events in an events object, in the order they were written. The format comes from the
/// key's extension.
pub fn decode_events(key: &str, body: Bytes) -> Result<Vec<EventRecord>, String> {
    match object_kind(key) {
        Some((ObjectKind::Events, S3Format::Parquet)) => read_parquet(body).map_err(|e| e.to_string()),
        Some((ObjectKind::Events, S3Format::JsonLinesGzip)) => {
            gunzip_lines(&body)?.iter().map(event_from_line).collect()
        }
        _ => Err("not an events object key (<prefix>/events/dt=.../hour=.../*.parquet or *.jsonl.gz)".into()),
    }
}

/// The dead letters in a dead-letter object, in the order they were written.
pub fn decode_dead_letters(body: &[u8]) -> Result<Vec<DeadLetter>, String> {
    gunzip_lines(body)?.iter().map(dead_letter_from_line).collect()
}

fn gunzip_lines(body: &[u8]) -> Result<Vec<Value>, String> {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(body).read_to_string(&mut text).map_err(|e| format!("gzip: {e}"))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", index + 1)))
        .collect()
}

fn event_from_line(line: &Value) -> Result<EventRecord, String> {
    let event = line.get("event").ok_or("a line without \"event\"")?;
    Ok(EventRecord {
        event: event_from_json(event).map_err(|e| format!("event: {e}"))?,
        shard_id: string_field(line, "shard_id")?,
        sequence_number: string_field(line, "sequence_number")?,
        sub_sequence_number: line.get("sub_sequence_number").and_then(Value::as_u64).ok_or("no sub_sequence_number")?,
        arrival: line.get("arrival_ms").and_then(Value::as_i64).map(ms_system_time),
    })
}

fn dead_letter_from_line(line: &Value) -> Result<DeadLetter, String> {
    let data = string_field(line, "data")?;
    Ok(DeadLetter {
        shard_id: string_field(line, "shard_id")?,
        sequence_number: string_field(line, "sequence_number")?,
        sub_sequence_number: line.get("sub_sequence_number").and_then(Value::as_u64).ok_or("no sub_sequence_number")?,
        partition_key: string_field(line, "partition_key")?,
        data: Bytes::from(base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| format!("data: {e}"))?),
        reason: string_field(line, "reason")?,
        arrival: line.get("arrival_ms").and_then(Value::as_i64).map(ms_system_time),
    })
}

fn string_field(line: &Value, name: &str) -> Result<String, String> {
    line.get(name).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| format!("no string \"{name}\""))
}

fn read_parquet(body: Bytes) -> Result<Vec<EventRecord>, ParquetError> {
    let reader = SerializedFileReader::new(body)?;
    let mut records = Vec::new();
    for row in reader.get_row_iter(None)? {
        let mut record = EventRecord {
            event: Event::default(),
            shard_id: String::new(),
            sequence_number: String::new(),
            sub_sequence_number: 0,
            arrival: None,
        };
        let event = &mut record.event;
        for (name, field) in row?.into_columns() {
            if matches!(field, Field::Null) {
                continue;
            }
            let bad = |what: &str| ParquetError::General(format!("column {name}: expected {what}, found {field:?}"));
            let string = || match &field {
                Field::Str(s) => Ok(s.clone()),
                _ => Err(bad("a string")),
            };
            let long = || match &field {
                Field::Long(n) | Field::TimestampMillis(n) => Ok(*n),
                _ => Err(bad("a 64-bit integer")),
            };
            let double = || match &field {
                Field::Double(n) => Ok(*n),
                _ => Err(bad("a double")),
            };
            match name.as_str() {
                "event_id" => event.event_id = string()?,
                "type" => {
                    let name = string()?;
                    let known = EventType::from_str_name(&name).map(|t| t as i32);
                    event.r#type = enum_value(&name, known).ok_or_else(|| bad("an event type"))?;
                }
                "occurred_at_ms" => event.occurred_at_ms = long()?,
                "received_at_ms" => event.received_at_ms = long()?,
                "user_id" => event.user_id = string()?,
                "device_id" => event.device_id = string()?,
                "session_id" => event.session_id = string()?,
                "platform" => {
                    let name = string()?;
                    let known = Platform::from_str_name(&name).map(|p| p as i32);
                    event.platform = enum_value(&name, known).ok_or_else(|| bad("a platform"))?;
                }
                "app_version" => event.app_version = string()?,
                "os_version" => event.os_version = string()?,
                "device_model" => event.device_model = string()?,
                "content_id" => event.content_id = string()?,
                "content_title" => event.content_title = string()?,
                "position_ms" => event.position_ms = long()?,
                "duration_ms" => event.duration_ms = long()?,
                "ad_id" => event.ad_id = string()?,
                "ad_break" => event.ad_break = string()?,
                "page" => event.page = string()?,
                "target" => event.target = string()?,
                "error_code" => event.error_code = string()?,
                "error_message" => event.error_message = string()?,
                "geo_lat" => event.geo.get_or_insert_default().lat = double()?,
                "geo_lon" => event.geo.get_or_insert_default().lon = double()?,
                "geo_country" => event.geo.get_or_insert_default().country = string()?,
                "geo_region" => event.geo.get_or_insert_default().region = string()?,
                "attributes" => {
                    let Field::MapInternal(map) = &field else { return Err(bad("a map")) };
                    for (key, value) in map.entries() {
                        match (key, value) {
                            (Field::Str(key), Field::Str(value)) => {
                                event.attributes.insert(key.clone(), value.clone());
                            }
                            _ => return Err(bad("a map of strings")),
                        }
                    }
                }
                "schema_version" => event.schema_version = string()?,
                "shard_id" => record.shard_id = string()?,
                "sequence_number" => record.sequence_number = string()?,
                "sub_sequence_number" => {
                    record.sub_sequence_number = match &field {
                        Field::ULong(n) => *n,
                        Field::Long(n) => *n as u64,
                        _ => return Err(bad("an unsigned 64-bit integer")),
                    }
                }
                "arrival_ms" => record.arrival = Some(ms_system_time(long()?)),
                // A column added after this build: its field is unknown here.
                _ => {}
            }
        }
        records.push(record);
    }
    Ok(records)
}

/// An enum column's value: the name this build knows, or the number it was written as.
fn enum_value(text: &str, known: Option<i32>) -> Option<i32> {
    known.or_else(|| text.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Reading a prefix back

/// Every event under a prefix, each once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadEvents {
    /// In key order, then in each object's order; of several copies of an `event_id`, the first.
    pub events: Vec<EventRecord>,
    /// Copies of an `event_id` already read.
    pub duplicates: u64,
    /// Events objects read.
    pub objects: usize,
    /// Their total size.
    pub bytes: u64,
}

/// Every dead letter under a prefix, each once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadDeadLetters {
    /// In key order, then in each object's order; of several copies of a record (same shard,
    /// sequence and sub-sequence numbers), the first.
    pub dead_letters: Vec<DeadLetter>,
    pub duplicates: u64,
    pub objects: usize,
    pub bytes: u64,
}

/// Lists `prefix` in `bucket` (every page; an S3 key prefix as is, e.g. a sink's prefix or one of
/// its `events/dt=.../` partitions), reads every events object of either format, and yields
/// each event once, by `event_id`.
pub async fn read_events(client: &Client, bucket: &str, prefix: &str) -> Result<ReadEvents, S3Error> {
    let keys = list_objects(client, bucket, prefix, ObjectKind::Events).await?;
    let mut read = ReadEvents { objects: keys.len(), ..ReadEvents::default() };
    let mut seen = HashSet::new();
    let mut bodies = futures::stream::iter(keys).map(|key| fetch(client, bucket, key)).buffered(READ_CONCURRENCY);
    while let Some((key, body)) = bodies.try_next().await? {
        read.bytes += body.len() as u64;
        let events = decode_events(&key, body).map_err(|message| S3Error::Decode {
            bucket: bucket.to_owned(),
            key: key.clone(),
            message,
        })?;
        for record in events {
            if seen.insert(record.event.event_id.clone()) {
                read.events.push(record);
            } else {
                read.duplicates += 1;
            }
        }
    }
    Ok(read)
}

/// Like [`read_events`], for the dead letters under `prefix`.
pub async fn read_dead_letters(client: &Client, bucket: &str, prefix: &str) -> Result<ReadDeadLetters, S3Error> {
    let keys = list_objects(client, bucket, prefix, ObjectKind::DeadLetters).await?;
    let mut read = ReadDeadLetters { objects: keys.len(), ..ReadDeadLetters::default() };
    let mut seen = HashSet::new();
    let mut bodies = futures::stream::iter(keys).map(|key| fetch(client, bucket, key)).buffered(READ_CONCURRENCY);
    while let Some((key, body)) = bodies.try_next().await? {
        read.bytes += body.len() as u64;
        let letters = decode_dead_letters(&body).map_err(|message| S3Error::Decode {
            bucket: bucket.to_owned(),
            key: key.clone(),
            message,
        })?;
        for letter in letters {
            if seen.insert((letter.shard_id.clone(), letter.sequence_number.clone(), letter.sub_sequence_number)) {
                read.dead_letters.push(letter);
            } else {
                read.duplicates += 1;
            }
        }
    }
    Ok(read)
}

async fn list_objects(client: &Client, bucket: &str, prefix: &str, kind: ObjectKind) -> Result<Vec<String>, S3Error> {
    let mut keys = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|error| request_error("ListObjectsV2", bucket, prefix, &error))?;
        for object in page.contents() {
            if let Some(key) = object.key()
                && object_kind(key).is_some_and(|(k, _)| k == kind)
            {
                keys.push(key.to_owned());
            }
        }
    }
    Ok(keys)
}

async fn fetch(client: &Client, bucket: &str, key: String) -> Result<(String, Bytes), S3Error> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .map_err(|error| request_error("GetObject", bucket, &key, &error))?;
    let body = object.body.collect().await.map_err(|error| S3Error::Request {
        operation: "GetObject",
        bucket: bucket.to_owned(),
        key: key.clone(),
        message: format!("reading the body: {error}"),
        retryable: true,
    })?;
    Ok((key, body.into_bytes()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;
    use parquet::file::reader::FileReader as _;
    use proptest::prelude::*;

    use super::*;

    /// 2026-03-01T10:59:59.000Z
    const T_10_59: i64 = 1_772_362_799_000;

    fn record(index: u64, occurred_at_ms: i64) -> EventRecord {
        let attributes: HashMap<String, String> =
            (0..6).map(|k| (format!("key_{k}"), format!("value {k} of {index}"))).collect();
        EventRecord {
            event: Event {
                event_id: format!("event-{index:05}"),
                r#type: EventType::Play as i32,
                occurred_at_ms,
                received_at_ms: occurred_at_ms + 250,
                user_id: format!("user-{}", index % 7),
                device_id: format!("device-{}", index % 13),
                session_id: format!("session-{}", index % 3),
                platform: Platform::Roku as i32,
                app_version: "4.2.0".into(),
                os_version: "12".into(),
                device_model: "Roku Ultra".into(),
                content_id: "movie-17".into(),
                content_title: "Ünïcode title ✓".into(),
                position_ms: (index as i64) * 1_000,
                duration_ms: 5_400_000,
                ad_id: String::new(),
                ad_break: "midroll-2".into(),
                page: "/watch".into(),
                target: String::new(),
                error_code: String::new(),
                error_message: String::new(),
                geo: index.is_multiple_of(2).then(|| Geo {
                    lat: 40.7128,
                    lon: -74.006,
                    country: "US".into(),
                    region: "US-NY".into(),
                }),
                attributes,
                schema_version: "1.0".into(),
            },
            shard_id: "shardId-000000000003".into(),
            sequence_number: format!("4963{index:052}"),
            sub_sequence_number: index % 4,
            arrival: (!index.is_multiple_of(5)).then(|| ms_system_time(occurred_at_ms + 1_000)),
        }
    }

    fn batch(events: Vec<EventRecord>) -> Batch {
        let first = events.first().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
        let last = events.last().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
        Batch {
            stream: "events".into(),
            shard_id: "shardId-000000000003".into(),
            events,
            dead_letters: vec![],
            first,
            last,
        }
    }

    fn letter(index: u64, arrival: Option<SystemTime>) -> DeadLetter {
        DeadLetter {
            shard_id: "shardId-000000000003".into(),
            sequence_number: format!("4963{index:052}"),
            sub_sequence_number: index,
            partition_key: format!("pk-{index}"),
            data: Bytes::from(vec![0xff, 0x00, index as u8, b'x']),
            reason: "not an events.v1 Event: invalid wire type".into(),
            arrival,
        }
    }

    fn round_trip(format: S3Format, records: Vec<EventRecord>) -> Vec<EventRecord> {
        let objects = encode_batch(&batch(records), "p", format).expect("encode");
        objects.into_iter().flat_map(|o| decode_events(&o.key, o.body).expect("decode")).collect()
    }

    #[test]
    fn keys_name_the_stream_shard_positions_and_hour() {
        let b = batch(vec![record(1, T_10_59), record(2, T_10_59)]);
        let name = format!("events-shardId-000000000003-4963{:052}-1-4963{:052}-2", 1, 2);
        assert_eq!(
            events_key("analytics/raw", &b, T_10_59, S3Format::Parquet),
            format!("analytics/raw/events/dt=2026-03-01/hour=10/{name}.parquet")
        );
        assert_eq!(
            events_key("/analytics/raw/", &b, T_10_59 + 1_000, S3Format::JsonLinesGzip),
            format!("analytics/raw/events/dt=2026-03-01/hour=11/{name}.jsonl.gz")
        );
        assert_eq!(events_key("", &b, 0, S3Format::Parquet), format!("events/dt=1970-01-01/hour=00/{name}.parquet"));
        assert_eq!(
            dead_letters_key("p", &b, Some(ms_system_time(T_10_59))),
            format!("p/dead-letters/dt=2026-03-01/{name}.jsonl.gz")
        );
        assert_eq!(dead_letters_key("p", &b, None), format!("p/dead-letters/dt=unknown/{name}.jsonl.gz"));
        assert_eq!(S3SinkConfig::new("b", "/a/b/").prefix(), "a/b");
    }

    #[test]
    fn the_partition_hour_is_the_utc_hour_of_occurred_at() {
        assert_eq!(date_and_hour(T_10_59 + 1_000 + 13 * MS_PER_HOUR), ("2026-03-02".into(), 0));
    }

    #[test]
    fn a_batch_spanning_two_hours_is_one_object_per_hour() {
        // Out of time order on purpose: device clocks are not ordered within a shard.
        let times = [T_10_59, T_10_59 + 1_000, T_10_59 + 500, T_10_59 + 2 * MS_PER_HOUR, T_10_59 - 5_000];
        let records: Vec<EventRecord> = times.iter().enumerate().map(|(i, t)| record(i as u64, *t)).collect();
        let mut b = batch(records.clone());
        b.dead_letters = vec![
            letter(7, Some(ms_system_time(T_10_59))),
            letter(8, None),
            letter(9, Some(ms_system_time(T_10_59 + crate::time::MS_PER_DAY))),
        ];
        for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
            let objects = encode_batch(&b, "p", format).expect("encode");
            let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
            let name = object_name(&b, format.extension());
            let dead = object_name(&b, "jsonl.gz");
            assert_eq!(
                keys,
                [
                    format!("p/dead-letters/dt=2026-03-01/{dead}"),
                    format!("p/dead-letters/dt=2026-03-02/{dead}"),
                    format!("p/dead-letters/dt=unknown/{dead}"),
                    format!("p/events/dt=2026-03-01/hour=10/{name}"),
                    format!("p/events/dt=2026-03-01/hour=11/{name}"),
                    format!("p/events/dt=2026-03-01/hour=12/{name}"),
                ]
            );
            let events: Vec<Vec<EventRecord>> =
                objects[3..].iter().map(|o| decode_events(&o.key, o.body.clone()).expect("decode")).collect();
            // Within an hour, batch order.
            assert_eq!(events[0], [records[0].clone(), records[2].clone(), records[4].clone()]);
            assert_eq!(events[1], [records[1].clone()]);
            assert_eq!(events[2], [records[3].clone()]);
            assert_eq!(objects.iter().map(|o| o.events).collect::<Vec<_>>(), [0, 0, 0, 3, 1, 1]);
            let letters: Vec<DeadLetter> =
                objects[..3].iter().flat_map(|o| decode_dead_letters(&o.body).expect("dead letters")).collect();
            assert_eq!(letters, [b.dead_letters[0].clone(), b.dead_letters[2].clone(), b.dead_letters[1].clone()]);
        }
    }

    #[test]
    fn the_same_batch_makes_the_same_bytes_in_both_formats() {
        // Two batches built apart: their attribute maps iterate in different orders.
        let make = || {
            let mut b = batch((0..300).map(|i| record(i, T_10_59 + i as i64 * 10_000)).collect());
            b.dead_letters = vec![letter(1, Some(ms_system_time(T_10_59))), letter(2, None)];
            b
        };
        let (one, two) = (make(), make());
        let orders: HashSet<Vec<String>> =
            (0..20).map(|i| two.events[i].event.attributes.keys().cloned().collect()).collect();
        assert!(orders.len() > 1 || one.events[0].event.attributes.len() < 2, "maps in a single order prove little");
        for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
            let first = encode_batch(&one, "p", format).expect("encode");
            let second = encode_batch(&two, "p", format).expect("encode");
            assert_eq!(first, second, "{format:?}");
            assert_eq!(first.len(), 2 + 2, "two hours, two dead-letter days");
        }
        for object in encode_batch(&one, "p", S3Format::JsonLinesGzip).expect("encode") {
            // gzip header: magic, method, flags 0 (no name, no comment), mtime 0.
            assert_eq!(&object.body[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "{}", object.key);
        }
        let parquet = encode_batch(&one, "p", S3Format::Parquet).expect("encode");
        let reader = SerializedFileReader::new(parquet[2].body.clone()).expect("parquet");
        let metadata = reader.metadata().file_metadata();
        assert_eq!(metadata.created_by(), Some(PARQUET_CREATED_BY));
        assert_eq!(metadata.key_value_metadata(), None);
        assert_eq!(reader.metadata().num_row_groups(), 1);
    }

    #[test]
    fn parquet_columns_are_typed() {
        let objects = encode_batch(&batch(vec![record(1, T_10_59)]), "p", S3Format::Parquet).expect("encode");
        let reader = SerializedFileReader::new(objects[0].body.clone()).expect("parquet");
        let schema = reader.metadata().file_metadata().schema_descr();
        let column = |name: &str| {
            (0..schema.num_columns())
                .map(|i| schema.column(i))
                .find(|c| c.path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"))
        };
        use parquet::basic::{LogicalType, Type as Physical};
        assert_eq!(column("occurred_at_ms").physical_type(), Physical::INT64);
        assert!(matches!(column("occurred_at_ms").logical_type_ref(), Some(LogicalType::Timestamp { .. })));
        assert!(matches!(column("type").logical_type_ref(), Some(LogicalType::String)));
        assert_eq!(column("geo_lat").physical_type(), Physical::DOUBLE);
        assert_eq!(column("attributes.key_value.value").max_rep_level(), 1);
        assert!(matches!(
            column("sub_sequence_number").logical_type_ref(),
            Some(LogicalType::Integer(int)) if !int.is_signed
        ));
        let compression = reader.metadata().row_group(0).column(0).compression();
        assert!(matches!(compression, Compression::ZSTD(_)), "{compression:?}");
    }

    #[test]
    fn parquet_and_json_lines_round_trip_every_field() {
        let mut records: Vec<EventRecord> = (0..40).map(|i| record(i, T_10_59 + i as i64)).collect();
        // Edge cases: enum values this build does not know, an empty event, geo present but all
        // zero, no attributes, the largest sub-sequence number, times before 1970.
        records[1].event.r#type = 999;
        records[1].event.platform = 77;
        records[2].event = Event { event_id: "bare".into(), occurred_at_ms: T_10_59, ..Event::default() };
        records[3].event.geo = Some(Geo::default());
        records[4].event.attributes.clear();
        records[5].sub_sequence_number = u64::MAX;
        records[6].arrival = Some(ms_system_time(-1_234));
        records[7].event.received_at_ms = -86_400_001;
        for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
            assert_eq!(round_trip(format, records.clone()), records, "{format:?}");
        }
    }

    #[test]
    fn unknown_enum_values_are_json_numbers() {
        let mut event = record(1, T_10_59).event;
        event.r#type = 999;
        let value = event_json(&event).expect("json");
        assert_eq!(value["type"], json!(999));
        assert_eq!(value["platform"], json!("PLATFORM_ROKU"));
        assert_eq!(value["occurredAtMs"], json!(T_10_59.to_string()));
        assert_eq!(event_from_json(&value).expect("event"), event);
    }

    #[test]
    fn dead_letters_round_trip() {
        let mut b = batch(vec![]);
        b.first = ("1".into(), 0);
        b.last = ("3".into(), 0);
        b.dead_letters = vec![letter(1, Some(ms_system_time(T_10_59))), letter(2, Some(ms_system_time(T_10_59 + 1)))];
        let objects = encode_batch(&b, "", S3Format::Parquet).expect("encode");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].key, "dead-letters/dt=2026-03-01/events-shardId-000000000003-1-0-3-0.jsonl.gz");
        assert_eq!(objects[0].dead_letters, 2);
        assert_eq!(decode_dead_letters(&objects[0].body).expect("decode"), b.dead_letters);
    }

    #[test]
    fn an_empty_batch_is_no_object() {
        assert_eq!(encode_batch(&Batch::default(), "p", S3Format::Parquet).expect("encode"), vec![]);
    }

    #[test]
    fn object_kinds_come_from_the_directory_before_dt() {
        assert_eq!(
            object_kind("p/events/dt=2026-03-01/hour=10/a.parquet"),
            Some((ObjectKind::Events, S3Format::Parquet))
        );
        assert_eq!(
            object_kind("events/dt=2026-03-01/hour=10/a.jsonl.gz"),
            Some((ObjectKind::Events, S3Format::JsonLinesGzip))
        );
        assert_eq!(
            object_kind("events/dead-letters/dt=unknown/a.jsonl.gz"),
            Some((ObjectKind::DeadLetters, S3Format::JsonLinesGzip))
        );
        assert_eq!(object_kind("p/dead-letters/dt=2026-03-01/a.parquet"), None);
        assert_eq!(object_kind("p/events/dt=2026-03-01/hour=10/a.json"), None);
        assert_eq!(object_kind("p/other/dt=2026-03-01/a.parquet"), None);
        assert_eq!(object_kind("p/events/a.parquet"), None);
        assert_eq!(object_kind("p/events/dt=2026-03-01/hour=10/parquet"), None);
        assert!(decode_events("p/x.parquet", Bytes::new()).is_err());
    }

    #[test]
    fn part_sizes_stay_within_s3_limits() {
        let config = S3SinkConfig::new("b", "p");
        assert_eq!((config.multipart_threshold(), config.part_size()), (8 * MIB, 8 * MIB));
        assert_eq!(config.clone().with_part_size(1).part_size(), MIN_PART_SIZE);
        assert_eq!(config.clone().with_part_size(usize::MAX).part_size(), MAX_PART_SIZE);
        assert_eq!(config.with_multipart_threshold(0).multipart_threshold(), 0);
    }

    #[test]
    fn the_report_counts_existing_objects_as_duplicates() {
        let object =
            |events, outcome| ObjectWrite { key: String::new(), bytes: 1, events, dead_letters: 0, outcome, parts: 0 };
        let written = BatchWrite {
            objects: vec![
                object(5, WriteOutcome::Created),
                object(3, WriteOutcome::AlreadyExisted { identical: true }),
                object(2, WriteOutcome::AlreadyExisted { identical: false }),
            ],
        };
        assert_eq!(written.report(), SinkReport { written: 5, duplicates: 5 });
    }

    fn service_error(status: u16, code: &str) -> SdkError<PutObjectError, HttpResponse> {
        let error = PutObjectError::generic(aws_sdk_s3::error::ErrorMetadata::builder().code(code).build());
        let response = HttpResponse::new(status.try_into().expect("status"), SdkBody::empty());
        SdkError::service_error(error, response)
    }

    #[test]
    fn errors_say_whether_to_retry() {
        let classify = |status, code| request_error("PutObject", "bucket-x", "k", &service_error(status, code));
        let missing = classify(404, "NoSuchBucket");
        assert!(matches!(missing, S3Error::NoSuchBucket { .. }) && !missing.is_retryable());
        let sink = SinkError::from(missing);
        assert!(!sink.is_retryable() && sink.message().contains("bucket-x") && sink.sink() == "s3", "{sink}");
        assert!(!classify(403, "AccessDenied").is_retryable());
        assert!(!classify(400, "InvalidArgument").is_retryable());
        for (status, code) in
            [(503, "SlowDown"), (500, "InternalError"), (409, "ConditionalRequestConflict"), (502, "")]
        {
            assert!(classify(status, code).is_retryable(), "{status} {code}");
        }
        let timeout: SdkError<PutObjectError, HttpResponse> = SdkError::timeout_error("too slow");
        assert!(request_error("PutObject", "b", "k", &timeout).is_retryable());
        assert!(is_precondition_failed(&service_error(412, "PreconditionFailed")));
        assert!(!is_precondition_failed(&service_error(404, "NoSuchBucket")));
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    prop_compose! {
        fn arb_event()(
            ids in (arb_string(), arb_string(), arb_string(), arb_string()),
            enums in (-3i32..70, -3i32..20),
            times in (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
            texts in proptest::collection::vec(arb_string(), 13),
            geo in proptest::option::of((-90.0f64..90.0, -180.0f64..180.0, arb_string(), arb_string())),
            attributes in proptest::collection::hash_map(arb_string(), arb_string(), 0..5),
        ) -> Event {
            Event {
                event_id: ids.0,
                r#type: enums.0,
                occurred_at_ms: times.0,
                received_at_ms: times.1,
                user_id: ids.1,
                device_id: ids.2,
                session_id: ids.3,
                platform: enums.1,
                app_version: texts[0].clone(),
                os_version: texts[1].clone(),
                device_model: texts[2].clone(),
                content_id: texts[3].clone(),
                content_title: texts[4].clone(),
                position_ms: times.2,
                duration_ms: times.3,
                ad_id: texts[5].clone(),
                ad_break: texts[6].clone(),
                page: texts[7].clone(),
                target: texts[8].clone(),
                error_code: texts[9].clone(),
                error_message: texts[10].clone(),
                geo: geo.map(|(lat, lon, country, region)| Geo { lat, lon, country, region }),
                attributes,
                schema_version: texts[11].clone(),
            }
        }
    }

    prop_compose! {
        fn arb_record()(
            event in arb_event(),
            sequence in "[0-9]{1,56}",
            sub in any::<u64>(),
            arrival in proptest::option::of(-10_000_000_000_000i64..10_000_000_000_000),
        ) -> EventRecord {
            EventRecord {
                event,
                shard_id: "shardId-000000000001".into(),
                sequence_number: sequence,
                sub_sequence_number: sub,
                arrival: arrival.map(ms_system_time),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_events_round_trip_through_both_formats(records in proptest::collection::vec(arb_record(), 1..12)) {
            for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
                let objects = encode_batch(&batch(records.clone()), "p", format).expect("encode");
                let mut read: Vec<EventRecord> =
                    objects.into_iter().flat_map(|o| decode_events(&o.key, o.body).expect("decode")).collect();
                // Objects come per hour: compare as multisets in batch order.
                let position = |r: &EventRecord| records.iter().position(|x| x == r);
                read.sort_by_key(|r| position(r));
                prop_assert_eq!(&read, &records, "{:?}", format);
            }
        }
    }
}
