//! The crate's one error type.

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can be wrong with a record or a setting given to this crate.
///
/// None of these is retryable: each names input that must be fixed by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("the partition key is empty; Kinesis needs 1 to 256 characters")]
    EmptyPartitionKey,

    #[error("the partition key has {chars} characters; Kinesis allows at most 256")]
    PartitionKeyTooLong { chars: usize },

    #[error("explicit hash key {value:?} is invalid: {reason}; it must be a decimal integer from 0 to 2^128-1")]
    InvalidExplicitHashKey { value: String, reason: &'static str },

    #[error(
        "hash key range [{start}, {end}] is invalid: bounds must be decimal integers from 0 to 2^128-1 with start <= end"
    )]
    InvalidHashKeyRange { start: String, end: String },

    #[error(
        "the record is {size} bytes (data plus partition key) but the stream accepts at most {max}; \
         split it or raise the stream's maximum record size"
    )]
    RecordTooLarge { size: usize, max: usize },

    #[error("invalid aggregation setting: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether trying the same thing again could succeed. Never, for this crate's errors: they all
    /// describe the input.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
