//! A consumer worker in its own process, for the multi-process tests: runs a
//! [`RecordingProcessor`](ktk_tests::worker_support::RecordingProcessor) with the test timings and
//! prints one JSON line per record processed and per lifecycle event, flushed as it goes, so a
//! test that SIGKILLs it still has everything it printed.
//!
//! Usage: `ktk-test-worker <stream> <lease table> <worker id>`. SIGTERM or SIGINT shuts it down
//! gracefully (exit 0 with a final `{"event":"stopped",...}` line).

use std::process::ExitCode;
use std::time::Duration;

use ktk_consumer::Worker;
use ktk_tests::worker_support::{Journal, RecordingProcessor, fast_worker_config};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [stream, table, worker] = args.as_slice() else {
        eprintln!("usage: ktk-test-worker <stream> <lease table> <worker id>");
        return ExitCode::from(2);
    };
    // Warnings and errors to stderr (the test shows them), more with RUST_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let journal = Journal::default();
    let config = ktk_tests::aws_config().await;
    let factory = {
        let journal = journal.clone();
        let worker = worker.clone();
        move |shard: &str| {
            let mut processor = RecordingProcessor::new(&worker, shard, journal.clone());
            // Report a batch before checkpointing it: a SIGKILL between the two must not hide
            // records that will never be read again.
            processor.echo = true;
            processor
        }
    };
    let consumer = match Worker::new(fast_worker_config(stream, table, worker), &config, factory) {
        Ok(worker) => worker,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(consumer.run(shutdown.clone()));

    // Print what was processed as it happens.
    let printer = {
        let journal = journal.clone();
        let worker = worker.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let stopping = stop.is_cancelled();
                journal.print_new(&worker);
                if stopping {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            eprintln!("cannot listen for SIGTERM: {error}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
    let report = run.await;
    let _ = printer.await;
    // The printer stopped at the shutdown signal; print what came after it (final checkpoints).
    journal.print_new(worker);
    match report {
        Ok(Ok(report)) => {
            println!(
                "{}",
                serde_json::json!({
                    "event": "stopped", "worker": worker, "taken": report.leases_taken,
                    "released": report.leases_released, "lost": report.leases_lost,
                    "reads": report.table_calls.reads, "writes": report.table_calls.writes,
                })
            );
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("worker failed: {error}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("worker panicked: {error}");
            ExitCode::FAILURE
        }
    }
}
