//! Reading shards: records come out of a reader in shard order, deaggregated, with the shard's
//! end and its children reported.
//!
//! - [`polling`](ShardReader): [`ShardReader`] reads one shard with `GetRecords`, keeping to the
//!   shard's read quota and re-getting expired iterators from the last delivered record.
//! - [`fanout`](FanOutReader): [`FanOutReader`] reads one shard through `SubscribeToShard` as a
//!   registered stream consumer ([`register_consumer`]).
//! - [`Reader`]: either kind behind one type.
//! - `kinesis`: the Kinesis read calls (`ListShards`, `GetShardIterator`, `GetRecords`) behind one
//!   seam, so the worker runs against a fake in unit tests; [`list_shards`] lists a stream's
//!   shards with their parents.
//!
//! Both readers resume a checkpoint exactly, even inside an aggregate: the checkpoint's Kinesis
//! record is read again and its sub-records up to the checkpoint are skipped.

mod fanout;
pub(crate) mod kinesis;
pub(crate) mod polling;
mod reader;

pub use fanout::{
    CONSUMER_ACTIVE_TIMEOUT, EVENT_TIMEOUT, FanOutConfig, FanOutReader, MAX_CONSUMERS_PER_STREAM, RegistrationError,
    SUBSCRIBE_MIN_INTERVAL, SUBSCRIPTION_LIFETIME, StreamConsumer, deregister_consumer, register_consumer,
    register_consumer_with_timeout,
};
pub use kinesis::{Shard, list_shards};
pub use polling::{
    ConsumerRecord, GET_RECORDS_MAX_RECORDS, GET_RECORDS_MIN_INTERVAL, ReadResult, ReaderConfig, RetrievalError,
    ShardReader, StartingPosition,
};
pub use reader::Reader;
