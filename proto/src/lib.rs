//! The toolkit's two formats: the KPL aggregation format and the `events.v1` analytics schema.
//!
//! # Layout
//! - [`aggregation`]: the codec for KPL aggregated records, byte-compatible with Amazon's KPL and
//!   KCL. [`Aggregator`](aggregation::Aggregator) packs, [`Deaggregator`](aggregation::Deaggregator)
//!   unpacks.
//! - [`keys`]: partition keys, explicit hash keys, hash-key ranges: how Kinesis routes a record.
//! - [`kpl`]: the aggregation format's protobuf messages, generated from
//!   `protos/kpl/aggregation.proto` (the codec writes and reads the same bytes by hand, to predict
//!   sizes exactly and to decode without copying).
//! - [`events::v1`]: the analytics event schema, generated from `protos/events/v1/events.proto`.
//!
//! The `.proto` files are compiled at build time by `protox`, so no system `protoc` is needed.
#![deny(unsafe_code)]

pub mod aggregation;
mod error;
pub mod keys;
mod wire;

pub use error::{Error, Result};

/// The KPL aggregation format's messages (`package kpl`).
#[allow(missing_docs, clippy::all)]
pub mod kpl {
    include!(concat!(env!("OUT_DIR"), "/kpl.rs"));
}

/// The analytics event schema, one module per major version.
pub mod events {
    /// `events.v1`: see `protos/events/v1/events.proto` for the fields and the evolution rules.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/events.v1.rs"));
    }
}
