//! The delivery pipeline as an AWS Lambda function behind a Kinesis event source mapping (ESM).
//!
//! The ECS `consumer` reads shards itself and checkpoints in DynamoDB; here the mapping reads the
//! shard and hands the function a batch of Kinesis records, and the function's answer is the
//! checkpoint: a partial batch response naming the first record that was not delivered.
//!
//! # Layout
//! - [`handler`]: [`KinesisHandler`] turns one `KinesisEvent` into sink batches and writes them,
//!   in order, through the consumer's sinks (`ktk_consumer::pipeline`), answering with
//!   `batchItemFailures`. Deaggregation is `ktk_proto`'s codec, event decoding and the dedup window
//!   are the consumer's: nothing of the pipeline is copied here.
//! - [`config`]: [`LambdaSettings`] from `KTK_*` environment variables (the sink variables are the
//!   ECS consumer's, read by `ktk_consumer::app::SinkSettings`).
//! - `main.rs` (the `bootstrap` binary): builds the clients and pools once per container, reports
//!   a bad setting to the Runtime API's `/init/error`, runs the handler, and closes the pools on
//!   the SIGTERM Lambda sends before it shuts a container down.
//!
//! See `lambda/README.md` for packaging and the mapping's settings.
#![deny(unsafe_code)]

pub mod config;
pub mod handler;

pub use config::LambdaSettings;
pub use handler::{HandlerConfig, InvocationReport, KinesisHandler, parse_event};
