//! The KPL aggregation codec: many user records in one Kinesis record, byte-compatible with
//! Amazon's Kinesis Producer Library (writer) and Kinesis Client Library (reader).
//!
//! An aggregated Kinesis record is `MAGIC | AggregatedRecord | MD5(AggregatedRecord)`, where the
//! middle part is the protobuf message of `protos/kpl/aggregation.proto`.
//!
//! - [`Aggregator`] packs [`UserRecord`]s into a [`KinesisRecord`], de-duplicating the partition
//!   and explicit hash keys into tables, and knows the exact size of what it will emit before it
//!   emits it, so callers can fill records up to a cap without ever re-encoding.
//! - [`Deaggregator`] unpacks a Kinesis record into [`DeaggregatedRecord`]s, recognising plain
//!   (non-aggregated) records the way the KCL does and saying why a record was taken as plain.

mod decode;
mod encode;

pub use decode::{DeaggregatedRecord, Deaggregation, Deaggregator, Malformed, RecordFormat};
pub use encode::{Aggregator, AggregatorConfig, InvalidRecord, KinesisRecord, Rejected, RejectedRef, UserRecord};

/// The four bytes every aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends every aggregated record.
pub const DIGEST_LEN: usize = 16;

/// Bytes an aggregated record adds around its protobuf message: the magic and the digest.
pub const FRAMING_LEN: usize = MAGIC.len() + DIGEST_LEN;

/// The partition key of every aggregated record, as the KPL writes it. Routing is by the explicit
/// hash key, so the partition key only has to be short.
pub const AGGREGATE_PARTITION_KEY: &str = "a";

/// Default cap on an aggregated record's size, as the KPL's `AggregationMaxSize` (51,200 bytes).
pub const DEFAULT_MAX_AGGREGATE_SIZE: usize = 51_200;

/// Default maximum size of one Kinesis record, data plus partition key: 1 MiB
/// ([Kinesis quotas](https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html)).
/// A stream can be configured for larger records; see [`LARGEST_MAX_RECORD_SIZE`].
pub const DEFAULT_MAX_RECORD_SIZE: usize = 1024 * 1024;

/// The largest maximum record size a stream can be configured with (10 MiB).
pub const LARGEST_MAX_RECORD_SIZE: usize = 10 * 1024 * 1024;
