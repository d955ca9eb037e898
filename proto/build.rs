//! Compiles the `.proto` files with `protox`, a protobuf compiler written in Rust, so that building
//! this crate never needs a system `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &["kpl/aggregation.proto", "events/v1/events.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    let descriptors = protox::compile(PROTOS, ["protos"])?;
    prost_build::Config::new()
        // User-record payloads decode as slices of the Kinesis record's buffer, not as copies.
        .bytes([".kpl"])
        .compile_fds(descriptors)?;
    Ok(())
}
