//! Shard sync against LocalStack: leases for a stream's shards, children of a split with their
//! parent, gating on the parent's end, idempotence, and LATEST skipping closed shards.

use std::collections::BTreeMap;

use ktk_consumer::lease::{ExtendedSequenceNumber, Lease, LeaseTable};
use ktk_consumer::lease::{InitialPosition, ShardSyncer, parents_done};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, kinesis, unique_name, wait_stream_active};

async fn leases(table: &LeaseTable) -> BTreeMap<String, Lease> {
    table.list().await.expect("list").leases.into_iter().map(|l| (l.lease_key.clone(), l)).collect()
}

async fn split_first_shard(client: &aws_sdk_kinesis::Client, stream: &str) -> String {
    let shards = client.list_shards().stream_name(stream).send().await.expect("list");
    let first = shards.shards().iter().min_by_key(|s| s.shard_id().to_owned()).expect("a shard");
    let range = first.hash_key_range().expect("range");
    let start: u128 = range.starting_hash_key().parse().expect("decimal");
    let end: u128 = range.ending_hash_key().parse().expect("decimal");
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(first.shard_id())
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .expect("split");
    wait_stream_active(client, stream).await;
    first.shard_id().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_follow_a_split_and_children_wait_for_their_parent() {
    let client = kinesis().await;
    dynamodb().await;
    let stream = unique_name("ktk-sync");
    create_stream(&client, &stream, 2).await;
    let table = LeaseTable::new(&aws_config().await, unique_name("ktk-sync-leases"));
    table.ensure_table().await.expect("table");
    let syncer = ShardSyncer::new(client.clone(), &stream, table.clone(), InitialPosition::TrimHorizon);

    let first = syncer.sync().await.expect("sync");
    assert_eq!((first.shards, first.created.len()), (2, 2), "{first:?}");
    let again = syncer.sync().await.expect("sync");
    assert!(again.created.is_empty(), "a second sync creates nothing: {again:?}");
    let before = leases(&table).await;
    assert!(
        before.values().all(|l| l.checkpoint == ExtendedSequenceNumber::TRIM_HORIZON && l.hash_key_range.is_some())
    );

    let parent = split_first_shard(&client, &stream).await;
    let after_split = syncer.sync().await.expect("sync");
    assert_eq!(after_split.created.len(), 2, "{after_split:?}");
    let all = leases(&table).await;
    let children: Vec<&Lease> = after_split.created.iter().map(|id| &all[id]).collect();
    for child in &children {
        assert!(child.parent_shard_ids.contains(&parent), "{child:?}");
        assert_eq!(child.checkpoint, ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(!parents_done(child, &all), "the parent is not finished yet");
    }
    // The parent is read to its end: its children may start.
    let owned = table.take(&all[&parent], "worker-1").await.expect("take");
    let children_ids = after_split.created.iter().cloned().collect();
    table.checkpoint_shard_end(&owned, &children_ids).await.expect("shard end");
    let done = leases(&table).await;
    assert!(children.iter().all(|c| parents_done(c, &done)));
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_leases_only_open_shards_of_an_already_split_stream() {
    let client = kinesis().await;
    dynamodb().await;
    let stream = unique_name("ktk-sync-latest");
    create_stream(&client, &stream, 2).await;
    let parent = split_first_shard(&client, &stream).await;
    let table = LeaseTable::new(&aws_config().await, unique_name("ktk-sync-latest-leases"));
    table.ensure_table().await.expect("table");
    let report =
        ShardSyncer::new(client.clone(), &stream, table.clone(), InitialPosition::Latest).sync().await.expect("sync");
    assert_eq!((report.shards, report.created.len()), (4, 3), "{report:?}");
    let all = leases(&table).await;
    assert!(!all.contains_key(&parent), "the closed parent holds nothing newer than now");
    assert!(all.values().all(|l| l.checkpoint == ExtendedSequenceNumber::LATEST));
    assert!(all.values().all(|l| parents_done(l, &all)), "no parent lease to wait for");
    delete_stream(&client, &stream).await;
}
