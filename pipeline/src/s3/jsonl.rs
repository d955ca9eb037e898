//! gzip JSON Lines: an event per line (its position in the shard and the event in canonical
//! proto3 JSON, keys sorted) or a dead letter per line (its position, partition key, base64 data
//! and reason), and back. Writes are byte-for-byte reproducible: sorted keys, and a gzip header
//! with mtime 0 and no file name.

use std::io::{Read, Write};

use base64::Engine as _;
use bytes::Bytes;
use ktk_proto::events::v1::{Event, EventType, Platform};
use serde_json::{Value, json};

use crate::time::{from_unix_millis as ms_system_time, unix_millis as system_time_ms};
use crate::{DeadLetter, EventRecord};

/// The JSON Lines object of one event: its position and the event in canonical proto3 JSON, every
/// object's keys sorted (the event's `attributes` map has no order of its own).
pub fn event_line(record: &EventRecord) -> Result<Value, serde_json::Error> {
    Ok(json!({
        "arrival_ms": record.arrival.map(system_time_ms),
        "event": event_json(&record.event)?,
        "sequence_number": record.sequence_number,
        "shard_id": record.shard_id,
        "sub_sequence_number": record.sub_sequence_number,
    }))
}

/// An event in canonical proto3 JSON, with sorted keys. An enum value this build does not know is
/// written as its number, as proto3 JSON prescribes (the generated serializer refuses it), so an
/// event from a newer client is kept whole.
pub fn event_json(event: &Event) -> Result<Value, serde_json::Error> {
    let unknown_type = EventType::try_from(event.r#type).is_err();
    let unknown_platform = Platform::try_from(event.platform).is_err();
    let mut value = if unknown_type || unknown_platform {
        let mut known = event.clone();
        if unknown_type {
            known.r#type = 0;
        }
        if unknown_platform {
            known.platform = 0;
        }
        let mut value = serde_json::to_value(&known)?;
        if let Value::Object(fields) = &mut value {
            if unknown_type {
                fields.insert("type".into(), event.r#type.into());
            }
            if unknown_platform {
                fields.insert("platform".into(), event.platform.into());
            }
        }
        value
    } else {
        serde_json::to_value(event)?
    };
    value.sort_all_objects();
    Ok(value)
}

/// Reads [`event_json`]'s output (or any proto3 JSON of an event), keeping enum values given as
/// numbers this build does not know.
pub(super) fn event_from_json(value: &Value) -> Result<Event, serde_json::Error> {
    let mut event: Event = serde_json::from_value(value.clone())?;
    let number = |name: &str| value.get(name).and_then(Value::as_i64).and_then(|n| i32::try_from(n).ok());
    if let Some(number) = number("type") {
        event.r#type = number;
    }
    if let Some(number) = number("platform") {
        event.platform = number;
    }
    Ok(event)
}

pub(super) fn dead_letter_line(letter: &DeadLetter) -> Result<Value, serde_json::Error> {
    Ok(json!({
        "arrival_ms": letter.arrival.map(system_time_ms),
        "data": base64::engine::general_purpose::STANDARD.encode(&letter.data),
        "partition_key": letter.partition_key,
        "reason": letter.reason,
        "sequence_number": letter.sequence_number,
        "shard_id": letter.shard_id,
        "sub_sequence_number": letter.sub_sequence_number,
    }))
}

pub(super) fn gzip_lines(lines: impl Iterator<Item = Result<Value, serde_json::Error>>) -> Result<Vec<u8>, String> {
    // mtime 0 and no file name: the header holds nothing that changes between writes.
    let mut gzip = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    for line in lines {
        serde_json::to_writer(&mut gzip, &line.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        gzip.write_all(b"\n").map_err(|e| e.to_string())?;
    }
    gzip.finish().map_err(|e| e.to_string())
}

/// The dead letters in a dead-letter object, in the order they were written.
pub(super) fn decode_dead_letters(body: &[u8]) -> Result<Vec<DeadLetter>, String> {
    gunzip_lines(body)?.iter().map(dead_letter_from_line).collect()
}

pub(super) fn gunzip_lines(body: &[u8]) -> Result<Vec<Value>, String> {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(body).read_to_string(&mut text).map_err(|e| format!("gzip: {e}"))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", index + 1)))
        .collect()
}

pub(super) fn event_from_line(line: &Value) -> Result<EventRecord, String> {
    let event = line.get("event").ok_or("a line without \"event\"")?;
    Ok(EventRecord {
        event: event_from_json(event).map_err(|e| format!("event: {e}"))?,
        shard_id: string_field(line, "shard_id")?,
        sequence_number: string_field(line, "sequence_number")?,
        sub_sequence_number: line.get("sub_sequence_number").and_then(Value::as_u64).ok_or("no sub_sequence_number")?,
        arrival: line.get("arrival_ms").and_then(Value::as_i64).map(ms_system_time),
    })
}

fn dead_letter_from_line(line: &Value) -> Result<DeadLetter, String> {
    let data = string_field(line, "data")?;
    Ok(DeadLetter {
        shard_id: string_field(line, "shard_id")?,
        sequence_number: string_field(line, "sequence_number")?,
        sub_sequence_number: line.get("sub_sequence_number").and_then(Value::as_u64).ok_or("no sub_sequence_number")?,
        partition_key: string_field(line, "partition_key")?,
        data: Bytes::from(base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| format!("data: {e}"))?),
        reason: string_field(line, "reason")?,
        arrival: line.get("arrival_ms").and_then(Value::as_i64).map(ms_system_time),
    })
}

fn string_field(line: &Value, name: &str) -> Result<String, String> {
    line.get(name).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| format!("no string \"{name}\""))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{T_10_59, record};
    use super::*;

    #[test]
    fn unknown_enum_values_are_json_numbers() {
        let mut event = record(1, T_10_59).event;
        event.r#type = 999;
        let value = event_json(&event).expect("json");
        assert_eq!(value["type"], json!(999));
        assert_eq!(value["platform"], json!("PLATFORM_ROKU"));
        assert_eq!(value["occurredAtMs"], json!(T_10_59.to_string()));
        assert_eq!(event_from_json(&value).expect("event"), event);
    }

    #[test]
    fn the_app_id_is_written_as_app_id_and_a_line_without_it_reads_empty() {
        let record = record(1, T_10_59);
        let line = event_line(&record).expect("json");
        assert_eq!(line["event"]["appId"], json!("tv-roku"));
        assert_eq!(event_from_line(&line).expect("read back"), record);

        // A line written before the field existed.
        let mut older = line.clone();
        older["event"].as_object_mut().expect("an object").remove("appId");
        let read = event_from_line(&older).expect("an older line reads");
        assert_eq!(read.event.app_id, "");
        assert_eq!(read.event.event_id, record.event.event_id);
    }
}
