//! The collector (Event API) end to end: a real HTTP server on 127.0.0.1:0, a real producer,
//! LocalStack's Kinesis behind it; what apps send is read back from the stream and decoded.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ktk_producer::collector::{self, Collector, CollectorConfig, Keys};
use ktk_producer::{Producer, ProducerConfig, ProducerStats};
use ktk_proto::events::v1::{Event, EventBatch, EventType, Platform};
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, read_stream, unique_name};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// An event of user `u` (anonymous, keyed by device, when `u` is a multiple of 5).
fn event(id: &str, u: usize) -> Event {
    Event {
        event_id: id.to_owned(),
        r#type: EventType::Play as i32,
        occurred_at_ms: now_ms() - 1_000,
        user_id: if u.is_multiple_of(5) { String::new() } else { format!("user-{u}") },
        device_id: format!("device-{u}"),
        session_id: format!("session-{u}"),
        platform: Platform::Roku as i32,
        content_id: "c-1001".into(),
        content_title: "Evening News".into(),
        position_ms: 42_000,
        ..Event::default()
    }
}

struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<ProducerStats>>,
}

async fn start(producer_config: ProducerConfig, config: CollectorConfig) -> Running {
    let producer = Producer::new(producer_config, &aws_config().await).await.expect("producer starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = oneshot::channel::<()>();
    let keys = Keys::anonymous("e2e-app").expect("valid keys");
    let collector = Collector::new(producer, config, keys, None);
    let server = tokio::spawn(collector::serve(listener, collector, async move {
        let _ = stopped.await;
    }));
    Running { url, stop, server }
}

async fn stop(running: Running) -> ProducerStats {
    let _ = running.stop.send(());
    running.server.await.expect("server task").expect("server")
}

async fn post(client: &reqwest::Client, url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON answer");
    (status, body)
}

/// Events in the stream, decoded, by event id: (partition key, event), and how often each id is there.
async fn events_in(client: &aws_sdk_kinesis::Client, stream: &str) -> (HashMap<String, (String, Event)>, usize) {
    let stored = read_stream(client, stream).await;
    let total = stored.len();
    let mut out = HashMap::new();
    for record in stored {
        let event = Event::decode(record.data.clone()).expect("every record is an events.v1.Event");
        out.insert(event.event_id.clone(), (record.partition_key.clone(), event));
    }
    (out, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_events_reach_the_stream_once_validated_stamped_and_keyed() {
    let kinesis_client = kinesis().await;
    let stream = unique_name("ktk-collector");
    create_stream(&kinesis_client, &stream, 2).await;
    let config = CollectorConfig::default().with_max_body_bytes(64 * 1024);
    let producer_config = ProducerConfig::new(&stream)
        .with_record_max_buffered_time(Duration::from_millis(20))
        .with_request_timeout(Duration::from_secs(60));
    let running = start(producer_config, config).await;
    let http = reqwest::Client::new();
    let events_url = format!("{}/v1/events", running.url);
    let before = now_ms();

    // A protobuf batch, waiting for Kinesis: every event acknowledged with its shard and sequence.
    let batch =
        EventBatch { events: (0..200).map(|i| event(&format!("pb-{i}"), i % 20)).collect(), sent_at_ms: now_ms() };
    let (status, body) =
        post(&http, &format!("{events_url}?wait=acked"), "application/x-protobuf", batch.encode_to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 200, "{body}");
    let results = body["results"].as_array().expect("results with wait=acked");
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|r| r["shard_id"].as_str().is_some_and(|s| s.starts_with("shardId-"))));

    // A JSON batch with one invalid event (no event_id) and one duplicate id: those two rejected.
    let mut json_events: Vec<Value> = (0..50)
        .map(|i| {
            json!({"eventId": format!("js-{i}"), "type": "EVENT_TYPE_PAUSE", "occurredAtMs": (now_ms() - 500).to_string(),
                   "userId": format!("user-{}", i % 7), "deviceId": "d", "platform": "PLATFORM_WEB"})
        })
        .collect();
    json_events[10]["eventId"] = json!("");
    json_events[20]["eventId"] = json!("js-3");
    let (status, body) = post(
        &http,
        &events_url,
        "application/json",
        serde_json::to_vec(&json!({"events": json_events})).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 48, "{body}");
    let rejected: Vec<u64> =
        body["rejected"].as_array().expect("rejected").iter().map(|r| r["index"].as_u64().expect("index")).collect();
    assert_eq!(rejected, vec![10, 20]);

    // Bodies the API cannot read: a reason, and nothing put.
    let (status, body) =
        post(&http, &events_url, "application/x-protobuf", b"\xff\xff\xff not protobuf".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let (status, _) = post(&http, &events_url, "application/json", vec![b' '; 100 * 1024]).await;
    assert_eq!(status, 413);

    let stats = stop(running).await;
    assert_eq!(stats.user_records_put, 248, "{stats:?}");

    let (events, total) = events_in(&kinesis_client, &stream).await;
    delete_stream(&kinesis_client, &stream).await;
    assert_eq!(total, 248, "each accepted event once");
    let expected: HashSet<String> = (0..200)
        .map(|i| format!("pb-{i}"))
        .chain((0..50).filter(|i| *i != 10 && *i != 20).map(|i| format!("js-{i}")))
        .collect();
    assert_eq!(events.keys().cloned().collect::<HashSet<_>>(), expected);
    for (id, (partition_key, event)) in &events {
        assert!(event.received_at_ms >= before && event.received_at_ms <= now_ms(), "{id}: stamped by the collector");
        assert_eq!(event.app_id, "e2e-app", "{id}: the app of the key (anonymous here)");
        let key = if event.user_id.is_empty() { &event.device_id } else { &event.user_id };
        assert_eq!(partition_key, key, "{id}: keyed by user, else device");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_answers_503_and_keeps_what_it_accepted() {
    let kinesis_client = kinesis().await;
    let stream = unique_name("ktk-collector-full");
    create_stream(&kinesis_client, &stream, 1).await;
    // Ten records of room, held for a long buffering time: the eleventh event finds it full.
    let producer_config = ProducerConfig::new(&stream)
        .with_request_timeout(Duration::from_secs(60))
        .with_max_outstanding_records(10)
        .with_record_max_buffered_time(Duration::from_secs(20));
    let running = start(producer_config, CollectorConfig::default()).await;
    let http = reqwest::Client::new();
    let batch = EventBatch { events: (0..25).map(|i| event(&format!("f-{i}"), 1)).collect(), sent_at_ms: now_ms() };
    let response = http
        .post(format!("{}/v1/events", running.url))
        .header("content-type", "application/x-protobuf")
        .body(batch.encode_to_vec())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some(), "tells the app when to retry");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["accepted"], 10, "{body}");
    let rejected = body["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 15);
    assert!(rejected.iter().all(|r| r["retryable"] == true));

    // Shutting down flushes what was accepted.
    let stats = stop(running).await;
    assert_eq!(stats.user_records_put, 10, "{stats:?}");
    let (events, total) = events_in(&kinesis_client, &stream).await;
    delete_stream(&kinesis_client, &stream).await;
    assert_eq!(total, 10);
    assert_eq!(events.keys().cloned().collect::<HashSet<_>>(), (0..10).map(|i| format!("f-{i}")).collect());
}
