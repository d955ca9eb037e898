//! The HTTP routes: `POST /v1/events` (and its CORS preflight) and `GET /health` on the public
//! listener, `GET /metrics` and `GET /health` on the admin one; write keys, body decoding, the
//! answer.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use ktk_proto::events::v1::{Event, EventBatch};
use metrics::{counter, histogram};
use prost::Message;
use serde::Serialize;
use serde::de::Deserialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::Collector;
use super::keys::{App, AuthError};
use super::validate::{
    BatchValidator, MAX_EVENT_ID_CHARS, RejectCode, Rejection, UNKNOWN_TYPE_ATTRIBUTE, later_type_name,
};
use crate::error::{PutError, PutErrorKind};
use crate::producer::BatchTaken;
use crate::record::{BatchReceipt, Record};

/// The public routes: what apps and pages reach.
pub(super) fn router(collector: Collector) -> Router {
    Router::new()
        .route("/v1/events", post(post_events).options(preflight))
        .route("/health", get(health))
        .route_layer(middleware::from_fn(observe))
        .layer(middleware::from_fn_with_state(collector.clone(), cors))
        .with_state(collector)
}

/// The operational routes, for the admin listener only.
pub(super) fn admin_router(collector: Collector) -> Router {
    Router::new().route("/metrics", get(render_metrics)).route("/health", get(admin_health)).with_state(collector)
}

/// The request headers a page may send to `POST /v1/events`.
const ALLOWED_HEADERS: &str = "authorization, content-type";
/// How long a browser may keep a preflight's answer, in seconds (Chromium caps it at 2 hours).
const PREFLIGHT_MAX_AGE_SECS: &str = "7200";

/// Adds the CORS headers to every answer to a page whose origin some key allows (errors
/// included, so the page can read them), and `Vary: Origin` to every answer to a page.
async fn cors(State(collector): State<Collector>, request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = next.run(request).await;
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.append(header::VARY, HeaderValue::from_static("origin"));
        let allowed = origin.to_str().is_ok_and(|o| collector.keys().current().some_key_allows_origin(o));
        if allowed {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after"));
        }
    }
    response
}

/// `OPTIONS /v1/events`: a browser asking whether a page may post (a CORS preflight), answered
/// 204 for an origin some key allows and the POST method; 403 otherwise. Without an `Origin` it
/// is a plain OPTIONS: 204 with `Allow`.
async fn preflight(State(collector): State<Collector>, headers: HeaderMap) -> Response {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return (StatusCode::NO_CONTENT, [(header::ALLOW, "POST, OPTIONS")]).into_response();
    };
    let origin_allowed = origin.to_str().is_ok_and(|o| collector.keys().current().some_key_allows_origin(o));
    if !origin_allowed {
        return RequestError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "no write key of this collector allows pages of this origin",
        )
        .into_response();
    }
    let method = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD).and_then(|m| m.to_str().ok());
    if method.is_some_and(|m| m != "POST") {
        return RequestError::new(StatusCode::FORBIDDEN, "method_not_allowed", "only POST is allowed here")
            .into_response();
    }
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, "POST"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS),
            (header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE_SECS),
            (header::VARY, "access-control-request-method, access-control-request-headers"),
        ],
    )
        .into_response()
}

/// Records every matched request's latency by route and status.
async fn observe(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    histogram!("collector_request_duration_seconds", "route" => route, "status" => status)
        .record(start.elapsed().as_secs_f64());
    response
}

async fn health(State(collector): State<Collector>) -> Response {
    if collector.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "shutting_down"}))).into_response()
    } else {
        Json(serde_json::json!({"status": "ok"})).into_response()
    }
}

/// The admin `/health`: the public answer, and whether the keys source reads.
async fn admin_health(State(collector): State<Collector>) -> Response {
    let keys = collector.keys().current();
    let status = if collector.is_shutting_down() { "shutting_down" } else { "ok" };
    let body = serde_json::json!({
        "status": status,
        "keys": keys.len(),
        "anonymous": keys.allows_anonymous(),
        "keys_reload_error": collector.keys().reload_error(),
    });
    let code = if collector.is_shutting_down() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

async fn render_metrics(State(collector): State<Collector>) -> Response {
    match &collector.shared.prometheus {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no metrics exporter is installed in this process\n").into_response(),
    }
}

/// Why a request could not be taken as a batch at all; answered `{"error", "reason"}`.
#[derive(Debug)]
struct RequestError {
    status: StatusCode,
    error: &'static str,
    reason: String,
}

impl RequestError {
    fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        RequestError { status, error, reason: reason.into() }
    }

    fn malformed(reason: impl Into<String>) -> Self {
        RequestError::new(StatusCode::BAD_REQUEST, "malformed_body", reason)
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let reason = cut(&self.reason, MAX_REASON_CHARS);
        (self.status, Json(serde_json::json!({"error": self.error, "reason": reason}))).into_response()
    }
}

/// Longest `reason` in an answer, in characters. A reason may quote what the client sent (a
/// content type, a JSON value in a decoder's message); cut, it cannot make an answer large.
const MAX_REASON_CHARS: usize = 200;

/// `text`, cut to at most `max` characters (with "..." when cut).
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}

fn retry_after(collector: &Collector) -> [(header::HeaderName, HeaderValue); 1] {
    [(header::RETRY_AFTER, HeaderValue::from(collector.config().retry_after_secs()))]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

fn format_of(headers: &HeaderMap) -> Result<Format, RequestError> {
    let unsupported = |got: &str| {
        RequestError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {got} is not supported; send application/x-protobuf, application/json or text/plain (JSON)"
            ),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Err(unsupported("(none)")) };
    let Ok(value) = value.to_str() else { return Err(unsupported("(not ASCII)")) };
    let media_type = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match media_type.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Format::Protobuf),
        // `text/plain` is what `navigator.sendBeacon` sends without a CORS preflight; its body
        // is read as JSON.
        "application/json" | "text/plain" => Ok(Format::Json),
        _ => Err(unsupported(&format!("{value:?}"))),
    }
}

/// What the query string says: `wait=acked` (wait for Kinesis) and `key=<write key>` (for
/// `navigator.sendBeacon`, which cannot set headers); other parameters are ignored.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query<'a> {
    wait: bool,
    key: Option<&'a str>,
}

fn parse_query(query: Option<&str>) -> Result<Query<'_>, RequestError> {
    let mut parsed = Query::default();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "wait" if value == "acked" => parsed.wait = true,
            "wait" => {
                return Err(RequestError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    format!("wait={value} is not supported; the only value is wait=acked"),
                ));
            }
            "key" => parsed.key = Some(value),
            _ => {}
        }
    }
    Ok(parsed)
}

/// The write key a request presents: `Authorization: Bearer <key>`, else `?key=`.
fn presented_key<'a>(headers: &'a HeaderMap, query: &Query<'a>) -> Result<Option<&'a str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(query.key) };
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, key) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Some(key))
}

fn unauthorized(error: AuthError) -> Response {
    counter!("collector_requests_refused", "reason" => error.code()).increment(1);
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"events\""))],
        RequestError::new(StatusCode::UNAUTHORIZED, error.code(), error.reason()),
    )
        .into_response()
}

fn rate_limited(wait: std::time::Duration) -> Response {
    counter!("collector_requests_refused", "reason" => "rate_limited").increment(1);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))],
        RequestError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "this write key is over its rate of events; send again after Retry-After",
        ),
    )
        .into_response()
}

/// A body as read, and its share of the collector's in-flight bytes budget (given back when
/// dropped, once the request is done).
struct ReadBody {
    bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Reads the body within the body timeout, refusing to hold more than the body limit.
async fn read_body_in_time(collector: &Collector, headers: &HeaderMap, body: Body) -> Result<ReadBody, RequestError> {
    let config = collector.config();
    let budget = &collector.shared.body_bytes;
    match tokio::time::timeout(config.body_timeout, read_body(headers, body, config.max_body_bytes, budget)).await {
        Ok(read) => read,
        Err(_) => {
            counter!("collector_connections_timed_out", "phase" => "body").increment(1);
            Err(RequestError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {} ms", config.body_timeout.as_millis()),
            ))
        }
    }
}

/// First allocation for a body: a declared length is not trusted for more than this.
const FIRST_BODY_ALLOCATION: usize = 4 * 1024;

/// Reads the body, refusing to hold more than `limit` bytes of it. Every byte of buffer it
/// allocates is first taken from `budget`; when the budget has no room, the request is answered
/// 503 `busy`.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<ReadBody, RequestError> {
    let too_large = || {
        RequestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over the limit of {limit} bytes; send fewer events per request"),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let mut buffer = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            RequestError::new(StatusCode::BAD_REQUEST, "body_unreadable", format!("the body could not be read: {e}"))
        })?;
        let needed = buffer.len() + chunk.len();
        if needed > limit {
            return Err(too_large());
        }
        if needed > buffer.capacity() {
            // Grow as the bytes come (doubling, within the limit), paying for the growth first.
            let first = declared.map_or(FIRST_BODY_ALLOCATION, |length| (length as usize).min(FIRST_BODY_ALLOCATION));
            let capacity = needed.max(buffer.capacity() * 2).max(first).min(limit);
            let more = capacity - held.as_ref().map_or(0, |p| p.num_permits());
            let Some(permit) = u32::try_from(more).ok().and_then(|n| budget.clone().try_acquire_many_owned(n).ok())
            else {
                counter!("collector_requests_refused", "reason" => "busy").increment(1);
                return Err(RequestError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "the collector holds as many request bytes as it allows; send again after Retry-After",
                ));
            };
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            buffer.reserve(capacity - buffer.len());
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(ReadBody { bytes: buffer.freeze(), _budget: held })
}

/// One event of the batch as decoded: the event, or why it could not be read.
struct Decoded {
    event: Result<Event, Rejection>,
    /// The event id as far as it could be read (for the answer, even for a malformed event).
    event_id: String,
    /// A `type` given in JSON that this build does not know (it reads as UNSPECIFIED).
    unknown_type: Option<String>,
}

/// How many events one request may hold, and how large each may be.
#[derive(Debug, Clone, Copy)]
struct Limits {
    events: usize,
    event_bytes: usize,
}

impl Limits {
    fn of(collector: &Collector) -> Self {
        let config = collector.config();
        Limits { events: config.max_events_per_request, event_bytes: config.max_event_bytes }
    }

    fn too_many(self) -> RequestError {
        RequestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("the batch holds more than {} events; send fewer events per request", self.events),
        )
    }

    fn too_large(self, index: usize, bytes: usize) -> RequestError {
        RequestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!("event {index} is {bytes} bytes as protobuf; at most {} are accepted", self.event_bytes),
        )
    }
}

/// Counts and measures the events of a binary `EventBatch` from its wire format, before any is
/// decoded: a body of a million empty events is refused without allocating a million events.
/// Whatever does not read as protobuf is left for the decoder to report.
fn check_protobuf_limits(body: &[u8], limits: Limits) -> Result<(), RequestError> {
    /// `EventBatch.events`.
    const EVENTS_FIELD: u64 = 1;
    let mut rest = body;
    let mut events = 0usize;
    while !rest.is_empty() {
        let Ok(key) = prost::encoding::decode_varint(&mut rest) else { return Ok(()) };
        let skip = match key & 0x7 {
            0 => match prost::encoding::decode_varint(&mut rest) {
                Ok(_) => 0,
                Err(_) => return Ok(()),
            },
            1 => 8,
            5 => 4,
            2 => {
                let Ok(length) = prost::encoding::decode_varint(&mut rest) else { return Ok(()) };
                let Ok(length) = usize::try_from(length) else { return Ok(()) };
                if key >> 3 == EVENTS_FIELD {
                    if events == limits.events {
                        return Err(limits.too_many());
                    }
                    if length > limits.event_bytes {
                        return Err(limits.too_large(events, length));
                    }
                    events += 1;
                }
                length
            }
            _ => return Ok(()),
        };
        let Some(after) = rest.get(skip..) else { return Ok(()) };
        rest = after;
    }
    Ok(())
}

fn decode_protobuf(body: &[u8], limits: Limits) -> Result<Vec<Decoded>, RequestError> {
    check_protobuf_limits(body, limits)?;
    let batch = EventBatch::decode(body)
        .map_err(|e| RequestError::malformed(format!("the body is not a binary protobuf events.v1.EventBatch: {e}")))?;
    Ok(batch
        .events
        .into_iter()
        .map(|event| Decoded { event_id: event.event_id.clone(), event: Ok(event), unknown_type: None })
        .collect())
}

/// A JSON batch as first read: its events still as JSON values (at most the limit of them), and
/// every other field.
struct JsonBatch {
    events: Vec<Value>,
    rest: serde_json::Map<String, Value>,
}

/// Reads a [`JsonBatch`], and stops reading `events` past the limit (setting `over_limit`).
struct JsonBatchSeed<'a> {
    max_events: usize,
    over_limit: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonBatchSeed<'_> {
    type Value = JsonBatch;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<JsonBatch, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonBatchSeed<'_> {
    type Value = JsonBatch;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object; send an events.v1.EventBatch: {\"events\": [...]}")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonBatch, A::Error> {
        let mut batch = JsonBatch { events: Vec::new(), rest: serde_json::Map::new() };
        while let Some(key) = map.next_key::<String>()? {
            if key == "events" {
                let seed = EventsSeed { max_events: self.max_events, over_limit: self.over_limit };
                batch.events = map.next_value_seed(seed)?;
            } else {
                batch.rest.insert(key, map.next_value()?);
            }
        }
        Ok(batch)
    }
}

/// `events`: null or an array of at most `max_events` values.
struct EventsSeed<'a> {
    max_events: usize,
    over_limit: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EventsSeed<'_> {
    type Value = Vec<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Value>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EventsSeed<'_> {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("`events` as an array")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<Value>, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut events = Vec::new();
        while let Some(event) = seq.next_element::<Value>()? {
            if events.len() == self.max_events {
                self.over_limit.set(true);
                return Err(serde::de::Error::custom("too many events"));
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// Reads a JSON batch event by event, so that one malformed event is rejected alone instead of
/// failing the whole batch.
fn decode_json(body: &[u8], limits: Limits) -> Result<Vec<Decoded>, RequestError> {
    let over_limit = std::cell::Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = serde::de::DeserializeSeed::deserialize(
        JsonBatchSeed { max_events: limits.events, over_limit: &over_limit },
        &mut deserializer,
    )
    .and_then(|batch| deserializer.end().map(|()| batch));
    let batch = match read {
        Ok(batch) => batch,
        Err(_) if over_limit.get() => return Err(limits.too_many()),
        Err(e) => return Err(RequestError::malformed(format!("the body is not a JSON events.v1.EventBatch: {e}"))),
    };
    // What is left (sentAtMs, fields of later versions) must still read as an EventBatch.
    EventBatch::deserialize(&Value::Object(batch.rest))
        .map_err(|e| RequestError::malformed(format!("the body is not an events.v1.EventBatch: {e}")))?;
    let decoded: Vec<Decoded> = batch.events.iter().map(decode_json_event).collect();
    for (index, event) in decoded.iter().enumerate() {
        if let Ok(event) = &event.event {
            let bytes = event.encoded_len();
            if bytes > limits.event_bytes {
                return Err(limits.too_large(index, bytes));
            }
        }
    }
    Ok(decoded)
}

fn decode_json_event(value: &Value) -> Decoded {
    let field = |camel: &str, snake: &str| value.get(camel).or_else(|| value.get(snake));
    let event_id = field("eventId", "event_id").and_then(Value::as_str).unwrap_or_default().to_owned();
    match Event::deserialize(value) {
        Ok(mut event) => {
            // The generated reader turns an enum number it does not know into 0; a later schema
            // version's value is passed on as its number instead (docs/schema.md).
            let number = |name: &str| value.get(name).and_then(Value::as_i64).and_then(|n| i32::try_from(n).ok());
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
            // Unknown type names and numbers read as UNSPECIFIED (the schema's evolution rule);
            // find them again to say what was wrong.
            let unknown_type = match value.get("type") {
                Some(given) if event.r#type == 0 && !matches!(given, Value::Null) => {
                    let unspecified = given.as_str() == Some("EVENT_TYPE_UNSPECIFIED") || given.as_i64() == Some(0);
                    (!unspecified).then(|| given.to_string())
                }
                _ => None,
            };
            Decoded { event: Ok(event), event_id, unknown_type }
        }
        Err(e) => Decoded {
            event: Err(Rejection::new(RejectCode::MalformedEvent, format!("not an events.v1.Event: {e}"))),
            event_id,
            unknown_type: None,
        },
    }
}

#[derive(Debug, Serialize)]
struct Answer {
    accepted: usize,
    rejected: Vec<Rejected>,
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<Vec<Acked>>,
}

#[derive(Debug, Serialize)]
struct Rejected {
    index: usize,
    event_id: String,
    code: &'static str,
    reason: String,
    retryable: bool,
}

impl Rejected {
    fn new(index: usize, event_id: String, rejection: Rejection) -> Self {
        Rejected {
            index,
            event_id: echoable(event_id),
            code: rejection.code.as_str(),
            retryable: rejection.code.is_retryable(),
            reason: cut(&rejection.reason, MAX_REASON_CHARS),
        }
    }
}

/// The `event_id` of a rejected entry: as sent when it is a valid length, else empty (an id over
/// the limit is never echoed back, so an answer stays small whatever was sent).
fn echoable(event_id: String) -> String {
    if event_id.chars().count() > MAX_EVENT_ID_CHARS { String::new() } else { event_id }
}

#[derive(Debug, Serialize)]
struct Acked {
    index: usize,
    event_id: String,
    shard_id: String,
    sequence_number: String,
    sub_sequence_number: u64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn post_events(
    State(collector): State<Collector>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Cheap checks first, before the body is read: the key, the page's origin, the key's rate.
    let query = match parse_query(query.as_deref()) {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    let app = match presented_key(&headers, &query).and_then(|key| collector.keys().current().authenticate(key)) {
        Ok(app) => app,
        Err(error) => return unauthorized(error),
    };
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| app.allows_origin(o))
    {
        counter!("collector_requests_refused", "reason" => "origin_not_allowed").increment(1);
        return RequestError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this write key does not allow pages of this origin",
        )
        .into_response();
    }
    if let Err(wait) = app.check_rate() {
        return rate_limited(wait);
    }
    let wait = query.wait;
    let format = match format_of(&headers) {
        Ok(format) => format,
        Err(error) => return error.into_response(),
    };
    // The body first, within its timeout: a slow sender holds its connection, not a permit.
    let ReadBody { bytes: body, _budget: budget } = match read_body_in_time(&collector, &headers, body).await {
        Ok(body) => body,
        Err(error) if error.status == StatusCode::REQUEST_TIMEOUT => {
            // The rest of the body may still be on its way; the connection cannot be reused.
            return ([(header::CONNECTION, HeaderValue::from_static("close"))], error).into_response();
        }
        Err(error) if error.status == StatusCode::SERVICE_UNAVAILABLE => {
            let close = [(header::CONNECTION, HeaderValue::from_static("close"))];
            return (close, retry_after(&collector), error).into_response();
        }
        Err(error) => return error.into_response(),
    };
    let Ok(_permit) = collector.shared.requests.try_acquire() else {
        let error = RequestError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_requests",
            "the collector is handling as many requests as it allows; send again after Retry-After",
        );
        return (retry_after(&collector), error).into_response();
    };
    let limits = Limits::of(&collector);
    let decoded = match format {
        Format::Protobuf => decode_protobuf(&body, limits),
        Format::Json => decode_json(&body, limits),
    };
    drop(body);
    // The body's share of the budget is kept until here: the decoded events take about as much.
    drop(budget);
    let events = match decoded {
        Ok(events) => events,
        Err(error) => return error.into_response(),
    };
    if let Err(wait) = app.take(events.len()) {
        return rate_limited(wait);
    }
    take_batch(&collector, &app, events, wait).await
}

/// Validates and puts the events of one batch, as `app`'s; builds the answer.
async fn take_batch(collector: &Collector, app: &App, events: Vec<Decoded>, wait: bool) -> Response {
    let now = now_ms();
    let total = events.len();
    counter!("collector_events_received").increment(total as u64);
    let mut validator = BatchValidator::new(now, collector.config().max_event_age);
    let mut rejected: Vec<Rejected> = Vec::new();
    // The valid events, in batch order, as records, and who they are.
    let mut records: Vec<Record> = Vec::new();
    let mut ids: Vec<Option<(usize, String)>> = Vec::new();
    for (index, decoded) in events.into_iter().enumerate() {
        let Decoded { event, event_id, unknown_type } = decoded;
        let mut event = match event {
            Ok(event) => event,
            Err(rejection) => {
                validator.remember(&event_id);
                rejected.push(Rejected::new(index, event_id, rejection));
                continue;
            }
        };
        let key = match validator.check(&event, unknown_type.as_deref()) {
            Ok(key) => key.to_owned(),
            Err(rejection) => {
                rejected.push(Rejected::new(index, event_id, rejection));
                continue;
            }
        };
        event.received_at_ms = now;
        if let Some(name) = unknown_type.as_deref().and_then(later_type_name) {
            // A later version's type: stored as UNSPECIFIED, its name kept beside.
            event.attributes.insert(UNKNOWN_TYPE_ATTRIBUTE.to_owned(), name.to_owned());
        }
        // The key says which app this is; what the client wrote there does not count.
        app.app_id().clone_into(&mut event.app_id);
        records.push(Record::new(key, event.encode_to_vec()));
        ids.push(Some((index, event_id)));
    }

    // One hand-off for the batch. The producer takes events in order while it has room; from
    // the first it cannot take, every later event is turned away too: taking a later event of a
    // user whose earlier one was turned away would put the earlier one's resend after it on the
    // stream.
    let BatchTaken { receipt, taken, refused } = collector.producer().try_put_batch(records);
    // Set when the producer stops taking records.
    let mut stopped: Option<Rejection> = None;
    for (position, error) in refused {
        let Some((index, event_id)) = ids.get_mut(position).and_then(Option::take) else {
            continue;
        };
        let rejection = match error.kind() {
            PutErrorKind::Full => Rejection::new(
                RejectCode::ProducerFull,
                "the collector is at its limit of events not yet in Kinesis; send again after Retry-After",
            ),
            PutErrorKind::ShutDown { .. } => {
                Rejection::new(RejectCode::ShuttingDown, "the collector is shutting down; send again after Retry-After")
            }
            _ => {
                rejected.push(put_failed(index, event_id, &error));
                continue;
            }
        };
        stopped.get_or_insert_with(|| rejection.clone());
        rejected.push(Rejected::new(index, event_id, rejection));
    }
    let receipts: Vec<(usize, String)> =
        taken.iter().filter_map(|&position| ids.get_mut(position).and_then(Option::take)).collect();
    rejected.sort_by_key(|r| r.index);

    counter!("collector_events_accepted").increment(receipts.len() as u64);
    for entry in &rejected {
        counter!("collector_events_rejected", "reason" => entry.code).increment(1);
    }
    if let Some(rejection) = &stopped
        && let Some(suppressed) = collector.shared.turned_away_warnings.admit()
    {
        // Once per interval at most: under overload this would otherwise be a line per request.
        warn!(
            code = rejection.code.as_str(),
            accepted = receipts.len(),
            rejected = rejected.len(),
            suppressed,
            "turned events away: the producer is not taking records (`suppressed` such warnings since the last; \
             collector_events_rejected counts every event)"
        );
    }

    let taken_count = receipts.len();
    let mut retryable_failures = false;
    let results = if wait {
        let mut acked = Vec::with_capacity(receipts.len());
        for ((index, event_id), result) in receipts.into_iter().zip(receipt.await) {
            match result {
                Ok(outcome) => acked.push(Acked {
                    index,
                    event_id,
                    shard_id: outcome.shard_id().to_owned(),
                    sequence_number: outcome.sequence_number().to_owned(),
                    sub_sequence_number: outcome.sub_sequence_number(),
                }),
                Err(error) => {
                    counter!("collector_events_failed").increment(1);
                    let entry = put_failed(index, event_id, &error);
                    retryable_failures |= entry.retryable;
                    rejected.push(entry);
                }
            }
        }
        rejected.sort_by_key(|r| r.index);
        Some(acked)
    } else {
        if !receipts.is_empty() {
            tokio::spawn(watch_receipts(collector.clone(), receipts, receipt));
        }
        None
    };

    let accepted = results.as_ref().map_or(taken_count, Vec::len);
    let unavailable = stopped.is_some() || (accepted == 0 && retryable_failures);
    debug!(events = total, accepted, rejected = rejected.len(), wait, "batch taken");
    let answer = Json(Answer { accepted, rejected, results });
    if unavailable {
        (StatusCode::SERVICE_UNAVAILABLE, retry_after(collector), answer).into_response()
    } else {
        (StatusCode::OK, answer).into_response()
    }
}

/// A record the producer refused or failed, with the producer's message.
fn put_failed(index: usize, event_id: String, error: &PutError) -> Rejected {
    let mut reason = error.kind().to_string();
    if let Some(last) = error.attempts().last()
        && let Some(code) = &last.error_code
    {
        reason.push_str(&format!(" (last attempt: {code})"));
    }
    // Shut down or not, another instance (or this one, restarted) can take the event.
    let retryable = error.is_retryable() || matches!(error.kind(), PutErrorKind::ShutDown { .. });
    Rejected {
        index,
        event_id: echoable(event_id),
        code: RejectCode::PutFailed.as_str(),
        reason: cut(&reason, MAX_REASON_CHARS),
        retryable,
    }
}

/// Without `?wait=acked` the app has its answer already; a record that fails later is still
/// never dropped silently: every one is counted in `collector_events_failed`, and logged with its
/// event id at most once per interval (with the number of others since the last line).
async fn watch_receipts(collector: Collector, events: Vec<(usize, String)>, receipt: BatchReceipt) {
    for ((_, event_id), result) in events.into_iter().zip(receipt.await) {
        if let Err(error) = result {
            counter!("collector_events_failed").increment(1);
            if let Some(suppressed) = collector.shared.failed_later_warnings.admit() {
                warn!(
                    event_id = %event_id,
                    error = %error.kind(),
                    suppressed,
                    "an accepted event could not be put into Kinesis (`suppressed` others since the last such line; \
                     collector_events_failed counts every one)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::api::NoopKinesis;
    use crate::collector::CollectorConfig;
    use crate::{Producer, ProducerConfig};

    async fn collector() -> Collector {
        let producer =
            Producer::with_api(ProducerConfig::new("s"), Arc::new(NoopKinesis::new(1))).await.expect("starts");
        let keys = crate::collector::Keys::anonymous("test").expect("valid");
        Collector::new(producer, CollectorConfig::default(), keys, None)
    }

    #[tokio::test]
    async fn health_turns_503_once_shutdown_begins() {
        let collector = collector().await;
        assert_eq!(health(State(collector.clone())).await.status(), StatusCode::OK);
        collector.shared.shutting_down.store(true, Ordering::Relaxed);
        assert_eq!(health(State(collector.clone())).await.status(), StatusCode::SERVICE_UNAVAILABLE);
        collector.producer().shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn content_types_are_matched_on_the_media_type_alone() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).expect("header"));
            format_of(&headers).map_err(|e| e.status)
        };
        assert_eq!(with("application/x-protobuf"), Ok(Format::Protobuf));
        assert_eq!(with("application/protobuf"), Ok(Format::Protobuf));
        assert_eq!(with("Application/JSON; charset=utf-8"), Ok(Format::Json));
        assert_eq!(with("text/json"), Err(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        assert_eq!(format_of(&HeaderMap::new()).map_err(|e| e.status), Err(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }

    #[test]
    fn the_query_says_wait_acked_and_the_key() {
        let parsed = |q| parse_query(Some(q)).map_err(|e| e.error);
        assert_eq!(parse_query(None).map_err(|e| e.error), Ok(Query::default()));
        assert_eq!(parsed("trace=1"), Ok(Query::default()));
        assert_eq!(parsed("trace=1&wait=acked"), Ok(Query { wait: true, key: None }));
        assert_eq!(parsed("key=wk_abc&wait=acked"), Ok(Query { wait: true, key: Some("wk_abc") }));
        assert_eq!(parsed("wait="), Err("bad_query"));
        assert_eq!(parsed("wait=all"), Err("bad_query"));
    }

    #[test]
    fn the_header_key_wins_over_the_query_and_must_be_bearer() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
            headers
        };
        let query = Query { wait: false, key: Some("from-query") };
        assert_eq!(presented_key(&HeaderMap::new(), &query), Ok(Some("from-query")));
        assert_eq!(presented_key(&HeaderMap::new(), &Query::default()), Ok(None));
        assert_eq!(presented_key(&with("Bearer from-header"), &query), Ok(Some("from-header")));
        assert_eq!(presented_key(&with("bearer  spaced "), &query), Ok(Some("spaced")));
        assert_eq!(presented_key(&with("Basic dXNlcjpwdw=="), &query), Err(AuthError::Malformed));
        assert_eq!(presented_key(&with("Bearer"), &query), Err(AuthError::Malformed));
        assert_eq!(presented_key(&with("Bearer "), &query), Err(AuthError::Malformed));
    }
}
