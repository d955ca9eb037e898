//! The audience `ktk demo` simulates: devices on every platform running streaming-app sessions,
//! each sending its events to the collector in small batches, the way the apps do.
//!
//! A session walks through what a viewer does: the app opens, a few pages are browsed (with
//! searches and clicks), a title is chosen (popular titles far more often: a Zipf-like skew), a
//! pre-roll ad may play (start, impression, then complete or skip), the title plays with
//! heartbeats, pauses and resumes, seeks, buffering and mid-roll ads, until it completes, is
//! stopped or fails; then another title, or the app closes.
//!
//! [`Audience::next_request`] picks a device, takes its next few events as one request, and mixes
//! in, at fixed rates, what real traffic also carries:
//! - malformed events ([`MALFORMED_RATE`]): each of a kind the collector must refuse, with the
//!   code it must give ([`Malformed::expected_code`]);
//! - duplicates ([`DUPLICATE_RATE`]): a whole batch sent again after its answer (an app that
//!   timed out and retried), or an event of an earlier batch sent again (an offline queue
//!   replayed). The collector accepts both; the consumers must drop them.
//!
//! Everything here is deterministic for a seed; nothing does I/O.

use std::collections::{BTreeMap, VecDeque};

use ktk_proto::events::v1::{Event, EventBatch, EventType, Geo, Platform};
use prost::Message as _;
use serde_json::Value;

/// Share of events (on top of the valid ones) that are malformed on purpose.
pub const MALFORMED_RATE: f64 = 0.005;
/// Share of events sent a second time (resent batches and reused event ids together).
pub const DUPLICATE_RATE: f64 = 0.01;
/// Content position advanced by one heartbeat (a common player setting).
const HEARTBEAT_MS: i64 = 30_000;
/// Valid events a device remembers from its earlier batches, to send one again.
const REMEMBERED_EVENTS: usize = 16;
/// `occurred_at_ms` of a device whose clock is days ahead.
const FUTURE_SKEW_MS: i64 = 3 * 24 * 60 * 60 * 1000;
/// `occurred_at_ms` of an event an offline queue kept for a month: older than the collector takes.
const TOO_OLD_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// A title of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct Title {
    pub id: &'static str,
    pub name: &'static str,
    pub minutes: i64,
}

/// The catalog, most popular first: title `i` is chosen with a weight of `1 / (i + 1)^1.1`.
pub const CATALOG: [Title; 16] = [
    Title { id: "mv-1001", name: "The Last Lighthouse", minutes: 118 },
    Title { id: "ep-2001", name: "Harbor Lights S1E1", minutes: 44 },
    Title { id: "mv-1002", name: "Paper Moons", minutes: 97 },
    Title { id: "ep-2002", name: "Harbor Lights S1E2", minutes: 42 },
    Title { id: "ep-3001", name: "Kitchen Wars S3E5", minutes: 22 },
    Title { id: "mv-1003", name: "Northbound", minutes: 131 },
    Title { id: "ep-3002", name: "Kitchen Wars S3E6", minutes: 22 },
    Title { id: "sp-4001", name: "Cup Final: Highlights", minutes: 12 },
    Title { id: "mv-1004", name: "A Quiet Orbit", minutes: 104 },
    Title { id: "ep-5001", name: "Deep Field S1E1", minutes: 51 },
    Title { id: "kd-6001", name: "Otter Town S2E3", minutes: 11 },
    Title { id: "mv-1005", name: "Saltwater Blues", minutes: 89 },
    Title { id: "dc-7001", name: "The Glass Forest", minutes: 58 },
    Title { id: "ep-5002", name: "Deep Field S1E2", minutes: 49 },
    Title { id: "mv-1006", name: "Seven Winters", minutes: 142 },
    Title { id: "kd-6002", name: "Otter Town S2E4", minutes: 11 },
];

/// How a platform's app behaves.
#[derive(Debug)]
struct PlatformProfile {
    platform: Platform,
    /// The app's id (`tv-ios`), which its events carry in `app_id`. A collector that takes write
    /// keys sets `app_id` from the request's key instead, whatever the event says.
    app_id: &'static str,
    /// Relative share of devices.
    share: u32,
    /// Sends canonical JSON (web and smart-TV apps) rather than protobuf (native apps).
    json: bool,
    /// Percentage of viewers not signed in (no `user_id`).
    anonymous_percent: u32,
    /// Most events an app puts in one request.
    max_batch: usize,
    models: &'static [&'static str],
    os_versions: &'static [&'static str],
    app_versions: &'static [&'static str],
    /// Ads can be skipped on this platform.
    skippable_ads: bool,
}

const PLATFORMS: [PlatformProfile; 8] = [
    PlatformProfile {
        platform: Platform::Ios,
        app_id: "tv-ios",
        share: 22,
        json: false,
        anonymous_percent: 5,
        max_batch: 10,
        models: &["iPhone15,2", "iPhone16,1", "iPad13,4"],
        os_versions: &["iOS 17.5", "iOS 18.1"],
        app_versions: &["5.12.0", "5.13.1"],
        skippable_ads: true,
    },
    PlatformProfile {
        platform: Platform::Android,
        app_id: "tv-android",
        share: 24,
        json: false,
        anonymous_percent: 8,
        max_batch: 10,
        models: &["Pixel 8", "SM-S918B", "moto g84"],
        os_versions: &["Android 14", "Android 13"],
        app_versions: &["5.12.2", "5.13.0"],
        skippable_ads: true,
    },
    PlatformProfile {
        platform: Platform::FireTv,
        app_id: "tv-firetv",
        share: 10,
        json: false,
        anonymous_percent: 0,
        max_batch: 6,
        models: &["AFTKA", "AFTMM"],
        os_versions: &["Fire OS 7.6"],
        app_versions: &["3.4.1"],
        skippable_ads: false,
    },
    PlatformProfile {
        platform: Platform::Roku,
        app_id: "tv-roku",
        share: 12,
        json: false,
        anonymous_percent: 0,
        max_batch: 6,
        models: &["Roku Ultra 4802", "Roku Express 3960"],
        os_versions: &["Roku OS 12.5"],
        app_versions: &["2.9.0"],
        skippable_ads: false,
    },
    PlatformProfile {
        platform: Platform::Web,
        app_id: "tv-web",
        share: 18,
        json: true,
        anonymous_percent: 35,
        max_batch: 4,
        models: &["Chrome 126", "Safari 17", "Firefox 127", "Edge 126"],
        os_versions: &["Windows 11", "macOS 14", "ChromeOS 125"],
        app_versions: &["web-2024.07.1"],
        skippable_ads: true,
    },
    PlatformProfile {
        platform: Platform::AppleTv,
        app_id: "tv-appletv",
        share: 5,
        json: false,
        anonymous_percent: 0,
        max_batch: 6,
        models: &["AppleTV14,1"],
        os_versions: &["tvOS 17.5"],
        app_versions: &["4.2.0"],
        skippable_ads: false,
    },
    PlatformProfile {
        platform: Platform::AndroidTv,
        app_id: "tv-androidtv",
        share: 4,
        json: false,
        anonymous_percent: 0,
        max_batch: 6,
        models: &["Chromecast HD", "SHIELD Android TV"],
        os_versions: &["Android TV 12"],
        app_versions: &["3.1.5"],
        skippable_ads: false,
    },
    PlatformProfile {
        platform: Platform::SmartTv,
        app_id: "tv-smarttv",
        share: 5,
        json: true,
        anonymous_percent: 0,
        max_batch: 5,
        models: &["Samsung QN90B (Tizen)", "LG C3 (webOS)"],
        os_versions: &["Tizen 7.0", "webOS 23"],
        app_versions: &["tv-1.8.3"],
        skippable_ads: false,
    },
];

/// Where viewers are: country, region, latitude, longitude.
const PLACES: [(&str, &str, f64, f64); 10] = [
    ("US", "CA", 37.77, -122.42),
    ("US", "NY", 40.71, -74.01),
    ("US", "TX", 30.27, -97.74),
    ("GB", "ENG", 51.51, -0.13),
    ("DE", "BE", 52.52, 13.40),
    ("BR", "SP", -23.55, -46.63),
    ("IN", "MH", 19.08, 72.88),
    ("JP", "13", 35.68, 139.69),
    ("CA", "ON", 43.65, -79.38),
    ("AU", "NSW", -33.87, 151.21),
];

const PAGES: [&str; 5] = ["home", "browse/movies", "browse/series", "my-list", "search"];
const SEARCHES: [&str; 6] = ["harbor", "kitchen wars", "otter", "space", "thriller", "football"];
const NETWORKS: [&str; 3] = ["wifi", "cellular", "ethernet"];

/// The app id of the demo's app on `platform` (`tv-firetv`): the profile's, else `tv-` and the
/// platform's name (`tv-other`). The demo's write keys name these apps.
pub fn app_id_of(platform: Platform) -> String {
    PLATFORMS.iter().find(|p| p.platform == platform).map_or_else(
        || {
            format!(
                "tv-{}",
                platform.as_str_name().trim_start_matches("PLATFORM_").to_ascii_lowercase().replace('_', "")
            )
        },
        |p| p.app_id.to_owned(),
    )
}

/// The short name of a platform, for reports ("Fire TV").
pub fn platform_label(name: &str) -> String {
    match name {
        "PLATFORM_IOS" => "iOS".to_owned(),
        "PLATFORM_ANDROID" => "Android".to_owned(),
        "PLATFORM_FIRE_TV" => "Fire TV".to_owned(),
        "PLATFORM_APPLE_TV" => "Apple TV".to_owned(),
        "PLATFORM_ANDROID_TV" => "Android TV".to_owned(),
        "PLATFORM_ROKU" => "Roku".to_owned(),
        "PLATFORM_WEB" => "web".to_owned(),
        "PLATFORM_SMART_TV" => "smart TV".to_owned(),
        other => other.trim_start_matches("PLATFORM_").to_ascii_lowercase(),
    }
}

/// A kind of event the collector must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Malformed {
    /// No `event_id` (an SDK bug).
    MissingEventId,
    /// A clock three days ahead.
    FutureTimestamp,
    /// Kept a month in an offline queue: older than the collector's maximum age (7 days).
    TooOld,
    /// Neither `user_id` nor `device_id`.
    MissingUserAndDevice,
    /// The `event_id` of an earlier event of the same batch.
    DuplicateInBatch,
    /// JSON only: a `type` that no schema version can have (`watch_party_join`, not an
    /// `EVENT_TYPE_` name; a newer app's `EVENT_TYPE_...` name would be taken).
    UnknownType,
    /// JSON only: a field of the wrong JSON type (`"positionMs": "twelve"`).
    NotAnEvent,
}

impl Malformed {
    const PROTOBUF_KINDS: [Malformed; 5] = [
        Malformed::MissingEventId,
        Malformed::FutureTimestamp,
        Malformed::TooOld,
        Malformed::MissingUserAndDevice,
        Malformed::DuplicateInBatch,
    ];
    const JSON_KINDS: [Malformed; 7] = [
        Malformed::MissingEventId,
        Malformed::UnknownType,
        Malformed::FutureTimestamp,
        Malformed::NotAnEvent,
        Malformed::TooOld,
        Malformed::MissingUserAndDevice,
        Malformed::DuplicateInBatch,
    ];

    /// The rejection `code` the collector must answer for it.
    pub fn expected_code(self) -> &'static str {
        match self {
            Malformed::MissingEventId => "missing_event_id",
            Malformed::FutureTimestamp => "occurred_in_future",
            Malformed::TooOld => "too_old",
            Malformed::MissingUserAndDevice => "missing_user_and_device",
            Malformed::DuplicateInBatch => "duplicate_event_id",
            Malformed::UnknownType => "unknown_type",
            Malformed::NotAnEvent => "malformed_event",
        }
    }
}

/// One event of a request.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub event: Event,
    /// Set when the collector must refuse it.
    pub malformed: Option<Malformed>,
    /// An event of an earlier batch sent again: a duplicate on purpose.
    pub reused: bool,
}

impl Outgoing {
    fn valid(event: Event) -> Self {
        Outgoing { event, malformed: None, reused: false }
    }

    /// The event in canonical proto3 JSON, with the JSON-only defects applied.
    fn to_json(&self) -> Result<Value, serde_json::Error> {
        let mut value = serde_json::to_value(&self.event)?;
        if let Value::Object(fields) = &mut value {
            match self.malformed {
                Some(Malformed::UnknownType) => {
                    fields.insert("type".into(), Value::from("watch_party_join"));
                }
                Some(Malformed::NotAnEvent) => {
                    fields.insert("positionMs".into(), Value::from("twelve"));
                }
                _ => {}
            }
        }
        Ok(value)
    }
}

/// One `POST /v1/events` of one device.
#[derive(Debug, Clone)]
pub struct Request {
    /// Canonical JSON rather than protobuf.
    pub json: bool,
    pub events: Vec<Outgoing>,
    /// Send the whole batch a second time once the first answer is in (duplicates on purpose).
    pub resend: bool,
}

/// The body of a request carrying `events`, and its `Content-Type`.
pub fn encode_body(json: bool, events: &[&Outgoing], sent_at_ms: i64) -> Result<(Vec<u8>, &'static str), String> {
    if json {
        let events: Vec<Value> =
            events.iter().map(|e| e.to_json()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let batch = serde_json::json!({ "sentAtMs": sent_at_ms.to_string(), "events": events });
        Ok((serde_json::to_vec(&batch).map_err(|e| e.to_string())?, "application/json"))
    } else {
        let batch = EventBatch { events: events.iter().map(|e| e.event.clone()).collect(), sent_at_ms };
        Ok((batch.encode_to_vec(), "application/x-protobuf"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Browsing pages; a title is picked after the last one.
    Browse {
        pages: u32,
    },
    /// An ad break (`step` 0: start, 1: impression, 2: complete or skip); `preroll` breaks start
    /// the title afterwards.
    Ad {
        step: u8,
        preroll: bool,
    },
    /// The title is about to start.
    Start,
    Playing,
    Paused,
    Buffering,
    /// Done with a title: another one, or the app closes.
    Finished,
}

#[derive(Debug, Clone)]
struct Session {
    id: String,
    phase: Phase,
    title: usize,
    position_ms: i64,
    /// Position of the last ad break (mid-rolls come at most every 8 minutes of content).
    last_ad_ms: i64,
    ad_id: String,
    ad_breaks: u32,
}

#[derive(Debug)]
struct Device {
    profile: &'static PlatformProfile,
    user_id: String,
    device_id: String,
    model: &'static str,
    os_version: &'static str,
    app_version: &'static str,
    geo: Geo,
    network: &'static str,
    session: Option<Session>,
    /// Valid events of earlier batches, newest last.
    remembered: VecDeque<Event>,
}

/// What the audience generated so far, by plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub requests: u64,
    pub json_requests: u64,
    pub valid: u64,
    pub malformed: BTreeMap<&'static str, u64>,
    pub resent_batches: u64,
    pub reused_events: u64,
}

/// The simulated devices and their sessions.
#[derive(Debug)]
pub struct Audience {
    rng: fastrand::Rng,
    devices: Vec<Device>,
    /// Cumulative popularity weights of [`CATALOG`].
    popularity: Vec<f64>,
    malformed_due: f64,
    duplicates_due: f64,
    /// The next malformed kind, per encoding (protobuf, JSON): each takes its kinds in turn.
    malformed_turn: [usize; 2],
    resend_next: bool,
    plan: Plan,
}

impl Audience {
    /// `devices` devices (at least 1), spread over the platforms by their shares; about one in
    /// seven signed-in users has a second device.
    pub fn new(seed: u64, devices: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let total_share: u32 = PLATFORMS.iter().map(|p| p.share).sum();
        let mut list: Vec<Device> = Vec::with_capacity(devices.max(1));
        let mut signed_in: Vec<String> = Vec::new();
        for _ in 0..devices.max(1) {
            let mut pick = rng.u32(0..total_share);
            let profile = PLATFORMS
                .iter()
                .find(|p| {
                    if pick < p.share {
                        true
                    } else {
                        pick -= p.share;
                        false
                    }
                })
                .unwrap_or(&PLATFORMS[0]);
            let user_id = if rng.u32(0..100) < profile.anonymous_percent {
                String::new()
            } else if !signed_in.is_empty() && rng.u32(0..7) == 0 {
                signed_in[rng.usize(0..signed_in.len())].clone()
            } else {
                let user = format!("user-{:06}", rng.u32(0..1_000_000));
                signed_in.push(user.clone());
                user
            };
            let (country, region, lat, lon) = PLACES[rng.usize(0..PLACES.len())];
            list.push(Device {
                profile,
                user_id,
                device_id: format!("dev-{}", uuid_from(&mut rng)),
                model: pick_from(&mut rng, profile.models),
                os_version: pick_from(&mut rng, profile.os_versions),
                app_version: pick_from(&mut rng, profile.app_versions),
                geo: Geo {
                    lat: lat + (rng.f64() - 0.5) * 0.4,
                    lon: lon + (rng.f64() - 0.5) * 0.4,
                    country: country.to_owned(),
                    region: region.to_owned(),
                },
                network: pick_from(&mut rng, &NETWORKS),
                session: None,
                remembered: VecDeque::new(),
            });
        }
        let mut total = 0.0;
        let popularity = (0..CATALOG.len())
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(1.1);
                total
            })
            .collect();
        Audience {
            rng,
            devices: list,
            popularity,
            malformed_due: 0.0,
            duplicates_due: 0.0,
            malformed_turn: [0; 2],
            resend_next: true,
            plan: Plan::default(),
        }
    }

    /// What was generated so far.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The next request of a random device, its events stamped as if they occurred over the last
    /// second or so before `now_ms`.
    pub fn next_request(&mut self, now_ms: i64) -> Request {
        let index = self.rng.usize(0..self.devices.len());
        let max_batch = self.devices[index].profile.max_batch;
        let json = self.devices[index].profile.json;
        let count = self.rng.usize(1..=max_batch);
        let mut events: Vec<Outgoing> = Vec::with_capacity(count + 2);
        let mut at = now_ms - self.rng.i64(0..300);
        let mut stamps: Vec<i64> = (0..count)
            .map(|_| {
                at -= self.rng.i64(100..1_500);
                at
            })
            .collect();
        stamps.reverse();
        for occurred_at in stamps {
            let event = self.step(index, occurred_at);
            events.push(Outgoing::valid(event));
        }
        self.plan.requests += 1;
        self.plan.json_requests += u64::from(json);
        self.plan.valid += events.len() as u64;

        self.malformed_due += count as f64 * MALFORMED_RATE;
        while self.malformed_due >= 1.0 {
            self.malformed_due -= 1.0;
            let bad = self.malformed(index, json, now_ms, &events);
            *self.plan.malformed.entry(bad.malformed.map_or("", Malformed::expected_code)).or_default() += 1;
            // At the end, so that a duplicate id follows the event it copies.
            events.push(bad);
        }

        let mut resend = false;
        self.duplicates_due += count as f64 * DUPLICATE_RATE;
        if self.duplicates_due >= 1.0 {
            let device = &self.devices[index];
            if self.resend_next {
                resend = true;
                self.plan.resent_batches += 1;
                self.duplicates_due -= events.iter().filter(|e| e.malformed.is_none()).count() as f64;
                self.resend_next = false;
            } else if !device.remembered.is_empty() {
                let copy = device.remembered[self.rng.usize(0..device.remembered.len())].clone();
                events.insert(self.rng.usize(0..=count), Outgoing { event: copy, malformed: None, reused: true });
                self.plan.reused_events += 1;
                self.duplicates_due -= 1.0;
                self.resend_next = true;
            }
            // Else this device has sent nothing yet: the next one that has will send an event again.
        }

        let device = &mut self.devices[index];
        for outgoing in events.iter().filter(|e| e.malformed.is_none() && !e.reused) {
            if device.remembered.len() == REMEMBERED_EVENTS {
                device.remembered.pop_front();
            }
            device.remembered.push_back(outgoing.event.clone());
        }
        Request { json, events, resend }
    }

    /// A malformed event of the next kind this request's encoding can carry.
    fn malformed(&mut self, index: usize, json: bool, now_ms: i64, earlier: &[Outgoing]) -> Outgoing {
        let kinds: &[Malformed] = if json { &Malformed::JSON_KINDS } else { &Malformed::PROTOBUF_KINDS };
        let turn = &mut self.malformed_turn[usize::from(json)];
        let kind = kinds[*turn % kinds.len()];
        *turn += 1;
        let mut event = self.step(index, now_ms);
        match kind {
            Malformed::MissingEventId => event.event_id.clear(),
            Malformed::FutureTimestamp => event.occurred_at_ms = now_ms + FUTURE_SKEW_MS,
            Malformed::TooOld => event.occurred_at_ms = now_ms - TOO_OLD_MS,
            Malformed::MissingUserAndDevice => {
                event.user_id.clear();
                event.device_id.clear();
            }
            Malformed::DuplicateInBatch => {
                if let Some(first) = earlier.first() {
                    event.event_id = first.event.event_id.clone();
                }
            }
            Malformed::UnknownType | Malformed::NotAnEvent => {}
        }
        Outgoing { event, malformed: Some(kind), reused: false }
    }

    fn pick_title(&mut self) -> usize {
        let total = self.popularity.last().copied().unwrap_or(1.0);
        let x = self.rng.f64() * total;
        self.popularity.iter().position(|&c| x < c).unwrap_or(0)
    }

    /// The device's next event; starts a session (with `APP_OPEN`) if it has none.
    fn step(&mut self, index: usize, occurred_at_ms: i64) -> Event {
        let Some(mut session) = self.devices[index].session.take() else {
            let session = Session {
                id: format!("ses-{}", uuid_from(&mut self.rng)),
                phase: Phase::Browse { pages: self.rng.u32(1..=3) },
                title: 0,
                position_ms: 0,
                last_ad_ms: 0,
                ad_id: String::new(),
                ad_breaks: 0,
            };
            let mut event = self.base(index, &session, EventType::AppOpen, occurred_at_ms);
            event.attributes.insert("launch".into(), pick_from(&mut self.rng, &["cold", "warm"]).to_owned());
            self.devices[index].session = Some(session);
            return event;
        };
        let skippable = self.devices[index].profile.skippable_ads;
        let roll = self.rng.f64();
        let (kind, next) = match session.phase {
            Phase::Browse { pages } if pages > 0 => {
                let kind = if roll < 0.7 {
                    EventType::PageView
                } else if roll < 0.85 {
                    EventType::Search
                } else {
                    EventType::Click
                };
                (kind, Phase::Browse { pages: pages - 1 })
            }
            Phase::Browse { .. } => {
                session.title = self.pick_title();
                session.position_ms = 0;
                session.last_ad_ms = 0;
                session.ad_breaks = 0;
                let next = if roll < 0.6 { Phase::Ad { step: 0, preroll: true } } else { Phase::Start };
                (EventType::PageView, next)
            }
            Phase::Ad { step: 0, preroll } => {
                session.ad_breaks += 1;
                session.ad_id = format!("ad-{:04}", self.rng.u32(0..400));
                (EventType::AdStart, Phase::Ad { step: 1, preroll })
            }
            Phase::Ad { step: 1, preroll } => (EventType::AdImpression, Phase::Ad { step: 2, preroll }),
            Phase::Ad { preroll, .. } => {
                let kind = if skippable && roll < 0.3 { EventType::AdSkip } else { EventType::AdComplete };
                session.last_ad_ms = session.position_ms;
                (kind, if preroll { Phase::Start } else { Phase::Playing })
            }
            Phase::Start => (EventType::Play, Phase::Playing),
            Phase::Playing => {
                let duration_ms = CATALOG[session.title].minutes * 60_000;
                if session.position_ms >= duration_ms {
                    session.position_ms = duration_ms;
                    (EventType::Complete, Phase::Finished)
                } else if roll < 0.035 {
                    (EventType::Pause, Phase::Paused)
                } else if roll < 0.065 {
                    let target = session.position_ms + self.rng.i64(-120_000..600_000);
                    session.position_ms = target.clamp(0, duration_ms);
                    (EventType::Seek, Phase::Playing)
                } else if roll < 0.085 {
                    (EventType::BufferStart, Phase::Buffering)
                } else if roll < 0.11 && session.position_ms - session.last_ad_ms >= 8 * 60_000 {
                    session.ad_breaks += 1;
                    session.ad_id = format!("ad-{:04}", self.rng.u32(0..400));
                    (EventType::AdStart, Phase::Ad { step: 1, preroll: false })
                } else if roll < 0.125 {
                    (EventType::Stop, Phase::Finished)
                } else if roll < 0.127 {
                    (EventType::Error, Phase::Finished)
                } else {
                    session.position_ms = (session.position_ms + HEARTBEAT_MS).min(duration_ms);
                    (EventType::Heartbeat, Phase::Playing)
                }
            }
            Phase::Paused if roll < 0.85 => (EventType::Resume, Phase::Playing),
            Phase::Paused => (EventType::Stop, Phase::Finished),
            Phase::Buffering => (EventType::BufferEnd, Phase::Playing),
            Phase::Finished if roll < 0.4 => {
                let event = self.base(index, &session, EventType::AppClose, occurred_at_ms);
                return event;
            }
            Phase::Finished => (EventType::PageView, Phase::Browse { pages: self.rng.u32(0..=2) }),
        };
        session.phase = next;
        let mut event = self.base(index, &session, kind, occurred_at_ms);
        self.fill(&mut event, &session, kind);
        self.devices[index].session = Some(session);
        event
    }

    /// The fields every event of the device carries.
    fn base(&mut self, index: usize, session: &Session, kind: EventType, occurred_at_ms: i64) -> Event {
        let device = &self.devices[index];
        let mut event = Event {
            event_id: uuid_from(&mut self.rng),
            r#type: kind as i32,
            occurred_at_ms,
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
            session_id: session.id.clone(),
            platform: device.profile.platform as i32,
            app_version: device.app_version.to_owned(),
            os_version: device.os_version.to_owned(),
            device_model: device.model.to_owned(),
            geo: Some(device.geo.clone()),
            schema_version: "1.0".to_owned(),
            app_id: device.profile.app_id.to_owned(),
            ..Event::default()
        };
        event.attributes.insert("network".into(), device.network.to_owned());
        event
    }

    /// The fields of the event's kind: page, search, content and position, ad, error.
    fn fill(&mut self, event: &mut Event, session: &Session, kind: EventType) {
        let title = &CATALOG[session.title];
        match kind {
            // The title's page, just before it plays (or its pre-roll does).
            EventType::PageView if matches!(session.phase, Phase::Start | Phase::Ad { step: 0, .. }) => {
                event.page = format!("title/{}", title.id);
                event.content_id = title.id.to_owned();
                event.content_title = title.name.to_owned();
            }
            EventType::PageView => event.page = pick_from(&mut self.rng, &PAGES).to_owned(),
            EventType::Search => {
                event.page = "search".to_owned();
                event.target = pick_from(&mut self.rng, &SEARCHES).to_owned();
            }
            EventType::Click => {
                let shown = &CATALOG[self.pick_title()];
                event.page = pick_from(&mut self.rng, &PAGES).to_owned();
                event.target = format!("tile:{}", shown.id);
            }
            _ => {}
        }
        let playback = matches!(
            kind,
            EventType::Play
                | EventType::Pause
                | EventType::Resume
                | EventType::Seek
                | EventType::Stop
                | EventType::Complete
                | EventType::BufferStart
                | EventType::BufferEnd
                | EventType::Heartbeat
                | EventType::Error
                | EventType::AdStart
                | EventType::AdImpression
                | EventType::AdComplete
                | EventType::AdSkip
        );
        if playback {
            event.content_id = title.id.to_owned();
            event.content_title = title.name.to_owned();
            event.position_ms = session.position_ms;
            event.duration_ms = title.minutes * 60_000;
        }
        if matches!(kind, EventType::AdStart | EventType::AdImpression | EventType::AdComplete | EventType::AdSkip) {
            event.ad_id = session.ad_id.clone();
            event.ad_break =
                if session.position_ms == 0 { "preroll".to_owned() } else { format!("midroll-{}", session.ad_breaks) };
        }
        if kind == EventType::Play {
            event.attributes.insert("autoplay".into(), (self.rng.u8(0..4) == 0).to_string());
        }
        if kind == EventType::Error {
            let (code, message) = pick_from(
                &mut self.rng,
                &[
                    ("PLAYBACK_DRM_LICENSE", "license request failed"),
                    ("PLAYBACK_NETWORK", "segment download timed out"),
                    ("PLAYBACK_DECODER", "decoder initialisation failed"),
                ],
            );
            event.error_code = code.to_owned();
            event.error_message = message.to_owned();
        }
    }
}

fn pick_from<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(0..items.len())]
}

/// A random (version 4) UUID from the seeded generator, as text.
fn uuid_from(rng: &mut fastrand::Rng) -> String {
    uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes()).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    const NOW: i64 = 1_760_000_000_000;

    fn requests(seed: u64, n: usize) -> (Audience, Vec<Request>) {
        let mut audience = Audience::new(seed, 200);
        let requests = (0..n).map(|i| audience.next_request(NOW + i as i64 * 10)).collect();
        (audience, requests)
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic() {
        let (_, a) = requests(7, 200);
        let (_, b) = requests(7, 200);
        let ids = |r: &[Request]| -> Vec<String> {
            r.iter().flat_map(|r| r.events.iter().map(|e| e.event.event_id.clone())).collect()
        };
        assert_eq!(ids(&a), ids(&b));
    }

    #[test]
    fn traffic_looks_like_a_streaming_app() {
        let (audience, requests) = requests(1, 5_000);
        let mut types: HashMap<i32, u64> = HashMap::new();
        let mut platforms: HashSet<i32> = HashSet::new();
        let mut titles: HashMap<String, u64> = HashMap::new();
        for outgoing in requests.iter().flat_map(|r| &r.events).filter(|e| e.malformed.is_none()) {
            let event = &outgoing.event;
            *types.entry(event.r#type).or_default() += 1;
            platforms.insert(event.platform);
            let profile = PLATFORMS.iter().find(|p| p.platform as i32 == event.platform).expect("a platform");
            assert_eq!(event.app_id, profile.app_id, "each platform's app sends its own app id");
            assert!(!event.event_id.is_empty() && !event.device_id.is_empty() && !event.session_id.is_empty());
            assert!(event.occurred_at_ms <= NOW + 50_000 && event.occurred_at_ms > NOW - 60_000);
            if event.r#type == EventType::Play as i32 {
                *titles.entry(event.content_title.clone()).or_default() += 1;
                assert!(!event.content_id.is_empty() && event.duration_ms > 0);
            }
        }
        for kind in [
            EventType::AppOpen,
            EventType::PageView,
            EventType::Play,
            EventType::Heartbeat,
            EventType::Pause,
            EventType::Resume,
            EventType::Seek,
            EventType::AdStart,
            EventType::AdImpression,
            EventType::AdComplete,
            EventType::Stop,
            EventType::Complete,
        ] {
            assert!(types.get(&(kind as i32)).copied().unwrap_or(0) > 0, "no {kind:?} in {types:?}");
        }
        assert_eq!(platforms.len(), PLATFORMS.len(), "every platform sends");
        let app_ids: HashSet<&str> = PLATFORMS.iter().map(|p| p.app_id).collect();
        assert_eq!(app_ids.len(), PLATFORMS.len(), "one app id per platform");
        // Skewed popularity: the top title is played far more than the last.
        let top = titles.get(CATALOG[0].name).copied().unwrap_or(0);
        let last = titles.get(CATALOG[CATALOG.len() - 1].name).copied().unwrap_or(0);
        assert!(top > 3 * last.max(1), "top {top}, last {last}");
        assert!(audience.plan().json_requests > 0 && audience.plan().json_requests < audience.plan().requests);
    }

    #[test]
    fn malformed_events_and_duplicates_come_at_their_rates() {
        let (audience, requests) = requests(3, 20_000);
        let plan = audience.plan();
        let valid = plan.valid as f64;
        let malformed: u64 = plan.malformed.values().sum();
        assert!((malformed as f64 - valid * MALFORMED_RATE).abs() <= 2.0, "{malformed} of {valid}");
        assert_eq!(plan.malformed.len(), Malformed::JSON_KINDS.len(), "every kind: {:?}", plan.malformed);
        let resent: usize = requests
            .iter()
            .filter(|r| r.resend)
            .map(|r| r.events.iter().filter(|e| e.malformed.is_none()).count())
            .sum();
        let duplicates = resent as f64 + plan.reused_events as f64;
        assert!((duplicates / valid - DUPLICATE_RATE).abs() < 0.002, "{duplicates} of {valid}");
        assert!(plan.resent_batches > 0 && plan.reused_events > 0);
        for request in &requests {
            for (i, outgoing) in request.events.iter().enumerate() {
                if outgoing.malformed == Some(Malformed::DuplicateInBatch) {
                    let id = &outgoing.event.event_id;
                    assert!(request.events[..i].iter().any(|e| &e.event.event_id == id), "copies an earlier event");
                }
                if outgoing.malformed.is_some_and(|m| matches!(m, Malformed::UnknownType | Malformed::NotAnEvent)) {
                    assert!(request.json, "JSON-only defects go in JSON requests");
                }
            }
        }
    }

    #[test]
    fn bodies_decode_as_event_batches() {
        let (_, requests) = requests(5, 300);
        for request in &requests {
            let events: Vec<&Outgoing> = request.events.iter().collect();
            let (body, content_type) = encode_body(request.json, &events, NOW).expect("encodes");
            if request.json {
                assert_eq!(content_type, "application/json");
                let value: Value = serde_json::from_slice(&body).expect("JSON");
                let array = value["events"].as_array().expect("events");
                assert_eq!(array.len(), events.len());
                for (json, outgoing) in array.iter().zip(&events) {
                    let parsed = serde_json::from_value::<Event>(json.clone());
                    match outgoing.malformed {
                        Some(Malformed::NotAnEvent) => assert!(parsed.is_err()),
                        Some(Malformed::UnknownType) => {
                            assert_eq!(parsed.expect("unknown types read as unspecified").r#type, 0)
                        }
                        _ => assert_eq!(parsed.expect("an event"), outgoing.event),
                    }
                }
            } else {
                assert_eq!(content_type, "application/x-protobuf");
                let batch = EventBatch::decode(body.as_slice()).expect("protobuf");
                assert_eq!(batch.events.len(), events.len());
                assert_eq!(batch.sent_at_ms, NOW);
            }
        }
    }

    #[test]
    fn platforms_have_short_names() {
        assert_eq!(platform_label("PLATFORM_FIRE_TV"), "Fire TV");
        assert_eq!(platform_label("PLATFORM_WEB"), "web");
        assert_eq!(platform_label("61"), "61");
    }
}
