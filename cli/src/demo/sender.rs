//! The apps' side of the Event API: posts each request to the collector's `POST /v1/events`,
//! follows its answer (events refused as retryable are sent again after `Retry-After`, as the
//! SDKs do), and keeps the [`Tally`] the report is checked against: which event ids the collector
//! accepted, what it refused and why, and every answer that was not what the traffic planned.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ktk_proto::events::v1::Platform;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;

use super::traffic::{Outgoing, Request, app_id_of, encode_body};

/// Attempts per request: the first, then resends of what was refused as retryable (or of the
/// whole request when no answer came).
const MAX_ATTEMPTS: u32 = 6;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before resending a request that got no answer.
const NO_ANSWER_PAUSE: Duration = Duration::from_millis(250);
/// Examples of surprises kept for the report.
const SURPRISE_EXAMPLES: usize = 5;

/// Everything the collector answered, summed.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// HTTP requests made (resent batches and retries included).
    pub requests: u64,
    /// Events sent, each once per send of its batch (a resent batch counts again; a retry after a
    /// retryable refusal does not).
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    /// Refusals of malformed events, with the code planned.
    pub rejected_as_planned: u64,
    /// The ids of every accepted event.
    pub accepted_ids: HashSet<String>,
    /// Accepted events whose id had been accepted before.
    pub duplicates: u64,
    /// Valid events accepted again as part of a resent batch.
    pub resent_accepted: u64,
    /// Events of earlier batches accepted again.
    pub reused_accepted: u64,
    /// Events sent again after a retryable refusal (`producer_full`, `shutting_down`).
    pub retried: u64,
    /// Requests sent again because no answer came (the first send may have been taken).
    pub resent_without_answer: u64,
    /// Events of requests that never got an answer, and their ids.
    pub unanswered: u64,
    pub unanswered_ids: HashSet<String>,
    /// Answers that contradict the plan: a valid event refused, a malformed one accepted, or a
    /// refusal with another reason than the one planned.
    pub surprises: u64,
    pub surprise_examples: Vec<String>,
}

impl Tally {
    fn surprise(&mut self, what: String) {
        self.surprises += 1;
        if self.surprise_examples.len() < SURPRISE_EXAMPLES {
            self.surprise_examples.push(what);
        }
    }

    fn accept(&mut self, outgoing: &Outgoing, resend: bool) {
        self.accepted += 1;
        if let Some(kind) = outgoing.malformed {
            self.surprise(format!(
                "event {:?} accepted, but it should have been refused as {}",
                outgoing.event.event_id,
                kind.expected_code()
            ));
        }
        if outgoing.reused {
            self.reused_accepted += 1;
        } else if resend && outgoing.malformed.is_none() {
            self.resent_accepted += 1;
        }
        if !self.accepted_ids.insert(outgoing.event.event_id.clone()) {
            self.duplicates += 1;
        }
    }

    fn reject(&mut self, outgoing: &Outgoing, code: &str, reason: &str) {
        self.rejected += 1;
        *self.rejected_by_code.entry(code.to_owned()).or_default() += 1;
        match outgoing.malformed {
            None => self.surprise(format!("valid event {:?} refused: {code}: {reason}", outgoing.event.event_id)),
            Some(kind) if kind.expected_code() != code => self.surprise(format!(
                "event {:?} refused as {code} ({reason}), but it was made to be refused as {}",
                outgoing.event.event_id,
                kind.expected_code()
            )),
            Some(_) => self.rejected_as_planned += 1,
        }
    }
}

/// The counts the live progress shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
}

/// The demo's apps: one write key per platform ("tv-ios", "tv-roku", ...), fresh for each run,
/// and the collector's keys document that lists them.
#[derive(Debug, Clone)]
pub struct AppKeys {
    by_platform: HashMap<i32, String>,
}

impl AppKeys {
    pub fn generate() -> Self {
        let by_platform = platforms()
            .map(|platform| (platform as i32, format!("wk_demo_{}", uuid::Uuid::new_v4().simple())))
            .collect();
        AppKeys { by_platform }
    }

    /// The app id of `platform`'s app (`tv-firetv`, see [`app_id_of`]).
    pub fn app_id(platform: Platform) -> String {
        app_id_of(platform)
    }

    /// The collector's keys document (JSON).
    pub fn document(&self) -> String {
        let keys: Vec<Value> = platforms()
            .filter_map(|platform| {
                let key = self.by_platform.get(&(platform as i32))?;
                Some(serde_json::json!({"app_id": Self::app_id(platform), "key": key}))
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    /// The key of the app on `platform` (an unknown platform number sends as `PLATFORM_OTHER`).
    fn key_for(&self, platform: i32) -> &str {
        self.by_platform
            .get(&platform)
            .or_else(|| self.by_platform.get(&(Platform::Other as i32)))
            .map_or("", String::as_str)
    }
}

/// Every [`Platform`] value (the schema numbers them below 256).
fn platforms() -> impl Iterator<Item = Platform> {
    (0..=i32::from(u8::MAX)).filter_map(|n| Platform::try_from(n).ok())
}

/// Posts requests to one collector; clones share the tally.
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
    url: String,
    keys: Arc<AppKeys>,
    tally: Arc<Mutex<Tally>>,
}

impl Sender {
    /// A sender to the collector at `base_url` (`http://127.0.0.1:8080`), each request with the
    /// key of its device's app.
    pub fn new(base_url: &str, keys: AppKeys) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?;
        Ok(Sender { http, url: format!("{base_url}/v1/events"), keys: Arc::new(keys), tally: Arc::default() })
    }

    fn lock(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn counts(&self) -> Counts {
        let t = self.lock();
        Counts {
            requests: t.requests,
            sent: t.sent,
            accepted: t.accepted,
            rejected: t.rejected,
            duplicates: t.duplicates,
        }
    }

    /// A copy of the tally (final once every request is done).
    pub fn finished(&self) -> Tally {
        self.lock().clone()
    }

    /// Sends the request (and, if it is to be resent, sends it again after the answer).
    pub async fn deliver(&self, request: Request) {
        self.send(&request, false).await;
        if request.resend {
            self.send(&request, true).await;
        }
    }

    async fn send(&self, request: &Request, resend: bool) {
        let mut pending: Vec<&Outgoing> = request.events.iter().collect();
        self.lock().sent += pending.len() as u64;
        for attempt in 1..=MAX_ATTEMPTS {
            let (body, content_type) = match encode_body(request.json, &pending, now_ms()) {
                Ok(encoded) => encoded,
                Err(error) => {
                    let mut tally = self.lock();
                    for outgoing in &pending {
                        tally.reject(outgoing, "not_sent", &format!("the request could not be encoded: {error}"));
                    }
                    return;
                }
            };
            self.lock().requests += 1;
            let platform = pending.first().map_or(0, |outgoing| outgoing.event.platform);
            let answer = match self.post(body, content_type, platform).await {
                Ok(answer) => answer,
                Err(error) if attempt < MAX_ATTEMPTS => {
                    self.lock().resent_without_answer += 1;
                    note(&format!("no answer from the collector ({error}); sending the request again"));
                    tokio::time::sleep(NO_ANSWER_PAUSE).await;
                    continue;
                }
                Err(error) => {
                    let mut tally = self.lock();
                    tally.unanswered += pending.len() as u64;
                    for outgoing in &pending {
                        tally.unanswered_ids.insert(outgoing.event.event_id.clone());
                    }
                    tally.surprise(format!("a request of {} events got no answer: {error}", pending.len()));
                    return;
                }
            };
            let retry = self.settle(&pending, &answer, resend);
            if retry.is_empty() {
                return;
            }
            if attempt == MAX_ATTEMPTS {
                let mut tally = self.lock();
                for outgoing in &retry {
                    tally.reject(outgoing, "gave_up", &format!("still refused after {MAX_ATTEMPTS} attempts"));
                }
                return;
            }
            self.lock().retried += retry.len() as u64;
            pending = retry;
            tokio::time::sleep(answer.retry_after).await;
        }
    }

    async fn post(&self, body: Vec<u8>, content_type: &'static str, platform: i32) -> Result<Answer, reqwest::Error> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(self.keys.key_for(platform))
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs);
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok(Answer { status, retry_after, body })
    }

    /// Books the answer; returns the events to send again.
    fn settle<'a>(&self, pending: &[&'a Outgoing], answer: &Answer, resend: bool) -> Vec<&'a Outgoing> {
        let mut tally = self.lock();
        let Some(refused) = answer.body.get("rejected").and_then(Value::as_array) else {
            // The request as a whole was refused: {"error", "reason"}.
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                return pending.to_vec();
            }
            let code = answer.body.get("error").and_then(Value::as_str).unwrap_or("http_error").to_owned();
            let reason = answer.body.get("reason").and_then(Value::as_str).unwrap_or("").to_owned();
            for outgoing in pending {
                tally.reject(outgoing, &code, &format!("HTTP {}: {reason}", answer.status));
            }
            return Vec::new();
        };
        let mut refusals: HashMap<usize, (&str, &str, bool)> = HashMap::new();
        for entry in refused {
            if let Some(index) = entry.get("index").and_then(Value::as_u64) {
                let code = entry.get("code").and_then(Value::as_str).unwrap_or("unknown");
                let reason = entry.get("reason").and_then(Value::as_str).unwrap_or("");
                let retryable = entry.get("retryable").and_then(Value::as_bool).unwrap_or(false);
                refusals.insert(index as usize, (code, reason, retryable));
            }
        }
        let mut retry = Vec::new();
        for (index, outgoing) in pending.iter().enumerate() {
            match refusals.get(&index) {
                None => tally.accept(outgoing, resend),
                Some((_, _, true)) => retry.push(*outgoing),
                Some((code, reason, false)) => tally.reject(outgoing, code, reason),
            }
        }
        retry
    }
}

/// One answer of the collector.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Duration,
    body: Value,
}

/// A note on stderr, between the progress lines on stdout.
fn note(message: &str) {
    eprintln!("ktk demo: {message}");
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use ktk_proto::events::v1::Event;

    use super::super::traffic::Malformed;
    use super::*;

    fn outgoing(id: &str, malformed: Option<Malformed>, reused: bool) -> Outgoing {
        Outgoing { event: Event { event_id: id.into(), ..Event::default() }, malformed, reused }
    }

    fn answer(status: StatusCode, body: Value) -> Answer {
        Answer { status, retry_after: Duration::from_secs(1), body }
    }

    #[test]
    fn every_platform_has_its_own_key_and_app_in_the_keys_document() {
        let keys = AppKeys::generate();
        let document = ktk_producer::collector::KeySet::from_json(&keys.document()).expect("a valid keys document");
        assert_eq!(document.len(), platforms().count());
        assert!(!document.allows_anonymous());
        for platform in platforms() {
            let app = document.authenticate(Some(keys.key_for(platform as i32))).expect("a known key");
            assert_eq!(app.app_id(), AppKeys::app_id(platform));
        }
        assert_eq!(AppKeys::app_id(Platform::FireTv), "tv-firetv");
        assert_eq!(AppKeys::app_id(Platform::Other), "tv-other");
        assert_eq!(keys.key_for(999), keys.key_for(Platform::Other as i32), "an unknown platform sends as other");
        assert_ne!(AppKeys::generate().key_for(1), keys.key_for(1), "fresh keys for each run");
    }

    #[test]
    fn answers_are_booked_event_by_event() {
        let sender = Sender::new("http://127.0.0.1:1", AppKeys::generate()).expect("client");
        let events = [
            outgoing("a", None, false),
            outgoing("", Some(Malformed::MissingEventId), false),
            outgoing("b", None, false),
            outgoing("c", Some(Malformed::TooOld), false),
            outgoing("a", None, true),
        ];
        let pending: Vec<&Outgoing> = events.iter().collect();
        let body = serde_json::json!({"accepted": 2, "rejected": [
            {"index": 1, "event_id": "", "code": "missing_event_id", "reason": "x", "retryable": false},
            {"index": 2, "event_id": "b", "code": "producer_full", "reason": "x", "retryable": true},
            {"index": 3, "event_id": "c", "code": "occurred_in_future", "reason": "x", "retryable": false},
        ]});
        let retry = sender.settle(&pending, &answer(StatusCode::SERVICE_UNAVAILABLE, body), false);
        assert_eq!(retry.iter().map(|o| o.event.event_id.as_str()).collect::<Vec<_>>(), ["b"]);
        let tally = sender.finished();
        assert_eq!((tally.accepted, tally.rejected, tally.duplicates, tally.reused_accepted), (2, 2, 1, 1));
        assert_eq!(tally.rejected_by_code.get("missing_event_id"), Some(&1));
        assert_eq!(tally.surprises, 1, "c was refused for another reason than planned: {:?}", tally.surprise_examples);
    }

    #[test]
    fn a_request_refused_as_a_whole_is_retried_only_when_unavailable() {
        let sender = Sender::new("http://127.0.0.1:1", AppKeys::generate()).expect("client");
        let events = [outgoing("a", None, false), outgoing("b", None, false)];
        let pending: Vec<&Outgoing> = events.iter().collect();
        let busy = serde_json::json!({"error": "too_many_requests", "reason": "later"});
        assert_eq!(sender.settle(&pending, &answer(StatusCode::SERVICE_UNAVAILABLE, busy), false).len(), 2);
        let bad = serde_json::json!({"error": "malformed_body", "reason": "no"});
        assert!(sender.settle(&pending, &answer(StatusCode::BAD_REQUEST, bad), false).is_empty());
        let tally = sender.finished();
        assert_eq!(tally.rejected_by_code.get("malformed_body"), Some(&2));
        assert_eq!(tally.surprises, 2);
    }
}
