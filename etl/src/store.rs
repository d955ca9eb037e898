//! The S3 layout and calls.
//!
//! ```text
//! <prefix>/events/dt=D/hour=HH/*.parquet|*.jsonl.gz         the sink's events (inputs)
//! <prefix>/dead-letters/dt=D/*.jsonl.gz                      the sink's dead letters
//! <derived>/<job>/v=V/dt=D/part-<sha256[..16]>.parquet       a partition's data (content-addressed)
//! <derived>/<job>/v=V/dt=D/_manifest.json                    its manifest: the commit point
//! <derived>/_symlink/<job>/v=V/dt=D/manifest                 the data file's s3:// URI, for Athena
//! ```
//!
//! `<derived>` is `<prefix>/derived` unless set. Athena skips files whose names start with `_`;
//! its derived tables read the `_symlink` tree (SymlinkTextInputFormat), so Athena too sees only
//! committed data files.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::manifest::InputObject;
use crate::{Day, EtlError};

/// Where a sink's objects are and where derived tables go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub bucket: String,
    /// The S3 sink's prefix (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// The derived tables' prefix.
    pub derived: String,
}

fn join(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() { rest.to_owned() } else { format!("{prefix}/{rest}") }
}

impl Layout {
    pub fn new(bucket: impl Into<String>, prefix: &str, derived: Option<&str>) -> Layout {
        let prefix = prefix.trim_matches('/').to_owned();
        let derived = derived.map(|d| d.trim_matches('/').to_owned()).unwrap_or_else(|| join(&prefix, "derived"));
        Layout { bucket: bucket.into(), prefix, derived }
    }

    /// `<prefix>/events/dt=D/`
    pub fn events_day(&self, day: Day) -> String {
        join(&self.prefix, &format!("events/dt={day}/"))
    }

    /// `<prefix>/events/`
    pub fn events_root(&self) -> String {
        join(&self.prefix, "events/")
    }

    /// `<prefix>/dead-letters/dt=D/`
    pub fn dead_letters_day(&self, day: Day) -> String {
        join(&self.prefix, &format!("dead-letters/dt={day}/"))
    }

    /// `<derived>/<job>/v=V/`
    pub fn version_root(&self, job: &str, version: u32) -> String {
        join(&self.derived, &format!("{job}/v={version}/"))
    }

    /// `<derived>/<job>/v=V/dt=D/`
    pub fn partition(&self, job: &str, version: u32, day: Day) -> String {
        format!("{}dt={day}/", self.version_root(job, version))
    }

    pub fn manifest(&self, job: &str, version: u32, day: Day) -> String {
        format!("{}_manifest.json", self.partition(job, version, day))
    }

    /// The content-addressed data file of a partition.
    pub fn part(&self, job: &str, version: u32, day: Day, sha256: &str) -> String {
        format!("{}part-{}.parquet", self.partition(job, version, day), &sha256[..16.min(sha256.len())])
    }

    /// `<derived>/_symlink/<job>/v=V/dt=D/manifest`
    pub fn symlink(&self, job: &str, version: u32, day: Day) -> String {
        join(&self.derived, &format!("_symlink/{job}/v={version}/dt={day}/manifest"))
    }

    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

/// Whether a key is a partition's data file (written by a run, committed or not).
pub fn is_part(key: &str) -> bool {
    key.rsplit('/').next().is_some_and(|name| name.starts_with("part-") && name.ends_with(".parquet"))
}

/// A PUT's condition.
#[derive(Debug, Clone, Copy)]
pub enum Condition<'a> {
    None,
    /// Only if no object is there (`If-None-Match: *`).
    Absent,
    /// Only if the object there has this ETag (`If-Match`).
    Matches(&'a str),
}

fn status<E>(error: &SdkError<E, HttpResponse>) -> u16 {
    error.raw_response().map(|r| r.status().as_u16()).unwrap_or(0)
}

fn s3_error<E>(operation: &'static str, bucket: &str, key: &str, error: &SdkError<E, HttpResponse>) -> EtlError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let retryable = match error {
        SdkError::ServiceError(_) => {
            let code = status(error);
            code >= 500 || code == 429 || matches!(error.code(), Some("SlowDown" | "RequestTimeout" | "Throttling"))
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    };
    let message = match error.code() {
        Some("NoSuchBucket") => format!("the bucket {bucket} does not exist (check --bucket and the region)"),
        Some("AccessDenied") => format!("access denied: {}", DisplayErrorContext(error)),
        _ => DisplayErrorContext(error).to_string(),
    };
    EtlError::S3 { operation, bucket: bucket.to_owned(), key: key.to_owned(), message, retryable }
}

/// The S3 calls the ETL makes.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    bucket: String,
}

impl Store {
    pub fn new(client: Client, bucket: impl Into<String>) -> Store {
        Store { client, bucket: bucket.into() }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Every object under `prefix` (every page), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<InputObject>, EtlError> {
        let mut objects = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", &self.bucket, prefix, &e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    objects.push(InputObject {
                        key: key.to_owned(),
                        etag: object.e_tag().unwrap_or_default().to_owned(),
                        size: object.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
        }
        objects.sort();
        Ok(objects)
    }

    /// The "directories" right under `prefix` (`Delimiter: /`), in order.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, EtlError> {
        let mut dirs = Vec::new();
        let mut pages =
            self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).delimiter("/").into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", &self.bucket, prefix, &e))?;
            dirs.extend(page.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_owned)));
        }
        dirs.sort();
        Ok(dirs)
    }

    /// The object's bytes and ETag; `None` when there is none. With `etag`, only that version
    /// (`If-Match`): another one there is [`EtlError::InputChanged`].
    pub async fn get(&self, key: &str, etag: Option<&str>) -> Result<Option<(Bytes, String)>, EtlError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        let object = match request.send().await {
            Ok(object) => object,
            Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) || status(&error) == 404 => {
                return match etag {
                    Some(etag) => Err(EtlError::InputChanged {
                        bucket: self.bucket.clone(),
                        key: key.to_owned(),
                        etag: etag.to_owned(),
                    }),
                    None => Ok(None),
                };
            }
            Err(error) if status(&error) == 412 => {
                return Err(EtlError::InputChanged {
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                    etag: etag.unwrap_or_default().to_owned(),
                });
            }
            Err(error) => return Err(s3_error("GetObject", &self.bucket, key, &error)),
        };
        let etag = object.e_tag().unwrap_or_default().to_owned();
        let body = object.body.collect().await.map_err(|error| EtlError::S3 {
            operation: "GetObject",
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            message: format!("reading the body: {error}"),
            retryable: true,
        })?;
        Ok(Some((body.into_bytes(), etag)))
    }

    /// The object's size, or `None` when there is none.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, EtlError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(error) if status(&error) == 404 => Ok(None),
            Err(error) => Err(s3_error("HeadObject", &self.bucket, key, &error)),
        }
    }

    /// Writes `body` at `key` under `condition`; a condition not met is
    /// [`EtlError::ConcurrentCommit`].
    pub async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: Condition<'_>,
    ) -> Result<(), EtlError> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        request = match condition {
            Condition::None => request,
            Condition::Absent => request.if_none_match("*"),
            Condition::Matches(etag) => request.if_match(etag),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            // 412: the condition failed; 409: a conflicting conditional write was in progress.
            Err(error) if !matches!(condition, Condition::None) && matches!(status(&error), 409 | 412) => {
                Err(EtlError::ConcurrentCommit { bucket: self.bucket.clone(), key: key.to_owned() })
            }
            Err(error) => Err(s3_error("PutObject", &self.bucket, key, &error)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtlError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_error("DeleteObject", &self.bucket, key, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let day: Day = "2026-03-01".parse().expect("day");
        let layout = Layout::new("b", "/analytics/raw/", None);
        assert_eq!(layout.events_day(day), "analytics/raw/events/dt=2026-03-01/");
        assert_eq!(layout.dead_letters_day(day), "analytics/raw/dead-letters/dt=2026-03-01/");
        assert_eq!(layout.manifest("plays", 2, day), "analytics/raw/derived/plays/v=2/dt=2026-03-01/_manifest.json");
        assert_eq!(
            layout.part("plays", 2, day, "0123456789abcdef0123"),
            "analytics/raw/derived/plays/v=2/dt=2026-03-01/part-0123456789abcdef.parquet"
        );
        assert_eq!(layout.symlink("plays", 2, day), "analytics/raw/derived/_symlink/plays/v=2/dt=2026-03-01/manifest");
        let bare = Layout::new("b", "", Some("tables/"));
        assert_eq!(bare.events_day(day), "events/dt=2026-03-01/");
        assert_eq!(bare.manifest("j", 1, day), "tables/j/v=1/dt=2026-03-01/_manifest.json");
        assert!(is_part("x/dt=2026-03-01/part-0123.parquet"));
        assert!(!is_part("x/dt=2026-03-01/_manifest.json"));
    }
}
