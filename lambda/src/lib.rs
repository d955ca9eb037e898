//! The delivery pipeline as an AWS Lambda function behind a Kinesis event source mapping (ESM).
//!
//! The ECS `consumer` reads shards itself and checkpoints in DynamoDB; here the mapping reads the
//! shard and hands the function a batch of Kinesis records, and the function's answer is the
//! checkpoint: a partial batch response naming the first record that was not delivered.
//!
//! # Layout
//! - [`handler`]: [`KinesisHandler`] deaggregates one `KinesisEvent` (`ktk_proto`'s codec) and
//!   drives the delivery pipeline (`ktk_pipeline::ShardPipeline`, the same code the ECS consumer
//!   drives) with the invocation's budget of attempts and time, answering with
//!   `batchItemFailures`. Nothing of the pipeline is copied here.
//! - [`config`]: [`LambdaSettings`], flags and `KTK_*` variables (the sink and batch settings are
//!   the pipeline's, read the same way by the ECS consumer).
//! - [`emf`]: the invocation's one CloudWatch embedded-metric-format line (`SinkFailing`,
//!   `UserRecords`, `Failures`, ...), which an alarm watches: a Lambda has no `/health` to ask.
//! - `main.rs` (the `bootstrap` binary): builds the clients and pools once per container, reports
//!   a bad setting to the Runtime API's `/init/error`, runs the handler, logs each invocation's
//!   report and its EMF line, and closes the pools on
//!   the SIGTERM Lambda sends before it shuts a container down.
//!
//! See `lambda/README.md` for packaging and the mapping's settings.
#![deny(unsafe_code)]

pub mod config;
pub mod emf;
pub mod handler;

pub use config::LambdaSettings;
pub use handler::{FailingSink, HandlerConfig, InvocationHealth, InvocationReport, KinesisHandler, parse_event};
