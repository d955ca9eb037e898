//! Renewing held leases against LocalStack's DynamoDB: a lease taken by another worker is lost
//! at the next renewal, checkpoints go through the held lease between renewals, a graceful
//! release hands leases over, and a lease that cannot be renewed is given up after the failover time.

use std::time::Duration;

use ktk_consumer::lease::LeaseRenewer;
use ktk_consumer::lease::{ExtendedSequenceNumber, Lease, LeaseTable};
use ktk_tests::{aws_config, dynamodb, unique_name};

async fn table_with_lease(shard: &str) -> (LeaseTable, Lease) {
    dynamodb().await;
    let table = LeaseTable::new(&aws_config().await, unique_name("ktk-renew"));
    table.ensure_table().await.expect("table");
    let lease = Lease::new(shard, ExtendedSequenceNumber::TRIM_HORIZON);
    assert!(table.create_if_absent(&lease).await.expect("create"));
    let lease = table.get(shard).await.expect("get").expect("exists");
    (table, lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_another_worker_is_lost_at_the_next_renewal() {
    let (table, lease) = table_with_lease("shardId-000000000000").await;
    let taken = table.take(&lease, "w1").await.expect("w1 takes");
    let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
    let held = renewer.add(taken);
    let report = renewer.renew_all().await;
    assert_eq!((report.renewed, report.lost.len()), (1, 0));
    assert!(held.snapshot().await.counter > lease.counter + 1, "renewal moved the counter");

    // Another worker takes it (it read the current item).
    let current = table.get("shardId-000000000000").await.expect("get").expect("exists");
    table.take(&current, "w2").await.expect("w2 takes");
    let report = renewer.renew_all().await;
    assert_eq!(report.lost, ["shardId-000000000000"]);
    assert!(held.is_lost());
    tokio::time::timeout(Duration::from_secs(1), held.lost()).await.expect("the loss is signalled");
    assert!(renewer.held().is_empty());
    // And nothing more can be written through it.
    assert!(
        held.checkpoint(
            &table,
            ExtendedSequenceNumber::at("49600000000000000000000000000000000000000000000000000001", 0).expect("seq")
        )
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_renewals_take_turns_and_release_hands_the_lease_over() {
    let (table, lease) = table_with_lease("shardId-000000000001").await;
    let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
    let held = renewer.add(table.take(&lease, "w1").await.expect("take"));
    renewer.renew_all().await;
    let position =
        ExtendedSequenceNumber::at("49600000000000000000000000000000000000000000000000000042", 3).expect("seq");
    held.checkpoint(&table, position.clone()).await.expect("checkpoint after a renewal");
    assert_eq!(renewer.renew_all().await.renewed, 1, "renewal after a checkpoint");
    let stored = table.get("shardId-000000000001").await.expect("get").expect("exists");
    assert_eq!(stored.checkpoint, position);
    assert_eq!(stored.owner.as_deref(), Some("w1"));

    assert_eq!(renewer.release_all().await, ["shardId-000000000001"]);
    let released = table.get("shardId-000000000001").await.expect("get").expect("exists");
    assert_eq!(released.owner, None, "released: free for the next taker at once");
    assert_eq!(released.checkpoint, position, "the checkpoint stays");
    assert!(held.is_lost(), "the processing task is told to stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_cannot_be_renewed_is_given_up_after_the_failover_time() {
    dynamodb().await;
    // A table that does not exist: every renewal fails, but not on a condition.
    let missing = LeaseTable::new(&aws_config().await, unique_name("ktk-renew-missing"));
    let renewer = LeaseRenewer::new(missing, Duration::from_millis(300));
    let mut lease = Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON);
    lease.owner = Some("w1".into());
    let held = renewer.add(lease);
    let first = renewer.renew_all().await;
    assert_eq!((first.failed, first.lost.len()), (1, 0), "kept for now: {first:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = renewer.renew_all().await;
    assert_eq!(later.lost, ["shardId-000000000002"], "{later:?}");
    assert!(held.is_lost());
}
