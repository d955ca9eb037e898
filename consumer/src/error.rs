//! The consumer's errors: one [`Error`] for the crate. Lost races on the lease table are their own
//! variants, never confused with DynamoDB being unwell: [`Error::is_condition_failure`] says the
//! table answered and the lease was not what the caller believed; [`Error::is_retryable`] says
//! the same call may work if made again.
//!
//! Reading a shard and registering a fan-out consumer fail with typed sub-errors of their own
//! ([`RetrievalError`], [`RegistrationError`]), returned as they are by the readers and
//! registration calls (a caller of those matches on them), and wrapped by [`Error`] where they
//! stop the worker. [`ItemError`] says why a table item is not a lease.

use std::fmt;
use std::time::Duration;

use crate::lease::{ExtendedSequenceNumber, Lease};
use crate::retrieval::{RegistrationError, RetrievalError};

/// `Result` with the consumer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller held the lease and does not any more: another worker took it, or it was
    /// deleted. The write was not made.
    #[error(
        "lost the lease for shard {shard}: {operation} expected leaseCounter {expected_counter}, but {}; \
         stop processing the shard and write nothing more for it",
        Now(current.as_deref())
    )]
    LeaseLost {
        shard: String,
        operation: &'static str,
        expected_counter: u64,
        /// The lease as the table holds it now (`None` if it no longer exists).
        current: Option<Box<Lease>>,
    },
    /// The lease changed between reading it and writing it (someone else took, renewed or
    /// checkpointed it first). The write was not made.
    #[error(
        "the lease for shard {shard} changed since it was read: {operation} expected leaseCounter \
         {expected_counter}, but {}; read the table again and decide again",
        Now(current.as_deref())
    )]
    LeaseChanged {
        shard: String,
        operation: &'static str,
        expected_counter: u64,
        /// The lease as the table holds it now (`None` if it no longer exists).
        current: Option<Box<Lease>>,
    },
    /// A checkpoint before the lease's current one: it would make the shard be read again.
    #[error(
        "checkpoint for shard {shard} would move backwards, from {current} to {requested}; \
         checkpoint only positions at or after the last one"
    )]
    CheckpointBackwards { shard: String, current: ExtendedSequenceNumber, requested: ExtendedSequenceNumber },
    /// The call itself makes no sense for this lease (no owner to renew as, an empty worker id...).
    #[error("cannot {operation} the lease for shard {shard}: {problem}")]
    InvalidRequest { shard: String, operation: &'static str, problem: String },
    /// A worker setting that cannot work, named.
    #[error("bad consumer configuration: {setting}: {problem}")]
    Config { setting: &'static str, problem: String },
    /// The stream cannot be read (it does not exist, or access is denied), or listing its shards
    /// failed for good.
    #[error("cannot consume stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
    /// Listing the stream's shards failed.
    #[error("listing the shards of stream {stream:?} failed: {message}")]
    ListShards { stream: String, message: String, retryable: bool },
    /// Reading a shard failed.
    #[error(transparent)]
    Retrieval(#[from] RetrievalError),
    /// Registering the enhanced fan-out consumer failed.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    /// The lease table is not there.
    #[error(
        "lease table {table:?} does not exist; create it with LeaseTable::ensure_table, or check the \
         table name and the AWS region"
    )]
    TableNotFound { table: String },
    /// A table of that name exists but cannot hold leases.
    #[error(
        "table {table:?} cannot be a lease table: its key is {found}, but a lease table's key must be \
         exactly the hash key leaseKey (S); use another table name"
    )]
    TableKeySchema { table: String, found: String },
    /// The table did not become usable in time.
    #[error(
        "lease table {table:?} is {status} after waiting {waited:?} for it to become ACTIVE; wait and \
         try again, or check the table in the DynamoDB console"
    )]
    TableNotActive { table: String, status: String, waited: Duration },
    /// The credentials in use may not do this.
    #[error(
        "not allowed to call {action} on DynamoDB table {table:?}: {message}; grant the worker's role \
         dynamodb:{action} on the table (a lease table needs DescribeTable, CreateTable, GetItem, PutItem, \
         UpdateItem, DeleteItem and Scan)"
    )]
    AccessDenied { table: String, action: &'static str, message: String },
    /// An item under a shard's key that cannot be read as a lease.
    #[error("item {key:?} of lease table {table:?} is not a lease ktk can use: {source}")]
    Item {
        table: String,
        key: String,
        #[source]
        source: ItemError,
    },
    /// DynamoDB refused the call for lack of capacity.
    #[error(
        "DynamoDB throttled {action} on table {table:?}: {message}; retry after a backoff, or give the \
         table more capacity (on-demand billing adapts by itself)"
    )]
    Throttled { table: String, action: &'static str, message: String },
    /// Any other failure of a DynamoDB call (network, timeout, server error, bad request).
    #[error("DynamoDB {action} on table {table:?} failed: {code}: {message}")]
    Service { table: String, action: &'static str, code: String, message: String, retryable: bool },
}

impl Error {
    /// Whether making the same call again may succeed (throttling, timeouts, server errors).
    /// Lost races never are: the caller must read the lease again first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Throttled { .. } | Error::TableNotActive { .. } => true,
            Error::Service { retryable, .. } | Error::ListShards { retryable, .. } => *retryable,
            Error::Retrieval(error) => error.is_retryable(),
            Error::Registration(error) => error.is_retryable(),
            _ => false,
        }
    }

    /// Whether a conditional write failed because the lease was not as the caller believed
    /// ([`Error::LeaseLost`] or [`Error::LeaseChanged`]).
    pub fn is_condition_failure(&self) -> bool {
        matches!(self, Error::LeaseLost { .. } | Error::LeaseChanged { .. })
    }

    /// For a failed condition, the lease as the table holds it now (`None` if it is gone, or for
    /// other errors).
    pub fn current_lease(&self) -> Option<&Lease> {
        match self {
            Error::LeaseLost { current, .. } | Error::LeaseChanged { current, .. } => current.as_deref(),
            _ => None,
        }
    }
}

/// Why an item could not be read as a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    /// Another kind of item that newer KCL releases keep in the lease table (leader lock,
    /// migration state, worker metrics), tagged with a non-`LEASE` `entityType`.
    #[error("it is not a lease but an item of entityType {entity_type:?}")]
    NotALease { entity_type: String },
    /// A lease of a KCL multi-stream application (it has `streamName`); ktk reads one stream.
    #[error("it is a lease of a multi-stream KCL application (streamName {stream:?}), which ktk does not read")]
    MultiStreamLease { stream: String },
    #[error("attribute {attribute} is missing")]
    Missing { attribute: &'static str },
    #[error("attribute {attribute} has type {found}, but the KCL writes it as {expected}")]
    WrongType { attribute: &'static str, expected: &'static str, found: &'static str },
    #[error("attribute {attribute} is {value:?}: {problem}")]
    Invalid { attribute: &'static str, value: String, problem: String },
}

impl ItemError {
    /// Whether the item is of another kind (not a single-stream lease) rather than a broken lease.
    pub fn is_other_kind(&self) -> bool {
        matches!(self, ItemError::NotALease { .. } | ItemError::MultiStreamLease { .. })
    }
}

/// How a lease stands now, for error messages.
struct Now<'a>(Option<&'a Lease>);

impl fmt::Display for Now<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("the lease no longer exists"),
            Some(lease) => {
                write!(f, "it is now at {} ", lease.counter)?;
                match (&lease.owner, &lease.checkpoint_owner) {
                    (None, _) => f.write_str("with no owner"),
                    (Some(owner), None) => write!(f, "owned by {owner:?}"),
                    (Some(owner), Some(from)) => write!(f, "being handed from {from:?} to {owner:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_and_changed_are_not_retryable() {
        let mut current = Lease::new("shardId-000000000001", ExtendedSequenceNumber::LATEST);
        current.owner = Some("w2".into());
        current.counter = 8;
        let lost = Error::LeaseLost {
            shard: "shardId-000000000001".into(),
            operation: "renew",
            expected_counter: 7,
            current: Some(Box::new(current)),
        };
        assert!(lost.is_condition_failure() && !lost.is_retryable());
        assert_eq!(lost.current_lease().map(|l| l.counter), Some(8));
        let text = lost.to_string();
        assert!(text.contains("owned by \"w2\"") && text.contains("stop processing"), "{text}");
        let gone = Error::LeaseChanged { shard: "s".into(), operation: "take", expected_counter: 1, current: None };
        assert!(gone.to_string().contains("no longer exists"));
        let throttled = Error::Throttled { table: "t".into(), action: "UpdateItem", message: "slow down".into() };
        assert!(throttled.is_retryable() && !throttled.is_condition_failure());
    }
}
