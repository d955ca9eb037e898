//! Checks one event of a batch against the Event API's contract, before it goes to the producer.
//!
//! The rules, in the order they are checked (the first that fails is the reason given):
//! 1. `event_id` is set and at most [`MAX_EVENT_ID_CHARS`] characters;
//! 2. it was not used by an earlier event of the same batch (the first one wins; a later one is
//!    rejected whatever became of the first);
//! 3. `type` is a value this build knows, and not `EVENT_TYPE_UNSPECIFIED`;
//! 4. `occurred_at_ms` is set, at most [`MAX_FUTURE_SKEW`] ahead of the server clock, and not older
//!    than the configured maximum age;
//! 5. `user_id` or `device_id` is set, and the one used as partition key (`user_id` when set, so
//!    each user's events stay in order on one shard) is a valid Kinesis partition key.

use std::collections::HashSet;
use std::time::Duration;

use ktk_proto::events::v1::{Event, EventType};

/// Longest `event_id` accepted, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;
/// How far ahead of the server clock `occurred_at_ms` may be (device clocks drift, and some are
/// set to the wrong time zone); anything further is a broken clock.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(24 * 60 * 60);

/// Why the collector did not take an event. [`as_str`](Self::as_str) is the `code` of a rejected
/// entry in the response and the `reason` label of the `collector_events_rejected` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectCode {
    /// The event in a JSON batch could not be read as an `events.v1.Event`.
    MalformedEvent,
    MissingEventId,
    EventIdTooLong,
    DuplicateEventId,
    /// `type` absent or `EVENT_TYPE_UNSPECIFIED`.
    UnspecifiedType,
    /// `type` is a JSON value that no version of the schema can have as an `EventType` name. (A
    /// number this build does not know is taken and passed on; so is a name of a later version,
    /// kept in the attribute [`UNKNOWN_TYPE_ATTRIBUTE`].)
    UnknownType,
    MissingOccurredAt,
    OccurredInFuture,
    TooOld,
    MissingUserAndDevice,
    InvalidPartitionKey,
    /// The producer is at its outstanding records/bytes limit: send again after `Retry-After`.
    ProducerFull,
    /// The collector is shutting down: send again (to another instance) after `Retry-After`.
    ShuttingDown,
    /// With `?wait=acked`: the producer could not get the event into Kinesis (the reason says
    /// why; `retryable` says whether sending it again can help).
    PutFailed,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::MalformedEvent => "malformed_event",
            RejectCode::MissingEventId => "missing_event_id",
            RejectCode::EventIdTooLong => "event_id_too_long",
            RejectCode::DuplicateEventId => "duplicate_event_id",
            RejectCode::UnspecifiedType => "unspecified_type",
            RejectCode::UnknownType => "unknown_type",
            RejectCode::MissingOccurredAt => "missing_occurred_at",
            RejectCode::OccurredInFuture => "occurred_in_future",
            RejectCode::TooOld => "too_old",
            RejectCode::MissingUserAndDevice => "missing_user_and_device",
            RejectCode::InvalidPartitionKey => "invalid_partition_key",
            RejectCode::ProducerFull => "producer_full",
            RejectCode::ShuttingDown => "shutting_down",
            RejectCode::PutFailed => "put_failed",
        }
    }

    /// Whether sending the same event again later can succeed. (For `PutFailed` it depends on
    /// the producer's error; see the rejected entry's `retryable`.)
    pub fn is_retryable(self) -> bool {
        matches!(self, RejectCode::ProducerFull | RejectCode::ShuttingDown)
    }
}

/// An event the collector did not take, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: RejectCode, reason: impl Into<String>) -> Self {
        Rejection { code, reason: reason.into() }
    }
}

/// Validates the events of one batch, in order; remembers their ids to find duplicates.
#[derive(Debug)]
pub(crate) struct BatchValidator {
    now_ms: i64,
    max_age_ms: i64,
    seen: HashSet<String>,
}

impl BatchValidator {
    pub(crate) fn new(now_ms: i64, max_age: Duration) -> Self {
        BatchValidator { now_ms, max_age_ms: duration_ms(max_age), seen: HashSet::new() }
    }

    /// Records an id that is already taken (by a malformed event of the batch whose id could
    /// still be read), so that a later event with the same id counts as a duplicate.
    pub(crate) fn remember(&mut self, event_id: &str) {
        if !event_id.is_empty() {
            self.seen.insert(event_id.to_owned());
        }
    }

    /// Checks `event`; on success returns its partition key. `unknown_type` is a `type` the
    /// decoder saw but could not map (JSON names of later schema versions read as UNSPECIFIED).
    pub(crate) fn check<'e>(&mut self, event: &'e Event, unknown_type: Option<&str>) -> Result<&'e str, Rejection> {
        let id = event.event_id.as_str();
        if id.is_empty() {
            return Err(Rejection::new(RejectCode::MissingEventId, "event_id is missing; every event needs one"));
        }
        let chars = id.chars().count();
        if chars > MAX_EVENT_ID_CHARS {
            return Err(Rejection::new(
                RejectCode::EventIdTooLong,
                format!("event_id has {chars} characters; at most {MAX_EVENT_ID_CHARS} are allowed"),
            ));
        }
        if !self.seen.insert(id.to_owned()) {
            return Err(Rejection::new(
                RejectCode::DuplicateEventId,
                "event_id is used by an earlier event of this batch; only the first one was taken",
            ));
        }
        // A type this build does not know is one of a later schema version: a number is taken and
        // passed on as the number, a JSON name that could be an EventType name is taken too (the
        // caller keeps the name). Only a missing type, or a name no version can have, is refused
        // (docs/schema.md).
        match unknown_type {
            Some(given) if later_type_name(given).is_none() => {
                return Err(Rejection::new(
                    RejectCode::UnknownType,
                    format!(
                        "type {given} is not an EventType name (EVENT_TYPE_ and up to {MAX_TYPE_NAME_CHARS} characters \
                         of A-Z 0-9 _)"
                    ),
                ));
            }
            Some(_) => {}
            None if event.r#type == EventType::Unspecified as i32 => {
                return Err(Rejection::new(RejectCode::UnspecifiedType, "type is missing or EVENT_TYPE_UNSPECIFIED"));
            }
            None => {}
        }
        self.check_time(event.occurred_at_ms)?;
        let key = if event.user_id.is_empty() { event.device_id.as_str() } else { event.user_id.as_str() };
        if key.is_empty() {
            return Err(Rejection::new(
                RejectCode::MissingUserAndDevice,
                "user_id and device_id are both missing; at least one is needed",
            ));
        }
        if let Err(e) = ktk_proto::keys::validate_partition_key(key) {
            let field = if event.user_id.is_empty() { "device_id" } else { "user_id" };
            return Err(Rejection::new(RejectCode::InvalidPartitionKey, format!("{field} cannot be used: {e}")));
        }
        Ok(key)
    }

    fn check_time(&self, occurred_at_ms: i64) -> Result<(), Rejection> {
        if occurred_at_ms <= 0 {
            return Err(Rejection::new(
                RejectCode::MissingOccurredAt,
                "occurred_at_ms is missing; give the device time of the event in Unix epoch milliseconds",
            ));
        }
        let ahead = occurred_at_ms.saturating_sub(self.now_ms);
        if ahead > duration_ms(MAX_FUTURE_SKEW) {
            return Err(Rejection::new(
                RejectCode::OccurredInFuture,
                format!("occurred_at_ms is {} s ahead of the server clock (at most 86400 s allowed)", ahead / 1000),
            ));
        }
        let age = self.now_ms.saturating_sub(occurred_at_ms);
        if age > self.max_age_ms {
            let (age, max) = (age / 1000, self.max_age_ms / 1000);
            return Err(Rejection::new(
                RejectCode::TooOld,
                format!("occurred_at_ms is {age} s old; events older than {max} s are not accepted"),
            ));
        }
        Ok(())
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Longest type name of a later schema version that is taken.
pub const MAX_TYPE_NAME_CHARS: usize = 100;

/// The attribute that keeps the `type` name of a later schema version (the event itself carries
/// `EVENT_TYPE_UNSPECIFIED`, having no number for it).
pub const UNKNOWN_TYPE_ATTRIBUTE: &str = "ktk_unknown_type";

/// `given` (a JSON value as text) when it is a name a later `EventType` value could have:
/// a string of `EVENT_TYPE_` and `A-Z 0-9 _`, at most [`MAX_TYPE_NAME_CHARS`] long.
pub(crate) fn later_type_name(given: &str) -> Option<&str> {
    let name = given.strip_prefix('"')?.strip_suffix('"')?;
    let rest = name.strip_prefix("EVENT_TYPE_")?;
    let valid = !rest.is_empty()
        && name.len() <= MAX_TYPE_NAME_CHARS
        && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    valid.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_730_000_000_000;
    const DAY_MS: i64 = 86_400_000;

    fn valid(id: &str) -> Event {
        Event {
            event_id: id.into(),
            r#type: EventType::Play as i32,
            occurred_at_ms: NOW - 1_000,
            user_id: "user-1".into(),
            device_id: "device-1".into(),
            ..Event::default()
        }
    }

    fn validator() -> BatchValidator {
        BatchValidator::new(NOW, Duration::from_secs(7 * 24 * 3600))
    }

    fn check<'e>(v: &mut BatchValidator, event: &'e Event) -> Result<&'e str, Rejection> {
        v.check(event, None)
    }

    fn code(result: Result<&str, Rejection>) -> RejectCode {
        result.expect_err("rejected").code
    }

    #[test]
    fn a_valid_event_is_keyed_by_user_then_device() {
        let mut v = validator();
        assert_eq!(check(&mut v, &valid("a")), Ok("user-1"));
        let anonymous = Event { user_id: String::new(), ..valid("b") };
        assert_eq!(check(&mut v, &anonymous), Ok("device-1"));
    }

    #[test]
    fn event_id_must_be_present_short_and_unique() {
        let mut v = validator();
        assert_eq!(code(check(&mut v, &valid(""))), RejectCode::MissingEventId);
        assert_eq!(code(check(&mut v, &valid(&"x".repeat(129)))), RejectCode::EventIdTooLong);
        // 128 characters of 2 bytes each is fine: the limit is in characters.
        assert!(check(&mut v, &valid(&"é".repeat(128))).is_ok());
        assert!(check(&mut v, &valid("a")).is_ok());
        assert_eq!(code(check(&mut v, &valid("a"))), RejectCode::DuplicateEventId);
        v.remember("m");
        assert_eq!(code(check(&mut v, &valid("m"))), RejectCode::DuplicateEventId);
    }

    #[test]
    fn type_must_be_specified_and_a_json_name_known() {
        let mut v = validator();
        assert_eq!(code(check(&mut v, &Event { r#type: 0, ..valid("a") })), RejectCode::UnspecifiedType);
        assert!(check(&mut v, &Event { r#type: 99, ..valid("b") }).is_ok(), "a later version's type is taken");
        assert!(check(&mut v, &Event { r#type: EventType::Error as i32, ..valid("c") }).is_ok());
        // A JSON name this build does not know reads as UNSPECIFIED; the decoder passes it on.
        assert!(v.check(&Event { r#type: 0, ..valid("d") }, Some("\"EVENT_TYPE_TELEPORT\"")).is_ok());
        for bad in ["\"teleport\"", "\"EVENT_TYPE_\"", "\"EVENT_TYPE_tele\"", "true", "\"PLAY\""] {
            let refused = v.check(&Event { r#type: 0, ..valid(bad) }, Some(bad)).expect_err(bad);
            assert_eq!(refused.code, RejectCode::UnknownType, "{bad}");
        }
        let long = format!("\"EVENT_TYPE_{}\"", "Z".repeat(MAX_TYPE_NAME_CHARS));
        assert_eq!(later_type_name(&long), None);
        assert_eq!(later_type_name("\"EVENT_TYPE_WATCH_PARTY_2\""), Some("EVENT_TYPE_WATCH_PARTY_2"));
    }

    #[test]
    fn occurred_at_must_be_set_and_sane() {
        let mut v = validator();
        let at = |id: &str, ms: i64| Event { occurred_at_ms: ms, ..valid(id) };
        assert_eq!(code(check(&mut v, &at("a", 0))), RejectCode::MissingOccurredAt);
        assert_eq!(code(check(&mut v, &at("b", -5))), RejectCode::MissingOccurredAt);
        assert_eq!(code(check(&mut v, &at("c", NOW + DAY_MS + 1))), RejectCode::OccurredInFuture);
        assert!(check(&mut v, &at("d", NOW + DAY_MS)).is_ok());
        assert_eq!(code(check(&mut v, &at("e", NOW - 7 * DAY_MS - 1))), RejectCode::TooOld);
        assert!(check(&mut v, &at("f", NOW - 7 * DAY_MS)).is_ok());
        assert_eq!(code(check(&mut v, &at("g", i64::MAX))), RejectCode::OccurredInFuture);
    }

    #[test]
    fn a_user_or_device_is_needed_and_must_make_a_partition_key() {
        let mut v = validator();
        let nobody = Event { user_id: String::new(), device_id: String::new(), ..valid("a") };
        assert_eq!(code(check(&mut v, &nobody)), RejectCode::MissingUserAndDevice);
        let long = Event { user_id: "u".repeat(257), ..valid("b") };
        let rejection = check(&mut v, &long).expect_err("rejected");
        assert_eq!(rejection.code, RejectCode::InvalidPartitionKey);
        assert!(rejection.reason.starts_with("user_id"), "{}", rejection.reason);
    }

    #[test]
    fn codes_are_distinct_snake_case() {
        let codes = [
            RejectCode::MalformedEvent,
            RejectCode::MissingEventId,
            RejectCode::EventIdTooLong,
            RejectCode::DuplicateEventId,
            RejectCode::UnspecifiedType,
            RejectCode::UnknownType,
            RejectCode::MissingOccurredAt,
            RejectCode::OccurredInFuture,
            RejectCode::TooOld,
            RejectCode::MissingUserAndDevice,
            RejectCode::InvalidPartitionKey,
            RejectCode::ProducerFull,
            RejectCode::ShuttingDown,
            RejectCode::PutFailed,
        ];
        let names: HashSet<&str> = codes.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), codes.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
