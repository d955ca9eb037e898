//! The crate's one error type.

use std::path::PathBuf;

/// What went wrong in an ETL run, a status or a report. Each message says what happened and, where
/// there is one, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtlError {
    #[error("{path}: {message}")]
    JobFile { path: PathBuf, message: String },
    #[error("job {job}: {message}")]
    Job { job: String, message: String },
    #[error("no job named {0:?} (ktk etl jobs lists them)")]
    UnknownJob(String),
    #[error("job {job} has no version {version} (versions: {known})")]
    UnknownVersion { job: String, version: u32, known: String },
    #[error("{0:?} is not a day: expected YYYY-MM-DD")]
    BadDay(String),
    #[error("{0}")]
    BadRange(String),
    #[error("S3 {operation} s3://{bucket}/{key}: {message}")]
    S3 { operation: &'static str, bucket: String, key: String, message: String, retryable: bool },
    #[error(
        "input s3://{bucket}/{key} changed while the run read it (listed with ETag {etag}); run again to compute from what is there now"
    )]
    InputChanged { bucket: String, key: String, etag: String },
    #[error(
        "another run committed s3://{bucket}/{key} while this one computed; nothing of this run is visible; run again to check it"
    )]
    ConcurrentCommit { bucket: String, key: String },
    #[error("s3://{bucket}/{key} cannot be decoded: {message}")]
    Decode { bucket: String, key: String, message: String },
    #[error("the engine (SQLite): {0}")]
    Engine(String),
    #[error("job {job} v{version}: {message}")]
    Query { job: String, version: u32, message: String },
    #[error("Parquet: {0}")]
    Parquet(String),
    #[error("manifest s3://{bucket}/{key}: {message}")]
    Manifest { bucket: String, key: String, message: String },
}

impl EtlError {
    /// Whether running again as is may succeed (a transient S3 failure, a race with a writer).
    pub fn is_retryable(&self) -> bool {
        match self {
            EtlError::S3 { retryable, .. } => *retryable,
            EtlError::InputChanged { .. } | EtlError::ConcurrentCommit { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = EtlError> = std::result::Result<T, E>;
