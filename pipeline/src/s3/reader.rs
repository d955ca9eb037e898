//! Reading a bucket back: [`read_events`] and [`read_dead_letters`] list a prefix (every page),
//! fetch the objects of one kind a few at a time, decode each by its key's extension, and keep
//! each event (by `event_id`) or dead letter (by position in the shard) once, counting the other
//! copies as duplicates.

use std::collections::HashSet;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::jsonl::{decode_dead_letters, event_from_line, gunzip_lines};
use super::keys::{ObjectKind, object_kind};
use super::parquet::read_parquet;
use super::upload::request_error;
use super::{Client, S3Error, S3Format};
use crate::{DeadLetter, EventRecord};

/// Objects fetched at once by the reader.
const READ_CONCURRENCY: usize = 8;

/// The events in an events object, in the order they were written. The format comes from the
/// key's extension.
pub(super) fn decode_events(key: &str, body: Bytes) -> Result<Vec<EventRecord>, String> {
    match object_kind(key) {
        Some((ObjectKind::Events, S3Format::Parquet)) => read_parquet(body).map_err(|e| e.to_string()),
        Some((ObjectKind::Events, S3Format::JsonLinesGzip)) => {
            gunzip_lines(&body)?.iter().map(event_from_line).collect()
        }
        _ => Err("not an events object key (<prefix>/events/dt=.../hour=.../*.parquet or *.jsonl.gz)".into()),
    }
}

/// The events of one events object (`<prefix>/events/dt=.../hour=.../*.parquet` or `*.jsonl.gz`),
/// in the order they were written, copies included. For readers that fetch objects themselves
/// (the ETL fetches each input at the ETag it listed).
pub fn decode_events_object(bucket: &str, key: &str, body: Bytes) -> Result<Vec<EventRecord>, S3Error> {
    decode_events(key, body).map_err(|message| S3Error::Decode {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        message,
    })
}

/// The dead letters of one dead-letters object (`<prefix>/dead-letters/dt=.../*.jsonl.gz`), in the
/// order they were written, copies included.
pub fn decode_dead_letters_object(bucket: &str, key: &str, body: &[u8]) -> Result<Vec<DeadLetter>, S3Error> {
    decode_dead_letters(body).map_err(|message| S3Error::Decode {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        message,
    })
}

/// Whether `key` names an events object (by its directory and extension).
pub fn is_events_object(key: &str) -> bool {
    object_kind(key).is_some_and(|(kind, _)| kind == ObjectKind::Events)
}

/// Whether `key` names a dead-letters object.
pub fn is_dead_letters_object(key: &str) -> bool {
    object_kind(key).is_some_and(|(kind, _)| kind == ObjectKind::DeadLetters)
}

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
