//! The KCL-compatible lease table (`ktk_consumer::lease::LeaseTable`) against LocalStack's
//! DynamoDB: table set-up, the conditional writes and their races, and a table written by
//! Amazon's KCL 3.0.3 read and written without changing its attribute types.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use ktk_consumer::Error;
use ktk_consumer::lease::serializer::type_name;
use ktk_consumer::lease::serializer::{self, Item};
use ktk_consumer::lease::{ExtendedSequenceNumber, Lease, LeaseTable, SequenceNumber, TableSetup, dynamo_json};
use ktk_proto::keys::HashKeyRange;

const KCL_3_0_3: &str = include_str!("../../consumer/tests/fixtures/kcl-3.0.3-lease-items.json");
const OTHER_ENTITIES: &str = include_str!("../../consumer/tests/fixtures/kcl-other-entities.json");

/// A fresh lease table (created through `ensure_table`) and a raw client to look at its items.
struct Setup {
    raw: aws_sdk_dynamodb::Client,
    config: aws_config::SdkConfig,
    name: String,
    table: LeaseTable,
}

impl Setup {
    async fn new(prefix: &str) -> Setup {
        let raw = ktk_tests::dynamodb().await;
        let config = ktk_tests::aws_config().await;
        let name = ktk_tests::unique_name(prefix);
        let table = LeaseTable::new(&config, &name);
        assert_eq!(table.ensure_table().await.expect("ensure_table"), TableSetup::Created);
        Setup { raw, config, name, table }
    }

    /// Another worker: its own client to the same table.
    fn worker(&self) -> LeaseTable {
        LeaseTable::new(&self.config, &self.name)
    }

    async fn raw_item(&self, shard: &str) -> Option<Item> {
        let output = self
            .raw
            .get_item()
            .table_name(&self.name)
            .set_key(Some(serializer::key(shard)))
            .consistent_read(true)
            .send()
            .await
            .expect("raw GetItem");
        output.item
    }

    async fn put_raw(&self, item: Item) {
        self.raw.put_item().table_name(&self.name).set_item(Some(item)).send().await.expect("raw PutItem");
    }

    async fn cleanup(self) {
        let _ = self.raw.delete_table().table_name(&self.name).send().await;
    }
}

fn shard(n: u32) -> String {
    format!("shardId-{n:012}")
}

fn seq(number: &str, sub: u64) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::at(number, sub).expect("valid sequence number")
}

/// Attribute name -> DynamoDB type.
fn shape(item: &Item) -> BTreeMap<String, &'static str> {
    item.iter().map(|(name, value)| (name.clone(), type_name(value))).collect()
}

fn fixture_items(json: &str, table: &str) -> Vec<Item> {
    let all: serde_json::Value = serde_json::from_str(json).expect("fixture is JSON");
    all[table]
        .as_array()
        .unwrap_or_else(|| panic!("{table} in fixture"))
        .iter()
        .map(|item| dynamo_json::item_from_json(item).expect("DynamoDB JSON"))
        .collect()
}

#[tokio::test]
async fn ensure_table_is_idempotent_and_makes_the_kcl_key() {
    let setup = Setup::new("leases-ensure").await;
    // Second call, and a second worker's call: the table is there.
    assert_eq!(setup.table.ensure_table().await.expect("again"), TableSetup::Existed);
    assert_eq!(setup.worker().ensure_table().await.expect("other worker"), TableSetup::Existed);

    let described = setup.raw.describe_table().table_name(&setup.name).send().await.expect("describe");
    let table = described.table.expect("table description");
    let keys: Vec<(&str, &KeyType)> = table.key_schema().iter().map(|k| (k.attribute_name(), k.key_type())).collect();
    assert_eq!(keys, [("leaseKey", &KeyType::Hash)]);
    let definitions = table.attribute_definitions();
    assert_eq!(definitions.len(), 1);
    assert_eq!(definitions[0].attribute_type(), &ScalarAttributeType::S);
    assert_eq!(table.billing_mode_summary().and_then(|b| b.billing_mode()), Some(&BillingMode::PayPerRequest));
    setup.cleanup().await;
}

#[tokio::test]
async fn ensure_table_refuses_a_table_with_another_key() {
    let raw = ktk_tests::dynamodb().await;
    let config = ktk_tests::aws_config().await;
    let name = ktk_tests::unique_name("leases-wrong-key");
    raw.create_table()
        .table_name(&name)
        .key_schema(KeySchemaElement::builder().attribute_name("key").key_type(KeyType::Hash).build().expect("key"))
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("definition"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create a table like the KCL's CoordinatorState");
    let error = LeaseTable::new(&config, &name).ensure_table().await.expect_err("wrong key schema");
    assert!(matches!(&error, Error::TableKeySchema { found, .. } if found.contains("key (S, HASH)")), "{error}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("leaseKey"), "{error}");
    let _ = raw.delete_table().table_name(&name).send().await;
}

#[tokio::test]
async fn a_missing_table_is_a_typed_error() {
    let _ = ktk_tests::dynamodb().await;
    let config = ktk_tests::aws_config().await;
    let table = LeaseTable::new(&config, ktk_tests::unique_name("leases-missing"));
    for error in [
        table.list().await.expect_err("no table"),
        table.get(&shard(0)).await.expect_err("no table"),
        table.create_if_absent(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST)).await.expect_err("no table"),
    ] {
        assert!(matches!(error, Error::TableNotFound { .. }), "{error}");
        assert!(!error.is_retryable() && !error.is_condition_failure());
    }
}

#[tokio::test]
async fn create_list_and_get() {
    let setup = Setup::new("leases-crud").await;
    let parent = Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON)
        .with_hash_key_range(HashKeyRange { start: 0, end: u128::MAX / 2 });
    let child = Lease::new(shard(2), ExtendedSequenceNumber::TRIM_HORIZON)
        .with_parents([shard(0), shard(1)])
        .with_hash_key_range(HashKeyRange { start: 0, end: u128::MAX });
    let latest = Lease::new(shard(3), ExtendedSequenceNumber::LATEST);
    for lease in [&parent, &child, &latest] {
        assert!(setup.table.create_if_absent(lease).await.expect("create"));
    }
    // A second create leaves the first one alone.
    let mut again = child.clone();
    again.checkpoint = ExtendedSequenceNumber::LATEST;
    assert!(!setup.table.create_if_absent(&again).await.expect("create again"));

    let listing = setup.table.list().await.expect("list");
    assert!(listing.skipped.is_empty(), "{:?}", listing.skipped);
    let mut leases = listing.leases;
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    assert_eq!(leases, [parent.clone(), child.clone(), latest.clone()]);

    assert_eq!(setup.table.get(&shard(2)).await.expect("get"), Some(child.clone()));
    assert_eq!(setup.table.get(&shard(9)).await.expect("get missing"), None);

    // On the wire: the KCL's attribute names and types, nothing empty.
    let raw = setup.raw_item(&shard(2)).await.expect("raw child");
    assert_eq!(
        shape(&raw),
        BTreeMap::from([
            ("leaseKey".to_owned(), "S"),
            ("leaseCounter".to_owned(), "N"),
            ("ownerSwitchesSinceCheckpoint".to_owned(), "N"),
            ("checkpoint".to_owned(), "S"),
            ("checkpointSubSequenceNumber".to_owned(), "N"),
            ("parentShardId".to_owned(), "SS"),
            ("startingHashKey".to_owned(), "S"),
            ("endingHashKey".to_owned(), "S"),
        ])
    );
    assert_eq!(raw["checkpoint"], AttributeValue::S("TRIM_HORIZON".into()));
    assert_eq!(raw["endingHashKey"], AttributeValue::S(u128::MAX.to_string()));
    setup.cleanup().await;
}

#[tokio::test]
async fn only_one_of_two_racing_takes_wins() {
    let setup = Setup::new("leases-race").await;
    let (worker_a, worker_b) = (setup.worker(), setup.worker());
    for n in 0..8 {
        assert!(
            setup
                .table
                .create_if_absent(&Lease::new(shard(n), ExtendedSequenceNumber::TRIM_HORIZON))
                .await
                .expect("create")
        );
    }
    for n in 0..8 {
        // Both workers read the same unowned lease, then both try to take it.
        let seen_by_a = worker_a.get(&shard(n)).await.expect("get").expect("lease");
        let seen_by_b = worker_b.get(&shard(n)).await.expect("get").expect("lease");
        let (a, b) = tokio::join!(worker_a.take(&seen_by_a, "wA"), worker_b.take(&seen_by_b, "wB"));
        let (winner, loser_error) = match (a, b) {
            (Ok(lease), Err(error)) | (Err(error), Ok(lease)) => (lease, error),
            (a, b) => panic!("exactly one take must win: {a:?} / {b:?}"),
        };
        assert!(matches!(loser_error, Error::LeaseChanged { operation: "take", .. }), "{loser_error}");
        assert!(loser_error.is_condition_failure() && !loser_error.is_retryable());
        assert_eq!(loser_error.current_lease(), Some(&winner));
        assert_eq!(winner.counter, 1);
        // Taking an unowned lease is not an owner switch.
        assert_eq!(winner.owner_switches_since_checkpoint, 0);
        assert_eq!(setup.table.get(&shard(n)).await.expect("get"), Some(winner.clone()));

        // The loser takes it over from the winner (a steal): that is a switch.
        let loser = if winner.owner.as_deref() == Some("wA") { ("wB", &worker_b) } else { ("wA", &worker_a) };
        let stolen = loser.1.take(&winner, loser.0).await.expect("steal");
        assert_eq!(stolen.owner.as_deref(), Some(loser.0));
        assert_eq!((stolen.counter, stolen.owner_switches_since_checkpoint), (2, 1));
    }
    setup.cleanup().await;
}

#[tokio::test]
async fn renewing_a_lease_someone_else_took_is_lease_lost() {
    let setup = Setup::new("leases-lost").await;
    let (worker_a, worker_b) = (setup.worker(), setup.worker());
    setup.table.create_if_absent(&Lease::new(shard(1), ExtendedSequenceNumber::LATEST)).await.expect("create");
    let unowned = worker_a.get(&shard(1)).await.expect("get").expect("lease");
    let held = worker_a.take(&unowned, "wA").await.expect("take");
    let held = worker_a.renew(&held).await.expect("renew");
    let held = worker_a.renew(&held).await.expect("renew again");
    assert_eq!((held.counter, held.owner.as_deref()), (3, Some("wA")));

    // Worker B finds the lease (say it looked expired to it) and takes it.
    let seen_by_b = worker_b.get(&shard(1)).await.expect("get").expect("lease");
    let taken = worker_b.take(&seen_by_b, "wB").await.expect("take over");

    let lost = worker_a.renew(&held).await.expect_err("A no longer holds it");
    assert!(matches!(&lost, Error::LeaseLost { operation: "renew", expected_counter: 3, .. }), "{lost}");
    assert!(lost.is_condition_failure() && !lost.is_retryable());
    assert_eq!(lost.current_lease(), Some(&taken));
    assert!(lost.to_string().contains("stop processing"), "{lost}");
    // Nothing else A might still try goes through either.
    let checkpoint = worker_a.checkpoint(&held, seq("100", 0)).await.expect_err("A cannot checkpoint");
    assert!(matches!(checkpoint, Error::LeaseLost { operation: "checkpoint", .. }), "{checkpoint}");
    let release = worker_a.release(&held).await.expect_err("A cannot release B's lease");
    assert!(matches!(release, Error::LeaseLost { operation: "release", .. }), "{release}");
    assert_eq!(setup.table.get(&shard(1)).await.expect("get"), Some(taken.clone()));

    // B's lease renews fine.
    let renewed = worker_b.renew(&taken).await.expect("B renews");
    assert_eq!(renewed.counter, taken.counter + 1);
    setup.cleanup().await;
}

#[tokio::test]
async fn a_write_repeated_after_it_was_applied_counts_as_done() {
    // What a retry after a lost answer looks like: the same write again, from the same snapshot.
    // The condition fails, but the item shows exactly that write, so it stands (the KCL's
    // "spurious renewal failure" check).
    let setup = Setup::new("leases-repeat").await;
    setup.table.create_if_absent(&Lease::new(shard(3), ExtendedSequenceNumber::TRIM_HORIZON)).await.expect("create");
    let seen = setup.table.get(&shard(3)).await.expect("get").expect("lease");
    let taken = setup.table.take(&seen, "wA").await.expect("take");
    assert_eq!(setup.table.take(&seen, "wA").await.expect("take repeated"), taken);
    let renewed = setup.table.renew(&taken).await.expect("renew");
    assert_eq!(setup.table.renew(&taken).await.expect("renew repeated"), renewed);
    let checkpointed = setup.table.checkpoint(&renewed, seq("9", 0)).await.expect("checkpoint");
    assert_eq!(setup.table.checkpoint(&renewed, seq("9", 0)).await.expect("checkpoint repeated"), checkpointed);
    // The same snapshot asking for something else is refused.
    let other = setup.table.checkpoint(&renewed, seq("10", 0)).await.expect_err("not the write that was made");
    assert!(other.is_condition_failure(), "{other}");
    let other = setup.table.take(&seen, "wB").await.expect_err("B was not first");
    assert!(other.is_condition_failure(), "{other}");
    setup.cleanup().await;
}

#[tokio::test]
async fn a_released_lease_is_taken_by_another_worker() {
    let setup = Setup::new("leases-release").await;
    let (worker_a, worker_b) = (setup.worker(), setup.worker());
    setup.table.create_if_absent(&Lease::new(shard(4), ExtendedSequenceNumber::TRIM_HORIZON)).await.expect("create");
    let unowned = worker_a.get(&shard(4)).await.expect("get").expect("lease");
    let held = worker_a.take(&unowned, "wA").await.expect("take");
    let held = worker_a.checkpoint(&held, seq("4900000000000000000000", 2)).await.expect("checkpoint");
    // A renewal the releasing worker made meanwhile does not stop the release (no counter condition).
    let _ = worker_a.renew(&held).await.expect("renew");

    let released = worker_a.release(&held).await.expect("release");
    assert_eq!(released.owner, None);
    assert_eq!(released.counter, held.counter + 2);
    assert_eq!(released.checkpoint, seq("4900000000000000000000", 2));
    let raw = setup.raw_item(&shard(4)).await.expect("raw");
    assert!(!raw.contains_key("leaseOwner"), "leaseOwner is removed, not emptied: {raw:?}");

    // B sees an unowned lease and takes it at once: no wait for expiry.
    let seen_by_b = worker_b.get(&shard(4)).await.expect("get").expect("lease");
    assert_eq!(seen_by_b, released);
    let taken = worker_b.take(&seen_by_b, "wB").await.expect("take released");
    assert_eq!(taken.owner.as_deref(), Some("wB"));
    assert_eq!(taken.checkpoint, seq("4900000000000000000000", 2));
    // From nobody to B is not a switch (the KCL counts only owner-to-owner moves).
    assert_eq!(taken.owner_switches_since_checkpoint, 0);

    // A's old view of the lease is useless now.
    let stale = worker_a.renew(&held).await.expect_err("stale");
    assert!(stale.is_condition_failure(), "{stale}");
    setup.cleanup().await;
}

#[tokio::test]
async fn checkpoint_moves_the_checkpoint_and_resets_owner_switches() {
    let setup = Setup::new("leases-checkpoint").await;
    let (worker_a, worker_b) = (setup.worker(), setup.worker());
    setup.table.create_if_absent(&Lease::new(shard(5), ExtendedSequenceNumber::TRIM_HORIZON)).await.expect("create");
    let unowned = worker_a.get(&shard(5)).await.expect("get").expect("lease");
    let held_by_a = worker_a.take(&unowned, "wA").await.expect("take");
    let held = worker_b.take(&held_by_a, "wB").await.expect("steal");
    assert_eq!(held.owner_switches_since_checkpoint, 1);

    // A prepared checkpoint, with state: S, N and B on the wire.
    let prepared = worker_b.prepare_checkpoint(&held, seq("500", 1), Some(b"state".to_vec())).await.expect("prepare");
    assert_eq!(prepared.pending_checkpoint, Some(seq("500", 1)));
    assert_eq!(prepared.checkpoint, ExtendedSequenceNumber::TRIM_HORIZON);
    let raw = setup.raw_item(&shard(5)).await.expect("raw");
    let pending_shape: Vec<_> = ["pendingCheckpoint", "pendingCheckpointSubSequenceNumber", "pendingCheckpointState"]
        .map(|a| type_name(&raw[a]))
        .into();
    assert_eq!(pending_shape, ["S", "N", "B"]);

    let checkpointed = worker_b.checkpoint(&prepared, seq("500", 1)).await.expect("checkpoint");
    assert_eq!(checkpointed.checkpoint, seq("500", 1));
    assert_eq!(checkpointed.owner_switches_since_checkpoint, 0);
    assert_eq!(checkpointed.pending_checkpoint, None);
    assert_eq!(checkpointed.pending_checkpoint_state, None);
    assert_eq!(checkpointed.counter, prepared.counter + 1);
    let raw = setup.raw_item(&shard(5)).await.expect("raw");
    assert_eq!(raw["checkpoint"], AttributeValue::S("500".into()));
    assert_eq!(raw["checkpointSubSequenceNumber"], AttributeValue::N("1".into()));
    assert_eq!(raw["ownerSwitchesSinceCheckpoint"], AttributeValue::N("0".into()));
    assert!(!raw.contains_key("pendingCheckpoint") && !raw.contains_key("pendingCheckpointState"), "{raw:?}");

    // Never backwards, not even by a sub-sequence number.
    let back = worker_b.checkpoint(&checkpointed, seq("500", 0)).await.expect_err("backwards");
    assert!(matches!(back, Error::CheckpointBackwards { .. }), "{back}");
    assert!(!back.is_retryable());
    let same = worker_b.checkpoint(&checkpointed, seq("500", 1)).await.expect("same checkpoint again");

    // The shard ends: SHARD_END and its children.
    let children = BTreeSet::from([shard(6), shard(7)]);
    let ended = worker_b.checkpoint_shard_end(&same, &children).await.expect("shard end");
    assert!(ended.is_finished());
    assert_eq!(ended.child_shard_ids, children);
    let raw = setup.raw_item(&shard(5)).await.expect("raw");
    assert_eq!(raw["checkpoint"], AttributeValue::S("SHARD_END".into()));
    assert_eq!(type_name(&raw["childShardIds"]), "SS");
    assert_eq!(ended.checkpoint.sequence, SequenceNumber::ShardEnd);
    setup.cleanup().await;
}

#[tokio::test]
async fn delete_needs_the_checkpoint_unchanged_and_is_idempotent() {
    let setup = Setup::new("leases-delete").await;
    setup.table.create_if_absent(&Lease::new(shard(8), ExtendedSequenceNumber::TRIM_HORIZON)).await.expect("create");
    let seen = setup.table.get(&shard(8)).await.expect("get").expect("lease");
    let held = setup.table.take(&seen, "wA").await.expect("take");
    let moved = setup.table.checkpoint(&held, seq("77", 0)).await.expect("checkpoint");

    let refused = setup.table.delete(&seen).await.expect_err("checkpoint moved since it was read");
    assert!(matches!(&refused, Error::LeaseChanged { operation: "delete", .. }), "{refused}");
    assert_eq!(refused.current_lease(), Some(&moved));

    // Renewals do not move the checkpoint, so they do not stop a delete.
    let renewed = setup.table.renew(&moved).await.expect("renew");
    setup.table.delete(&moved).await.expect("delete");
    assert_eq!(setup.table.get(&shard(8)).await.expect("get"), None);
    setup.table.delete(&renewed).await.expect("deleting again is fine");
    setup.cleanup().await;
}

#[tokio::test]
async fn a_table_written_by_kcl_3_0_3_is_read_and_keeps_its_types() {
    let setup = Setup::new("leases-kcl").await;
    let kcl_leases = fixture_items(KCL_3_0_3, "kcltake1-app");
    let others = fixture_items(OTHER_ENTITIES, "items");
    for item in kcl_leases.iter().chain(&others) {
        setup.put_raw(item.clone()).await;
    }
    // An attribute ktk does not know, on one lease: it must survive ktk's writes.
    let target = shard(2);
    let mut with_extra =
        kcl_leases.iter().find(|i| i["leaseKey"] == AttributeValue::S(target.clone())).expect("shard 2").clone();
    with_extra.insert("operatorNote".into(), AttributeValue::S("do not touch".into()));
    setup.put_raw(with_extra.clone()).await;

    // Every KCL lease reads back; every other item is skipped as another kind.
    let listing = setup.table.list().await.expect("list");
    let mut keys: Vec<&str> = listing.leases.iter().map(|l| l.lease_key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, [shard(0), shard(1), shard(2), shard(3)]);
    assert_eq!(listing.skipped.len(), others.len(), "{:?}", listing.skipped);
    assert!(listing.skipped.iter().all(|s| s.reason.is_other_kind()), "{:?}", listing.skipped);
    let lease = listing.leases.iter().find(|l| l.lease_key == target).expect("shard 2").clone();
    assert_eq!((lease.owner.as_deref(), lease.counter), (Some("wA"), 24));

    // wA (now running ktk) checkpoints further on.
    let before = setup.raw_item(&target).await.expect("raw before");
    let next = seq("49680443225280980504501278656977474355984056203406737443", 5);
    let after_checkpoint = setup.table.checkpoint(&lease, next.clone()).await.expect("checkpoint");
    assert_eq!(after_checkpoint.counter, 25);
    let after = setup.raw_item(&target).await.expect("raw after");
    assert_eq!(shape(&after), shape(&before), "same attributes, same types");
    assert_eq!(after["checkpoint"], AttributeValue::S(next.sequence.as_str().to_owned()));
    assert_eq!(after["checkpointSubSequenceNumber"], AttributeValue::N("5".into()));
    assert_eq!(after["leaseCounter"], AttributeValue::N("25".into()));
    let unchanged = |item: &Item| -> HashMap<String, AttributeValue> {
        item.iter()
            .filter(|(name, _)| !["checkpoint", "checkpointSubSequenceNumber", "leaseCounter"].contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    };
    assert_eq!(unchanged(&after), unchanged(&before), "everything else as the KCL left it");

    // Taken over by another ktk worker and renewed: still the KCL's types.
    let taken = setup.worker().take(&after_checkpoint, "ktk-1").await.expect("take");
    let renewed = setup.worker().renew(&taken).await.expect("renew");
    assert_eq!((renewed.counter, renewed.owner_switches_since_checkpoint), (27, 1));
    let after = setup.raw_item(&target).await.expect("raw after take");
    assert_eq!(shape(&after), shape(&before));
    assert_eq!(after["ownerSwitchesSinceCheckpoint"], AttributeValue::N("1".into()));
    assert_eq!(after["operatorNote"], AttributeValue::S("do not touch".into()));

    // Released as the KCL evicts: leaseOwner removed, nothing else.
    setup.worker().release(&renewed).await.expect("release");
    let after = setup.raw_item(&target).await.expect("raw after release");
    let mut expected = shape(&before);
    expected.remove("leaseOwner");
    assert_eq!(shape(&after), expected);

    // The other kinds of items were not touched.
    for item in &others {
        let AttributeValue::S(key) = &item["leaseKey"] else { panic!("string key") };
        assert_eq!(setup.raw_item(key).await.as_ref(), Some(item), "{key}");
    }
    // Nor the other KCL leases.
    for item in kcl_leases.iter().filter(|i| i["leaseKey"] != AttributeValue::S(target.clone())) {
        let AttributeValue::S(key) = &item["leaseKey"] else { panic!("string key") };
        assert_eq!(setup.raw_item(key).await.as_ref(), Some(item), "{key}");
    }
    setup.cleanup().await;
}
