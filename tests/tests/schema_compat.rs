//! Old and new clients together (`docs/schema.md`): events that apps built against other versions
//! of `events.v1` send, encoded from those versions' `.proto` files (compiled here by protox and
//! encoded by prost-reflect, as an app's generated code would encode them):
//! - the previous version: a frozen copy in `tests/schemas/`, before `Event.app_id`;
//! - a future version: the current file plus a field in `Event` (two) and in `Geo`, and a value
//!   in each enum, numbered after the highest ones in use.
//!
//! In the pipeline's decode path every one of them decodes, in protobuf and in JSON: fields this
//! build does not know are skipped, enum values it does not know keep their number (or read as
//! UNSPECIFIED when a JSON name is all there is), and none is a dead letter. End to end, they go
//! through the collector (real HTTP, a real producer, LocalStack's Kinesis) and the pipeline into
//! PostgreSQL and S3 (LocalStack), each stored once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::Blob;
use ktk_pipeline::postgres::{PostgresSink, StoreConfig};
use ktk_pipeline::s3::{self, S3Sink, S3SinkConfig, read_events};
use ktk_pipeline::{
    Acknowledge, BatchEnd, DeliveryError, EventEncoding, Pipeline, PipelineConfig, Sink, SinkError, UserRecord,
    decode_event,
};
use ktk_producer::collector::{self, Collector, CollectorConfig, Keys};
use ktk_producer::{Producer, ProducerConfig};
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use ktk_tests::consumer_support::database_url;
use ktk_tests::store_support::unique_table;
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, read_stream, unique_name};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, Value};
use protox::Compiler;
use protox::file::{File, FileResolver};
use serde_json::json;
use sqlx::Row as _;

const PREVIOUS: &str = include_str!("../schemas/events-v1-before-app-id.proto");
const CURRENT: &str = include_str!("../../proto/protos/events/v1/events.proto");
const FILE: &str = "events/v1/events.proto";
const PLAY: i32 = EventType::Play as i32;
const WEB: i32 = Platform::Web as i32;
/// The app the collector's write key names.
const APP: &str = "compat-app";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Serves one `events.v1` source to protox under its usual name.
struct Source(String);

impl FileResolver for Source {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == FILE { File::from_source(name, &self.0) } else { Err(protox::Error::file_not_found(name)) }
    }
}

/// One version of `events.v1`, compiled from its source.
struct Schema {
    pool: DescriptorPool,
}

impl Schema {
    fn compile(source: &str) -> Self {
        let mut compiler = Compiler::with_file_resolver(Source(source.to_owned()));
        compiler.open_file(FILE).expect("the schema version compiles");
        Schema { pool: compiler.descriptor_pool() }
    }

    fn message(&self, name: &str) -> MessageDescriptor {
        self.pool.get_message_by_name(&format!("events.v1.{name}")).expect("the message is in the schema")
    }

    fn highest_field(&self, message: &str) -> u32 {
        self.message(message).fields().map(|f| f.number()).max().expect("the message has fields")
    }

    fn highest_value(&self, name: &str) -> i32 {
        let descriptor = self.pool.get_enum_by_name(&format!("events.v1.{name}")).expect("the enum is in the schema");
        descriptor.values().map(|v| v.number()).max().expect("the enum has values")
    }
}

/// The future version, and the numbers of what it adds.
struct Future {
    schema: Schema,
    /// `Event.future_note` (string) and `Event.future_count` (int64).
    note: u32,
    count: u32,
    /// `Geo.future_city` (string).
    city: u32,
    /// `EVENT_TYPE_FUTURE_ACTION` and `PLATFORM_FUTURE`.
    event_type: i32,
    platform: i32,
}

/// Inserts `lines` at the end of the block that opens with the line `opening`.
fn add_to_block(source: &mut String, opening: &str, lines: &str) {
    let start = source.find(&format!("\n{opening}\n")).unwrap_or_else(|| panic!("no block {opening:?}")) + 1;
    let close = start + source[start..].find("\n}\n").unwrap_or_else(|| panic!("{opening:?} has no end")) + 1;
    source.insert_str(close, lines);
}

impl Future {
    fn new() -> Self {
        let current = Schema::compile(CURRENT);
        let note = current.highest_field("Event") + 1;
        let count = note + 1;
        let city = current.highest_field("Geo") + 1;
        let event_type = current.highest_value("EventType") + 1;
        let platform = current.highest_value("Platform") + 1;
        let mut source = CURRENT.to_owned();
        add_to_block(
            &mut source,
            "message Event {",
            &format!("  string future_note = {note};\n  int64 future_count = {count};\n"),
        );
        add_to_block(&mut source, "message Geo {", &format!("  string future_city = {city};\n"));
        add_to_block(&mut source, "enum EventType {", &format!("  EVENT_TYPE_FUTURE_ACTION = {event_type};\n"));
        add_to_block(&mut source, "enum Platform {", &format!("  PLATFORM_FUTURE = {platform};\n"));
        let schema = Schema::compile(&source);
        assert_eq!(schema.message("Event").get_field_by_name("future_note").map(|f| f.number()), Some(note));
        Future { schema, note, count, city, event_type, platform }
    }
}

fn text(value: &str) -> Value {
    Value::String(value.to_owned())
}

/// An event as an app built against `schema` encodes it; with `future_fields`, it also sets the
/// future version's fields.
fn app_event(
    schema: &Schema,
    id: &str,
    at: i64,
    (event_type, platform): (i32, i32),
    future_fields: bool,
) -> DynamicMessage {
    let mut event = DynamicMessage::new(schema.message("Event"));
    event.set_field_by_name("event_id", text(id));
    event.set_field_by_name("type", Value::EnumNumber(event_type));
    event.set_field_by_name("occurred_at_ms", Value::I64(at));
    event.set_field_by_name("user_id", text(&format!("user-{id}")));
    event.set_field_by_name("device_id", text("device-1"));
    event.set_field_by_name("platform", Value::EnumNumber(platform));
    event.set_field_by_name("content_id", text("c-1"));
    let mut geo = DynamicMessage::new(schema.message("Geo"));
    geo.set_field_by_name("country", text("US"));
    if future_fields {
        geo.set_field_by_name("future_city", text("Reno"));
        event.set_field_by_name("future_note", text("sent by a newer app"));
        event.set_field_by_name("future_count", Value::I64(7));
    }
    event.set_field_by_name("geo", Value::Message(geo));
    event.set_field_by_name("attributes", Value::Map(HashMap::from([(MapKey::String("k".into()), text("v"))])));
    event
}

fn app_batch(schema: &Schema, events: Vec<DynamicMessage>) -> Vec<u8> {
    let mut batch = DynamicMessage::new(schema.message("EventBatch"));
    batch.set_field_by_name("events", Value::List(events.into_iter().map(Value::Message).collect()));
    batch.set_field_by_name("sent_at_ms", Value::I64(now_ms()));
    batch.encode_to_vec()
}

/// The same event as JSON; `extra` fields are added (nested objects merged).
fn app_json(id: &str, at: i64, extra: serde_json::Value) -> serde_json::Value {
    let mut event = json!({
        "eventId": id, "type": "EVENT_TYPE_PLAY", "occurredAtMs": at.to_string(), "userId": format!("user-{id}"),
        "deviceId": "device-1", "platform": "PLATFORM_WEB", "contentId": "c-1", "geo": {"country": "US"},
        "attributes": {"k": "v"},
    });
    for (key, value) in extra.as_object().expect("extra fields are an object") {
        match (event.get_mut(key), value) {
            (Some(serde_json::Value::Object(into)), serde_json::Value::Object(more)) => into.extend(more.clone()),
            _ => {
                event[key.as_str()] = value.clone();
            }
        }
    }
    event
}

/// What the current schema reads from [`app_event`] and [`app_json`].
fn expected(id: &str, at: i64, (event_type, platform): (i32, i32)) -> Event {
    Event {
        event_id: id.to_owned(),
        r#type: event_type,
        occurred_at_ms: at,
        user_id: format!("user-{id}"),
        device_id: "device-1".to_owned(),
        platform,
        content_id: "c-1".to_owned(),
        geo: Some(Geo { country: "US".to_owned(), ..Geo::default() }),
        attributes: HashMap::from([("k".to_owned(), "v".to_owned())]),
        ..Event::default()
    }
}

fn future_json_fields() -> serde_json::Value {
    json!({"futureNote": "sent by a newer app", "futureCount": "7", "geo": {"futureCity": "Reno"}})
}

#[test]
fn events_of_the_previous_and_a_future_schema_decode_in_the_pipeline() {
    let previous = Schema::compile(PREVIOUS);
    let future = Future::new();
    let at = now_ms() - 1_000;
    let decode = |bytes: &[u8]| decode_event(bytes, EventEncoding::Auto);

    // Protobuf from an app on the previous version: the same event.
    let bytes = app_event(&previous, "prev-1", at, (PLAY, WEB), false).encode_to_vec();
    assert_eq!(decode(&bytes), Ok(expected("prev-1", at, (PLAY, WEB))));

    // From an app on the future version: its new fields are skipped (prost keeps no unknown
    // fields, so encoding the event again leaves them out), the rest is the same event.
    let bytes = app_event(&future.schema, "fut-1", at, (PLAY, WEB), true).encode_to_vec();
    let decoded = decode(&bytes).expect("an event with fields of a newer version decodes");
    assert_eq!(decoded, expected("fut-1", at, (PLAY, WEB)));
    let unknown = DynamicMessage::decode(future.schema.message("Event"), decoded.encode_to_vec().as_slice())
        .expect("decodes with the future version");
    assert!(!unknown.has_field_by_number(future.note) && !unknown.has_field_by_number(future.count));
    let geo = unknown.get_field_by_name("geo").expect("geo is set");
    assert!(!geo.as_message().expect("geo is a message").has_field_by_number(future.city));

    // Enum values of the future version keep their numbers.
    let newer = (future.event_type, future.platform);
    let bytes = app_event(&future.schema, "fut-2", at, newer, true).encode_to_vec();
    assert_eq!(decode(&bytes), Ok(expected("fut-2", at, newer)));

    // The reverse: an event of the current version (with app_id, field 25) read by a reader built
    // against the previous one, as a consumer not yet upgraded reads what an upgraded collector
    // wrote: it decodes, and field 25 is an unknown field there.
    let current = Event { app_id: APP.to_owned(), ..expected("cur-1", at, (PLAY, WEB)) };
    let old = DynamicMessage::decode(previous.message("Event"), current.encode_to_vec().as_slice())
        .expect("the previous version reads the current one");
    assert_eq!(old.get_field_by_name("event_id").as_deref(), Some(&text("cur-1")));
    assert_eq!(old.unknown_fields().map(|f| f.number()).collect::<Vec<_>>(), vec![25]);

    // JSON, from an app on the previous version and on the future one.
    let json = |value: serde_json::Value| serde_json::to_vec(&value).expect("JSON");
    assert_eq!(decode(&json(app_json("prev-2", at, json!({})))), Ok(expected("prev-2", at, (PLAY, WEB))));
    assert_eq!(decode(&json(app_json("fut-3", at, future_json_fields()))), Ok(expected("fut-3", at, (PLAY, WEB))));
    // Future enum values as numbers keep them; as names (which have no number here) they read as
    // UNSPECIFIED, and the event is kept.
    let numbers = json!({"type": future.event_type, "platform": future.platform});
    assert_eq!(decode(&json(app_json("fut-4", at, numbers))), Ok(expected("fut-4", at, newer)));
    let names = json!({"type": "EVENT_TYPE_FUTURE_ACTION", "platform": "PLATFORM_FUTURE"});
    assert_eq!(decode(&json(app_json("fut-5", at, names))), Ok(expected("fut-5", at, (0, 0))));
}

/// Never retries: a failing sink fails the test.
struct Once;

impl Acknowledge for Once {
    fn may_retry(&self, _attempt: u32, error: &SinkError, _pause: Duration) -> Result<(), String> {
        Err(error.to_string())
    }

    async fn batch_delivered(&mut self, _end: &BatchEnd) -> Result<(), DeliveryError> {
        Ok(())
    }
}

async fn post(client: &reqwest::Client, url: &str, content_type: &str, body: Vec<u8>) -> serde_json::Value {
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let answer: serde_json::Value = response.json().await.expect("JSON answer");
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_clients_events_are_stored_through_the_collector_and_the_pipeline() {
    let previous = Schema::compile(PREVIOUS);
    let future = Future::new();
    let at = now_ms() - 1_000;
    let newer = (future.event_type, future.platform);

    let kinesis_client = kinesis().await;
    let stream = unique_name("ktk-compat");
    create_stream(&kinesis_client, &stream, 1).await;
    let producer_config = ProducerConfig::new(&stream)
        .with_record_max_buffered_time(Duration::from_millis(20))
        .with_request_timeout(Duration::from_secs(60));
    let producer = Producer::new(producer_config, &aws_config().await).await.expect("producer starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1/events?wait=acked", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let collector = Collector::new(producer, CollectorConfig::default(), Keys::anonymous(APP).expect("keys"), None);
    let server = tokio::spawn(collector::serve(listener, collector, async move {
        let _ = stopped.await;
    }));

    // Apps on either version, in either encoding, with the event types the collector knows.
    let http = reqwest::Client::new();
    let protobuf = "application/x-protobuf";
    let previous_pb: Vec<DynamicMessage> =
        (0..3).map(|i| app_event(&previous, &format!("prev-pb-{i}"), at, (PLAY, WEB), false)).collect();
    // The last one also has a platform the collector does not know: passed on as its number.
    let future_pb: Vec<DynamicMessage> = (0..3)
        .map(|i| {
            let platform = if i == 2 { future.platform } else { WEB };
            app_event(&future.schema, &format!("fut-pb-{i}"), at, (PLAY, platform), true)
        })
        .collect();
    let previous_js: Vec<serde_json::Value> =
        (0..3).map(|i| app_json(&format!("prev-js-{i}"), at, json!({}))).collect();
    let future_js: Vec<serde_json::Value> =
        (0..3).map(|i| app_json(&format!("fut-js-{i}"), at, future_json_fields())).collect();
    let future_js = json!({"events": future_js, "sentAtMs": now_ms().to_string(), "futureBatchField": true});
    let batches = [
        (app_batch(&previous, previous_pb), protobuf),
        (app_batch(&future.schema, future_pb), protobuf),
        (serde_json::to_vec(&json!({ "events": previous_js })).expect("JSON"), "application/json"),
        (serde_json::to_vec(&future_js).expect("JSON"), "application/json"),
    ];
    for (body, content_type) in batches {
        let answer = post(&http, &url, content_type, body).await;
        assert_eq!(answer["accepted"], 3, "{answer}");
        assert_eq!(answer["rejected"], json!([]), "{answer}");
    }
    // Producers that put events on the stream themselves, with the future version's enum values.
    let direct: [(&str, Vec<u8>); 3] = [
        ("fut-direct-pb", app_event(&future.schema, "fut-direct-pb", at, newer, true).encode_to_vec()),
        (
            "fut-direct-number",
            serde_json::to_vec(&app_json(
                "fut-direct-number",
                at,
                json!({"type": future.event_type, "platform": future.platform, "futureNote": "x"}),
            ))
            .expect("JSON"),
        ),
        (
            "fut-direct-name",
            serde_json::to_vec(&app_json(
                "fut-direct-name",
                at,
                json!({"type": "EVENT_TYPE_FUTURE_ACTION", "platform": "PLATFORM_FUTURE"}),
            ))
            .expect("JSON"),
        ),
    ];
    for (id, data) in &direct {
        kinesis_client
            .put_record()
            .stream_name(&stream)
            .partition_key(*id)
            .data(Blob::new(data.clone()))
            .send()
            .await
            .expect("put record");
    }
    let _ = stop.send(());
    server.await.expect("server task").expect("collector");

    // The collector wrote what it read with the current version: stamped, its app, and without
    // the fields it does not know.
    let stored = read_stream(&kinesis_client, &stream).await;
    assert_eq!(stored.len(), 15);
    for record in stored.iter().filter(|r| !r.partition_key.starts_with("fut-direct")) {
        let event = Event::decode(record.data.clone()).expect("the collector writes protobuf events");
        assert_eq!(event.app_id, APP);
        assert!(event.received_at_ms >= at);
        let as_future = DynamicMessage::decode(future.schema.message("Event"), record.data.clone()).expect("decodes");
        assert!(!as_future.has_field_by_number(future.note), "{}", event.event_id);
    }

    // The pipeline delivers every record to PostgreSQL and S3: no dead letter.
    let store = PostgresSink::connect_with(
        &database_url(),
        &unique_table("compat"),
        StoreConfig::default().with_max_connections(2).with_acquire_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap_or_else(|e| panic!("PostgreSQL is not reachable ({e}); start it with localstack/databases.sh"));
    store.migrate().await.expect("migrate");
    let s3_client = s3::client(&aws_config().await, true);
    let bucket = unique_name("ktk-compat");
    s3_client.create_bucket().bucket(&bucket).send().await.unwrap_or_else(|e| panic!("create bucket: {e:?}"));
    let store = Arc::new(store);
    let sinks: Vec<Arc<dyn Sink>> =
        vec![store.clone(), Arc::new(S3Sink::with_client(s3_client.clone(), S3SinkConfig::new(&bucket, "compat")))];
    let pipeline = Pipeline::new(PipelineConfig::default(), sinks).expect("pipeline");
    let mut shard = pipeline.shard(&stream, &stored[0].shard_id);
    let records = stored
        .iter()
        .map(|r| UserRecord {
            sequence_number: r.sequence_number.clone(),
            sub_sequence_number: r.sub_sequence_number,
            partition_key: r.partition_key.clone(),
            data: r.data.clone(),
            arrival: Some(SystemTime::now()),
        })
        .collect();
    shard.process(records, &mut Once).await.expect("delivered");
    shard.flush(&mut Once).await.expect("delivered");
    let stats = pipeline.stats();
    assert_eq!((stats.events_delivered, stats.dead_letters, stats.sink_errors), (15, 0, 0), "{stats:?}");

    // Each event once in the store, with its type and platform: names, a number this build does
    // not know as its digits, a JSON name it does not know as UNSPECIFIED.
    let rows = sqlx::query(&format!(
        "SELECT event_id, event_type, platform, content_id, geo_country FROM \"{}\" ORDER BY event_id",
        store.table()
    ))
    .fetch_all(store.pool())
    .await
    .expect("select");
    let rows: HashMap<String, (String, String, String, String)> = rows
        .iter()
        .map(|row| {
            let text = |c: &str| row.get::<Option<String>, _>(c).unwrap_or_default();
            (text("event_id"), (text("event_type"), text("platform"), text("content_id"), text("geo_country")))
        })
        .collect();
    assert_eq!(rows.len(), 15);
    let play = ("EVENT_TYPE_PLAY".to_owned(), "PLATFORM_WEB".to_owned());
    let digits = (future.event_type.to_string(), future.platform.to_string());
    let future_platform = ("EVENT_TYPE_PLAY".to_owned(), future.platform.to_string());
    let unspecified = ("EVENT_TYPE_UNSPECIFIED".to_owned(), "PLATFORM_UNSPECIFIED".to_owned());
    for (id, (event_type, platform, content, country)) in &rows {
        let want = match id.as_str() {
            "fut-direct-pb" | "fut-direct-number" => &digits,
            "fut-pb-2" => &future_platform,
            "fut-direct-name" => &unspecified,
            _ => &play,
        };
        assert_eq!((event_type, platform), (&want.0, &want.1), "{id}");
        assert_eq!((content.as_str(), country.as_str()), ("c-1", "US"), "{id}");
    }

    // The S3 copy keeps the future enum numbers too.
    let copy = read_events(&s3_client, &bucket, "compat").await.expect("read S3");
    assert_eq!(copy.events.len(), 15);
    let direct = copy.events.iter().find(|r| r.event.event_id == "fut-direct-pb").expect("in S3");
    assert_eq!((direct.event.r#type, direct.event.platform), newer);

    for table in [store.table(), store.dead_letter_table()] {
        sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\"")).execute(store.pool()).await.expect("drop table");
    }
    store.close().await;
    delete_stream(&kinesis_client, &stream).await;
}
