//! Compiles the `.proto` files with `protox`, a protobuf compiler written in Rust, so that building
//! this crate never needs a system `protoc`.
//!
//! Two generators run over the same descriptors: `prost-build` writes the message types
//! (`kpl.rs`, `events.v1.rs`), and `pbjson-build` writes canonical proto3 JSON serde impls for
//! `events.v1` only (`events.v1.serde.rs`): the KPL format is never JSON.

use std::error::Error;

use prost::Message;

const PROTOS: &[&str] = &["kpl/aggregation.proto", "events/v1/events.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    let descriptors = protox::compile(PROTOS, ["protos"])?;
    let encoded = descriptors.encode_to_vec();
    prost_build::Config::new()
        // User-record payloads decode as slices of the Kinesis record's buffer, not as copies.
        .bytes([".kpl"])
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        // The schema's evolution rules 2 and 3: a reader built against an older events.v1 keeps an
        // event that carries fields or enum values it does not know yet (unknown fields are
        // skipped, unknown enum values read as UNSPECIFIED; binary protobuf keeps their number).
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".events.v1"])?;
    Ok(())
}
