//! User records into events: protobuf `events.v1.Event` (what the collector and the SDKs send), or
//! its canonical JSON. A record that is not a valid event gets a reason, for the dead letters.
//!
//! An event written against a newer `events.v1` than this build decodes like any other (the
//! schema's evolution rules, `docs/schema.md`): fields this build does not know are skipped, in
//! protobuf (prost does not keep unknown fields) and in JSON; an enum value it does not know keeps
//! its number when it came as a number (always in protobuf, and in JSON when given as a number),
//! and reads as `*_UNSPECIFIED` (0) when it came as a JSON name, which has no number here.

use ktk_proto::events::v1::Event;
use prost::Message as _;

/// Longest `event_id` the stores key on (a `VARCHAR(128)` in MySQL-protocol stores).
pub const MAX_EVENT_ID_LEN: usize = 128;

/// How user records encode events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EventEncoding {
    /// JSON when the data starts with `{` (after blanks), protobuf otherwise (default).
    #[default]
    Auto,
    Protobuf,
    Json,
}

/// Decodes and checks one event. `Err` says why the record is not a valid event.
pub fn decode_event(data: &[u8], encoding: EventEncoding) -> Result<Event, String> {
    let json = match encoding {
        EventEncoding::Json => true,
        EventEncoding::Protobuf => false,
        EventEncoding::Auto => data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    };
    let event = if json {
        let mut event =
            serde_json::from_slice::<Event>(data).map_err(|e| format!("not an events.v1.Event in JSON: {e}"))?;
        keep_unknown_enum_numbers(data, &mut event);
        event
    } else {
        Event::decode(data).map_err(|e| format!("not an events.v1.Event in protobuf: {e}"))?
    };
    if event.event_id.is_empty() {
        return Err("the event has no event_id".to_owned());
    }
    if event.event_id.len() > MAX_EVENT_ID_LEN {
        return Err(format!("the event_id is {} bytes long; at most {MAX_EVENT_ID_LEN}", event.event_id.len()));
    }
    if event.event_id.chars().any(char::is_control) {
        return Err("the event_id has control characters".to_owned());
    }
    Ok(event)
}

/// The generated JSON reader turns an enum number it does not know into 0; puts it back, as the
/// protobuf reader keeps it. Only events with a 0 there are read a second time.
fn keep_unknown_enum_numbers(data: &[u8], event: &mut Event) {
    if event.r#type != 0 && event.platform != 0 {
        return;
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let number = |name: &str| fields.get(name).and_then(serde_json::Value::as_i64).and_then(|n| i32::try_from(n).ok());
    if event.r#type == 0
        && let Some(n) = number("type")
    {
        event.r#type = n;
    }
    if event.platform == 0
        && let Some(n) = number("platform")
    {
        event.platform = n;
    }
}

#[cfg(test)]
mod tests {
    use ktk_proto::events::v1::{EventType, Platform};

    use super::*;

    fn event(id: &str) -> Event {
        Event {
            event_id: id.to_owned(),
            user_id: "u1".to_owned(),
            occurred_at_ms: 1_700_000_000_000,
            ..Event::default()
        }
    }

    #[test]
    fn protobuf_and_json_decode_to_the_same_event() {
        let e = event("e-1");
        assert_eq!(decode_event(&e.encode_to_vec(), EventEncoding::Auto), Ok(e.clone()));
        let json = serde_json::to_vec(&e).expect("json");
        assert_eq!(decode_event(&json, EventEncoding::Auto), Ok(e.clone()));
        assert_eq!(decode_event(&json, EventEncoding::Json), Ok(e));
    }

    #[test]
    fn enum_values_this_build_does_not_know_are_kept_as_numbers() {
        let newer = Event { r#type: 61, platform: 9, ..event("e-1") };
        // Protobuf carries the number, and prost keeps it.
        let decoded = decode_event(&newer.encode_to_vec(), EventEncoding::Auto).expect("decodes");
        assert_eq!((decoded.r#type, decoded.platform), (61, 9));
        // JSON numbers are kept too; known values given as numbers read as themselves.
        let json = br#"{"eventId": "e-1", "type": 61, "platform": 9}"#;
        let decoded = decode_event(json, EventEncoding::Json).expect("decodes");
        assert_eq!((decoded.r#type, decoded.platform), (61, 9));
        let json = br#"{"eventId": "e-1", "type": 1, "platform": "PLATFORM_WEB"}"#;
        let decoded = decode_event(json, EventEncoding::Json).expect("decodes");
        assert_eq!((decoded.r#type, decoded.platform), (EventType::Play as i32, Platform::Web as i32));
        // A JSON name has no number in this build: UNSPECIFIED, and the event is kept.
        let json = br#"{"eventId": "e-1", "type": "EVENT_TYPE_TELEPORT", "platform": "PLATFORM_HOLODECK"}"#;
        let decoded = decode_event(json, EventEncoding::Json).expect("decodes");
        assert_eq!((decoded.r#type, decoded.platform), (0, 0));
        // A number past i32 is no enum value of any version: not an event.
        let json = br#"{"eventId": "e-1", "type": 4294967296}"#;
        assert!(decode_event(json, EventEncoding::Json).expect_err("invalid").contains("JSON"));
    }

    #[test]
    fn fields_this_build_does_not_know_are_skipped() {
        let json = br#"{"eventId": "e-1", "userId": "u1", "watchedMs": "5", "geo": {"country": "US", "city": "Reno"}}"#;
        let decoded = decode_event(json, EventEncoding::Auto).expect("decodes");
        assert_eq!((decoded.user_id.as_str(), decoded.geo.map(|g| g.country)), ("u1", Some("US".to_owned())));
        // Field 26 (a string) and field 27 (a varint) after the known ones.
        let mut bytes = event("e-2").encode_to_vec();
        bytes.extend_from_slice(&[0xd2, 0x01, 3, b'a', b'b', b'c', 0xd8, 0x01, 7]);
        let decoded = decode_event(&bytes, EventEncoding::Protobuf).expect("decodes");
        assert_eq!(decoded, event("e-2"));
    }

    #[test]
    fn bad_records_get_a_reason() {
        assert!(
            decode_event(&event("").encode_to_vec(), EventEncoding::Auto).expect_err("invalid").contains("no event_id")
        );
        assert!(decode_event(b"{not json", EventEncoding::Auto).expect_err("invalid").contains("JSON"));
        assert!(decode_event(&[0xff, 0xff, 0xff], EventEncoding::Protobuf).expect_err("invalid").contains("protobuf"));
        let long = "x".repeat(MAX_EVENT_ID_LEN + 1);
        assert!(decode_event(&event(&long).encode_to_vec(), EventEncoding::Auto).is_err());
        // Random bytes never panic.
        for seed in 0..2_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let bytes: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
            let _ = decode_event(&bytes, EventEncoding::Auto);
        }
    }
}
