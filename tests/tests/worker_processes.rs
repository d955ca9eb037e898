//! Consumer workers as separate processes (the `ktk-test-worker` binary) on an 8-shard stream
//! under a steady producer: an even share across three processes, one SIGKILLed (its shards resume
//! on the others from its last checkpoints after the failover time; only what it had not
//! checkpointed is processed again), and the others stopped with SIGTERM (exit 0, leases released).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktk_consumer::lease::LeaseTable;
use ktk_tests::worker_support::{lease_owners, steady_producer, wait_for};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, index_in, kinesis, unique_name};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

/// One record a worker process printed.
#[derive(Debug, Clone)]
struct Line {
    at: Instant,
    worker: String,
    shard: String,
    index: usize,
}

type Lines = Arc<Mutex<Vec<Line>>>;

fn spawn_worker(stream: &str, table: &str, worker: &str, lines: &Lines) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ktk-test-worker"))
        .args([stream, table, worker])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start ktk-test-worker");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::clone(lines);
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if value["event"] == "record" {
                let data = value["data"].as_str().expect("data");
                lines.lock().expect("lock").push(Line {
                    at: Instant::now(),
                    worker: value["worker"].as_str().expect("worker").to_owned(),
                    shard: value["shard"].as_str().expect("shard").to_owned(),
                    index: index_in(data.as_bytes()),
                });
            }
        }
    });
    child
}

async fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_a_stream_and_survive_one_being_killed() {
    const N: usize = 8_000;
    let client = kinesis().await;
    let _ = dynamodb().await;
    let stream = unique_name("ktk-procs");
    let table_name = unique_name("ktk-procs-app");
    create_stream(&client, &stream, 8).await;
    let table = LeaseTable::new(&aws_config().await, &table_name);
    let lines: Lines = Arc::default();

    let producer = steady_producer(&stream, N, Duration::from_secs(16));

    let mut survivors = vec![
        spawn_worker(&stream, &table_name, "proc-1", &lines),
        spawn_worker(&stream, &table_name, "proc-2", &lines),
    ];
    let mut victim = spawn_worker(&stream, &table_name, "proc-3", &lines);
    let spread = wait_for(Duration::from_secs(30), "a 3/3/2 spread over the processes", || async {
        let o = lease_owners(&table).await;
        let mut counts: Vec<usize> =
            ["proc-1", "proc-2", "proc-3"].iter().map(|w| o.get(*w).map_or(0, Vec::len)).collect();
        counts.sort_unstable();
        counts == [2, 3, 3]
    })
    .await;

    // Kill one without warning.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let orphaned = lease_owners(&table).await.remove("proc-3").expect("proc-3 holds leases");
    victim.start_kill().expect("SIGKILL");
    let killed_at = Instant::now();
    victim.wait().await.expect("reaped");
    let takeover = wait_for(Duration::from_secs(20), "proc-3's shards processed by the others", || async {
        let lines = lines.lock().expect("lock");
        orphaned.iter().all(|shard| lines.iter().any(|l| l.at > killed_at && &l.shard == shard && l.worker != "proc-3"))
    })
    .await;

    producer.await.expect("producer");
    let missing = || {
        let lines = lines.lock().expect("lock");
        let mut seen = vec![false; N];
        for l in lines.iter() {
            seen[l.index] = true;
        }
        (0..N).filter(|i| !seen[*i]).collect::<Vec<usize>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing().is_empty() {
        if Instant::now() > deadline {
            // Say what is stuck before failing: which records, and the leases as the table has them.
            let leases = table.list().await.map(|l| l.leases);
            panic!(
                "records never processed (first ten of {}): {:?}; leases: {leases:#?}",
                missing().len(),
                &missing()[..missing().len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for child in &survivors {
        sigterm(child).await;
    }
    for child in &mut survivors {
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").expect("status");
        assert!(status.success(), "graceful exit: {status:?}");
    }

    // Nothing lost; whatever was processed twice was first processed by the killed worker (what it
    // had not checkpointed yet), and then by a survivor.
    let lines = lines.lock().expect("lock").clone();
    let mut by_index: HashMap<usize, Vec<&Line>> = HashMap::new();
    for line in &lines {
        by_index.entry(line.index).or_default().push(line);
    }
    assert_eq!(by_index.len(), N, "every record processed");
    let twice: Vec<&Vec<&Line>> = by_index.values().filter(|v| v.len() > 1).collect();
    for seen in &twice {
        assert_eq!(seen.len(), 2, "at most twice: {seen:?}");
        assert_eq!(seen[0].worker, "proc-3", "only the killed worker's uncheckpointed records repeat: {seen:?}");
        assert_ne!(seen[1].worker, "proc-3");
    }
    println!(
        "processes: even spread in {spread:?}; takeover after SIGKILL in {takeover:?} (failover 3 s, taking 2 s); \
         {} records processed twice (the killed worker's uncheckpointed batches)",
        twice.len()
    );
    assert!(
        takeover <= Duration::from_secs(6),
        "within the failover time plus a taking cycle (and a second): {takeover:?}"
    );
    let leases = table.list().await.expect("list").leases;
    assert!(leases.iter().all(|l| l.owner.is_none()), "all released at the end: {leases:?}");
    delete_stream(&client, &stream).await;
}
