//! User records into events: protobuf `events.v1.Event` (what the collector and the SDKs send), or
//! its canonical JSON. A record that is not a valid event gets a reason, for the dead letters.

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
        serde_json::from_slice::<Event>(data).map_err(|e| format!("not an events.v1.Event in JSON: {e}"))?
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

#[cfg(test)]
mod tests {
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
