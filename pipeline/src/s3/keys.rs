//! Object keys: where a batch's events and dead letters go (`events/dt=YYYY-MM-DD/hour=HH/` and
//! `dead-letters/dt=YYYY-MM-DD/` under the sink's prefix, named after the batch's stream, shard and
//! first and last records), and what an object holds, told from its key alone.

use std::time::SystemTime;

use super::S3Format;
use crate::Batch;
use crate::time::{date_and_hour, unix_millis as system_time_ms};

const EVENTS_DIR: &str = "events";
const DEAD_LETTERS_DIR: &str = "dead-letters";

pub(super) fn object_name(batch: &Batch, extension: &str) -> String {
    let (first, first_sub) = &batch.first;
    let (last, last_sub) = &batch.last;
    format!("{}-{}-{first}-{first_sub}-{last}-{last_sub}.{extension}", batch.stream, batch.shard_id)
}

fn join_key(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() { rest.to_owned() } else { format!("{prefix}/{rest}") }
}

/// The key of the events object of `batch` for the hour of `occurred_at_ms`.
pub(super) fn events_key(prefix: &str, batch: &Batch, occurred_at_ms: i64, format: S3Format) -> String {
    let (date, hour) = date_and_hour(occurred_at_ms);
    let name = object_name(batch, format.extension());
    join_key(prefix.trim_matches('/'), &format!("{EVENTS_DIR}/dt={date}/hour={hour:02}/{name}"))
}

/// The key of the dead-letter object of `batch` for the day of `arrival` (`dt=unknown` for none).
pub(super) fn dead_letters_key(prefix: &str, batch: &Batch, arrival: Option<SystemTime>) -> String {
    let date = arrival.map(|time| date_and_hour(system_time_ms(time)).0).unwrap_or_else(|| "unknown".to_owned());
    let name = object_name(batch, S3Format::JsonLinesGzip.extension());
    join_key(prefix.trim_matches('/'), &format!("{DEAD_LETTERS_DIR}/dt={date}/{name}"))
}

/// What an object under a sink's prefix holds, from its key: the directory before its `dt=`
/// segment, and its extension.
pub(super) fn object_kind(key: &str) -> Option<(ObjectKind, S3Format)> {
    let format = S3Format::of_key(key)?;
    let segments: Vec<&str> = key.split('/').collect();
    let dt = segments.iter().rposition(|segment| segment.starts_with("dt="))?;
    match *segments.get(dt.checked_sub(1)?)? {
        EVENTS_DIR => Some((ObjectKind::Events, format)),
        DEAD_LETTERS_DIR if format == S3Format::JsonLinesGzip => Some((ObjectKind::DeadLetters, format)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ObjectKind {
    Events,
    DeadLetters,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::S3SinkConfig;
    use super::super::fixtures::{T_10_59, batch, record};
    use super::super::reader::decode_events;
    use super::*;
    use crate::time::{MS_PER_HOUR, from_unix_millis as ms_system_time};

    #[test]
    fn keys_name_the_stream_shard_positions_and_hour() {
        let b = batch(vec![record(1, T_10_59), record(2, T_10_59)]);
        let name = format!("events-shardId-000000000003-4963{:052}-1-4963{:052}-2", 1, 2);
        assert_eq!(
            events_key("analytics/raw", &b, T_10_59, S3Format::Parquet),
            format!("analytics/raw/events/dt=2026-03-01/hour=10/{name}.parquet")
        );
        assert_eq!(
            events_key("/analytics/raw/", &b, T_10_59 + 1_000, S3Format::JsonLinesGzip),
            format!("analytics/raw/events/dt=2026-03-01/hour=11/{name}.jsonl.gz")
        );
        assert_eq!(events_key("", &b, 0, S3Format::Parquet), format!("events/dt=1970-01-01/hour=00/{name}.parquet"));
        assert_eq!(
            dead_letters_key("p", &b, Some(ms_system_time(T_10_59))),
            format!("p/dead-letters/dt=2026-03-01/{name}.jsonl.gz")
        );
        assert_eq!(dead_letters_key("p", &b, None), format!("p/dead-letters/dt=unknown/{name}.jsonl.gz"));
        assert_eq!(S3SinkConfig::new("b", "/a/b/").prefix(), "a/b");
    }

    #[test]
    fn the_partition_hour_is_the_utc_hour_of_occurred_at() {
        assert_eq!(date_and_hour(T_10_59 + 1_000 + 13 * MS_PER_HOUR), ("2026-03-02".into(), 0));
    }

    #[test]
    fn object_kinds_come_from_the_directory_before_dt() {
        assert_eq!(
            object_kind("p/events/dt=2026-03-01/hour=10/a.parquet"),
            Some((ObjectKind::Events, S3Format::Parquet))
        );
        assert_eq!(
            object_kind("events/dt=2026-03-01/hour=10/a.jsonl.gz"),
            Some((ObjectKind::Events, S3Format::JsonLinesGzip))
        );
        assert_eq!(
            object_kind("events/dead-letters/dt=unknown/a.jsonl.gz"),
            Some((ObjectKind::DeadLetters, S3Format::JsonLinesGzip))
        );
        assert_eq!(object_kind("p/dead-letters/dt=2026-03-01/a.parquet"), None);
        assert_eq!(object_kind("p/events/dt=2026-03-01/hour=10/a.json"), None);
        assert_eq!(object_kind("p/other/dt=2026-03-01/a.parquet"), None);
        assert_eq!(object_kind("p/events/a.parquet"), None);
        assert_eq!(object_kind("p/events/dt=2026-03-01/hour=10/parquet"), None);
        assert!(decode_events("p/x.parquet", Bytes::new()).is_err());
    }
}
