//! Shard sync: keeping one lease per shard that should be processed, as the stream reshards.
//!
//! [`ShardSyncer::sync`] lists the stream's shards (all pages), works out with [`plan_new_leases`]
//! which shards need a lease, creates them (a conditional put: several workers may sync at once),
//! and deletes the leases of finished shards that have left the stream (past retention).
//!
//! Which shards get a lease, and where they start:
//! - a shard whose parent has (or gets) a lease starts at `TRIM_HORIZON`: it is read from its
//!   first record once its parents are done ([`parents_done`]), so nothing is lost across a split
//!   or merge and nothing is read twice;
//! - a shard with no leased ancestor starts at the application's initial position. With
//!   `TRIM_HORIZON` or `AT_TIMESTAMP` every listed shard is leased (the oldest data is wanted);
//!   with `LATEST` only open shards are (closed ones hold nothing newer than now).

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use tracing::{debug, info};

use crate::error::Result;
use crate::lease::{ExtendedSequenceNumber, Lease, LeaseTable};
use crate::retrieval::Shard;
use crate::retrieval::kinesis::KinesisReads;

/// Where a shard with no processed ancestor starts (KCL `initialPositionInStream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    TrimHorizon,
    Latest,
    /// The reader is given the timestamp; the lease records `AT_TIMESTAMP`.
    AtTimestamp,
}

impl InitialPosition {
    pub fn checkpoint(self) -> ExtendedSequenceNumber {
        match self {
            InitialPosition::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON,
            InitialPosition::Latest => ExtendedSequenceNumber::LATEST,
            InitialPosition::AtTimestamp => ExtendedSequenceNumber::AT_TIMESTAMP,
        }
    }
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub shards: usize,
    pub created: Vec<String>,
    /// Leases of finished shards that are no longer in the stream, deleted.
    pub deleted: Vec<String>,
    /// Leases of shards no longer in the stream that were not finished: left alone and reported
    /// (their records expired before they were processed; an operator should look).
    pub orphaned: Vec<String>,
}

/// The leases to create for `shards`, given the leases that exist. Pure, so the rules are tested
/// without a stream.
pub(crate) fn plan_new_leases(
    shards: &[Shard],
    existing: &BTreeMap<String, Lease>,
    initial: InitialPosition,
) -> Vec<Lease> {
    let listed: BTreeMap<&str, &Shard> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    // Shards that have or will have a lease; grows until nothing changes (children after parents).
    let mut leased: BTreeSet<&str> = existing.keys().map(String::as_str).collect();
    let mut planned: Vec<Lease> = Vec::new();
    loop {
        let mut added = false;
        for shard in shards {
            if leased.contains(shard.shard_id.as_str()) {
                continue;
            }
            let leased_parent = shard.parents.iter().any(|p| leased.contains(p.as_str()));
            let listed_parent = shard.parents.iter().any(|p| listed.contains_key(p.as_str()));
            let start = if leased_parent {
                // Its lineage is being processed: read it whole, after the parents.
                Some(ExtendedSequenceNumber::TRIM_HORIZON)
            } else if initial == InitialPosition::Latest {
                // Nothing older than now is wanted: open shards only, from the tip.
                shard.open.then(|| initial.checkpoint())
            } else if listed_parent {
                // Its parent gets a lease first (this loop comes back for it).
                None
            } else {
                Some(initial.checkpoint())
            };
            if let Some(start) = start {
                let lease = Lease::new(shard.shard_id.clone(), start)
                    .with_parents(shard.parents.iter().cloned())
                    .with_hash_key_range(shard.range);
                leased.insert(shard.shard_id.as_str());
                planned.push(lease);
                added = true;
            }
        }
        if !added {
            return planned;
        }
    }
}

/// Whether a lease's shard may be processed: every parent is finished or has no lease (never
/// leased, or cleaned up after it finished).
pub fn parents_done(lease: &Lease, leases: &BTreeMap<String, Lease>) -> bool {
    lease.parent_shard_ids.iter().all(|parent| leases.get(parent).is_none_or(Lease::is_finished))
}

/// Keeps a stream's leases in step with its shards.
#[derive(Debug, Clone)]
pub struct ShardSyncer {
    client: Arc<dyn KinesisReads>,
    stream: String,
    table: LeaseTable,
    initial: InitialPosition,
}

impl ShardSyncer {
    pub fn new(
        client: aws_sdk_kinesis::Client,
        stream: impl Into<String>,
        table: LeaseTable,
        initial: InitialPosition,
    ) -> Self {
        ShardSyncer::with_api(Arc::new(client), stream, table, initial)
    }

    /// A syncer that lists shards through `client` (the SDK client, or a fake in tests).
    pub(crate) fn with_api(
        client: Arc<dyn KinesisReads>,
        stream: impl Into<String>,
        table: LeaseTable,
        initial: InitialPosition,
    ) -> Self {
        ShardSyncer { client, stream: stream.into(), table, initial }
    }

    /// One pass: create missing leases, delete finished leases of shards that left the stream.
    pub async fn sync(&self) -> Result<SyncReport> {
        let shards = self.client.list_shards(&self.stream).await?;
        let listing = self.table.list().await?;
        let existing: BTreeMap<String, Lease> = listing.leases.into_iter().map(|l| (l.lease_key.clone(), l)).collect();
        let mut report = SyncReport { shards: shards.len(), ..SyncReport::default() };
        for lease in plan_new_leases(&shards, &existing, self.initial) {
            // Another worker may have created it meanwhile: that is fine.
            if self.table.create_if_absent(&lease).await? {
                debug!(shard = %lease.lease_key, checkpoint = %lease.checkpoint, "lease created");
                report.created.push(lease.lease_key);
            }
        }
        let listed: BTreeSet<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
        for lease in existing.values().filter(|l| !listed.contains(l.lease_key.as_str())) {
            if lease.is_finished() {
                self.table.delete(lease).await?;
                report.deleted.push(lease.lease_key.clone());
            } else {
                report.orphaned.push(lease.lease_key.clone());
            }
        }
        if !report.created.is_empty() || !report.deleted.is_empty() {
            info!(stream = %self.stream, created = report.created.len(), deleted = report.deleted.len(), "shard sync");
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ktk_proto::keys::HashKeyRange;

    fn shard(id: &str, parents: &[&str], open: bool) -> Shard {
        Shard {
            shard_id: id.into(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            range: HashKeyRange::FULL,
            open,
        }
    }

    /// A stream that was split: 0 closed into 2 and 3; 1 open.
    fn split_stream() -> Vec<Shard> {
        vec![shard("s0", &[], false), shard("s1", &[], true), shard("s2", &["s0"], true), shard("s3", &["s0"], true)]
    }

    fn planned(
        shards: &[Shard],
        existing: &BTreeMap<String, Lease>,
        initial: InitialPosition,
    ) -> Vec<(String, String)> {
        plan_new_leases(shards, existing, initial)
            .into_iter()
            .map(|l| (l.lease_key.clone(), l.checkpoint.sequence.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn trim_horizon_leases_the_whole_lineage_and_children_wait_for_parents() {
        let got = planned(&split_stream(), &BTreeMap::new(), InitialPosition::TrimHorizon);
        assert_eq!(
            got,
            [("s0", "TRIM_HORIZON"), ("s1", "TRIM_HORIZON"), ("s2", "TRIM_HORIZON"), ("s3", "TRIM_HORIZON")]
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let leases: BTreeMap<String, Lease> =
            plan_new_leases(&split_stream(), &BTreeMap::new(), InitialPosition::TrimHorizon)
                .into_iter()
                .map(|l| (l.lease_key.clone(), l))
                .collect();
        assert!(!parents_done(&leases["s2"], &leases), "s0 is not finished");
        let mut finished = leases.clone();
        if let Some(parent) = finished.get_mut("s0") {
            parent.checkpoint = ExtendedSequenceNumber::SHARD_END;
        }
        assert!(parents_done(&finished["s2"], &finished));
        assert!(parents_done(&leases["s1"], &leases), "no parents");
    }

    #[test]
    fn latest_skips_closed_shards_without_a_leased_lineage() {
        let got = planned(&split_stream(), &BTreeMap::new(), InitialPosition::Latest);
        assert_eq!(
            got,
            [("s1", "LATEST"), ("s2", "LATEST"), ("s3", "LATEST")].map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn children_of_a_leased_shard_start_at_trim_horizon_whatever_the_initial_position() {
        let mut existing = BTreeMap::new();
        existing.insert("s0".to_owned(), Lease::new("s0", ExtendedSequenceNumber::LATEST));
        existing.insert("s1".to_owned(), Lease::new("s1", ExtendedSequenceNumber::LATEST));
        let got = planned(&split_stream(), &existing, InitialPosition::Latest);
        assert_eq!(got, [("s2", "TRIM_HORIZON"), ("s3", "TRIM_HORIZON")].map(|(a, b)| (a.to_owned(), b.to_owned())));
        let planned_leases = plan_new_leases(&split_stream(), &existing, InitialPosition::Latest);
        assert!(planned_leases.iter().all(|l| l.parent_shard_ids.contains("s0")));
        // Nothing new when everything is leased.
        let mut all = existing.clone();
        for lease in planned_leases {
            all.insert(lease.lease_key.clone(), lease);
        }
        assert!(planned(&split_stream(), &all, InitialPosition::Latest).is_empty());
    }

    #[test]
    fn a_merge_child_waits_for_both_parents() {
        let shards = vec![shard("a", &[], false), shard("b", &[], false), shard("m", &["a", "b"], true)];
        let leases: BTreeMap<String, Lease> = plan_new_leases(&shards, &BTreeMap::new(), InitialPosition::TrimHorizon)
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect();
        assert_eq!(leases["m"].parent_shard_ids.len(), 2);
        let mut one_done = leases.clone();
        if let Some(a) = one_done.get_mut("a") {
            a.checkpoint = ExtendedSequenceNumber::SHARD_END;
        }
        assert!(!parents_done(&one_done["m"], &one_done));
        if let Some(b) = one_done.get_mut("b") {
            b.checkpoint = ExtendedSequenceNumber::SHARD_END;
        }
        assert!(parents_done(&one_done["m"], &one_done));
    }
}
