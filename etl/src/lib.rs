//! Daily ETL over the S3 sink's partitions: versioned SQL jobs computed, per day, into derived
//! tables that are reproducible, atomic and versioned.
//!
//! # Layout
//! - [`job`]: jobs as files (`jobs/<name>/job.toml` and `v<N>.sql`), embedded at build time or
//!   read from a directory; a job version's SQL and declared output columns, and their hash.
//! - [`day`]: the `YYYY-MM-DD` day a run computes, and day ranges.
//! - [`engine`]: the embedded engine, SQLite (a private on-disk temporary database, so memory
//!   stays bounded by its page cache): a day's events loaded once per event id, a job's query
//!   run and its rows checked against the declared columns, in a total order.
//! - [`output`]: a result as Parquet with fixed writer settings (the same rows make the same
//!   bytes), and back.
//! - [`manifest`]: what a committed partition was computed from (every input object with its
//!   ETag and size, the job's hash, the engine) and what it holds (rows, the output's key, size
//!   and SHA-256).
//! - [`store`]: the S3 layout (`<prefix>/events/dt=D/`, `<derived>/<job>/v=V/dt=D/`,
//!   `<derived>/_symlink/...` for Athena) and the S3 calls, conditional where it matters.
//! - [`run`]: one job, one day: plan (is the manifest up to date?), compute, write the part,
//!   commit the manifest (a conditional PUT: the commit point), point Athena at it, clean up.
//! - [`status`]: which days are computed, for which version, from which inputs, and whether
//!   they are stale.
//! - [`dead_letters`]: a day's dead letters counted by reason.
//!
//! # Data flow of a run
//! ```text
//! list events/dt=D/ ─> manifest up to date? ─yes─> nothing to do (repair Athena's pointer if needed)
//!                          │no
//!                          v
//! GET each input (If-Match its listed ETag) ─> decode ─> SQLite `events` (one row per event_id)
//!   ─> job SQL, ordered by every column ─> Parquet ─> PUT part-<sha256>.parquet
//!   ─> PUT _manifest.json (If-Match the old manifest / If-None-Match *)   <- the commit point
//!   ─> PUT _symlink/.../manifest (Athena) ─> DELETE parts no manifest names
//! ```

pub mod day;
pub mod dead_letters;
pub mod engine;
mod error;
pub mod job;
pub mod manifest;
pub mod output;
pub mod run;
pub mod status;
pub mod store;
#[doc(hidden)]
pub mod synthetic;

pub use day::Day;
pub use error::{EtlError, Result};
pub use job::{Catalog, Column, ColumnType, Job, JobVersion};
pub use manifest::Manifest;
pub use run::{Changes, Etl, EtlConfig, RunOutcome};
