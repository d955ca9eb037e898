//! `ktk s3 read`: the events an S3 sink wrote under a prefix, each once, as JSON Lines.
//!
//! The listing, reading (Parquet and gzip JSON Lines objects alike) and dedup by `event_id` are
//! the consumer library's reader ([`read_events`]); this module prints what it returns: one line
//! per event on stdout, a summary on stderr.

use std::io::{self, Write};

use ktk_pipeline::s3::{Client, ReadEvents, S3Error, event_json, event_line, read_events};

/// What `ktk s3 read` reads and how it prints it.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub bucket: String,
    /// An S3 key prefix, used as is (a sink's prefix, or one of its `events/dt=.../` partitions).
    pub prefix: String,
    /// Each line is the event with its position (the JSON Lines object format) rather than the
    /// event alone.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error("event {event_id} cannot be written as JSON: {source}")]
    Json { event_id: String, source: serde_json::Error },
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Reads every event under the prefix and prints them.
pub async fn read(
    client: &Client,
    options: &ReadOptions,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<ReadEvents, ReadError> {
    let read = read_events(client, &options.bucket, &options.prefix).await?;
    print_events(&read, options.json, out, err)?;
    Ok(read)
}

/// One line per event on `out` (canonical proto3 JSON, keys sorted; with `json`, wrapped with its
/// position), then the summary on `err`.
pub fn print_events(
    read: &ReadEvents,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), ReadError> {
    for record in &read.events {
        let line = if json { event_line(record) } else { event_json(&record.event) };
        let line = line.map_err(|source| ReadError::Json { event_id: record.event.event_id.clone(), source })?;
        serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    writeln!(
        err,
        "ktk s3 read: {} events, {} duplicates, {} objects, {} bytes",
        read.events.len(),
        read.duplicates,
        read.objects,
        read.bytes
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ktk_pipeline::EventRecord;
    use ktk_proto::events::v1::{Event, EventType};

    use super::*;

    fn read() -> ReadEvents {
        let event = Event {
            event_id: "e-1".into(),
            r#type: EventType::Play as i32,
            occurred_at_ms: 1_772_359_200_000,
            attributes: [("b".to_owned(), "2".to_owned()), ("a".to_owned(), "1".to_owned())].into(),
            app_id: "tv-roku".into(),
            ..Event::default()
        };
        let record = EventRecord {
            event,
            shard_id: "shardId-000000000001".into(),
            sequence_number: "4966".into(),
            sub_sequence_number: 2,
            arrival: None,
        };
        ReadEvents { events: vec![record], duplicates: 3, objects: 2, bytes: 1_234 }
    }

    #[test]
    fn prints_canonical_json_lines_and_a_summary() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        print_events(&read(), false, &mut out, &mut err).expect("print");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\"appId\":\"tv-roku\",\"attributes\":{\"a\":\"1\",\"b\":\"2\"},\"eventId\":\"e-1\",\
             \"occurredAtMs\":\"1772359200000\",\"type\":\"EVENT_TYPE_PLAY\"}\n"
        );
        assert_eq!(
            String::from_utf8(err).expect("utf-8"),
            "ktk s3 read: 1 events, 3 duplicates, 2 objects, 1234 bytes\n"
        );
    }

    #[test]
    fn with_json_each_line_carries_the_position() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        print_events(&read(), true, &mut out, &mut err).expect("print");
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(line["shard_id"], "shardId-000000000001");
        assert_eq!(line["sequence_number"], "4966");
        assert_eq!(line["sub_sequence_number"], 2);
        assert_eq!(line["arrival_ms"], serde_json::Value::Null);
        assert_eq!(line["event"]["eventId"], "e-1");
        assert_eq!(line["event"]["appId"], "tv-roku");
    }
}
