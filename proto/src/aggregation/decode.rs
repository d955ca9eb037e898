//! Unpacking Kinesis records into user records, as the KCL does, and saying what was found.
//!
//! A record is an aggregate only if it starts with the magic, is long enough to hold a digest, its
//! digest matches, and its message parses with every index in range. Anything else is delivered
//! unchanged as one plain record, with the reason it was not taken as an aggregate; nothing is
//! ever dropped for being malformed.
//!
//! Where this differs from the KCL, it is to lose nothing: the KCL drops a whole aggregate when one
//! sub-record's hash key is outside the shard's range, and drops the rest of an aggregate whose
//! table indices are broken. Here the out-of-range sub-records alone are set aside (counted and
//! handed back), and a broken aggregate is delivered as a plain record.

use std::fmt;

use bytes::Bytes;
use bytestring::ByteString;
use md5::{Digest, Md5};

use super::{DIGEST_LEN, FRAMING_LEN, MAGIC};
use crate::keys::{HashKeyRange, parse_explicit_hash_key, partition_key_hash};
use crate::wire::{Reader, WIRE_LEN, WIRE_VARINT, WireError};

/// One user record out of a Kinesis record.
#[derive(Clone, PartialEq, Eq)]
pub struct DeaggregatedRecord {
    /// Shares the Kinesis record's buffer, like `data`.
    pub partition_key: ByteString,
    pub explicit_hash_key: Option<ByteString>,
    /// A slice of the Kinesis record's data: no copy is made.
    pub data: Bytes,
    /// Position within the aggregate, from 0; always 0 for a plain record.
    pub sub_sequence_number: u64,
    /// Whether it came out of an aggregate.
    pub aggregated: bool,
}

impl fmt::Debug for DeaggregatedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeaggregatedRecord")
            .field("partition_key", &self.partition_key)
            .field("explicit_hash_key", &self.explicit_hash_key)
            .field("data_len", &self.data.len())
            .field("sub_sequence_number", &self.sub_sequence_number)
            .field("aggregated", &self.aggregated)
            .finish()
    }
}

/// What a Kinesis record turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordFormat {
    /// A well-formed KPL aggregate.
    Aggregated,
    /// Does not start with the magic bytes: an ordinary record.
    Plain,
    /// Starts with the magic but is too short to hold a digest and a message.
    PlainTooShort,
    /// Starts with the magic but the digest does not match the message.
    PlainDigestMismatch,
    /// Starts with the magic and the digest matches, but the message is not a valid aggregate.
    PlainMalformed(Malformed),
}

impl RecordFormat {
    pub fn is_aggregated(&self) -> bool {
        matches!(self, RecordFormat::Aggregated)
    }

    /// Whether the record looked like an aggregate (it has the magic) but was not a valid one:
    /// worth a warning and a metric, since a KPL-compatible writer never produces that.
    pub fn is_suspicious(&self) -> bool {
        !matches!(self, RecordFormat::Aggregated | RecordFormat::Plain)
    }
}

/// Why a digest-verified message is not a valid aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// The protobuf encoding is broken (truncated, bad varint, bad wire type).
    Encoding,
    /// A field has the wrong wire type.
    FieldType,
    /// A key in a table is not valid UTF-8.
    InvalidUtf8,
    /// A record lacks its required partition key index or data.
    MissingField,
    /// A record refers to a partition or explicit hash key that is not in the tables.
    IndexOutOfRange,
    /// An explicit hash key in the table is not a decimal integer in 0..2^128-1.
    InvalidExplicitHashKey,
}

impl From<WireError> for Malformed {
    fn from(_: WireError) -> Self {
        Malformed::Encoding
    }
}

/// The outcome of unpacking one Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deaggregation {
    pub format: RecordFormat,
    /// The user records in order; for a plain record, the record itself.
    pub records: Vec<DeaggregatedRecord>,
    /// Sub-records whose hash key is outside the shard's range (only with
    /// [`Deaggregator::with_shard_range`]). They are not lost: the caller decides what to do with
    /// them, and should at least count them.
    pub out_of_range: Vec<DeaggregatedRecord>,
}

/// Unpacks Kinesis records, optionally keeping only the sub-records that belong to one shard.
#[derive(Debug, Clone, Default)]
pub struct Deaggregator {
    shard_range: Option<HashKeyRange>,
}

impl Deaggregator {
    pub fn new() -> Self {
        Deaggregator::default()
    }

    /// Sets aside sub-records of aggregates whose effective hash key is outside `range`, the
    /// hash-key range of the shard being read (KCL semantics, but per sub-record and never
    /// silent). Plain records are never filtered.
    pub fn with_shard_range(mut self, range: HashKeyRange) -> Self {
        self.shard_range = Some(range);
        self
    }

    /// Unpacks one Kinesis record, given its data and partition key (and explicit hash key, if
    /// known: `GetRecords` does not return it).
    pub fn deaggregate(&self, data: Bytes, partition_key: &str, explicit_hash_key: Option<&str>) -> Deaggregation {
        let mut records = Vec::new();
        let mut out_of_range = Vec::new();
        let format = self.deaggregate_into(data, partition_key, explicit_hash_key, &mut records, &mut out_of_range);
        Deaggregation { format, records, out_of_range }
    }

    /// Like [`deaggregate`](Self::deaggregate), appending to caller-owned vectors so a consumer
    /// can reuse their allocations across records.
    pub fn deaggregate_into(
        &self,
        data: Bytes,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        records: &mut Vec<DeaggregatedRecord>,
        out_of_range: &mut Vec<DeaggregatedRecord>,
    ) -> RecordFormat {
        let format = classify(&data);
        if format == RecordFormat::Aggregated {
            let (records_before, dropped_before) = (records.len(), out_of_range.len());
            match self.unpack(&data, records, out_of_range) {
                Ok(()) => return RecordFormat::Aggregated,
                Err(malformed) => {
                    // Deliver the record whole rather than a part of it.
                    records.truncate(records_before);
                    out_of_range.truncate(dropped_before);
                    records.push(plain(data, partition_key, explicit_hash_key));
                    return RecordFormat::PlainMalformed(malformed);
                }
            }
        }
        records.push(plain(data, partition_key, explicit_hash_key));
        format
    }

    fn unpack(
        &self,
        data: &Bytes,
        records: &mut Vec<DeaggregatedRecord>,
        out_of_range: &mut Vec<DeaggregatedRecord>,
    ) -> Result<(), Malformed> {
        let message_start = MAGIC.len();
        let message_end = data.len() - DIGEST_LEN;
        let message = &data[message_start..message_end];

        // Pass 1: the key tables, wherever they are in the message (a protobuf writer may
        // interleave repeated fields; the KPL writes them first).
        let string_at = |range: std::ops::Range<usize>| {
            let range = message_start + range.start..message_start + range.end;
            ByteString::try_from(data.slice(range)).map_err(|_| Malformed::InvalidUtf8)
        };
        let mut partition_keys: Vec<ByteString> = Vec::new();
        let mut explicit_hash_keys: Vec<(ByteString, u128)> = Vec::new();
        let mut reader = Reader::new(message);
        while !reader.is_empty() {
            let (field, wire_type) = reader.key()?;
            match (field, wire_type) {
                (1, WIRE_LEN) => partition_keys.push(string_at(reader.len_delimited()?)?),
                (2, WIRE_LEN) => {
                    let key = string_at(reader.len_delimited()?)?;
                    let hash = parse_explicit_hash_key(&key).map_err(|_| Malformed::InvalidExplicitHashKey)?;
                    explicit_hash_keys.push((key, hash));
                }
                (1..=3, _) if wire_type != WIRE_LEN => return Err(Malformed::FieldType),
                _ => reader.skip(wire_type)?,
            }
        }

        // Pass 2: the records, in order. Hashes of partition keys are computed only when filtering,
        // and once per table entry.
        let mut partition_key_hashes: Vec<Option<u128>> = Vec::new();
        if self.shard_range.is_some() {
            partition_key_hashes.resize(partition_keys.len(), None);
        }
        let mut reader = Reader::new(message);
        let mut sub_sequence_number = 0u64;
        while !reader.is_empty() {
            let (field, wire_type) = reader.key()?;
            if (field, wire_type) != (3, WIRE_LEN) {
                reader.skip(wire_type)?;
                continue;
            }
            let range = reader.len_delimited()?;
            let fields = parse_record(&message[range.clone()])?;
            let partition_key = partition_keys
                .get(usize::try_from(fields.partition_key_index).map_err(|_| Malformed::IndexOutOfRange)?);
            let partition_key = partition_key.ok_or(Malformed::IndexOutOfRange)?;
            let explicit_hash_key = match fields.explicit_hash_key_index {
                None => None,
                Some(index) => Some(
                    usize::try_from(index)
                        .ok()
                        .and_then(|i| explicit_hash_keys.get(i))
                        .ok_or(Malformed::IndexOutOfRange)?,
                ),
            };
            let offset = message_start + range.start;
            let record = DeaggregatedRecord {
                partition_key: partition_key.clone(),
                explicit_hash_key: explicit_hash_key.map(|(key, _)| key.clone()),
                data: data.slice(offset + fields.data.start..offset + fields.data.end),
                sub_sequence_number,
                aggregated: true,
            };
            sub_sequence_number += 1;
            let in_range = match (&self.shard_range, explicit_hash_key) {
                (None, _) => true,
                (Some(shard), Some((_, hash))) => shard.contains(*hash),
                (Some(shard), None) => {
                    let index = fields.partition_key_index as usize;
                    let hash = match partition_key_hashes[index] {
                        Some(hash) => hash,
                        None => {
                            let hash = partition_key_hash(partition_key);
                            partition_key_hashes[index] = Some(hash);
                            hash
                        }
                    };
                    shard.contains(hash)
                }
            };
            if in_range {
                records.push(record);
            } else {
                out_of_range.push(record);
            }
        }
        Ok(())
    }
}

/// The fields of one `Record` message, as positions in it.
struct RecordFields {
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    data: std::ops::Range<usize>,
}

fn parse_record(message: &[u8]) -> Result<RecordFields, Malformed> {
    let mut reader = Reader::new(message);
    let (mut partition_key_index, mut explicit_hash_key_index, mut data) = (None, None, None);
    while !reader.is_empty() {
        let (field, wire_type) = reader.key()?;
        // As in protobuf, the last occurrence of a non-repeated field wins.
        match (field, wire_type) {
            (1, WIRE_VARINT) => partition_key_index = Some(reader.varint()?),
            (2, WIRE_VARINT) => explicit_hash_key_index = Some(reader.varint()?),
            (3, WIRE_LEN) => data = Some(reader.len_delimited()?),
            (1..=3, _) => return Err(Malformed::FieldType),
            // Tags (field 4) and any field a newer writer adds are skipped.
            _ => reader.skip(wire_type)?,
        }
    }
    let position = reader.position();
    debug_assert_eq!(position, message.len());
    match (partition_key_index, data) {
        (Some(partition_key_index), Some(data)) => {
            Ok(RecordFields { partition_key_index, explicit_hash_key_index, data })
        }
        _ => Err(Malformed::MissingField),
    }
}

/// Decides from the framing alone whether a record can be an aggregate.
fn classify(data: &[u8]) -> RecordFormat {
    if !data.starts_with(&MAGIC) {
        return RecordFormat::Plain;
    }
    // As the KCL: at least one byte of message between the magic and the digest.
    if data.len() <= FRAMING_LEN {
        return RecordFormat::PlainTooShort;
    }
    let (message, digest) = data[MAGIC.len()..].split_at(data.len() - FRAMING_LEN);
    if Md5::digest(message).as_slice() != digest {
        return RecordFormat::PlainDigestMismatch;
    }
    RecordFormat::Aggregated
}

fn plain(data: Bytes, partition_key: &str, explicit_hash_key: Option<&str>) -> DeaggregatedRecord {
    DeaggregatedRecord {
        partition_key: ByteString::from(partition_key),
        explicit_hash_key: explicit_hash_key.map(ByteString::from),
        data,
        sub_sequence_number: 0,
        aggregated: false,
    }
}
