//! Packing user records into Kinesis records.
//!
//! The aggregator keeps the three parts of the protobuf message (partition-key table,
//! explicit-hash-key table, records) as ready-encoded byte buffers. Adding a record appends to
//! them and updates a running length, so the exact size of the finished record is always known;
//! finishing concatenates the parts between the magic and the digest. The field order (all of
//! field 1, then 2, then 3) is the order a protobuf library writes, so the bytes are the KPL's.

use std::fmt;
use std::hash::BuildHasher;

use bytes::Bytes;
use hashbrown::HashTable;
use md5::{Digest, Md5};

use super::{
    AGGREGATE_PARTITION_KEY, DEFAULT_MAX_AGGREGATE_SIZE, DEFAULT_MAX_RECORD_SIZE, FRAMING_LEN, LARGEST_MAX_RECORD_SIZE,
    MAGIC,
};
use crate::error::{Error, Result};
use crate::keys::{effective_hash_key, parse_explicit_hash_key, validate_partition_key};
use crate::wire::{WIRE_LEN, WIRE_VARINT, len_field_size, put_varint, tag, varint_len};

const TAG_PARTITION_KEY_TABLE: u8 = tag(1, WIRE_LEN);
const TAG_EXPLICIT_HASH_KEY_TABLE: u8 = tag(2, WIRE_LEN);
const TAG_RECORDS: u8 = tag(3, WIRE_LEN);
const TAG_PARTITION_KEY_INDEX: u8 = tag(1, WIRE_VARINT);
const TAG_EXPLICIT_HASH_KEY_INDEX: u8 = tag(2, WIRE_VARINT);
const TAG_DATA: u8 = tag(3, WIRE_LEN);

/// One record as the application gave it: a partition key, an optional explicit hash key, data.
///
/// Keys are validated when the record is made, so everything downstream can rely on them.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRecord {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
}

impl UserRecord {
    /// A record routed by the hash of `partition_key` (1 to 256 Unicode characters).
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Result<Self> {
        let partition_key = partition_key.into();
        validate_partition_key(&partition_key)?;
        Ok(UserRecord { partition_key, explicit_hash_key: None, data: data.into() })
    }

    /// Routes the record by `explicit_hash_key` (decimal, `0..=2^128-1`) instead of the partition
    /// key's hash.
    pub fn with_explicit_hash_key(mut self, explicit_hash_key: impl Into<String>) -> Result<Self> {
        let ehk = explicit_hash_key.into();
        parse_explicit_hash_key(&ehk)?;
        self.explicit_hash_key = Some(ehk);
        Ok(self)
    }

    /// Like [`new`](Self::new) plus [`with_explicit_hash_key`](Self::with_explicit_hash_key), for
    /// callers that must get their parts back when a key is invalid (a producer returns the
    /// caller's record with the error).
    pub fn from_parts(
        partition_key: String,
        explicit_hash_key: Option<String>,
        data: Bytes,
    ) -> Result<Self, Box<InvalidRecord>> {
        let check = validate_partition_key(&partition_key)
            .and_then(|()| explicit_hash_key.as_deref().map_or(Ok(0), parse_explicit_hash_key).map(drop));
        match check {
            Ok(()) => Ok(UserRecord { partition_key, explicit_hash_key, data }),
            Err(error) => Err(Box::new(InvalidRecord { error, partition_key, explicit_hash_key, data })),
        }
    }

    pub fn partition_key(&self) -> &str {
        &self.partition_key
    }

    pub fn explicit_hash_key(&self) -> Option<&str> {
        self.explicit_hash_key.as_deref()
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The 128-bit hash key that decides the record's shard.
    pub fn hash_key(&self) -> u128 {
        // Both keys were validated at construction, so this cannot fail; fall back to the
        // partition key's hash rather than panic if that invariant were ever broken.
        effective_hash_key(&self.partition_key, self.explicit_hash_key.as_deref())
            .unwrap_or_else(|_| crate::keys::partition_key_hash(&self.partition_key))
    }

    /// Size of this record if it is put on its own: data plus partition key, as Kinesis counts it.
    pub fn plain_size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    pub fn into_parts(self) -> (String, Option<String>, Bytes) {
        (self.partition_key, self.explicit_hash_key, self.data)
    }
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("partition_key", &self.partition_key)
            .field("explicit_hash_key", &self.explicit_hash_key)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// The parts of a record [`UserRecord::from_parts`] refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRecord {
    pub error: Error,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
}

/// A record ready for `PutRecords`: what the aggregator emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
    /// How many user records it carries (1 for a plain record).
    pub user_records: usize,
}

impl KinesisRecord {
    /// Whether this is an aggregate (more than one user record) rather than a plain record.
    pub fn is_aggregated(&self) -> bool {
        self.user_records > 1
    }

    /// Size as Kinesis counts it against the record size limit: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// Limits of an [`Aggregator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorConfig {
    max_aggregate_size: usize,
    max_record_size: usize,
}

impl Default for AggregatorConfig {
    /// The KPL's defaults: aggregates up to 51,200 bytes (`AggregationMaxSize`), records up to 1 MiB.
    fn default() -> Self {
        AggregatorConfig { max_aggregate_size: DEFAULT_MAX_AGGREGATE_SIZE, max_record_size: DEFAULT_MAX_RECORD_SIZE }
    }
}

impl AggregatorConfig {
    /// Caps an aggregate's data size (magic, message and digest). Default 51,200 bytes, the KPL's
    /// `AggregationMaxSize`. Must be at least 64 bytes and at most the maximum record size. A lone
    /// record larger than this is still put, on its own, up to the maximum record size.
    pub fn with_max_aggregate_size(mut self, bytes: usize) -> Result<Self> {
        if bytes < 64 || bytes > self.max_record_size {
            return Err(Error::InvalidConfig(format!(
                "max aggregate size {bytes} must be between 64 and the maximum record size ({})",
                self.max_record_size
            )));
        }
        self.max_aggregate_size = bytes;
        Ok(self)
    }

    /// The stream's maximum record size (data plus partition key): 1 MiB by default, up to 10 MiB
    /// for streams configured for large records. A lower aggregate cap is lowered with it.
    pub fn with_max_record_size(mut self, bytes: usize) -> Result<Self> {
        if !(1024..=LARGEST_MAX_RECORD_SIZE).contains(&bytes) {
            return Err(Error::InvalidConfig(format!(
                "max record size {bytes} must be between 1 KiB and {LARGEST_MAX_RECORD_SIZE} bytes"
            )));
        }
        self.max_record_size = bytes;
        self.max_aggregate_size = self.max_aggregate_size.min(bytes);
        Ok(self)
    }

    pub fn max_aggregate_size(&self) -> usize {
        self.max_aggregate_size
    }

    pub fn max_record_size(&self) -> usize {
        self.max_record_size
    }
}

/// Why [`Aggregator::try_add`] did not take a record; the record comes back either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The record does not fit in the current aggregate: finish it and add the record again.
    Full(UserRecord),
    /// The record is larger than a Kinesis record may be, even on its own: `size` bytes (data
    /// plus partition key) against a maximum of `max`.
    TooLarge { record: UserRecord, size: usize, max: usize },
}

impl Rejected {
    /// The record that was not taken.
    pub fn into_record(self) -> UserRecord {
        match self {
            Rejected::Full(record) | Rejected::TooLarge { record, .. } => record,
        }
    }

    /// The error to report for a record that can never be put; `None` for [`Rejected::Full`],
    /// which only means "finish the aggregate first".
    pub fn error(&self) -> Option<Error> {
        match self {
            Rejected::Full(_) => None,
            Rejected::TooLarge { size, max, .. } => Some(Error::RecordTooLarge { size: *size, max: *max }),
        }
    }
}

/// Why [`Aggregator::try_add_ref`] did not take a record (which the caller still has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectedRef {
    /// Does not fit in the current aggregate: finish it and add the record again.
    Full,
    /// Larger than the record size limit, even alone.
    TooLarge { size: usize, max: usize },
}

/// Packs user records into one Kinesis record at a time, KPL-style.
///
/// ```
/// use ktk_proto::aggregation::{Aggregator, UserRecord};
/// let mut agg = Aggregator::default();
/// agg.try_add(UserRecord::new("user-1", "play").unwrap()).unwrap();
/// agg.try_add(UserRecord::new("user-2", "pause").unwrap()).unwrap();
/// let predicted = agg.size();
/// let record = agg.finish().unwrap();
/// assert_eq!(record.user_records, 2);
/// assert_eq!(record.data.len(), predicted);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Aggregator {
    config: AggregatorConfig,
    partition_key_table: Vec<u8>,
    explicit_hash_key_table: Vec<u8>,
    records: Vec<u8>,
    partition_key_indices: KeyIndex,
    explicit_hash_key_indices: KeyIndex,
    count: usize,
    /// The first record added, kept whole: it is emitted as it is if no other record joins it,
    /// and its keys route the aggregate.
    first: Option<UserRecord>,
}

/// Index of each distinct key in its table, found by the key's bytes in the table itself: no key
/// is copied or kept elsewhere, so a producer that adds records by reference allocates nothing
/// per record. Keys are short and hashed once per record, so a fast non-cryptographic hasher
/// pays (they come from the application, and flooding one producer's own aggregate buys an
/// attacker nothing).
#[derive(Clone, Default)]
struct KeyIndex {
    entries: HashTable<KeySpan>,
    hasher: foldhash::fast::FixedState,
}

/// Where a key's bytes are in its table, and its index.
#[derive(Debug, Clone, Copy)]
struct KeySpan {
    start: usize,
    len: usize,
    index: u64,
}

impl KeyIndex {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key.as_bytes())
    }

    /// The index of `key`, whose hash is `hash`, if `table` holds it.
    fn get(&self, table: &[u8], key: &str, hash: u64) -> Option<u64> {
        self.entries
            .find(hash, |span| table.get(span.start..span.start + span.len) == Some(key.as_bytes()))
            .map(|s| s.index)
    }

    /// Records that the key at `start..start + len` of `table` has index `len()`.
    fn insert(&mut self, table: &[u8], hash: u64, start: usize, len: usize) {
        let hasher = &self.hasher;
        let index = self.entries.len() as u64;
        self.entries.insert_unique(hash, KeySpan { start, len, index }, |span| {
            hasher.hash_one(&table[span.start..span.start + span.len])
        });
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

impl fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyIndex").field("keys", &self.entries.len()).finish()
    }
}

/// What adding a record would cost, worked out once and then committed.
struct Addition {
    /// The key's hash in its index, when the key is new to the aggregate.
    new_partition_key: Option<u64>,
    new_explicit_hash_key: Option<u64>,
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    /// Length of the encoded `Record` message (without its own tag and length).
    record_len: usize,
    /// Bytes the message grows by.
    growth: usize,
}

impl Aggregator {
    pub fn new(config: AggregatorConfig) -> Self {
        Aggregator { config, ..Aggregator::default() }
    }

    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    /// Number of user records added since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Exact length of the data of the Kinesis record [`finish`](Self::finish) would return now
    /// (magic, message and digest for an aggregate; the user data for a lone record); 0 when empty.
    /// This is the size the KPL compares with `AggregationMaxSize`.
    pub fn size(&self) -> usize {
        match (&self.first, self.count) {
            (None, _) => 0,
            (Some(first), 1) => first.data.len(),
            (Some(_), _) => FRAMING_LEN + self.message_len(),
        }
    }

    /// What [`size`](Self::size) would be after adding `record`.
    pub fn size_with(&self, record: &UserRecord) -> usize {
        match &self.first {
            None => record.data.len(),
            Some(_) => FRAMING_LEN + self.message_len() + self.plan(record).growth,
        }
    }

    /// The largest aggregate this aggregator emits: the configured cap, kept below the record
    /// size limit, which also counts the aggregate's partition key.
    fn aggregate_cap(&self) -> usize {
        self.config.max_aggregate_size.min(self.config.max_record_size - AGGREGATE_PARTITION_KEY.len())
    }

    /// Adds `record` if the result stays within the configured caps. An empty aggregator takes
    /// any record up to the maximum record size, since a lone record is put as a plain record.
    pub fn try_add(&mut self, record: UserRecord) -> Result<(), Rejected> {
        // Checked first, whatever the aggregator holds, so that `Full` always means "fits once
        // the current aggregate is finished".
        let size = record.plain_size();
        if size > self.config.max_record_size {
            let max = self.config.max_record_size;
            return Err(Rejected::TooLarge { record, size, max });
        }
        let plan = self.plan(&record);
        if self.first.is_none() {
            // The first record goes into the buffers like any other, and is also kept whole: a
            // lone record is emitted plain, as it came.
            self.first = Some(record.clone());
        } else if FRAMING_LEN + self.message_len() + plan.growth > self.aggregate_cap() {
            return Err(Rejected::Full(record));
        }
        self.write(&record, &plan);
        Ok(())
    }

    /// Like [`try_add`](Self::try_add), for a caller that keeps its record (a producer holds on to
    /// it to hand it back if the put fails): copies only what it must (new keys, and the first
    /// record).
    pub fn try_add_ref(&mut self, record: &UserRecord) -> Result<(), RejectedRef> {
        let size = record.plain_size();
        if size > self.config.max_record_size {
            return Err(RejectedRef::TooLarge { size, max: self.config.max_record_size });
        }
        let plan = self.plan(record);
        if self.first.is_none() {
            self.first = Some(record.clone());
        } else if FRAMING_LEN + self.message_len() + plan.growth > self.aggregate_cap() {
            return Err(RejectedRef::Full);
        }
        self.write(record, &plan);
        Ok(())
    }

    /// Discards everything added since the last [`finish`](Self::finish).
    pub fn reset(&mut self) {
        self.clear();
    }

    /// Adds `record`, first finishing the current aggregate if the record does not fit in it.
    /// Returns the finished record, if one was finished. A record too large for the stream is
    /// handed back and the aggregator is left as it was.
    pub fn add(&mut self, record: UserRecord) -> Result<Option<KinesisRecord>, Rejected> {
        match self.try_add(record) {
            Ok(()) => Ok(None),
            Err(Rejected::Full(record)) => {
                let finished = self.finish();
                // `Full` is only returned for records within the record size limit, and an empty
                // aggregator takes any such record.
                match self.try_add(record) {
                    Ok(()) => Ok(finished),
                    Err(_) => {
                        unreachable!("an empty aggregator refused a record within the size limit")
                    }
                }
            }
            Err(rejected) => Err(rejected),
        }
    }

    /// Emits what was added and empties the aggregator: `None` if nothing was added, a plain
    /// record for a single user record, an aggregate otherwise.
    pub fn finish(&mut self) -> Option<KinesisRecord> {
        let first = self.first.take()?;
        let count = std::mem::take(&mut self.count);
        let record = if count == 1 {
            let (partition_key, explicit_hash_key, data) = first.into_parts();
            KinesisRecord { partition_key, explicit_hash_key, data, user_records: 1 }
        } else {
            let message_len = self.message_len();
            let mut data = Vec::with_capacity(FRAMING_LEN + message_len);
            data.extend_from_slice(&MAGIC);
            data.extend_from_slice(&self.partition_key_table);
            data.extend_from_slice(&self.explicit_hash_key_table);
            data.extend_from_slice(&self.records);
            let digest = Md5::digest(&data[MAGIC.len()..]);
            data.extend_from_slice(&digest);
            // As the KPL does: the aggregate is routed by the first record's hash key, so it
            // lands on the shard all of its records were predicted for, and its partition key is
            // a one-byte constant that costs nothing against the record size limit.
            KinesisRecord {
                explicit_hash_key: Some(first.hash_key().to_string()),
                partition_key: AGGREGATE_PARTITION_KEY.to_owned(),
                data: Bytes::from(data),
                user_records: count,
            }
        };
        self.clear();
        Some(record)
    }

    fn clear(&mut self) {
        self.partition_key_table.clear();
        self.explicit_hash_key_table.clear();
        self.records.clear();
        self.partition_key_indices.clear();
        self.explicit_hash_key_indices.clear();
        self.count = 0;
        self.first = None;
    }

    fn message_len(&self) -> usize {
        self.partition_key_table.len() + self.explicit_hash_key_table.len() + self.records.len()
    }

    fn plan(&self, record: &UserRecord) -> Addition {
        let mut growth = 0;
        let indices = &self.partition_key_indices;
        let hash = indices.hash(&record.partition_key);
        let (partition_key_index, new_partition_key) =
            match indices.get(&self.partition_key_table, &record.partition_key, hash) {
                Some(index) => (index, None),
                None => {
                    growth += len_field_size(record.partition_key.len());
                    (indices.len() as u64, Some(hash))
                }
            };
        let (explicit_hash_key_index, new_explicit_hash_key) = match &record.explicit_hash_key {
            None => (None, None),
            Some(ehk) => {
                let indices = &self.explicit_hash_key_indices;
                let hash = indices.hash(ehk);
                match indices.get(&self.explicit_hash_key_table, ehk, hash) {
                    Some(index) => (Some(index), None),
                    None => {
                        growth += len_field_size(ehk.len());
                        (Some(indices.len() as u64), Some(hash))
                    }
                }
            }
        };
        let record_len = 1
            + varint_len(partition_key_index)
            + explicit_hash_key_index.map_or(0, |i| 1 + varint_len(i))
            + len_field_size(record.data.len());
        growth += len_field_size(record_len);
        Addition {
            new_partition_key,
            new_explicit_hash_key,
            partition_key_index,
            explicit_hash_key_index,
            record_len,
            growth,
        }
    }

    /// Appends the record's bytes to the tables (indexing new keys) and the records.
    fn write(&mut self, record: &UserRecord, plan: &Addition) {
        if let Some(hash) = plan.new_partition_key {
            let table = &mut self.partition_key_table;
            let start = put_string(table, TAG_PARTITION_KEY_TABLE, &record.partition_key);
            self.partition_key_indices.insert(table, hash, start, record.partition_key.len());
        }
        if let (Some(hash), Some(ehk)) = (plan.new_explicit_hash_key, &record.explicit_hash_key) {
            let table = &mut self.explicit_hash_key_table;
            let start = put_string(table, TAG_EXPLICIT_HASH_KEY_TABLE, ehk);
            self.explicit_hash_key_indices.insert(table, hash, start, ehk.len());
        }
        let records = &mut self.records;
        records.push(TAG_RECORDS);
        put_varint(records, plan.record_len as u64);
        records.push(TAG_PARTITION_KEY_INDEX);
        put_varint(records, plan.partition_key_index);
        if let Some(index) = plan.explicit_hash_key_index {
            records.push(TAG_EXPLICIT_HASH_KEY_INDEX);
            put_varint(records, index);
        }
        records.push(TAG_DATA);
        put_varint(records, record.data.len() as u64);
        records.extend_from_slice(&record.data);
        self.count += 1;
    }
}

/// Appends a length-delimited string field; returns where the string's bytes start.
fn put_string(buf: &mut Vec<u8>, tag: u8, value: &str) -> usize {
    buf.push(tag);
    put_varint(buf, value.len() as u64);
    let start = buf.len();
    buf.extend_from_slice(value.as_bytes());
    start
}
