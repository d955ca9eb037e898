//! Puts a batch of 100-byte records through a producer over the no-op sink, repeatedly, on one
//! core: a target for profilers (`perf record`, `valgrind --tool=callgrind`).
//!
//! `cargo run --release -p ktk-producer --example profile_put -- [ROUNDS]`

use std::sync::Arc;

use ktk_producer::api::NoopKinesis;
use ktk_producer::{Producer, ProducerConfig, Record};

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let config = ProducerConfig::new("profile").with_rate_limit_percent(1_000_000);
        let producer = Producer::with_api(config, Arc::new(NoopKinesis::new(4))).await.expect("producer");
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let mut receipts = Vec::with_capacity(20_000);
            for i in 0..20_000usize {
                let mut data = format!("event-{i:08}").into_bytes();
                data.resize(100, b'.');
                receipts.push(producer.put(Record::new(format!("user-{:06}", i % 1000), data)).await.expect("put"));
            }
            producer.flush().await;
            for receipt in receipts {
                receipt.await.expect("resolved");
            }
        }
        let elapsed = started.elapsed();
        let records = rounds * 20_000;
        println!("{records} records in {elapsed:?}: {:.0} records/s", records as f64 / elapsed.as_secs_f64());
    });
}
