//! Putting one object in S3 exactly once: a conditional `PutObject` (`If-None-Match: *`), or for a
//! large object a multipart upload that checks with `HeadObject` first, completes conditionally and
//! is aborted when it fails. An object already at its key is left as it is and compared with what
//! would have been written through the digest in its user metadata ([`DIGEST_METADATA`]). Every
//! failed call becomes an [`S3Error`] whose retryability is decided here, from the service's
//! answer.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use tracing::warn;

use super::{S3Format, S3Object, S3Sink};
use crate::SinkError;

/// The user-metadata key (`x-amz-meta-ktk-md5`) holding the hex MD5 of an object's bytes.
pub const DIGEST_METADATA: &str = "ktk-md5";

/// The most parts one upload may have (10,000).
pub const MAX_PARTS: usize = 10_000;

/// Parts of one multipart upload in flight at once.
const PART_UPLOAD_CONCURRENCY: usize = 4;

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

/// What a write found at an object's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The object was created.
    Created,
    /// An object was already there and was left as it is. `identical`: its recorded digest (or,
    /// for an object without one, its length) matches the bytes this write would have written.
    AlreadyExisted { identical: bool },
}

impl S3Sink {
    /// Writes `object` unless its key is taken; with the parts of its multipart upload (0 for one
    /// `PutObject`, or when nothing was uploaded).
    pub(super) async fn put_once(&self, object: &S3Object) -> Result<(WriteOutcome, usize), S3Error> {
        let digest = hex_md5(&object.body);
        if object.body.len() > self.config.multipart_threshold() {
            // A rewrite after a crash is common: look first rather than upload megabytes for nothing.
            if let Some(existing) = self.head(&object.key).await? {
                return Ok((existing.outcome(&digest, object.body.len()), 0));
            }
            return self.put_multipart(object, &digest).await;
        }
        let put = self
            .client
            .put_object()
            .bucket(self.config.bucket())
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
            Err(error) => Err(request_error("PutObject", self.config.bucket(), &object.key, &error)),
        }
    }

    async fn put_multipart(&self, object: &S3Object, digest: &str) -> Result<(WriteOutcome, usize), S3Error> {
        let bucket = self.config.bucket();
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
                bucket: bucket.to_owned(),
                key: key.clone(),
                message: "the response has no upload id".into(),
                retryable: true,
            });
        };
        let part_size = self.config.part_size().max(object.body.len().div_ceil(MAX_PARTS));
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
        let bucket = self.config.bucket();
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
                bucket: self.config.bucket().to_owned(),
                key: key.to_owned(),
                message: "the object existed when the write was refused, and is gone now; write the batch again".into(),
                retryable: true,
            }),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<Existing>, S3Error> {
        let bucket = self.config.bucket();
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
pub(super) fn request_error<E>(
    operation: &'static str,
    bucket: &str,
    key: &str,
    error: &SdkError<E, HttpResponse>,
) -> S3Error
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

#[cfg(test)]
mod tests {
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;

    use super::*;

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
}
