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
//!   `arrival_ms` (timestamp, null when unknown), then the fields added to the schema since, in
//!   the order they were added: `app_id`. Pages are zstd-compressed. See [`PARQUET_SCHEMA`].
//!   New columns only ever come last, and the reader goes by column name: an object written
//!   before a column existed reads with that field at its default (an empty `app_id`).
//! - gzip JSON Lines ([`S3Format::JsonLinesGzip`]): one object per event,
//!   `{"arrival_ms", "event": <canonical proto3 JSON>, "sequence_number", "shard_id",
//!   "sub_sequence_number"}` (see [`event_line`]); dead letters likewise, `{"arrival_ms", "data"
//!   (base64), "partition_key", "reason", "sequence_number", "shard_id", "sub_sequence_number"}`.
//!   The event's fields have their proto3 JSON names (`appId`) and a field at its default is
//!   left out, so a line written before a field existed reads with it empty.
//!   JSON has no NaN or infinity: such a geo coordinate is written as `null` and reads back as 0
//!   (Parquet keeps it).
//!
//! A field added to the schema changes the bytes a batch makes (a Parquet column more; in JSON
//! Lines, a key more where it is set): a batch written again by a newer build, across an upgrade,
//! finds its object "different" ([`WriteOutcome`]) and keeps it as it is.
//!
//! Objects above a threshold ([`DEFAULT_MULTIPART_THRESHOLD`]) go up in parts; a failed multipart
//! upload is aborted, so no parts are left behind to be billed.
//!
//! # Reading back
//! [`read_events`] lists a prefix (every page), reads each events object of either format, and
//! yields each event once (the first copy in key order), counting the other copies as duplicates;
//! [`read_dead_letters`] does the same for dead letters.
//!
//! # Layout
//! - `config`: [`S3SinkConfig`], [`S3Format`] and [`client`].
//! - `keys`: object keys and partitions, and what an object holds from its key.
//! - `jsonl` and `parquet`: the two object formats, both ways.
//! - `upload`: putting an object once (conditional writes, multipart uploads, the digest check)
//!   and [`S3Error`] with its retryability.
//! - `reader`: [`read_events`] and [`read_dead_letters`].
//! - this module: [`S3Sink`], the objects a batch becomes ([`S3Object`]) and what writing them did
//!   ([`BatchWrite`]).

mod config;
mod jsonl;
mod keys;
mod parquet;
mod reader;
mod upload;

#[cfg(test)]
mod fixtures;

use std::collections::BTreeMap;

use aws_config::SdkConfig;
/// The S3 client the sink and the reader take (re-exported so callers name the same SDK version).
pub use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::future::BoxFuture;
use tracing::{debug, warn};

pub use self::config::{
    DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE, MAX_PART_SIZE, MIN_PART_SIZE, S3Format, S3SinkConfig, client,
};
use self::jsonl::{dead_letter_line, gzip_lines};
pub use self::jsonl::{event_json, event_line};
use self::keys::{dead_letters_key, events_key};
use self::parquet::encode_parquet;
pub use self::parquet::{PARQUET_CREATED_BY, PARQUET_SCHEMA};
pub use self::reader::{
    ReadDeadLetters, ReadEvents, decode_dead_letters_object, decode_events_object, is_dead_letters_object,
    is_events_object, read_dead_letters, read_events,
};
pub use self::upload::{DIGEST_METADATA, MAX_PARTS, S3Error, WriteOutcome};
use crate::time::MS_PER_HOUR;
use crate::{Batch, DeadLetter, EventRecord, Sink, SinkError, SinkReport};

/// One object a batch becomes: its key, its bytes, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub key: String,
    pub body: Bytes,
    pub events: u64,
    pub dead_letters: u64,
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
    /// duplicates, and re-read ones: an object's key names the stretch of the shard it holds, so
    /// an object already at its key holds the same records, read before.
    pub fn report(&self) -> SinkReport {
        let mut report = SinkReport::default();
        for object in &self.objects {
            match object.outcome {
                WriteOutcome::Created => report.written += object.events,
                WriteOutcome::AlreadyExisted { .. } => {
                    report.duplicates += object.events;
                    report.reread += object.events;
                }
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
                .force_path_style(config.path_style())
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
        encode_batch(batch, self.config.prefix(), self.config.format())
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
            // already there with the same bytes; `different` means a build with fewer event
            // fields wrote it (around an upgrade), or else that batches are not reproducible,
            // which needs a look.
            metrics::counter!("S3Objects", "bucket" => self.config.bucket().to_owned(), "outcome" => label)
                .increment(1);
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
}

impl Sink for S3Sink {
    fn name(&self) -> &str {
        "s3"
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        Box::pin(async move { Ok(self.write_batch(batch).await?.report()) })
    }
}

/// The objects `batch` becomes under `prefix`: one events object per hour of `occurred_at_ms`
/// (events in batch order), one dead-letter object per arrival day; in key order.
fn encode_batch(batch: &Batch, prefix: &str, format: S3Format) -> Result<Vec<S3Object>, S3Error> {
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

#[cfg(test)]
mod tests {
    use ::parquet::file::reader::{FileReader as _, SerializedFileReader};
    use ktk_proto::events::v1::{Event, Geo};
    use proptest::prelude::*;
    use std::collections::HashSet;

    use super::fixtures::{T_10_59, arb_record, batch, letter, record};
    use super::jsonl::decode_dead_letters;
    use super::keys::object_name;
    use super::reader::decode_events;
    use super::*;
    use crate::time::from_unix_millis as ms_system_time;

    fn round_trip(format: S3Format, records: Vec<EventRecord>) -> Vec<EventRecord> {
        let objects = encode_batch(&batch(records), "p", format).expect("encode");
        objects.into_iter().flat_map(|o| decode_events(&o.key, o.body).expect("decode")).collect()
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
        assert_eq!(written.report(), SinkReport { written: 5, duplicates: 5, reread: 5 });
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
