//! Fixtures shared by the real-time store tests (PostgreSQL and MariaDB): events with every field
//! set, batches of them, and table names no other test uses.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ktk_pipeline::{Batch, EventRecord};
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};

/// A table name no other test (or earlier run) uses.
pub fn unique_table(tag: &str) -> String {
    format!("ktk_{tag}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

pub fn ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

/// Event `i`, every field set (and varied by `i`).
pub fn event(i: u32) -> Event {
    Event {
        event_id: format!("event-{i:06}"),
        r#type: EventType::Play as i32,
        occurred_at_ms: 1_700_000_000_000 + i64::from(i),
        received_at_ms: 1_700_000_001_000 + i64::from(i),
        user_id: format!("user-{}", i % 97),
        device_id: format!("device-{}", i % 13),
        session_id: format!("session-{}", i / 10),
        platform: Platform::FireTv as i32,
        app_version: "5.4.3".to_owned(),
        os_version: "Fire OS 8".to_owned(),
        device_model: "AFTKA".to_owned(),
        content_id: format!("content-{}", i % 50),
        content_title: "Ein Film über \"Zitate\" — 🎬".to_owned(),
        position_ms: i64::from(i) * 1000,
        duration_ms: 5_400_000,
        ad_id: "ad-7".to_owned(),
        ad_break: "midroll-2".to_owned(),
        page: "/watch".to_owned(),
        target: "player".to_owned(),
        error_code: String::new(),
        error_message: String::new(),
        geo: Some(Geo { lat: 52.52, lon: 13.405, country: "DE".to_owned(), region: "DE-BE".to_owned() }),
        attributes: HashMap::from([
            ("cdn".to_owned(), "edge-3".to_owned()),
            ("bitrate_kbps".to_owned(), (3000 + i).to_string()),
        ]),
        schema_version: "1.0".to_owned(),
        app_id: "tv-firetv".to_owned(),
    }
}

pub fn record(event: Event, sequence: u64) -> EventRecord {
    EventRecord {
        event,
        shard_id: "shardId-000000000003".to_owned(),
        sequence_number: format!("4959033827149025660855969253836157109592157598913658{sequence:04}"),
        sub_sequence_number: sequence % 3,
        arrival: Some(ms(1_700_000_002_000 + sequence as i64)),
    }
}

pub fn batch(events: impl IntoIterator<Item = Event>) -> Batch {
    let events: Vec<EventRecord> = events.into_iter().enumerate().map(|(n, e)| record(e, n as u64)).collect();
    let first = events.first().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
    let last = events.last().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)).unwrap_or_default();
    Batch {
        stream: "ktk-events".to_owned(),
        shard_id: "shardId-000000000003".to_owned(),
        events,
        dead_letters: Vec::new(),
        first,
        last,
    }
}

/// How to read one row of a store's events table, by kind of column (NULL as the default).
#[derive(Clone, Copy)]
pub struct RowReader<'a> {
    pub text: &'a dyn Fn(&str) -> String,
    pub int: &'a dyn Fn(&str) -> Option<i64>,
    pub float: &'a dyn Fn(&str) -> Option<f64>,
}

impl std::fmt::Debug for RowReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowReader")
    }
}

impl RowReader<'_> {
    /// An enum column: its name, or its number for a value the build did not know (0 for a row
    /// from before the column existed).
    fn enum_number(&self, column: &str, from_name: fn(&str) -> Option<i32>) -> i32 {
        let stored = (self.text)(column);
        if stored.is_empty() {
            return 0;
        }
        from_name(&stored).unwrap_or_else(|| stored.parse().expect("an enum name or number"))
    }

    /// The event, rebuilt from the typed columns the way a reader of the table would: the times
    /// from `<column>_ms` (milliseconds the query computed), the attributes from the
    /// `attributes_text` JSON.
    pub fn event(&self) -> Event {
        let (text, int, float) = (self.text, self.int, self.float);
        let geo_lat = float("geo_lat");
        let geo_lon = float("geo_lon");
        let geo_present = geo_lat.is_some() || geo_lon.is_some() || !text("geo_country").is_empty();
        let attributes = text("attributes_text");
        Event {
            event_id: text("event_id"),
            r#type: self.enum_number("event_type", |n| EventType::from_str_name(n).map(|t| t as i32)),
            occurred_at_ms: int("occurred_at_ms").unwrap_or_default(),
            received_at_ms: int("received_at_ms").unwrap_or_default(),
            user_id: text("user_id"),
            device_id: text("device_id"),
            session_id: text("session_id"),
            platform: self.enum_number("platform", |n| Platform::from_str_name(n).map(|p| p as i32)),
            app_version: text("app_version"),
            os_version: text("os_version"),
            device_model: text("device_model"),
            content_id: text("content_id"),
            content_title: text("content_title"),
            position_ms: int("position_ms").unwrap_or_default(),
            duration_ms: int("duration_ms").unwrap_or_default(),
            ad_id: text("ad_id"),
            ad_break: text("ad_break"),
            page: text("page"),
            target: text("target"),
            error_code: text("error_code"),
            error_message: text("error_message"),
            geo: geo_present.then(|| Geo {
                lat: geo_lat.unwrap_or_default(),
                lon: geo_lon.unwrap_or_default(),
                country: text("geo_country"),
                region: text("geo_region"),
            }),
            attributes: if attributes.is_empty() {
                HashMap::new()
            } else {
                serde_json::from_str(&attributes).expect("a JSON object")
            },
            schema_version: text("schema_version"),
            app_id: text("app_id"),
        }
    }
}
