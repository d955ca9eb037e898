//! What a lease is: one shard's owner, counter and checkpoint, as the KCL models it
//! (`software.amazon.kinesis.leases.Lease` and `retrieval.kpl.ExtendedSequenceNumber`).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use ktk_proto::keys::HashKeyRange;

/// Where a shard is read from or up to: a Kinesis sequence number, or one of the KCL's sentinel
/// checkpoints (`SentinelCheckpoint`: `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`, `SHARD_END`).
///
/// Ordered as the KCL orders them (`ExtendedSequenceNumber.compareTo`): `AT_TIMESTAMP` <
/// `TRIM_HORIZON` < `LATEST` < every sequence number (by numeric value) < `SHARD_END`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SequenceNumber {
    /// Start at the oldest record still in the shard.
    TrimHorizon,
    /// Start after the newest record.
    Latest,
    /// Start at a time given to the consumer (the lease itself does not store the time).
    AtTimestamp,
    /// The shard was read to its end (it was split or merged away); its children may start.
    ShardEnd,
    /// A Kinesis sequence number: decimal digits, no leading zero (checked by [`SequenceNumber::parse`]).
    Number(String),
}

/// Most digits of a Kinesis sequence number (the API's pattern is `0|([1-9]\d{0,128})`).
const MAX_SEQUENCE_NUMBER_DIGITS: usize = 129;

impl SequenceNumber {
    /// Reads a checkpoint as the KCL stores it: a sentinel name or a sequence number.
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        Ok(match value {
            "TRIM_HORIZON" => SequenceNumber::TrimHorizon,
            "LATEST" => SequenceNumber::Latest,
            "AT_TIMESTAMP" => SequenceNumber::AtTimestamp,
            "SHARD_END" => SequenceNumber::ShardEnd,
            number => {
                check_sequence_number(number)?;
                SequenceNumber::Number(number.to_owned())
            }
        })
    }

    /// The string stored in the lease table's `checkpoint` attribute.
    pub fn as_str(&self) -> &str {
        match self {
            SequenceNumber::TrimHorizon => "TRIM_HORIZON",
            SequenceNumber::Latest => "LATEST",
            SequenceNumber::AtTimestamp => "AT_TIMESTAMP",
            SequenceNumber::ShardEnd => "SHARD_END",
            SequenceNumber::Number(number) => number,
        }
    }

    /// Whether this is a sentinel rather than a sequence number.
    pub fn is_sentinel(&self) -> bool {
        !matches!(self, SequenceNumber::Number(_))
    }

    /// `Err` with the reason if this is a [`SequenceNumber::Number`] that Kinesis could not have issued.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            SequenceNumber::Number(number) => check_sequence_number(number),
            _ => Ok(()),
        }
    }

    /// The KCL's rank: sentinels below numbers are negative (`AT_TIMESTAMP` -3, `TRIM_HORIZON` -2,
    /// `LATEST` -1); `SHARD_END` is above everything.
    fn rank(&self) -> i8 {
        match self {
            SequenceNumber::AtTimestamp => -3,
            SequenceNumber::TrimHorizon => -2,
            SequenceNumber::Latest => -1,
            SequenceNumber::Number(_) => 0,
            SequenceNumber::ShardEnd => 1,
        }
    }
}

fn check_sequence_number(number: &str) -> Result<(), &'static str> {
    if number.is_empty() {
        return Err("it is empty");
    }
    if !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            "it is neither a sequence number (decimal digits) nor TRIM_HORIZON, LATEST, AT_TIMESTAMP or SHARD_END",
        );
    }
    if number.len() > 1 && number.starts_with('0') {
        return Err("it has a leading zero");
    }
    if number.len() > MAX_SEQUENCE_NUMBER_DIGITS {
        return Err("it has more than 129 digits");
    }
    Ok(())
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            // Without leading zeros, the longer number is the larger; equal lengths compare as text.
            (SequenceNumber::Number(a), SequenceNumber::Number(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position inside a shard down to one user record of a KPL aggregate: the Kinesis record's
/// sequence number and the user record's index in it (0 for records that are not aggregated).
/// Ordered by sequence number, then sub-sequence number, as the KCL does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtendedSequenceNumber {
    pub sequence: SequenceNumber,
    pub sub_sequence: u64,
}

impl ExtendedSequenceNumber {
    pub const TRIM_HORIZON: ExtendedSequenceNumber =
        ExtendedSequenceNumber { sequence: SequenceNumber::TrimHorizon, sub_sequence: 0 };
    pub const LATEST: ExtendedSequenceNumber =
        ExtendedSequenceNumber { sequence: SequenceNumber::Latest, sub_sequence: 0 };
    pub const AT_TIMESTAMP: ExtendedSequenceNumber =
        ExtendedSequenceNumber { sequence: SequenceNumber::AtTimestamp, sub_sequence: 0 };
    pub const SHARD_END: ExtendedSequenceNumber =
        ExtendedSequenceNumber { sequence: SequenceNumber::ShardEnd, sub_sequence: 0 };

    /// A position after the Kinesis record `sequence` (sub-sequence 0); `Err` if it is not a
    /// sequence number Kinesis could have issued.
    pub fn at(sequence: impl Into<String>, sub_sequence: u64) -> Result<Self, &'static str> {
        let sequence = SequenceNumber::Number(sequence.into());
        sequence.validate()?;
        Ok(ExtendedSequenceNumber { sequence, sub_sequence })
    }

    pub fn is_shard_end(&self) -> bool {
        self.sequence == SequenceNumber::ShardEnd
    }
}

impl fmt::Display for ExtendedSequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.sequence, self.sub_sequence)
    }
}

/// One item of the lease table: who processes a shard, how far it got, and where the shard sits
/// in the stream's lineage. Field names follow the KCL's attribute names (in brackets).
///
/// The table holds the truth; a `Lease` is a snapshot of one item. Every write in
/// [`LeaseTable`](crate::lease::LeaseTable) is conditional on the snapshot still being current
/// (its `counter`, and for owner operations its owners), and returns the new snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The shard id (`leaseKey`, the table's hash key), e.g. `shardId-000000000000`.
    pub lease_key: String,
    /// The worker holding the lease (`leaseOwner`); `None` when nobody holds it.
    pub owner: Option<String>,
    /// Incremented by every write (`leaseCounter`). A holder that sees it move without having moved
    /// it has lost the lease; a counter that stays still for the failover time means the holder died.
    pub counter: u64,
    /// How far the shard has been processed (`checkpoint`, `checkpointSubSequenceNumber`).
    pub checkpoint: ExtendedSequenceNumber,
    /// A checkpoint that was prepared but not yet committed (`pendingCheckpoint`,
    /// `pendingCheckpointSubSequenceNumber`).
    pub pending_checkpoint: Option<ExtendedSequenceNumber>,
    /// Application state stored with the pending checkpoint (`pendingCheckpointState`, binary).
    pub pending_checkpoint_state: Option<Vec<u8>>,
    /// Times the lease changed hands since the last checkpoint (`ownerSwitchesSinceCheckpoint`).
    pub owner_switches_since_checkpoint: u64,
    /// The shards this one was split or merged from (`parentShardId`, a string set). A shard is
    /// processed only after all of them have reached `SHARD_END`.
    pub parent_shard_ids: BTreeSet<String>,
    /// The shards this one was split or merged into (`childShardIds`), recorded at `SHARD_END`.
    pub child_shard_ids: BTreeSet<String>,
    /// The shard's hash-key range (`startingHashKey`, `endingHashKey`, decimal strings). KCL
    /// versions before 2.3 did not write it.
    pub hash_key_range: Option<HashKeyRange>,
    /// The shard's recent throughput in KB/s (`throughputKBps`), written by KCL 3.x workers for
    /// their load balancing. Kept as read; ktk does not write it.
    pub throughput_kbps: Option<f64>,
    /// The worker that must still checkpoint before handing the lease to `owner`
    /// (`checkpointOwner`): KCL 3.x's graceful hand-off in progress.
    pub checkpoint_owner: Option<String>,
}

impl Lease {
    /// A new, unowned lease for a shard, to be read from `initial` (TRIM_HORIZON, LATEST or
    /// AT_TIMESTAMP) once its parents are done.
    pub fn new(shard_id: impl Into<String>, initial: ExtendedSequenceNumber) -> Self {
        Lease {
            lease_key: shard_id.into(),
            owner: None,
            counter: 0,
            checkpoint: initial,
            pending_checkpoint: None,
            pending_checkpoint_state: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
            throughput_kbps: None,
            checkpoint_owner: None,
        }
    }

    /// The shard's parents (from `ListShards`: `ParentShardId`, `AdjacentParentShardId`).
    pub fn with_parents(mut self, parents: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.parent_shard_ids = parents.into_iter().map(Into::into).collect();
        self
    }

    /// The shard's hash-key range.
    pub fn with_hash_key_range(mut self, range: HashKeyRange) -> Self {
        self.hash_key_range = Some(range);
        self
    }

    /// The shard this lease is for (the lease key; ktk uses single-stream leases only).
    pub fn shard_id(&self) -> &str {
        &self.lease_key
    }

    /// Whether the shard has been read to its end.
    pub fn is_finished(&self) -> bool {
        self.checkpoint.is_shard_end()
    }

    /// The worker that is doing the processing right now: during a KCL 3.x hand-off that is the
    /// `checkpoint_owner`, otherwise the `owner` (the KCL's `Lease.actualOwner()`).
    pub fn actual_owner(&self) -> Option<&str> {
        self.checkpoint_owner.as_deref().or(self.owner.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn kcl_order() {
        let ordered = [
            SequenceNumber::AtTimestamp,
            SequenceNumber::TrimHorizon,
            SequenceNumber::Latest,
            n("0"),
            n("9"),
            n("10"),
            n("49680443144240072453040994160358621214668619104173162498"),
            n("49680443144262373198239524783501365858760882094853849106"),
            SequenceNumber::ShardEnd,
        ];
        for pair in ordered.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
        }
        let a = ExtendedSequenceNumber::at("5", 3).expect("valid");
        let b = ExtendedSequenceNumber::at("5", 4).expect("valid");
        assert!(a < b && b < ExtendedSequenceNumber::at("6", 0).expect("valid"));
        assert!(b < ExtendedSequenceNumber::SHARD_END);
    }

    #[test]
    fn parse_sentinels_and_numbers() {
        for s in ["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "SHARD_END", "0", "123"] {
            assert_eq!(n(s).as_str(), s);
        }
        assert!(n("SHARD_END").is_sentinel() && !n("1").is_sentinel());
        for bad in ["", "01", "-1", "12a", "trim_horizon", &"9".repeat(130)] {
            assert!(SequenceNumber::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn actual_owner_prefers_checkpoint_owner() {
        let mut lease = Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON);
        assert_eq!(lease.actual_owner(), None);
        lease.owner = Some("next".into());
        assert_eq!(lease.actual_owner(), Some("next"));
        lease.checkpoint_owner = Some("current".into());
        assert_eq!(lease.actual_owner(), Some("current"));
    }
}
