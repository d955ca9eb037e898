//! Test fixtures of the S3 sink's unit tests: events and dead letters with every field set, the
//! batches they make, and proptest strategies for arbitrary events.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use proptest::prelude::*;

use crate::time::from_unix_millis as ms_system_time;
use crate::{Batch, DeadLetter, EventRecord};

/// 2026-03-01T10:59:59.000Z
pub(super) const T_10_59: i64 = 1_772_362_799_000;

pub(super) fn record(index: u64, occurred_at_ms: i64) -> EventRecord {
    let attributes: HashMap<String, String> =
        (0..6).map(|k| (format!("key_{k}"), format!("value {k} of {index}"))).collect();
    EventRecord {
        event: Event {
            event_id: format!("event-{index:05}"),
            r#type: EventType::Play as i32,
            occurred_at_ms,
            received_at_ms: occurred_at_ms + 250,
            user_id: format!("user-{}", index % 7),
            device_id: format!("device-{}", index % 13),
            session_id: format!("session-{}", index % 3),
            platform: Platform::Roku as i32,
            app_version: "4.2.0".into(),
            os_version: "12".into(),
            device_model: "Roku Ultra".into(),
            content_id: "movie-17".into(),
            content_title: "Ünïcode title ✓".into(),
            position_ms: (index as i64) * 1_000,
            duration_ms: 5_400_000,
            ad_id: String::new(),
            ad_break: "midroll-2".into(),
            page: "/watch".into(),
            target: String::new(),
            error_code: String::new(),
            error_message: String::new(),
            geo: index.is_multiple_of(2).then(|| Geo {
                lat: 40.7128,
                lon: -74.006,
                country: "US".into(),
                region: "US-NY".into(),
            }),
            attributes,
            schema_version: "1.0".into(),
            app_id: "tv-roku".into(),
        },
        shard_id: "shardId-000000000003".into(),
        sequence_number: format!("4963{index:052}"),
        sub_sequence_number: index % 4,
        arrival: (!index.is_multiple_of(5)).then(|| ms_system_time(occurred_at_ms + 1_000)),
    }
}

pub(super) fn batch(events: Vec<EventRecord>) -> Batch {
    let first = events.first().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
    let last = events.last().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
    Batch {
        stream: "events".into(),
        shard_id: "shardId-000000000003".into(),
        events,
        dead_letters: vec![],
        first,
        last,
    }
}

pub(super) fn letter(index: u64, arrival: Option<SystemTime>) -> DeadLetter {
    DeadLetter {
        shard_id: "shardId-000000000003".into(),
        sequence_number: format!("4963{index:052}"),
        sub_sequence_number: index,
        partition_key: format!("pk-{index}"),
        data: Bytes::from(vec![0xff, 0x00, index as u8, b'x']),
        reason: "not an events.v1 Event: invalid wire type".into(),
        arrival,
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

prop_compose! {
    fn arb_event()(
        ids in (arb_string(), arb_string(), arb_string(), arb_string()),
        enums in (-3i32..70, -3i32..20),
        times in (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
        texts in proptest::collection::vec(arb_string(), 13),
        geo in proptest::option::of((-90.0f64..90.0, -180.0f64..180.0, arb_string(), arb_string())),
        attributes in proptest::collection::hash_map(arb_string(), arb_string(), 0..5),
    ) -> Event {
        Event {
            event_id: ids.0,
            r#type: enums.0,
            occurred_at_ms: times.0,
            received_at_ms: times.1,
            user_id: ids.1,
            device_id: ids.2,
            session_id: ids.3,
            platform: enums.1,
            app_version: texts[0].clone(),
            os_version: texts[1].clone(),
            device_model: texts[2].clone(),
            content_id: texts[3].clone(),
            content_title: texts[4].clone(),
            position_ms: times.2,
            duration_ms: times.3,
            ad_id: texts[5].clone(),
            ad_break: texts[6].clone(),
            page: texts[7].clone(),
            target: texts[8].clone(),
            error_code: texts[9].clone(),
            error_message: texts[10].clone(),
            geo: geo.map(|(lat, lon, country, region)| Geo { lat, lon, country, region }),
            attributes,
            schema_version: texts[11].clone(),
            app_id: texts[12].clone(),
        }
    }
}

prop_compose! {
    pub(super) fn arb_record()(
        event in arb_event(),
        sequence in "[0-9]{1,56}",
        sub in any::<u64>(),
        arrival in proptest::option::of(-10_000_000_000_000i64..10_000_000_000_000),
    ) -> EventRecord {
        EventRecord {
            event,
            shard_id: "shardId-000000000001".into(),
            sequence_number: sequence,
            sub_sequence_number: sub,
            arrival: arrival.map(ms_system_time),
        }
    }
}
