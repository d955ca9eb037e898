//! `ktk leases`: a lease table (KCL layout) printed as an aligned table or as JSON Lines.
//!
//! Data flow: one consistent scan of the table ([`LeaseTable::list`]); with a stream, one
//! `GetRecords` call per unfinished shard from its checkpoint (a [`ShardReader`] asking for one
//! record, several shards at a time) says how far behind the tip the checkpoint is; then the rows,
//! sorted by shard, are written. Items that are not leases ktk reads are counted and explained on
//! the error stream.

use std::io::{self, Write};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use ktk_consumer::lease::{ExtendedSequenceNumber, Lease, LeaseListing, LeaseTable, SequenceNumber};
use ktk_consumer::retrieval::{ReaderConfig, RetrievalError, ShardReader, StartingPosition};
use ktk_proto::keys::HashKeyRange;
use serde::Serialize;

/// Shards asked how far behind they are at once (each call is on its own shard's quota).
const BEHIND_CONCURRENCY: usize = 16;
/// Attempts at the one `GetRecords` call when it fails in a way worth retrying (throttling).
const BEHIND_ATTEMPTS: u32 = 4;
const BEHIND_BACKOFF: Duration = Duration::from_millis(250);

/// What `ktk leases` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub json: bool,
    /// The stream the leases are for: when given, how far behind each checkpoint is.
    pub stream: Option<String>,
}

/// What a run found, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub leases: usize,
    pub skipped: usize,
    /// Shards whose distance behind the tip could not be read (each reported on the error stream).
    pub behind_failures: usize,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeasesError {
    #[error("{}", crate::tail::without_sdk_debug(&.0.to_string()))]
    Table(#[from] ktk_consumer::Error),
    #[error("cannot write to standard output: {0}")]
    Output(#[from] io::Error),
}

/// How far behind the tip a lease's checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Behind {
    /// Milliseconds, as `GetRecords` reports them (`None` if it did not).
    Millis(Option<i64>),
    /// Nothing to measure: the shard is finished, or the checkpoint is `AT_TIMESTAMP` (the lease
    /// does not store the time).
    NotApplicable,
    Failed(String),
}

/// Reads the table and writes it to `out`; skipped items and failed measurements go to `err`.
pub async fn run(
    table: &LeaseTable,
    kinesis: Option<&aws_sdk_kinesis::Client>,
    options: &Options,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<Summary, LeasesError> {
    let LeaseListing { mut leases, skipped } = table.list().await?;
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    if !skipped.is_empty() {
        writeln!(
            err,
            "ktk leases: {} item(s) of table {:?} skipped (not leases ktk can read):",
            skipped.len(),
            table.name()
        )?;
        for item in &skipped {
            writeln!(err, "  {:?}: {}", item.key, item.reason)?;
        }
    }
    let behind: Option<Vec<Behind>> = match (kinesis, &options.stream) {
        (Some(client), Some(stream)) => Some(
            stream::iter(&leases)
                .map(|lease| how_far_behind(client, stream, lease))
                .buffered(BEHIND_CONCURRENCY)
                .collect()
                .await,
        ),
        _ => None,
    };
    let mut behind_failures = 0;
    if let Some(behind) = &behind {
        for (lease, behind) in leases.iter().zip(behind) {
            if let Behind::Failed(reason) = behind {
                behind_failures += 1;
                writeln!(err, "ktk leases: cannot tell how far behind shard {} is: {reason}", lease.lease_key)?;
            }
        }
    }
    if options.json {
        for (i, lease) in leases.iter().enumerate() {
            let line = LeaseLine::new(lease, behind.as_ref().map(|b| &b[i]));
            serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
            out.write_all(b"\n")?;
        }
    } else {
        write_table(out, &leases, behind.as_deref())?;
    }
    out.flush()?;
    Ok(Summary { leases: leases.len(), skipped: skipped.len(), behind_failures })
}

/// One `GetRecords` call (one record) from the lease's checkpoint: its `MillisBehindLatest`.
async fn how_far_behind(client: &aws_sdk_kinesis::Client, stream: &str, lease: &Lease) -> Behind {
    let start = match &lease.checkpoint.sequence {
        SequenceNumber::ShardEnd | SequenceNumber::AtTimestamp => return Behind::NotApplicable,
        SequenceNumber::TrimHorizon => StartingPosition::TrimHorizon,
        SequenceNumber::Latest => StartingPosition::Latest,
        SequenceNumber::Number(number) => StartingPosition::After {
            sequence_number: number.clone(),
            sub_sequence_number: lease.checkpoint.sub_sequence,
        },
    };
    let range = lease.hash_key_range.unwrap_or(HashKeyRange::FULL);
    let config = ReaderConfig::default().with_max_records(1);
    let mut reader = ShardReader::new(client.clone(), stream, &lease.lease_key, range, start, config);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match reader.read().await {
            Ok(result) => return Behind::Millis(result.millis_behind_latest),
            // A closed shard with nothing left in retention: nothing is behind.
            Err(_) if reader.ended() => return Behind::Millis(Some(0)),
            Err(error) if error.is_retryable() && attempt < BEHIND_ATTEMPTS => {
                tokio::time::sleep(BEHIND_BACKOFF * attempt).await;
            }
            Err(RetrievalError::NotFound { .. }) => {
                return Behind::Failed(format!(
                    "stream {stream:?} has no such shard (or does not exist); is the lease table for this stream?"
                ));
            }
            Err(error) => return Behind::Failed(crate::tail::without_sdk_debug(&error.to_string()).to_owned()),
        }
    }
}

/// A position as the table shows it: sentinels by name, sequence numbers as
/// `sequence/sub-sequence`.
fn position(checkpoint: &ExtendedSequenceNumber) -> String {
    if checkpoint.sequence.is_sentinel() && checkpoint.sub_sequence == 0 {
        checkpoint.sequence.as_str().to_owned()
    } else {
        checkpoint.to_string()
    }
}

fn owner(lease: &Lease) -> String {
    match (&lease.owner, &lease.checkpoint_owner) {
        (None, _) => "-".to_owned(),
        (Some(owner), None) => owner.clone(),
        // A KCL 3.x hand-off in progress: the current worker, then the next one.
        (Some(owner), Some(from)) => format!("{from}->{owner}"),
    }
}

fn shard_list<'a>(shards: impl IntoIterator<Item = &'a String>) -> String {
    let list: Vec<&str> = shards.into_iter().map(String::as_str).collect();
    if list.is_empty() { "-".to_owned() } else { list.join(",") }
}

/// The human table: a header, then one row per lease, columns two spaces apart, numbers aligned
/// to the right.
fn write_table(out: &mut impl Write, leases: &[Lease], behind: Option<&[Behind]>) -> io::Result<()> {
    let mut header = vec!["shard", "owner", "counter", "checkpoint", "parents", "children", "owner_switches"];
    if behind.is_some() {
        header.push("behind_ms");
    }
    // Columns whose values are numbers.
    let numeric = |column: usize| matches!(header[column], "counter" | "owner_switches" | "behind_ms");
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for (i, lease) in leases.iter().enumerate() {
        let mut row = vec![
            lease.lease_key.clone(),
            owner(lease),
            lease.counter.to_string(),
            position(&lease.checkpoint),
            shard_list(&lease.parent_shard_ids),
            shard_list(&lease.child_shard_ids),
            lease.owner_switches_since_checkpoint.to_string(),
        ];
        if let Some(behind) = behind {
            row.push(match &behind[i] {
                Behind::Millis(Some(ms)) => ms.to_string(),
                Behind::Millis(None) | Behind::NotApplicable => "-".to_owned(),
                Behind::Failed(_) => "?".to_owned(),
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let last = c + 1 == row.len();
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            if numeric(c) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if !last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// One lease as `ktk leases --json` prints it. The field names are a public interface.
#[derive(Debug, Serialize)]
struct LeaseLine<'a> {
    shard: &'a str,
    owner: Option<&'a str>,
    /// During a KCL 3.x hand-off, the worker still processing the shard.
    checkpoint_owner: Option<&'a str>,
    counter: u64,
    checkpoint: &'a str,
    checkpoint_sub_sequence_number: u64,
    pending_checkpoint: Option<&'a str>,
    pending_checkpoint_sub_sequence_number: Option<u64>,
    parents: Vec<&'a str>,
    children: Vec<&'a str>,
    owner_switches: u64,
    starting_hash_key: Option<String>,
    ending_hash_key: Option<String>,
    /// Only with `--stream`; null when there is nothing to measure or it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    behind_ms: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    behind_error: Option<&'a str>,
}

impl<'a> LeaseLine<'a> {
    fn new(lease: &'a Lease, behind: Option<&'a Behind>) -> Self {
        LeaseLine {
            shard: &lease.lease_key,
            owner: lease.owner.as_deref(),
            checkpoint_owner: lease.checkpoint_owner.as_deref(),
            counter: lease.counter,
            checkpoint: lease.checkpoint.sequence.as_str(),
            checkpoint_sub_sequence_number: lease.checkpoint.sub_sequence,
            pending_checkpoint: lease.pending_checkpoint.as_ref().map(|p| p.sequence.as_str()),
            pending_checkpoint_sub_sequence_number: lease.pending_checkpoint.as_ref().map(|p| p.sub_sequence),
            parents: lease.parent_shard_ids.iter().map(String::as_str).collect(),
            children: lease.child_shard_ids.iter().map(String::as_str).collect(),
            owner_switches: lease.owner_switches_since_checkpoint,
            starting_hash_key: lease.hash_key_range.map(|r| r.start.to_string()),
            ending_hash_key: lease.hash_key_range.map(|r| r.end.to_string()),
            behind_ms: behind.map(|b| match b {
                Behind::Millis(ms) => *ms,
                Behind::NotApplicable | Behind::Failed(_) => None,
            }),
            behind_error: match behind {
                Some(Behind::Failed(reason)) => Some(reason),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases() -> Vec<Lease> {
        let mut parent = Lease::new("shardId-000000000000", ExtendedSequenceNumber::SHARD_END);
        parent.counter = 12;
        parent.child_shard_ids = ["shardId-000000000001".to_owned(), "shardId-000000000002".to_owned()].into();
        let mut child = Lease::new("shardId-000000000001", ExtendedSequenceNumber::at("4960123", 2).expect("valid"))
            .with_parents(["shardId-000000000000"])
            .with_hash_key_range(HashKeyRange { start: 0, end: 99 });
        child.owner = Some("worker-a".into());
        child.counter = 7;
        child.owner_switches_since_checkpoint = 1;
        let other = Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON)
            .with_parents(["shardId-000000000000"]);
        vec![parent, child, other]
    }

    #[test]
    fn human_table_is_aligned() {
        let mut out = Vec::new();
        let behind = [Behind::NotApplicable, Behind::Millis(Some(1500)), Behind::Failed("boom".into())];
        write_table(&mut out, &leases(), Some(&behind)).expect("write");
        let text = String::from_utf8(out).expect("UTF-8");
        let expected = [
            "shard                 owner     counter  checkpoint    parents               children                                   owner_switches  behind_ms",
            "shardId-000000000000  -              12  SHARD_END     -                     shardId-000000000001,shardId-000000000002               0          -",
            "shardId-000000000001  worker-a        7  4960123/2     shardId-000000000000  -                                                       1       1500",
            "shardId-000000000002  -               0  TRIM_HORIZON  shardId-000000000000  -                                                       0          ?",
        ];
        assert_eq!(text, expected.join("\n") + "\n");

        let mut out = Vec::new();
        write_table(&mut out, &leases()[1..2], None).expect("write");
        let text = String::from_utf8(out).expect("UTF-8");
        assert_eq!(
            text,
            "shard                 owner     counter  checkpoint  parents               children  owner_switches\n\
             shardId-000000000001  worker-a        7  4960123/2   shardId-000000000000  -                      1\n"
        );
    }

    #[test]
    fn json_lines() {
        let leases = leases();
        let behind = Behind::Millis(Some(1500));
        let line = serde_json::to_value(LeaseLine::new(&leases[1], Some(&behind))).expect("JSON");
        assert_eq!(
            line,
            serde_json::json!({
                "shard": "shardId-000000000001",
                "owner": "worker-a",
                "checkpoint_owner": null,
                "counter": 7,
                "checkpoint": "4960123",
                "checkpoint_sub_sequence_number": 2,
                "pending_checkpoint": null,
                "pending_checkpoint_sub_sequence_number": null,
                "parents": ["shardId-000000000000"],
                "children": [],
                "owner_switches": 1,
                "starting_hash_key": "0",
                "ending_hash_key": "99",
                "behind_ms": 1500,
            })
        );
        let line = serde_json::to_value(LeaseLine::new(&leases[0], None)).expect("JSON");
        assert!(line.get("behind_ms").is_none());
        assert_eq!(line["checkpoint"], "SHARD_END");
        let failed = Behind::Failed("no such stream".into());
        let line = serde_json::to_value(LeaseLine::new(&leases[2], Some(&failed))).expect("JSON");
        assert_eq!(line["behind_ms"], serde_json::Value::Null);
        assert_eq!(line["behind_error"], "no such stream");
    }

    #[test]
    fn positions() {
        assert_eq!(position(&ExtendedSequenceNumber::LATEST), "LATEST");
        assert_eq!(position(&ExtendedSequenceNumber::at("5", 0).expect("valid")), "5/0");
    }
}
