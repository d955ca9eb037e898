//! A synthetic day of app analytics events (plays, heartbeats, pauses, ads, page views on every
//! platform), deterministic for a seed: the input of the ETL's benchmarks
//! (`benches/day_job.rs`, `bench/etl/`). Not used by the ETL itself.

use ktk_pipeline::EventRecord;
use ktk_pipeline::time::MS_PER_DAY;
use ktk_proto::events::v1::{Event, EventType, Platform};

use crate::Day;

const PLATFORMS: [Platform; 8] = [
    Platform::Ios,
    Platform::Android,
    Platform::FireTv,
    Platform::AppleTv,
    Platform::AndroidTv,
    Platform::Roku,
    Platform::Web,
    Platform::SmartTv,
];

/// (type, weight in 100).
const TYPES: [(EventType, u32); 11] = [
    (EventType::Play, 14),
    (EventType::Heartbeat, 36),
    (EventType::Pause, 6),
    (EventType::Resume, 5),
    (EventType::Complete, 5),
    (EventType::AdStart, 8),
    (EventType::AdComplete, 5),
    (EventType::AdSkip, 2),
    (EventType::AdImpression, 8),
    (EventType::AdClick, 1),
    (EventType::PageView, 10),
];

/// `n` events of `day`, in time order, spread evenly over the day, with random 128-bit event ids
/// (hex): about one user per 50 events,
/// 3 sessions per user, 200 titles; 10% of a user's events come from a second platform.
pub fn day_of_events(day: Day, n: usize, seed: u64) -> Vec<EventRecord> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let users = (n / 50).max(1) as u64;
    let start = day.days() * MS_PER_DAY;
    let step = (MS_PER_DAY / n.max(1) as i64).max(1);
    (0..n)
        .map(|i| {
            let user = rng.u64(0..users);
            let mut platform = PLATFORMS[(user % 8) as usize];
            if rng.u32(0..10) == 0 {
                platform = PLATFORMS[((user + 3) % 8) as usize];
            }
            let mut pick = rng.u32(0..100);
            let mut kind = EventType::Play;
            for (t, weight) in TYPES {
                if pick < weight {
                    kind = t;
                    break;
                }
                pick -= weight;
            }
            let title = rng.u32(0..200);
            let occurred_at_ms = start + i as i64 * step;
            let ad = matches!(
                kind,
                EventType::AdStart
                    | EventType::AdComplete
                    | EventType::AdSkip
                    | EventType::AdImpression
                    | EventType::AdClick
            );
            EventRecord {
                event: Event {
                    // Random, as apps make them (UUID v4 in the web SDK): the engine's primary key
                    // then takes inserts all over its B-tree, as it does with real events.
                    event_id: format!("{:016x}{:016x}", rng.u64(..), rng.u64(..)),
                    r#type: kind as i32,
                    occurred_at_ms,
                    received_at_ms: occurred_at_ms + 300,
                    user_id: format!("user-{user}"),
                    device_id: format!("device-{user}-{}", platform as i32),
                    session_id: format!("session-{user}-{}", rng.u32(0..3)),
                    platform: platform as i32,
                    app_version: "5.1.0".into(),
                    content_id: if kind == EventType::PageView { String::new() } else { format!("title-{title}") },
                    content_title: if kind == EventType::PageView { String::new() } else { format!("Title {title}") },
                    position_ms: i64::from(rng.u32(0..3_600_000)),
                    duration_ms: 3_600_000,
                    ad_id: if ad { format!("ad-{}", rng.u32(0..40)) } else { String::new() },
                    page: if kind == EventType::PageView { "/home".into() } else { String::new() },
                    schema_version: "1.0".into(),
                    app_id: format!("app-{}", platform as i32),
                    ..Event::default()
                },
                shard_id: format!("shardId-{:012}", user % 4),
                sequence_number: format!("4963{i:052}"),
                sub_sequence_number: 0,
                arrival: None,
            }
        })
        .collect()
}
