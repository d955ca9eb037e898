//! The collector (the Event API) served for real on 127.0.0.1:0, over a producer whose Kinesis is
//! an in-process fake, and called with a real HTTP client. (The same service against LocalStack
//! is tested in `tests/`.) Time is real here: HTTP over sockets does not mix with paused time, so
//! the producer buffers for 10 ms and every wait is bounded.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use ktk_producer::api::{CallError, Entry, EntryResult, KinesisApi, ShardInfo, even_shards};
use ktk_producer::collector::{self, Collector, CollectorConfig, Keys};
use ktk_producer::{Producer, ProducerConfig, ProducerStats};
use ktk_proto::aggregation::Deaggregator;
use ktk_proto::events::v1::{Event, EventBatch, EventType, Platform};
use ktk_proto::keys::effective_hash_key;
use metrics_exporter_prometheus::PrometheusHandle;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// Longest any test waits for anything.
const BOUND: Duration = Duration::from_secs(10);

/// A Kinesis that stores what it is given, and can stall or throttle on cue.
#[derive(Default)]
struct FakeKinesis {
    shards: Vec<ShardInfo>,
    /// (shard, sequence number, entry), in the order stored.
    stored: Mutex<Vec<(String, String, Entry)>>,
    /// While set, calls wait (for `release`) before answering.
    stalled: AtomicBool,
    release: Notify,
    /// While set, every entry fails with a throttling error.
    throttling: AtomicBool,
    calls: AtomicUsize,
    sequence: AtomicU64,
}

impl FakeKinesis {
    fn new(shards: usize) -> Arc<Self> {
        Arc::new(FakeKinesis { shards: even_shards(shards), ..FakeKinesis::default() })
    }

    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    fn unstall(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    /// Every event stored, deaggregated: (shard, sequence number, partition key, event).
    fn events(&self) -> Vec<(String, String, String, Event)> {
        let stored = self.stored.lock().expect("lock");
        let mut out = Vec::new();
        for (shard, sequence, entry) in stored.iter() {
            let records = Deaggregator::new().deaggregate(
                entry.data.clone(),
                &entry.partition_key,
                entry.explicit_hash_key.as_deref(),
            );
            for record in records.records {
                let event = Event::decode(record.data).expect("every record is an events.v1.Event");
                out.push((shard.clone(), sequence.clone(), record.partition_key.to_string(), event));
            }
        }
        out
    }

    fn event_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.events().into_iter().map(|(_, _, _, e)| e.event_id).collect();
        ids.sort();
        ids
    }
}

impl KinesisApi for FakeKinesis {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        entries: Vec<Entry>,
    ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            loop {
                let released = self.release.notified();
                if !self.stalled.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
            if self.throttling.load(Ordering::SeqCst) {
                let throttled = EntryResult::Failed {
                    code: "ProvisionedThroughputExceededException".into(),
                    message: "Rate exceeded for shard".into(),
                };
                return Ok(vec![throttled; entries.len()]);
            }
            let mut stored = self.stored.lock().expect("lock");
            Ok(entries
                .into_iter()
                .map(|entry| {
                    let hash =
                        effective_hash_key(&entry.partition_key, entry.explicit_hash_key.as_deref()).expect("valid");
                    let shard = self.shards.iter().find(|s| s.range.contains(hash)).expect("shards cover the space");
                    let sequence = format!("{:056}", self.sequence.fetch_add(1, Ordering::SeqCst));
                    stored.push((shard.shard_id.clone(), sequence.clone(), entry));
                    EntryResult::Put { shard_id: shard.shard_id.clone(), sequence_number: sequence }
                })
                .collect())
        })
    }

    fn list_shards<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
        Box::pin(async move { Ok(self.shards.clone()) })
    }
}

/// A collector serving on 127.0.0.1:0 until `stop`, with its admin routes on another port.
struct Server {
    base: String,
    admin: String,
    http: reqwest::Client,
    fake: Arc<FakeKinesis>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<ProducerStats>>>,
}

fn producer_config() -> ProducerConfig {
    ProducerConfig::new("events").with_record_max_buffered_time(Duration::from_millis(10))
}

impl Server {
    async fn start(fake: Arc<FakeKinesis>) -> Self {
        Self::start_with(fake, producer_config(), CollectorConfig::default(), None).await
    }

    async fn start_with(
        fake: Arc<FakeKinesis>,
        producer: ProducerConfig,
        config: CollectorConfig,
        prometheus: Option<PrometheusHandle>,
    ) -> Self {
        let keys = Keys::anonymous("test-app").expect("valid");
        Self::start_keyed(fake, producer, config, keys, prometheus).await
    }

    async fn start_keyed(
        fake: Arc<FakeKinesis>,
        producer: ProducerConfig,
        config: CollectorConfig,
        keys: Keys,
        prometheus: Option<PrometheusHandle>,
    ) -> Self {
        let producer = Producer::with_api(producer, fake.clone()).await.expect("producer starts");
        let collector = Collector::new(producer, config, keys, prometheus);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("bound"));
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let admin = format!("http://{}", admin_listener.local_addr().expect("bound"));
        let admin_router = collector.admin_router();
        tokio::spawn(async move { axum::serve(admin_listener, admin_router).await });
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(collector::serve(listener, collector, shutdown));
        let http = reqwest::Client::builder().timeout(BOUND).build().expect("client");
        Server { base, admin, http, fake, stop: Some(stop), task: Some(task) }
    }

    async fn post(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("an answer")
    }

    async fn post_protobuf(&self, path: &str, batch: &EventBatch) -> reqwest::Response {
        self.post(path, "application/x-protobuf", batch.encode_to_vec()).await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.base)).send().await.expect("an answer")
    }

    async fn get_admin(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.admin)).send().await.expect("an answer")
    }

    /// Stops the server the way the binary does on SIGTERM, and returns the producer's stats.
    async fn stop(&mut self) -> ProducerStats {
        let _ = self.stop.take().expect("running").send(());
        let task = self.task.take().expect("running");
        tokio::time::timeout(BOUND, task).await.expect("stops in time").expect("no panic").expect("served")
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as i64
}

fn event(id: &str, user: &str, device: &str) -> Event {
    Event {
        event_id: id.into(),
        r#type: EventType::Play as i32,
        occurred_at_ms: now_ms() - 5_000,
        user_id: user.into(),
        device_id: device.into(),
        platform: Platform::Roku as i32,
        content_id: format!("content-of-{id}"),
        ..Event::default()
    }
}

fn batch(events: Vec<Event>) -> EventBatch {
    EventBatch { events, sent_at_ms: now_ms() }
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON answer")
}

/// The (index, code) pairs of an answer's rejected events.
fn rejected(answer: &Value) -> Vec<(u64, String)> {
    answer["rejected"]
        .as_array()
        .expect("rejected is an array")
        .iter()
        .map(|r| (r["index"].as_u64().expect("index"), r["code"].as_str().expect("code").to_owned()))
        .collect()
}

/// Waits until `condition` holds, at most `BOUND`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_protobuf_batch_is_accepted_stamped_and_keyed_by_user_then_device() {
    let mut server = Server::start(FakeKinesis::new(2)).await;
    let mut sent = vec![event("e-1", "user-1", "device-1"), event("e-2", "", "device-2"), event("e-3", "user-3", "")];
    sent[0].received_at_ms = 1; // whatever the client says is overwritten
    let before = now_ms();
    let response = server.post_protobuf("/v1/events", &batch(sent.clone())).await;
    let after = now_ms();
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await, json!({"accepted": 3, "rejected": []}));

    let stats = server.stop().await;
    assert_eq!((stats.user_records_received, stats.user_records_put), (3, 3), "flushed at shutdown");
    let stored = server.fake.events();
    assert_eq!(stored.len(), 3, "exactly the events sent: {stored:?}");
    for (_, _, key, got) in stored {
        let original = sent.iter().find(|e| e.event_id == got.event_id).expect("an event that was sent");
        assert!(
            (before..=after).contains(&got.received_at_ms),
            "received_at_ms {} is the server's",
            got.received_at_ms
        );
        assert_eq!(got.app_id, "test-app", "the key's app");
        assert_eq!(
            got,
            Event { received_at_ms: got.received_at_ms, app_id: got.app_id.clone(), ..original.clone() },
            "nothing else changed"
        );
        let expected_key = if original.user_id.is_empty() { &original.device_id } else { &original.user_id };
        assert_eq!(&key, expected_key, "partition key of {}", got.event_id);
    }
}

#[tokio::test]
async fn a_json_batch_is_accepted_with_either_field_naming() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let occurred = (now_ms() - 1_000).to_string();
    let body = json!({
        "events": [
            {"eventId": "j-1", "type": "EVENT_TYPE_AD_START", "occurredAtMs": occurred, "userId": "u-1",
             "platform": "PLATFORM_IOS", "adId": "ad-7", "attributes": {"cdn": "edge"}},
            {"event_id": "j-2", "type": 40, "occurred_at_ms": now_ms() - 2_000, "device_id": "d-2", "page": "/home"},
        ],
        "sentAtMs": now_ms().to_string(),
    });
    let response = server.post("/v1/events", "application/json; charset=utf-8", body.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await, json!({"accepted": 2, "rejected": []}));
    // The client's JSON serialization of the generated types is accepted too.
    let response = server
        .http
        .post(format!("{}/v1/events", server.base))
        .json(&batch(vec![event("j-3", "u-3", "d-3")]))
        .send()
        .await
        .expect("an answer");
    assert_eq!(json_of(response).await, json!({"accepted": 1, "rejected": []}));

    server.stop().await;
    let by_id: HashMap<String, (String, Event)> =
        server.fake.events().into_iter().map(|(_, _, key, e)| (e.event_id.clone(), (key, e))).collect();
    assert_eq!(by_id.len(), 3);
    let (key, first) = &by_id["j-1"];
    assert_eq!((key.as_str(), first.r#type(), first.platform()), ("u-1", EventType::AdStart, Platform::Ios));
    assert_eq!((first.ad_id.as_str(), first.attributes["cdn"].as_str()), ("ad-7", "edge"));
    assert_eq!(first.occurred_at_ms.to_string(), occurred);
    let (key, second) = &by_id["j-2"];
    assert_eq!((key.as_str(), second.r#type(), second.page.as_str()), ("d-2", EventType::PageView, "/home"));
    assert!(second.received_at_ms > 0);
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_reason() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let cases: [(&str, Vec<u8>); 5] = [
        ("application/x-protobuf", vec![0x0a, 0xff, 0xff, 0xff]),
        ("application/json", b"{not json".to_vec()),
        ("application/json", b"[1, 2]".to_vec()),
        ("application/json", br#"{"events": 5}"#.to_vec()),
        ("application/json", br#"{"events": [], "sentAtMs": "yesterday"}"#.to_vec()),
    ];
    for (content_type, body) in cases {
        let response = server.post("/v1/events", content_type, body.clone()).await;
        assert_eq!(response.status(), 400, "{content_type} {:?}", String::from_utf8_lossy(&body));
        let answer = json_of(response).await;
        assert_eq!(answer["error"], "malformed_body");
        assert!(answer["reason"].as_str().is_some_and(|r| !r.is_empty()), "{answer}");
    }
    let response = server.post_protobuf("/v1/events?wait=forever", &batch(vec![])).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json_of(response).await["error"], "bad_query");
    server.stop().await;
    assert!(server.fake.events().is_empty());
}

#[tokio::test]
async fn an_oversized_body_is_413_with_or_without_a_content_length() {
    let config = CollectorConfig::default().with_max_body_bytes(1024);
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    let response = server.post("/v1/events", "application/json", vec![b' '; 2048]).await;
    assert_eq!(response.status(), 413);
    let answer = json_of(response).await;
    assert_eq!(answer["error"], "body_too_large");
    assert!(answer["reason"].as_str().is_some_and(|r| r.contains("1024")), "{answer}");
    // Just under the limit is read (and then found malformed).
    let response = server.post("/v1/events", "application/json", vec![b'x'; 1024]).await;
    assert_eq!(response.status(), 400);

    // A chunked body declares no length: the limit holds while it is read.
    let address = server.base.trim_start_matches("http://").to_owned();
    let status_line = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address).expect("connects");
        stream.set_read_timeout(Some(BOUND)).expect("timeout");
        let head = "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        stream.write_all(head.as_bytes()).expect("writes");
        for _ in 0..3 {
            let chunk = format!("{:x}\r\n{}\r\n", 512, " ".repeat(512));
            if stream.write_all(chunk.as_bytes()).is_err() {
                break; // the server may answer and close before the last chunk
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
    })
    .await
    .expect("no panic");
    assert_eq!(status_line, "HTTP/1.1 413 Payload Too Large");
    server.stop().await;
}

#[tokio::test]
async fn other_content_types_are_415() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    for content_type in ["text/html", "application/xml", "multipart/form-data"] {
        let response = server.post("/v1/events", content_type, "{}").await;
        assert_eq!(response.status(), 415, "{content_type}");
        let answer = json_of(response).await;
        assert_eq!(answer["error"], "unsupported_media_type");
        assert!(answer["reason"].as_str().is_some_and(|r| r.contains(content_type)), "{answer}");
    }
    let response = server.http.post(format!("{}/v1/events", server.base)).body("{}").send().await.expect("answer");
    assert_eq!(response.status(), 415, "no content type");
    server.stop().await;
}

#[tokio::test]
async fn invalid_events_are_rejected_alone_with_index_and_reason() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let events = vec![
        event("ok-1", "u", "d"),
        event("", "u", "d"),
        Event { r#type: 0, ..event("no-type", "u", "d") },
        event(&"x".repeat(129), "u", "d"),
        Event { occurred_at_ms: now_ms() - 8 * 86_400_000, ..event("too-old", "u", "d") },
        Event { occurred_at_ms: now_ms() + 2 * 86_400_000, ..event("future", "u", "d") },
        Event { occurred_at_ms: 0, ..event("no-time", "u", "d") },
        event("nobody", "", ""),
        event("ok-2", "", "d"),
    ];
    let response = server.post_protobuf("/v1/events", &batch(events)).await;
    assert_eq!(response.status(), 200);
    let answer = json_of(response).await;
    assert_eq!(answer["accepted"], 2);
    let expected = [
        (1, "missing_event_id"),
        (2, "unspecified_type"),
        (3, "event_id_too_long"),
        (4, "too_old"),
        (5, "occurred_in_future"),
        (6, "missing_occurred_at"),
        (7, "missing_user_and_device"),
    ];
    assert_eq!(rejected(&answer), expected.map(|(i, c)| (i, c.to_owned())));
    let unspecified = &answer["rejected"][1];
    assert_eq!(unspecified["event_id"], "no-type");
    assert_eq!(unspecified["retryable"], false);

    // In JSON, a type that no version can name and an unreadable event are rejected alone as
    // well.
    let body = json!({"events": [
        {"eventId": "j-ok", "type": "EVENT_TYPE_PLAY", "occurredAtMs": now_ms(), "userId": "u"},
        {"eventId": "j-teleport", "type": "teleport", "occurredAtMs": now_ms(), "userId": "u"},
        {"eventId": "j-bad", "type": "EVENT_TYPE_PLAY", "occurredAtMs": "soon", "userId": "u"},
        "not an object",
    ]});
    let answer = json_of(server.post("/v1/events", "application/json", body.to_string()).await).await;
    assert_eq!(answer["accepted"], 1);
    assert_eq!(
        rejected(&answer),
        [(1, "unknown_type".to_owned()), (2, "malformed_event".to_owned()), (3, "malformed_event".to_owned())]
    );
    assert!(answer["rejected"][0]["reason"].as_str().is_some_and(|r| r.contains("teleport")), "{answer}");
    assert_eq!(answer["rejected"][1]["event_id"], "j-bad");

    server.stop().await;
    assert_eq!(server.fake.event_ids(), ["j-ok", "ok-1", "ok-2"]);
}

#[tokio::test]
async fn a_duplicate_event_id_in_a_batch_keeps_the_first() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let first = Event { content_id: "first".into(), ..event("dup", "u", "d") };
    let second = Event { content_id: "second".into(), ..event("dup", "u", "d") };
    let response = server.post_protobuf("/v1/events", &batch(vec![first, event("other", "u", "d"), second])).await;
    assert_eq!(response.status(), 200);
    let answer = json_of(response).await;
    assert_eq!(answer["accepted"], 2);
    assert_eq!(rejected(&answer), [(2, "duplicate_event_id".to_owned())]);
    assert_eq!(answer["rejected"][0]["event_id"], "dup");
    server.stop().await;
    let stored = server.fake.events();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().any(|(_, _, _, e)| e.event_id == "dup" && e.content_id == "first"));
}

#[tokio::test]
async fn wait_acked_reports_shard_and_sequence_numbers() {
    let mut server = Server::start(FakeKinesis::new(4)).await;
    let events: Vec<Event> = (0..6).map(|i| event(&format!("a-{i}"), &format!("user-{i}"), "d")).collect();
    let mut with_invalid = events.clone();
    with_invalid.insert(2, event("", "u", "d"));
    let response = server.post_protobuf("/v1/events?wait=acked", &batch(with_invalid)).await;
    assert_eq!(response.status(), 200);
    let answer = json_of(response).await;
    assert_eq!(answer["accepted"], 6);
    assert_eq!(rejected(&answer), [(2, "missing_event_id".to_owned())]);
    let results = answer["results"].as_array().expect("results with wait=acked");
    assert_eq!(results.len(), 6);
    // Acknowledged means stored: every result names where the fake put that very event.
    let stored = server.fake.events();
    for result in results {
        let id = result["event_id"].as_str().expect("event_id");
        let (shard, sequence, _, _) = stored.iter().find(|(_, _, _, e)| e.event_id == id).expect("stored");
        assert_eq!(result["shard_id"].as_str(), Some(shard.as_str()), "{result}");
        assert_eq!(result["sequence_number"].as_str(), Some(sequence.as_str()), "{result}");
        assert!(result["sub_sequence_number"].is_u64());
    }
    let indices: Vec<u64> = results.iter().map(|r| r["index"].as_u64().expect("index")).collect();
    assert_eq!(indices, [0, 1, 3, 4, 5, 6]);
    server.stop().await;
}

#[tokio::test]
async fn wait_acked_reports_producer_failures_and_is_503_when_nothing_got_in() {
    let fake = FakeKinesis::new(1);
    fake.throttling.store(true, Ordering::SeqCst);
    let producer = producer_config().with_fail_if_throttled(true);
    let config = CollectorConfig::default().with_retry_after(Duration::from_secs(7));
    let mut server = Server::start_with(fake, producer, config, None).await;
    let response = server.post_protobuf("/v1/events?wait=acked", &batch(vec![event("t-1", "u", "d")])).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "7");
    let answer = json_of(response).await;
    assert_eq!(answer["accepted"], 0);
    assert_eq!(answer["results"], json!([]));
    let failed = &answer["rejected"][0];
    assert_eq!((failed["index"].as_u64(), failed["code"].as_str()), (Some(0), Some("put_failed")));
    assert_eq!(failed["retryable"], true);
    let reason = failed["reason"].as_str().expect("reason");
    assert!(reason.contains("throttled") && reason.contains("ProvisionedThroughputExceededException"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn a_full_producer_is_503_with_retry_after_and_lists_what_it_did_not_take() {
    let fake = FakeKinesis::new(1);
    fake.stall();
    let producer = producer_config().with_max_outstanding_records(2);
    let config = CollectorConfig::default().with_retry_after(Duration::from_secs(3));
    let mut server = Server::start_with(fake.clone(), producer, config, None).await;
    let events = vec![
        event("f-0", "u", "d"),
        event("f-1", "v", "d"),
        event("f-2", "u", "d"),
        event("", "u", "d"), // invalid anyway: reported as such, not as producer_full
        event("f-4", "w", "d"),
    ];
    let response = server.post_protobuf("/v1/events", &batch(events)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");
    let answer = json_of(response).await;
    assert_eq!(answer["accepted"], 2, "the events taken before the producer filled up stay taken");
    assert_eq!(
        rejected(&answer),
        [(2, "producer_full".to_owned()), (3, "missing_event_id".to_owned()), (4, "producer_full".to_owned())]
    );
    assert_eq!(answer["rejected"][0]["retryable"], true);
    assert_eq!(answer["rejected"][1]["retryable"], false);
    assert_eq!(answer["rejected"][2]["event_id"], "f-4");

    // Still full: a later request is turned away whole.
    let answer = json_of(server.post_protobuf("/v1/events", &batch(vec![event("f-5", "u", "d")])).await).await;
    assert_eq!((answer["accepted"].as_u64(), rejected(&answer)), (Some(0), vec![(0, "producer_full".to_owned())]));

    fake.unstall();
    let stats = server.stop().await;
    assert_eq!(stats.user_records_put, 2);
    assert_eq!(fake.event_ids(), ["f-0", "f-1"]);
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_are_503_once_their_body_has_arrived() {
    let fake = FakeKinesis::new(1);
    fake.stall();
    let config = CollectorConfig::default().with_max_concurrent_requests(1);
    let mut server = Server::start_with(fake.clone(), producer_config(), config, None).await;
    // The first request holds the only permit while it waits for Kinesis.
    let first = {
        let (http, url) = (server.http.clone(), format!("{}/v1/events?wait=acked", server.base));
        let body = batch(vec![event("c-1", "u", "d")]).encode_to_vec();
        tokio::spawn(
            async move { http.post(url).header("content-type", "application/x-protobuf").body(body).send().await },
        )
    };
    eventually("the first request to reach Kinesis", || fake.calls.load(Ordering::SeqCst) > 0).await;
    let response = server.post_protobuf("/v1/events", &batch(vec![event("c-2", "u", "d")])).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(json_of(response).await["error"], "too_many_requests");

    fake.unstall();
    let first = tokio::time::timeout(BOUND, first).await.expect("in time").expect("no panic").expect("answer");
    assert_eq!(first.status(), 200);
    assert_eq!(json_of(first).await["accepted"], 1);
    server.stop().await;
    assert_eq!(fake.event_ids(), ["c-1"]);
}

#[tokio::test]
async fn health_is_ok_while_serving() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let response = server.get("/health").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await, json!({"status": "ok"}));
    server.stop().await;
    // Stopped: the listener is closed.
    assert!(server.http.get(format!("{}/health", server.base)).send().await.is_err());
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    // The only test in this binary that installs a global recorder, as the binary's main does.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("no other test installs a recorder");
    let mut server =
        Server::start_with(FakeKinesis::new(1), producer_config(), CollectorConfig::default(), Some(handle)).await;
    let events = vec![event("m-1", "u", "d"), event("", "u", "d")];
    assert_eq!(server.post_protobuf("/v1/events", &batch(events)).await.status(), 200);

    assert_eq!(server.get("/metrics").await.status(), 404, "metrics are not on the public listener");
    let response = server.get_admin("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("ascii").to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.expect("text");
    for expected in [
        "collector_events_received ",
        "collector_events_accepted ",
        "collector_events_rejected{reason=\"missing_event_id\"}",
        "collector_request_duration_seconds",
        "route=\"/v1/events\"",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    server.stop().await;

    // Without a handle there is nothing to render.
    let mut bare = Server::start(FakeKinesis::new(1)).await;
    assert_eq!(bare.get_admin("/metrics").await.status(), 404);
    bare.stop().await;
}

// The collector as a public edge: slow, idle and oversized clients are bounded.

/// Reads from `stream` until it closes (or `BOUND` passes); returns what was read.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(BOUND, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server did not close the connection within {BOUND:?}");
    answer
}

fn address_of(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn slow_clients_do_not_lock_out_valid_ones() {
    use tokio::io::AsyncWriteExt;
    // Fewer request permits than slow clients: a client still sending its body holds none.
    let config = CollectorConfig::default().with_max_concurrent_requests(4).with_max_connections(1000);
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    let address = address_of(&server);
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connects");
        let head = if i % 2 == 0 {
            // Headers at once, then a body of 1,000 bytes one byte a second.
            "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        } else {
            // Headers one byte a second.
            "P"
        };
        stream.write_all(head.as_bytes()).await.expect("writes");
        slow.push(stream);
    }
    let drip = tokio::spawn(async move {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for stream in &mut slow {
                let _ = stream.write_all(b"O").await;
            }
        }
        slow
    });
    // Meanwhile valid requests are answered, each quickly.
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let sent = std::time::Instant::now();
        let events = batch(vec![event(&format!("v-{answered}"), "u", "d")]);
        let response = server.post_protobuf("/v1/events", &events).await;
        assert_eq!(response.status(), 200, "a valid request while 300 slow clients are held");
        assert!(sent.elapsed() < Duration::from_secs(1), "answered in {:?}", sent.elapsed());
        answered += 1;
    }
    assert!(answered >= 20, "only {answered} valid requests answered in 3 s");
    let slow = drip.await.expect("no panic");
    assert_eq!(slow.len(), 300);
    drop(slow);
    server.stop().await;
    assert_eq!(server.fake.event_ids().len(), answered);
}

#[tokio::test]
async fn a_slow_head_is_disconnected_and_a_slow_body_answered_408() {
    use tokio::io::AsyncWriteExt;
    let config = CollectorConfig::default()
        .with_header_timeout(Duration::from_millis(500))
        .with_body_timeout(Duration::from_millis(500));
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    let address = address_of(&server);

    // Half a head, then nothing: closed without an answer.
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connects");
    stream.write_all(b"POST /v1/events HTTP/1.1\r\nHost: te").await.expect("writes");
    assert!(read_until_closed(&mut stream).await.is_empty());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "closed after {took:?}");

    // A connection that sends nothing at all: the same.
    let mut silent = tokio::net::TcpStream::connect(&address).await.expect("connects");
    assert!(read_until_closed(&mut silent).await.is_empty());

    // A whole head and part of the body: 408, and the connection closed.
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connects");
    let head =
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.expect("writes");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = CollectorConfig::default()
        .with_idle_timeout(Duration::from_millis(700))
        .with_header_timeout(Duration::from_secs(5));
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    let mut stream = tokio::net::TcpStream::connect(address_of(&server)).await.expect("connects");
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n").await.expect("writes");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("{\"status\":\"ok\"}") {
        let n = tokio::time::timeout(BOUND, stream.read(&mut buffer)).await.expect("in time").expect("reads");
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buffer[..n]);
    }
    // Kept alive after the answer, then closed once idle for the idle timeout (not the header
    // timeout of 5 s).
    let answered = std::time::Instant::now();
    assert!(read_until_closed(&mut stream).await.is_empty());
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(600) && idle < Duration::from_secs(3), "closed after {idle:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_million_empty_events_are_413_with_a_small_answer() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    // 524,280 empty events: 2 bytes each (field 1, length 0), just under the 1 MiB body limit.
    let body: Vec<u8> = [0x0a_u8, 0x00].repeat(524_280);
    assert!(body.len() <= 1024 * 1024);
    let response = server.post("/v1/events", "application/x-protobuf", body).await;
    assert_eq!(response.status(), 413);
    let answer = response.bytes().await.expect("a body");
    assert!(answer.len() < 300, "{} bytes", answer.len());
    let answer: Value = serde_json::from_slice(&answer).expect("JSON");
    assert_eq!(answer["error"], "too_many_events");

    // Exactly at the cap is read; one more is not. JSON too.
    let at_cap = [0x0a_u8, 0x00].repeat(500);
    let response = server.post("/v1/events", "application/x-protobuf", at_cap).await;
    assert_eq!(response.status(), 200);
    assert_eq!(rejected(&json_of(response).await).len(), 500);
    let over = format!("{{\"events\": [{}{{}}]}}", "{},".repeat(500));
    let response = server.post("/v1/events", "application/json", over).await;
    assert_eq!(response.status(), 413);
    assert_eq!(json_of(response).await["error"], "too_many_events");
    server.stop().await;
    assert!(server.fake.events().is_empty());
}

#[tokio::test]
async fn a_long_event_id_or_value_is_never_echoed() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    let long_id = "x".repeat(10_000);
    let response = server.post_protobuf("/v1/events", &batch(vec![event(&long_id, "u", "d")])).await;
    assert_eq!(response.status(), 200);
    let answer = response.text().await.expect("a body");
    assert!(answer.len() < 400 && !answer.contains("xxxxxxxxxx"), "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(rejected(&answer), [(0, "event_id_too_long".to_owned())]);

    // An event over the event size limit: the whole request is 413, compactly.
    let huge = event(&"y".repeat(500_000), "u", "d"); // twice over: content_id repeats the id
    let response = server.post_protobuf("/v1/events", &batch(vec![huge])).await;
    assert_eq!(response.status(), 413);
    let answer = response.text().await.expect("a body");
    assert!(answer.len() < 300 && answer.contains("event_too_large"), "{answer}");

    // JSON values quoted by a reason are cut.
    let long = "z".repeat(20_000);
    let body = json!({"events": [
        {"eventId": "t", "type": format!("EVENT_TYPE_{long}"), "occurredAtMs": now_ms(), "userId": "u"},
        {"eventId": "o", "type": "EVENT_TYPE_PLAY", "occurredAtMs": long, "userId": "u"},
    ]});
    let response = server.post("/v1/events", "application/json", body.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer = response.text().await.expect("a body");
    assert!(answer.len() < 1000 && !answer.contains(&"z".repeat(300)), "{} bytes: {answer:.500}", answer.len());
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(rejected(&answer), [(0, "unknown_type".to_owned()), (1, "malformed_event".to_owned())]);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_an_open_request_finish_and_flushes() {
    let fake = FakeKinesis::new(1);
    fake.stall();
    let mut server = Server::start_with(fake.clone(), producer_config(), CollectorConfig::default(), None).await;
    let open = {
        let (http, url) = (server.http.clone(), format!("{}/v1/events?wait=acked", server.base));
        let body = batch(vec![event("s-1", "u", "d")]).encode_to_vec();
        tokio::spawn(
            async move { http.post(url).header("content-type", "application/x-protobuf").body(body).send().await },
        )
    };
    eventually("the request to reach Kinesis", || fake.calls.load(Ordering::SeqCst) > 0).await;
    let _ = server.stop.take().expect("running").send(());
    // No new connections once shutdown has begun: the listener closes within the bound (polled,
    // each attempt on a fresh connection).
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let attempt = reqwest::Client::new().get(format!("{}/health", server.base)).send().await;
        if attempt.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new connections still served after shutdown began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fake.unstall();
    let open = tokio::time::timeout(BOUND, open).await.expect("in time").expect("no panic").expect("answer");
    assert_eq!(open.status(), 200);
    let task = server.task.take().expect("running");
    let stats = tokio::time::timeout(BOUND, task).await.expect("stops").expect("no panic").expect("served");
    assert_eq!(stats.user_records_put, 1);
    assert_eq!(fake.event_ids(), ["s-1"]);
}

// Write keys, per-key rates, CORS, the admin listener, and clients that never read.

const WEB_KEY: &str = "wk_web_0123456789abcdef";
const TV_KEY: &str = "wk_firetv_0123456789abcdef";
const PAGE: &str = "https://tv.example.com";

/// Two apps: a web one for `PAGE` and a Fire TV one at 10 events/s (burst 10); no anonymous.
fn two_apps() -> Keys {
    Keys::from_json(
        &json!({"keys": [
            {"app_id": "tv-web", "key": WEB_KEY, "origins": [PAGE, "https://*.example.org"]},
            {"app_id": "tv-firetv", "key": TV_KEY, "events_per_second": 10, "burst": 10},
        ]})
        .to_string(),
    )
    .expect("valid")
}

async fn keyed_server(keys: Keys) -> Server {
    Server::start_keyed(FakeKinesis::new(1), producer_config(), CollectorConfig::default(), keys, None).await
}

impl Server {
    fn events_request(&self, query: &str, events: &EventBatch) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/events{query}", self.base))
            .header("content-type", "application/x-protobuf")
            .body(events.encode_to_vec())
    }
}

#[tokio::test]
async fn a_write_key_is_required_and_names_the_app_of_its_events() {
    let mut server = keyed_server(two_apps()).await;
    let one = |id: &str| batch(vec![event(id, "u", "d")]);

    for (request, code) in [
        (server.events_request("", &one("x-1")), "missing_key"),
        (server.events_request("", &one("x-2")).bearer_auth("wk_bogus_0123456789abcdef"), "unknown_key"),
        (
            server.events_request("", &one("x-3")).header("authorization", format!("Basic {WEB_KEY}")),
            "bad_authorization",
        ),
        (server.events_request("?key=wk_bogus_0123456789abcdef", &one("x-4")), "unknown_key"),
    ] {
        let response = request.send().await.expect("an answer");
        assert_eq!(response.status(), 401, "{code}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"events\"");
        let answer = json_of(response).await;
        assert_eq!(answer["error"], code);
        assert!(!answer.to_string().contains("wk_bogus"), "a key is never echoed: {answer}");
    }

    // The header, or the query parameter (navigator.sendBeacon cannot set headers).
    let mut spoofed = event("w-1", "u", "d");
    spoofed.app_id = "someone-else".into();
    let by_header = server.events_request("", &batch(vec![spoofed])).bearer_auth(WEB_KEY).send().await.expect("answer");
    assert_eq!(by_header.status(), 200);
    let by_query = server.events_request(&format!("?key={TV_KEY}"), &one("t-1")).send().await.expect("answer");
    assert_eq!(by_query.status(), 200);

    server.stop().await;
    let apps: HashMap<String, String> =
        server.fake.events().into_iter().map(|(_, _, _, e)| (e.event_id, e.app_id)).collect();
    assert_eq!(
        apps,
        HashMap::from([("w-1".to_owned(), "tv-web".to_owned()), ("t-1".to_owned(), "tv-firetv".to_owned())]),
        "only the keyed events got in, each with its key's app (the client's app_id replaced)"
    );
}

#[tokio::test]
async fn a_key_over_its_rate_is_429_with_retry_after_and_others_are_not_slowed() {
    let mut server = keyed_server(two_apps()).await;
    let events = |prefix: &str, n: usize| batch((0..n).map(|i| event(&format!("{prefix}-{i}"), "u", "d")).collect());

    // 10 events/s, burst 10: a batch of 12 empties the bucket, and the next request is refused.
    let first = server.events_request("", &events("a", 12)).bearer_auth(TV_KEY).send().await.expect("answer");
    assert_eq!(first.status(), 200);
    let refused = server.events_request("", &events("b", 1)).bearer_auth(TV_KEY).send().await.expect("answer");
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(json_of(refused).await["error"], "rate_limited");
    // Another key is not held back by it.
    let other = server.events_request("", &events("c", 50)).bearer_auth(WEB_KEY).send().await.expect("answer");
    assert_eq!(other.status(), 200);
    // After Retry-After the key sends again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let again = server.events_request("", &events("d", 1)).bearer_auth(TV_KEY).send().await.expect("answer");
    assert_eq!(again.status(), 200);

    server.stop().await;
    let ids = server.fake.event_ids();
    assert_eq!(ids.len(), 12 + 50 + 1, "the refused request put nothing in");
    assert!(!ids.contains(&"b-0".to_owned()));
}

#[tokio::test]
async fn pages_of_allowed_origins_get_cors_answers_and_others_do_not() {
    let mut server = keyed_server(two_apps()).await;
    let preflight = |origin: &str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/events", server.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };

    for origin in [PAGE, "https://www.example.org"] {
        let answer = preflight(origin).await.expect("an answer");
        assert_eq!(answer.status(), 204, "{origin}");
        let headers = answer.headers();
        assert_eq!(headers["access-control-allow-origin"], origin);
        assert_eq!(headers["access-control-allow-methods"], "POST");
        let allowed = headers["access-control-allow-headers"].to_str().expect("ascii");
        assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
        assert!(headers.contains_key("access-control-max-age"));
        assert!(headers.get_all("vary").iter().any(|v| v.to_str().is_ok_and(|v| v.contains("origin"))));
    }
    let evil = preflight("https://evil.example.net").await.expect("an answer");
    assert_eq!(evil.status(), 403);
    assert!(!evil.headers().contains_key("access-control-allow-origin"));

    // The real request from the page: CORS headers on the 200, and on errors (the page reads them).
    let page_post = |key: &str, id: &str| {
        server.events_request("", &batch(vec![event(id, "u", "d")])).header("origin", PAGE).bearer_auth(key).send()
    };
    let ok = page_post(WEB_KEY, "p-1").await.expect("an answer");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["access-control-allow-origin"], PAGE);
    assert_eq!(ok.headers()["access-control-expose-headers"], "retry-after");
    let unknown = page_post("wk_bogus_0123456789abcdef", "p-2").await.expect("an answer");
    assert_eq!(unknown.status(), 401);
    assert_eq!(unknown.headers()["access-control-allow-origin"], PAGE);
    // The Fire TV key does not list the page: refused, though the preflight (any key) passed.
    let wrong_key = page_post(TV_KEY, "p-3").await.expect("an answer");
    assert_eq!(wrong_key.status(), 403);
    assert_eq!(json_of(wrong_key).await["error"], "origin_not_allowed");
    // A simple request (no preflight, as sendBeacon's text/plain) from a page no key allows is
    // refused before its events are read.
    let beacon = server
        .http
        .post(format!("{}/v1/events?key={WEB_KEY}", server.base))
        .header("origin", "https://evil.example.net")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(json!({"events": [{"eventId": "p-4", "type": "EVENT_TYPE_PLAY", "occurredAtMs": now_ms(), "deviceId": "d"}]}).to_string())
        .send()
        .await
        .expect("an answer");
    assert_eq!(beacon.status(), 403);
    assert!(!beacon.headers().contains_key("access-control-allow-origin"));
    // The same beacon from the page is taken (text/plain is read as JSON).
    let beacon = server
        .http
        .post(format!("{}/v1/events?key={WEB_KEY}", server.base))
        .header("origin", PAGE)
        .header("content-type", "text/plain;charset=UTF-8")
        .body(json!({"events": [{"eventId": "p-5", "type": "EVENT_TYPE_PLAY", "occurredAtMs": now_ms(), "deviceId": "d"}]}).to_string())
        .send()
        .await
        .expect("an answer");
    assert_eq!(beacon.status(), 200);

    server.stop().await;
    let mut ids = server.fake.event_ids();
    ids.sort();
    assert_eq!(ids, ["p-1", "p-5"]);
}

#[tokio::test]
async fn replaced_keys_take_effect_on_the_next_request() {
    let keys = two_apps();
    let mut server = keyed_server(keys.clone()).await;
    let one = |id: &str| batch(vec![event(id, "u", "d")]);
    assert_eq!(server.events_request("", &one("r-1")).bearer_auth(WEB_KEY).send().await.expect("answer").status(), 200);
    keys.replace(
        ktk_producer::collector::KeySet::from_json(&json!({"anonymous": {"app_id": "open"}}).to_string())
            .expect("valid"),
    );
    let revoked = server.events_request("", &one("r-2")).bearer_auth(WEB_KEY).send().await.expect("answer");
    assert_eq!(revoked.status(), 401, "a removed key is refused at once");
    assert_eq!(server.events_request("", &one("r-3")).send().await.expect("answer").status(), 200, "anonymous now");
    server.stop().await;
    let apps: HashMap<String, String> =
        server.fake.events().into_iter().map(|(_, _, _, e)| (e.event_id, e.app_id)).collect();
    assert_eq!(apps, HashMap::from([("r-1".to_owned(), "tv-web".to_owned()), ("r-3".to_owned(), "open".to_owned())]));
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_disconnected_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = CollectorConfig::default().with_write_timeout(Duration::from_secs(1));
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    // 500 events without an id: each answer lists 500 rejections (about 60 KB).
    let body = batch(vec![Event::default(); 500]).encode_to_vec();
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut one = request.into_bytes();
    one.extend_from_slice(&body);
    // A small receive buffer, and 400 pipelined requests (24 MB of answers) that are never read.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let mut stream = socket.connect(address_of(&server).parse().expect("address")).await.expect("connects");
    let (mut reader, mut writer) = stream.split();
    let sending = async {
        for _ in 0..400 {
            if writer.write_all(&one).await.is_err() {
                break; // the server dropped the connection
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(8), sending).await;
    // Well past the write timeout, the connection is gone: reading drains what was buffered, then ends.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut answers = Vec::new();
    let drained = tokio::time::timeout(BOUND, async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was still open {BOUND:?} after the write timeout");
    let answered = answers.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(answered < 400, "the server stopped writing to a client that does not read ({answered} answers)");
    // The server serves others all along.
    let response = server.post_protobuf("/v1/events", &batch(vec![event("after", "u", "d")])).await;
    assert_eq!(response.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn admin_health_reports_the_keys_and_the_public_listener_has_no_metrics() {
    let mut server = keyed_server(two_apps()).await;
    let health = server.get_admin("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(
        json_of(health).await,
        json!({"status": "ok", "keys": 2, "anonymous": false, "keys_reload_error": null})
    );
    assert_eq!(server.get("/metrics").await.status(), 404);
    assert_eq!(json_of(server.get("/health").await).await, json!({"status": "ok"}));
    server.stop().await;
}

#[tokio::test]
async fn bodies_in_flight_share_one_memory_budget_counted_as_bytes_arrive() {
    use tokio::io::AsyncWriteExt;
    // 20,000 bytes for every body being read; the body limit stays 1 MiB.
    let config = CollectorConfig::default().with_max_body_bytes_in_flight(20_000);
    let mut server = Server::start_with(FakeKinesis::new(1), producer_config(), config, None).await;
    let address = address_of(&server);
    let head = "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000000\r\n\r\n";
    // A valid request of about 1.5 KB.
    let valid = |id: &str| {
        batch(
            (0..10)
                .map(|i| Event { content_title: "x".repeat(100), ..event(&format!("{id}-{i}"), "u", "d") })
                .collect(),
        )
    };
    assert!(valid("v").encode_to_vec().len() > 1200);

    // Four clients that declare 1 MB and send a byte: what they declared is not reserved (they
    // hold 4 KiB each), so a valid request still gets through.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connects");
        stream.write_all(head.as_bytes()).await.expect("writes");
        stream.write_all(&[0x0a]).await.expect("writes");
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = server.post_protobuf("/v1/events", &valid("a")).await;
    assert_eq!(ok.status(), 200, "four one-byte bodies hold 4 x 4 KiB");
    drop(slow);

    // A client that has sent 19,000 bytes of its body holds most of the budget: a request that
    // needs room now is answered 503 busy with Retry-After.
    let mut heavy = tokio::net::TcpStream::connect(&address).await.expect("connects");
    heavy.write_all(head.as_bytes()).await.expect("writes");
    heavy.write_all(&[0u8; 19_000]).await.expect("writes");
    let busy = async {
        loop {
            let response = server.post_protobuf("/v1/events", &valid("b")).await;
            if response.status() == 503 {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let response = tokio::time::timeout(BOUND, busy).await.expect("the budget runs out");
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json_of(response).await["error"], "busy");
    // Once it is gone, the budget is back.
    drop(heavy);
    let back = async {
        loop {
            let response = server.post_protobuf("/v1/events", &valid("c")).await;
            if response.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(BOUND, back).await.expect("the budget comes back");
    server.stop().await;
    let ids = server.fake.event_ids();
    assert_eq!(ids.len(), 20, "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("a-") || id.starts_with("c-")), "{ids:?}");
}

#[tokio::test]
async fn a_type_or_platform_of_a_later_schema_version_is_taken_and_passed_on() {
    let mut server = Server::start(FakeKinesis::new(1)).await;
    // Binary protobuf: the numbers as sent.
    let newer = Event { r#type: 61, platform: 16, ..event("p-new", "u", "d") };
    let answer = json_of(server.post_protobuf("/v1/events", &batch(vec![newer])).await).await;
    assert_eq!(answer, json!({"accepted": 1, "rejected": []}));
    // JSON numbers: kept as numbers (the generated reader would make them 0). A JSON name of a
    // later version: stored as UNSPECIFIED with the name in an attribute.
    let body = json!({"events": [
        {"eventId": "j-new", "type": 62, "platform": 17, "occurredAtMs": now_ms(), "userId": "u"},
        {"eventId": "j-zero", "type": 0, "occurredAtMs": now_ms(), "userId": "u"},
        {"eventId": "j-named", "type": "EVENT_TYPE_WATCH_PARTY_JOIN", "occurredAtMs": now_ms(), "userId": "u"},
    ]});
    let answer = json_of(server.post("/v1/events", "application/json", body.to_string()).await).await;
    assert_eq!(answer["accepted"], 2);
    assert_eq!(rejected(&answer), [(1, "unspecified_type".to_owned())]);
    server.stop().await;
    let stored: HashMap<String, Event> =
        server.fake.events().into_iter().map(|(_, _, _, e)| (e.event_id.clone(), e)).collect();
    let types: HashMap<&str, (i32, i32)> = stored.iter().map(|(id, e)| (id.as_str(), (e.r#type, e.platform))).collect();
    assert_eq!(types, HashMap::from([("p-new", (61, 16)), ("j-new", (62, 17)), ("j-named", (0, 0))]));
    assert_eq!(
        stored["j-named"].attributes.get(collector::UNKNOWN_TYPE_ATTRIBUTE).map(String::as_str),
        Some("EVENT_TYPE_WATCH_PARTY_JOIN")
    );
    assert!(stored["j-new"].attributes.is_empty());
}
