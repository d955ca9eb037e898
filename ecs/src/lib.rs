//! `ktk-ecs`: the `consumer` binary, the delivery pipeline as an ECS task.
//!
//! # Layout
//! - [`settings`]: [`Settings`], every setting a `--flag` and its `KTK_*` variable (the sink and
//!   batch settings are `ktk_pipeline::settings`, shared with the Lambda).
//! - [`processor`]: [`DeliveryProcessor`], the adapter from the KCL-style worker
//!   (`ktk_consumer::RecordProcessor`) to the pipeline (`ktk_pipeline::ShardPipeline`):
//!   checkpoints after every sink holds a batch.
//! - [`app`]: [`run`](app::run), the worker and the pipeline with `GET /health` and `GET /metrics`.
//! - `bin/consumer.rs`: parses the settings, sets up logs and metrics, waits for SIGTERM.
#![deny(unsafe_code)]

pub mod app;
pub mod processor;
pub mod settings;

pub use processor::DeliveryProcessor;
pub use settings::{LogFormat, Settings};
