//! Lease <-> DynamoDB item, attribute for attribute as the KCL's `DynamoDBLeaseSerializer`
//! (amazon-kinesis-client 3.0.3, `leases/dynamodb/DynamoDBLeaseSerializer.java`) writes them.
//!
//! | attribute | type | when |
//! | --- | --- | --- |
//! | `leaseKey` | S | always (the table's hash key) |
//! | `leaseOwner` | S | when owned |
//! | `leaseCounter` | N | always |
//! | `ownerSwitchesSinceCheckpoint` | N | always |
//! | `checkpoint` | S | always: a sequence number or a sentinel name |
//! | `checkpointSubSequenceNumber` | N | always |
//! | `pendingCheckpoint`, `pendingCheckpointSubSequenceNumber` | S, N | when a checkpoint is prepared |
//! | `pendingCheckpointState` | B | when prepared with state |
//! | `parentShardId` | SS | when the shard has parents |
//! | `childShardIds` | SS | when the shard has ended into children |
//! | `startingHashKey`, `endingHashKey` | S, S | when the range is known (KCL >= 2.3) |
//! | `throughputKBps` | N | KCL 3.x, when measured |
//! | `checkpointOwner` | S | KCL 3.x, during a graceful hand-off |
//!
//! Absent means absent: the KCL never writes an empty set or an empty string.
//!
//! Items of other kinds share the table in newer KCL releases (leader lock, migration state,
//! worker metrics: an `entityType` other than `LEASE`), and multi-stream applications write leases
//! with `streamName`/`shardId`. Reading those gives [`ItemError::NotALease`] or
//! [`ItemError::MultiStreamLease`], which [`LeaseTable::list`](crate::lease::LeaseTable::list)
//! skips. Attributes this module does not know are never removed: every write to an existing item
//! is an `UpdateItem` of named attributes.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use ktk_proto::keys::HashKeyRange;

use crate::error::ItemError;
use crate::lease::model::{ExtendedSequenceNumber, Lease, SequenceNumber};

/// A DynamoDB item: attribute name to value.
pub type Item = HashMap<String, AttributeValue>;

/// The attribute names of a lease item (`DynamoDBLeaseSerializer`'s constants).
pub(crate) mod attr {
    pub const LEASE_KEY: &str = "leaseKey";
    pub const LEASE_OWNER: &str = "leaseOwner";
    pub const LEASE_COUNTER: &str = "leaseCounter";
    pub const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
    pub const CHECKPOINT: &str = "checkpoint";
    pub const CHECKPOINT_SUB_SEQUENCE: &str = "checkpointSubSequenceNumber";
    pub const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
    pub const PENDING_CHECKPOINT_SUB_SEQUENCE: &str = "pendingCheckpointSubSequenceNumber";
    pub const PENDING_CHECKPOINT_STATE: &str = "pendingCheckpointState";
    pub const PARENT_SHARD_IDS: &str = "parentShardId";
    pub const CHILD_SHARD_IDS: &str = "childShardIds";
    pub const STARTING_HASH_KEY: &str = "startingHashKey";
    pub const ENDING_HASH_KEY: &str = "endingHashKey";
    pub const THROUGHPUT_KBPS: &str = "throughputKBps";
    pub const CHECKPOINT_OWNER: &str = "checkpointOwner";
    /// Newer KCL releases tag every item; leases are `LEASE`, untagged items are leases too.
    pub const ENTITY_TYPE: &str = "entityType";
    /// Written on multi-stream leases only (`DynamoDBMultiStreamLeaseSerializer`).
    pub const STREAM_NAME: &str = "streamName";
}

/// The `entityType` of a lease (`EntityType.LEASE`).
pub(crate) const LEASE_ENTITY_TYPE: &str = "LEASE";

/// The key of the item for `lease_key`.
pub fn key(lease_key: &str) -> Item {
    HashMap::from([(attr::LEASE_KEY.to_owned(), AttributeValue::S(lease_key.to_owned()))])
}

/// The whole item for a new lease, as `DynamoDBLeaseSerializer.toDynamoRecord` builds it.
/// (KCL 3.0.3 writes `pendingCheckpointState` there as the checkpoint's sub-sequence number, a
/// bug; like its update path, this writes the state itself, binary.)
pub fn to_item(lease: &Lease) -> Item {
    let mut item = key(&lease.lease_key);
    item.insert(attr::LEASE_COUNTER.into(), number(lease.counter));
    if let Some(owner) = &lease.owner {
        item.insert(attr::LEASE_OWNER.into(), AttributeValue::S(owner.clone()));
    }
    item.insert(attr::OWNER_SWITCHES.into(), number(lease.owner_switches_since_checkpoint));
    item.insert(attr::CHECKPOINT.into(), AttributeValue::S(lease.checkpoint.sequence.as_str().to_owned()));
    item.insert(attr::CHECKPOINT_SUB_SEQUENCE.into(), number(lease.checkpoint.sub_sequence));
    if let Some(parents) = string_set(&lease.parent_shard_ids) {
        item.insert(attr::PARENT_SHARD_IDS.into(), parents);
    }
    if let Some(children) = string_set(&lease.child_shard_ids) {
        item.insert(attr::CHILD_SHARD_IDS.into(), children);
    }
    if let Some(pending) = &lease.pending_checkpoint {
        item.insert(attr::PENDING_CHECKPOINT.into(), AttributeValue::S(pending.sequence.as_str().to_owned()));
        item.insert(attr::PENDING_CHECKPOINT_SUB_SEQUENCE.into(), number(pending.sub_sequence));
    }
    if let Some(state) = &lease.pending_checkpoint_state {
        item.insert(attr::PENDING_CHECKPOINT_STATE.into(), AttributeValue::B(Blob::new(state.clone())));
    }
    if let Some(range) = &lease.hash_key_range {
        item.insert(attr::STARTING_HASH_KEY.into(), AttributeValue::S(range.start.to_string()));
        item.insert(attr::ENDING_HASH_KEY.into(), AttributeValue::S(range.end.to_string()));
    }
    if let Some(kbps) = lease.throughput_kbps.and_then(java_double) {
        item.insert(attr::THROUGHPUT_KBPS.into(), AttributeValue::N(kbps));
    }
    if let Some(checkpoint_owner) = &lease.checkpoint_owner {
        item.insert(attr::CHECKPOINT_OWNER.into(), AttributeValue::S(checkpoint_owner.clone()));
    }
    item
}

/// Reads a lease item, as `DynamoDBLeaseSerializer.fromDynamoRecord` does, but strictly: a
/// required attribute that is missing, or any known attribute of the wrong type or with a value
/// the KCL could not have written, is an error naming it.
pub fn from_item(item: &Item) -> Result<Lease, ItemError> {
    if let Some(entity_type) = opt_string(item, attr::ENTITY_TYPE)?
        && entity_type != LEASE_ENTITY_TYPE
    {
        return Err(ItemError::NotALease { entity_type: entity_type.to_owned() });
    }
    if let Some(stream) = opt_string(item, attr::STREAM_NAME)? {
        return Err(ItemError::MultiStreamLease { stream: stream.to_owned() });
    }
    let lease_key = string(item, attr::LEASE_KEY)?.to_owned();
    let counter = u64_attr(item, attr::LEASE_COUNTER)?.ok_or(ItemError::Missing { attribute: attr::LEASE_COUNTER })?;
    let checkpoint = extended(item, attr::CHECKPOINT, attr::CHECKPOINT_SUB_SEQUENCE)?
        .ok_or(ItemError::Missing { attribute: attr::CHECKPOINT })?;
    let pending_checkpoint = extended(item, attr::PENDING_CHECKPOINT, attr::PENDING_CHECKPOINT_SUB_SEQUENCE)?;
    let pending_checkpoint_state = match item.get(attr::PENDING_CHECKPOINT_STATE) {
        None => None,
        Some(AttributeValue::B(blob)) => Some(blob.as_ref().to_vec()),
        Some(other) => return Err(wrong_type(attr::PENDING_CHECKPOINT_STATE, "B", other)),
    };
    let hash_key_range = match (
        opt_string(item, attr::STARTING_HASH_KEY)?.filter(|s| !s.is_empty()),
        opt_string(item, attr::ENDING_HASH_KEY)?.filter(|s| !s.is_empty()),
    ) {
        (Some(start), Some(end)) => Some(HashKeyRange::parse(start, end).map_err(|e| ItemError::Invalid {
            attribute: attr::STARTING_HASH_KEY,
            value: format!("{start}..{end}"),
            problem: e.to_string(),
        })?),
        // The KCL reads a range only when both ends are there.
        _ => None,
    };
    let throughput_kbps = match item.get(attr::THROUGHPUT_KBPS) {
        None => None,
        Some(AttributeValue::N(n)) => Some(n.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
            ItemError::Invalid { attribute: attr::THROUGHPUT_KBPS, value: n.clone(), problem: "not a number".into() }
        })?),
        Some(other) => return Err(wrong_type(attr::THROUGHPUT_KBPS, "N", other)),
    };
    Ok(Lease {
        lease_key,
        owner: opt_string(item, attr::LEASE_OWNER)?.map(str::to_owned),
        counter,
        checkpoint,
        pending_checkpoint,
        pending_checkpoint_state,
        owner_switches_since_checkpoint: u64_attr(item, attr::OWNER_SWITCHES)?.unwrap_or(0),
        parent_shard_ids: opt_string_set(item, attr::PARENT_SHARD_IDS)?,
        child_shard_ids: opt_string_set(item, attr::CHILD_SHARD_IDS)?,
        hash_key_range,
        throughput_kbps,
        checkpoint_owner: opt_string(item, attr::CHECKPOINT_OWNER)?.map(str::to_owned),
    })
}

/// An `N` value for a counter or sub-sequence number (Java's `Long.toString`).
pub(crate) fn number(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// An `SS` value, or `None` for an empty set (DynamoDB has no empty sets; the KCL then omits the
/// attribute).
pub(crate) fn string_set(values: &BTreeSet<String>) -> Option<AttributeValue> {
    (!values.is_empty()).then(|| AttributeValue::Ss(values.iter().cloned().collect()))
}

/// A double as Java's `Double.toString` writes it in the usual range (`0.0`, `2.37085`): always
/// with a decimal point. (Java switches to `1.0E7` notation outside 10^-3..10^7; plain decimals
/// are the same DynamoDB number.) `None` for NaN and infinities, which DynamoDB cannot store.
fn java_double(value: f64) -> Option<String> {
    if !value.is_finite() {
        return None;
    }
    let mut text = value.to_string();
    if !text.contains('.') {
        text.push_str(".0");
    }
    Some(text)
}

/// DynamoDB's name for the type of `value` ("S", "N", "SS"...), as error messages and tests
/// compare attribute types.
pub fn type_name(value: &AttributeValue) -> &'static str {
    match value {
        AttributeValue::S(_) => "S",
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
        AttributeValue::M(_) => "M",
        AttributeValue::L(_) => "L",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Null(_) => "NULL",
        _ => "unknown",
    }
}

fn wrong_type(attribute: &'static str, expected: &'static str, found: &AttributeValue) -> ItemError {
    ItemError::WrongType { attribute, expected, found: type_name(found) }
}

fn opt_string<'a>(item: &'a Item, attribute: &'static str) -> Result<Option<&'a str>, ItemError> {
    match item.get(attribute) {
        None => Ok(None),
        Some(AttributeValue::S(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(attribute, "S", other)),
    }
}

fn string<'a>(item: &'a Item, attribute: &'static str) -> Result<&'a str, ItemError> {
    opt_string(item, attribute)?.ok_or(ItemError::Missing { attribute })
}

fn u64_attr(item: &Item, attribute: &'static str) -> Result<Option<u64>, ItemError> {
    match item.get(attribute) {
        None => Ok(None),
        Some(AttributeValue::N(n)) => n.parse::<u64>().map(Some).map_err(|_| ItemError::Invalid {
            attribute,
            value: n.clone(),
            problem: "not a whole number from 0 to 2^64-1".into(),
        }),
        Some(other) => Err(wrong_type(attribute, "N", other)),
    }
}

fn opt_string_set(item: &Item, attribute: &'static str) -> Result<BTreeSet<String>, ItemError> {
    match item.get(attribute) {
        None => Ok(BTreeSet::new()),
        Some(AttributeValue::Ss(values)) => Ok(values.iter().cloned().collect()),
        Some(other) => Err(wrong_type(attribute, "SS", other)),
    }
}

/// A sequence-number attribute and its sub-sequence companion (missing sub-sequence reads as 0,
/// as in the KCL's `ExtendedSequenceNumber`).
fn extended(
    item: &Item,
    sequence_attribute: &'static str,
    sub_sequence_attribute: &'static str,
) -> Result<Option<ExtendedSequenceNumber>, ItemError> {
    let Some(sequence) = opt_string(item, sequence_attribute)? else {
        return Ok(None);
    };
    let sequence = SequenceNumber::parse(sequence).map_err(|problem| ItemError::Invalid {
        attribute: sequence_attribute,
        value: sequence.to_owned(),
        problem: problem.into(),
    })?;
    let sub_sequence = u64_attr(item, sub_sequence_attribute)?.unwrap_or(0);
    Ok(Some(ExtendedSequenceNumber { sequence, sub_sequence }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::lease::dynamo_json;

    const KCL_3_0_3: &str = include_str!("../../tests/fixtures/kcl-3.0.3-lease-items.json");
    const OTHER_ENTITIES: &str = include_str!("../../tests/fixtures/kcl-other-entities.json");

    fn fixture_items(table: &str) -> Vec<Item> {
        let all: serde_json::Value = serde_json::from_str(KCL_3_0_3).expect("fixture is JSON");
        all[table]
            .as_array()
            .expect("table in fixture")
            .iter()
            .map(|item| dynamo_json::item_from_json(item).expect("DynamoDB JSON"))
            .collect()
    }

    /// Attribute name -> type name, to compare items by shape.
    fn shape(item: &Item) -> BTreeMap<String, &'static str> {
        item.iter().map(|(name, value)| (name.clone(), type_name(value))).collect()
    }

    #[test]
    fn reads_every_kcl_3_0_3_lease() {
        for table in ["kclagg-app", "kcltake1-app"] {
            let items = fixture_items(table);
            assert_eq!(items.len(), 4);
            for item in &items {
                let lease = from_item(item).unwrap_or_else(|e| panic!("{table}: {e}"));
                assert!(lease.lease_key.starts_with("shardId-00000000000"));
                assert!(matches!(lease.checkpoint.sequence, SequenceNumber::Number(_)));
                assert_eq!(lease.checkpoint.sub_sequence, 0);
                assert!(lease.owner.is_some());
                assert!(lease.hash_key_range.is_some());
                assert!(lease.throughput_kbps.is_some());
                assert!(lease.parent_shard_ids.is_empty() && lease.child_shard_ids.is_empty());
                assert_eq!(lease.pending_checkpoint, None);
            }
        }
        let take = fixture_items("kcltake1-app");
        let shard_2 = take.iter().map(|i| from_item(i).expect("lease")).find(|l| l.lease_key == "shardId-000000000002");
        let shard_2 = shard_2.expect("shard 2 in fixture");
        assert_eq!(shard_2.owner.as_deref(), Some("wA"));
        assert_eq!(shard_2.counter, 24);
        assert_eq!(shard_2.owner_switches_since_checkpoint, 0);
        assert_eq!(
            shard_2.checkpoint,
            ExtendedSequenceNumber::at("49680443225280980504501278656977474355984056203406737442", 0).expect("valid")
        );
        assert_eq!(
            shard_2.hash_key_range,
            Some(HashKeyRange {
                start: 170141183460469231731687303715884105726,
                end: 255211775190703847597530955573826158588
            })
        );
        assert_eq!(shard_2.throughput_kbps, Some(0.618544));
    }

    #[test]
    fn writes_back_exactly_what_the_kcl_wrote() {
        for table in ["kclagg-app", "kcltake1-app"] {
            for item in fixture_items(table) {
                let written = to_item(&from_item(&item).expect("lease"));
                assert_eq!(shape(&written), shape(&item), "{table}: names and types");
                assert_eq!(written, item, "{table}: values");
            }
        }
    }

    #[test]
    fn other_kinds_of_items_are_not_leases() {
        for table in ["kclagg-app-CoordinatorState", "kcltake1-app-WorkerMetricStats"] {
            for item in fixture_items(table) {
                // In their own tables they have no leaseKey at all.
                assert!(from_item(&item).is_err());
            }
        }
        let others: serde_json::Value = serde_json::from_str(OTHER_ENTITIES).expect("fixture is JSON");
        let others = others["items"].as_array().expect("items");
        assert_eq!(others.len(), 5);
        for item in others {
            let item = dynamo_json::item_from_json(item).expect("DynamoDB JSON");
            let error = from_item(&item).expect_err("not a single-stream lease");
            assert!(error.is_other_kind(), "{error}");
        }
        // A lease tagged as one by newer KCL releases is still a lease.
        let mut tagged = fixture_items("kcltake1-app").remove(0);
        tagged.insert(attr::ENTITY_TYPE.into(), AttributeValue::S(LEASE_ENTITY_TYPE.into()));
        assert!(from_item(&tagged).is_ok());
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let good = fixture_items("kclagg-app").remove(0);
        let cases: [(&str, AttributeValue, &str); 6] = [
            (attr::LEASE_COUNTER, AttributeValue::S("66".into()), "leaseCounter"),
            (attr::LEASE_COUNTER, AttributeValue::N("-1".into()), "leaseCounter"),
            (attr::PARENT_SHARD_IDS, AttributeValue::S("shardId-000000000000".into()), "parentShardId"),
            (attr::CHECKPOINT, AttributeValue::S("somewhere".into()), "checkpoint"),
            (attr::CHECKPOINT_SUB_SEQUENCE, AttributeValue::N("1.5".into()), "checkpointSubSequenceNumber"),
            (attr::STARTING_HASH_KEY, AttributeValue::S("x".into()), "startingHashKey"),
        ];
        for (attribute, value, named) in cases {
            let mut item = good.clone();
            item.insert(attribute.into(), value);
            let error = from_item(&item).expect_err("bad item");
            assert!(!error.is_other_kind());
            assert!(error.to_string().contains(named), "{error}");
        }
        let mut no_counter = good.clone();
        no_counter.remove(attr::LEASE_COUNTER);
        assert!(matches!(from_item(&no_counter), Err(ItemError::Missing { attribute: "leaseCounter" })));
    }

    #[test]
    fn empty_sets_and_absent_options_are_not_written() {
        let lease = Lease::new("shardId-000000000007", ExtendedSequenceNumber::TRIM_HORIZON);
        let item = to_item(&lease);
        let names: BTreeSet<&str> = item.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                "leaseKey",
                "leaseCounter",
                "ownerSwitchesSinceCheckpoint",
                "checkpoint",
                "checkpointSubSequenceNumber"
            ])
        );
        assert_eq!(item["checkpoint"], AttributeValue::S("TRIM_HORIZON".into()));
    }

    #[test]
    fn full_lease_has_the_kcl_types() {
        let mut lease = Lease::new("shardId-000000000004", ExtendedSequenceNumber::SHARD_END)
            .with_parents(["shardId-000000000000", "shardId-000000000001"])
            .with_hash_key_range(HashKeyRange::FULL);
        lease.owner = Some("w1".into());
        lease.child_shard_ids = BTreeSet::from(["shardId-000000000009".to_owned()]);
        lease.pending_checkpoint = Some(ExtendedSequenceNumber::at("42", 3).expect("valid"));
        lease.pending_checkpoint_state = Some(vec![1, 2, 3]);
        lease.throughput_kbps = Some(12.0);
        lease.checkpoint_owner = Some("w0".into());
        let expected: BTreeMap<String, &str> = [
            ("leaseKey", "S"),
            ("leaseOwner", "S"),
            ("leaseCounter", "N"),
            ("ownerSwitchesSinceCheckpoint", "N"),
            ("checkpoint", "S"),
            ("checkpointSubSequenceNumber", "N"),
            ("pendingCheckpoint", "S"),
            ("pendingCheckpointSubSequenceNumber", "N"),
            ("pendingCheckpointState", "B"),
            ("parentShardId", "SS"),
            ("childShardIds", "SS"),
            ("startingHashKey", "S"),
            ("endingHashKey", "S"),
            ("throughputKBps", "N"),
            ("checkpointOwner", "S"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let item = to_item(&lease);
        assert_eq!(shape(&item), expected);
        assert_eq!(item["throughputKBps"], AttributeValue::N("12.0".into()));
        assert_eq!(item["endingHashKey"], AttributeValue::S(u128::MAX.to_string()));
    }

    fn shard_id() -> impl Strategy<Value = String> {
        (0u32..100_000).prop_map(|n| format!("shardId-{n:012}"))
    }

    fn sequence() -> impl Strategy<Value = SequenceNumber> {
        prop_oneof![
            Just(SequenceNumber::TrimHorizon),
            Just(SequenceNumber::Latest),
            Just(SequenceNumber::AtTimestamp),
            Just(SequenceNumber::ShardEnd),
            "0|[1-9][0-9]{0,60}".prop_map(SequenceNumber::Number),
        ]
    }

    fn extended_sequence() -> impl Strategy<Value = ExtendedSequenceNumber> {
        (sequence(), any::<u64>())
            .prop_map(|(sequence, sub_sequence)| ExtendedSequenceNumber { sequence, sub_sequence })
    }

    fn range() -> impl Strategy<Value = HashKeyRange> {
        (any::<u128>(), any::<u128>()).prop_map(|(a, b)| HashKeyRange { start: a.min(b), end: a.max(b) })
    }

    prop_compose! {
        fn lease()(
            lease_key in shard_id(),
            owner in proptest::option::of("[a-zA-Z0-9:._-]{1,40}"),
            counter in any::<u64>(),
            checkpoint in extended_sequence(),
            pending_checkpoint in proptest::option::of(extended_sequence()),
            pending_checkpoint_state in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            owner_switches_since_checkpoint in any::<u64>(),
            parent_shard_ids in proptest::collection::btree_set(shard_id(), 0..3),
            child_shard_ids in proptest::collection::btree_set(shard_id(), 0..3),
            hash_key_range in proptest::option::of(range()),
            throughput_kbps in proptest::option::of(0.0f64..1.0e9),
            checkpoint_owner in proptest::option::of("[a-zA-Z0-9:._-]{1,40}"),
        ) -> Lease {
            Lease {
                lease_key, owner, counter, checkpoint, pending_checkpoint, pending_checkpoint_state,
                owner_switches_since_checkpoint, parent_shard_ids, child_shard_ids, hash_key_range,
                throughput_kbps, checkpoint_owner,
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(lease in lease()) {
            let item = to_item(&lease);
            prop_assert_eq!(from_item(&item).expect("reads back"), lease.clone());
            // Also through DynamoDB JSON, the form fixtures and raw dumps use.
            let json = dynamo_json::item_to_json(&item);
            prop_assert_eq!(dynamo_json::item_from_json(&json).expect("DynamoDB JSON"), item);
        }
    }
}
