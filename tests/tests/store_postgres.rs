//! The PostgreSQL sink against a real PostgreSQL: `DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test` (`localstack/databases.sh` starts one). A database
//! that is not there fails the tests, with what to start. Each test has tables of its own.

use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use ktk_pipeline::postgres::{PostgresSink, StoreConfig};
use ktk_pipeline::{DeadLetter, Sink, SinkReport};
use ktk_proto::events::v1::{Event, EventType, Geo};
use ktk_tests::consumer_support::database_url;
use ktk_tests::store_support::{RowReader, batch, event, ms, unique_table};
use sqlx::Row;
use sqlx::postgres::PgRow;

fn config() -> StoreConfig {
    StoreConfig::default().with_max_connections(2).with_acquire_timeout(Duration::from_secs(5))
}

/// A sink on a fresh table, migrated; panics with what to do if PostgreSQL is not there.
async fn sink(tag: &str) -> PostgresSink {
    let url = database_url();
    let sink = PostgresSink::connect_with(&url, &unique_table(tag), config()).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is not reachable at {url} ({e}); start it with localstack/databases.sh or set DATABASE_URL")
    });
    sink.migrate().await.expect("migrate");
    sink
}

async fn drop_tables(sink: &PostgresSink) {
    for table in [sink.table(), sink.dead_letter_table()] {
        sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\"")).execute(sink.pool()).await.expect("drop table");
    }
    sink.close().await;
}

async fn count(sink: &PostgresSink, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(sink.pool()).await.expect("count")
}

fn text(row: &PgRow, column: &str) -> String {
    row.get::<Option<String>, _>(column).unwrap_or_default()
}

/// Reads an event back from its typed columns, the way a reader of the table would.
async fn read_back(sink: &PostgresSink, event_id: &str) -> (Event, PgRow) {
    let millis = |c: &str| format!("(EXTRACT(EPOCH FROM \"{c}\") * 1000)::int8 AS \"{c}_ms\"");
    let sql = format!(
        "SELECT *, {}, {}, {}, attributes::text AS attributes_text FROM \"{}\" WHERE event_id = $1",
        millis("occurred_at"),
        millis("received_at"),
        millis("arrival"),
        sink.table()
    );
    let row = sqlx::query(&sql).bind(event_id).fetch_one(sink.pool()).await.expect("the event is stored");
    let event = RowReader {
        text: &|c| text(&row, c),
        int: &|c| row.get::<Option<i64>, _>(c),
        float: &|c| row.get::<Option<f64>, _>(c),
    }
    .event();
    (event, row)
}

#[tokio::test]
async fn writes_a_batch_once_and_reports_it_again_as_duplicates() {
    let sink = sink("once").await;
    let batch = batch((0..100).map(event));
    assert_eq!(sink.write(&batch).await.expect("write"), SinkReport { written: 100, duplicates: 0, reread: 0 });
    assert_eq!(sink.write(&batch).await.expect("write again"), SinkReport { written: 0, duplicates: 100, reread: 100 });
    assert_eq!(count(&sink, &sink.table()).await, 100);
    drop_tables(&sink).await;
}

#[tokio::test]
async fn an_overlapping_batch_writes_only_the_new_events() {
    let sink = sink("overlap").await;
    assert_eq!(
        sink.write(&batch((0..60).map(event))).await.expect("write"),
        SinkReport { written: 60, duplicates: 0, reread: 0 }
    );
    // 40..120 overlaps 40..60; event 100 is in it twice (a producer retry inside one batch).
    let overlapping = batch((40..120).map(event).chain([event(100)]));
    assert_eq!(sink.write(&overlapping).await.expect("write"), SinkReport { written: 60, duplicates: 21, reread: 0 });
    assert_eq!(count(&sink, &sink.table()).await, 120);
    // The first write of an event is the one kept.
    let sequence: String = sqlx::query_scalar(&format!(
        "SELECT sequence_number FROM \"{}\" WHERE event_id = 'event-000045'",
        sink.table()
    ))
    .fetch_one(sink.pool())
    .await
    .expect("read");
    assert_eq!(sequence, batch((0..60).map(event)).events[45].sequence_number);
    drop_tables(&sink).await;
}

#[tokio::test]
async fn every_column_round_trips() {
    let sink = sink("roundtrip").await;
    let full =
        Event { error_code: "E_DRM".to_owned(), error_message: "license expired\nretry later".to_owned(), ..event(7) };
    let minimal = Event { event_id: "minimal".to_owned(), ..Event::default() };
    let unknown_enums = Event { event_id: "unknown-enums".to_owned(), r#type: 61, platform: 99, ..Event::default() };
    let geo_at_zero = Event { event_id: "geo-zero".to_owned(), geo: Some(Geo::default()), ..Event::default() };
    let broken_clock =
        Event { event_id: "broken-clock".to_owned(), occurred_at_ms: i64::MAX, received_at_ms: -1, ..Event::default() };
    let events = [full, minimal, unknown_enums, geo_at_zero, broken_clock];
    let batch = batch(events.clone());
    assert_eq!(sink.write(&batch).await.expect("write").written, 5);

    for (event, record) in events.iter().zip(&batch.events) {
        let (stored, row) = read_back(&sink, &event.event_id).await;
        let mut expected = event.clone();
        if expected.event_id == "broken-clock" {
            // Past the year 9999: stored as NULL. A time before 1970 is kept.
            expected.occurred_at_ms = 0;
        }
        assert_eq!(stored, expected, "event {}", event.event_id);
        assert_eq!(text(&row, "stream"), "ktk-events");
        assert_eq!(text(&row, "shard_id"), record.shard_id);
        assert_eq!(text(&row, "sequence_number"), record.sequence_number);
        assert_eq!(row.get::<i64, _>("sub_sequence_number") as u64, record.sub_sequence_number);
        let arrival = record.arrival.expect("arrival").duration_since(UNIX_EPOCH).expect("after 1970");
        assert_eq!(row.get::<i64, _>("arrival_ms"), arrival.as_millis() as i64);
    }

    // The columns are typed: times compare as times, attributes as JSON, enums by name.
    let table = sink.table();
    let checks: (String, bool, String, bool, bool) = sqlx::query_as(&format!(
        "SELECT pg_typeof(occurred_at)::text, occurred_at = '2023-11-14 22:13:20.007+00'::timestamptz, \
         attributes->>'cdn', event_type = 'EVENT_TYPE_PLAY', stored_at > now() - interval '1 minute' \
         FROM \"{table}\" WHERE event_id = 'event-000007'"
    ))
    .fetch_one(sink.pool())
    .await
    .expect("typed read");
    assert_eq!(checks, ("timestamp with time zone".to_owned(), true, "edge-3".to_owned(), true, true));
    let minimal_nulls: (Option<String>, Option<String>, Option<f64>) = sqlx::query_as(&format!(
        "SELECT user_id, attributes::text, geo_lat FROM \"{table}\" WHERE event_id = 'minimal'"
    ))
    .fetch_one(sink.pool())
    .await
    .expect("read");
    assert_eq!(minimal_nulls, (None, None, None));
    drop_tables(&sink).await;
}

#[tokio::test]
async fn dead_letters_are_stored_once() {
    let sink = sink("dead").await;
    let dead = |sequence: &str, sub: u64, data: &'static [u8], reason: &str| DeadLetter {
        shard_id: "shardId-000000000003".to_owned(),
        sequence_number: sequence.to_owned(),
        sub_sequence_number: sub,
        partition_key: "pk-1".to_owned(),
        data: Bytes::from_static(data),
        reason: reason.to_owned(),
        arrival: Some(ms(1_700_000_003_000)),
    };
    let mut first = batch((0..3).map(event));
    first.dead_letters = vec![
        dead("100", 0, b"\x00\xffnot protobuf", "not an events.v1.Event: invalid wire type"),
        dead("100", 1, b"{}", "event without event_id"),
    ];
    assert_eq!(sink.write(&first).await.expect("write"), SinkReport { written: 3, duplicates: 0, reread: 0 });
    let mut again = first.clone();
    again.dead_letters.push(dead("101", 0, b"", "empty record"));
    assert_eq!(sink.write(&again).await.expect("write again"), SinkReport { written: 0, duplicates: 3, reread: 3 });
    // A batch of dead letters only.
    let mut only_dead = batch([]);
    only_dead.dead_letters = again.dead_letters.clone();
    assert_eq!(sink.write(&only_dead).await.expect("write dead letters"), SinkReport::default());

    assert_eq!(count(&sink, &sink.dead_letter_table()).await, 3);
    let stored: Vec<(String, i64, String, Vec<u8>, String, String)> = sqlx::query_as(&format!(
        "SELECT sequence_number, sub_sequence_number, partition_key, data, reason, stream FROM \"{}\" \
         ORDER BY sequence_number, sub_sequence_number",
        sink.dead_letter_table()
    ))
    .fetch_all(sink.pool())
    .await
    .expect("read dead letters");
    let expected: Vec<_> = again
        .dead_letters
        .iter()
        .map(|d| {
            let sub = d.sub_sequence_number as i64;
            let data = d.data.to_vec();
            (d.sequence_number.clone(), sub, d.partition_key.clone(), data, d.reason.clone(), "ktk-events".to_owned())
        })
        .collect();
    assert_eq!(stored, expected);
    drop_tables(&sink).await;
}

#[tokio::test]
async fn a_dead_database_is_a_retryable_error_within_the_acquire_timeout() {
    let dead_url = "postgres://postgres:secret@127.0.0.1:1/test";
    let config = StoreConfig::default().with_acquire_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let error =
        PostgresSink::connect_with(dead_url, "events", config.clone()).await.expect_err("nothing listens on port 1");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert!(error.is_retryable(), "{error}");
    assert!(error.message().contains("127.0.0.1:1") && !error.message().contains("secret"), "{error}");

    // A sink whose database goes away: each write fails retryably, just as fast.
    let sink = PostgresSink::connect_lazy(dead_url, "events", config).expect("valid URL");
    let started = Instant::now();
    let error = sink.write(&batch((0..5).map(event))).await.expect_err("no database");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert!(error.is_retryable() && error.sink() == "postgres", "{error}");
}

#[tokio::test]
async fn migrate_twice_is_fine_and_adds_missing_columns_to_an_older_table() {
    let url = database_url();
    let table = unique_table("older");
    let sink = PostgresSink::connect_with(&url, &table, config()).await.expect("PostgreSQL is up");
    // The table as an older version made it: a few columns, one row.
    sqlx::query(&format!(
        "CREATE TABLE \"{table}\" (event_id TEXT PRIMARY KEY, event_type TEXT, occurred_at TIMESTAMPTZ)"
    ))
    .execute(sink.pool())
    .await
    .expect("create the older table");
    sqlx::query(&format!("INSERT INTO \"{table}\" VALUES ('old-1', 'EVENT_TYPE_PLAY', now())"))
        .execute(sink.pool())
        .await
        .expect("insert an old row");

    let report = sink.migrate().await.expect("migrate");
    assert_eq!(report.created_tables, vec![sink.dead_letter_table()]);
    for column in ["user_id", "attributes", "geo_lat", "sub_sequence_number", "arrival", "stored_at"] {
        assert!(report.added_columns.contains(&format!("{table}.{column}")), "{column} in {report:?}");
    }
    assert!(!report.added_columns.iter().any(|c| c.ends_with(".event_type")), "{report:?}");
    // The readers' indexes, on both tables.
    let dead = sink.dead_letter_table();
    let mut expected = vec![
        format!("{table}.{table}_occurred_idx"),
        format!("{table}.{table}_stored_idx"),
        format!("{table}.{table}_user_occurred_idx"),
        format!("{table}.{table}_type_occurred_idx"),
        format!("{dead}.{dead}_stored_idx"),
    ];
    let mut created = report.created_indexes.clone();
    created.sort();
    expected.sort();
    assert_eq!(created, expected);
    let definitions: Vec<String> =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = $1")
            .bind(format!("{table}_user_occurred_idx"))
            .fetch_all(sink.pool())
            .await
            .expect("read the index");
    assert_eq!(definitions.len(), 1);
    assert!(definitions[0].ends_with("(user_id, occurred_at)"), "{definitions:?}");
    let again = sink.migrate().await.expect("migrate again");
    assert!(again.created_tables.is_empty() && again.added_columns.is_empty(), "{again:?}");
    assert!(again.created_indexes.is_empty(), "{again:?}");

    assert_eq!(sink.write(&batch((0..10).map(event))).await.expect("write").written, 10);
    let (old, _) = read_back(&sink, "old-1").await;
    assert_eq!((old.r#type, old.user_id.as_str()), (EventType::Play as i32, ""));
    assert_eq!(count(&sink, &table).await, 11);
    drop_tables(&sink).await;
}

/// A table the previous version created (every column but `app_id`) gets `app_id` from
/// `migrate`: its rows read NULL there, new rows carry theirs, and a duplicate still stores nothing.
#[tokio::test]
async fn a_table_from_before_app_id_gains_the_column_and_keeps_its_rows() {
    let sink = sink("noappid").await;
    let table = sink.table();
    // The previous version's table: this version's, less the one column it added.
    sqlx::query(&format!("ALTER TABLE \"{table}\" DROP COLUMN app_id")).execute(sink.pool()).await.expect("drop");
    let position = batch([event(0)]).events.remove(0);
    sqlx::query(&format!(
        "INSERT INTO \"{table}\" (event_id, event_type, user_id, stream, shard_id, sequence_number, \
         sub_sequence_number) VALUES ('event-000000', 'EVENT_TYPE_PLAY', 'user-0', 'ktk-events', $1, $2, $3)"
    ))
    .bind(&position.shard_id)
    .bind(&position.sequence_number)
    .bind(position.sub_sequence_number as i64)
    .execute(sink.pool())
    .await
    .expect("a row of the previous version");
    // Before the migration the sink cannot write, and says what to do.
    let error = sink.write(&batch([event(1)])).await.expect_err("no app_id column yet");
    assert!(!error.is_retryable() && error.message().contains("42703"), "{error}");
    assert!(error.message().contains("run migrate() to add the missing columns"), "{error}");

    let report = sink.migrate().await.expect("migrate");
    assert_eq!(report.added_columns, vec![format!("{table}.app_id")], "{report:?}");
    assert!(report.created_tables.is_empty(), "{report:?}");
    let app_id_type: String = sqlx::query_scalar(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema() \
         AND table_name = $1 AND column_name = 'app_id'",
    )
    .bind(&table)
    .fetch_one(sink.pool())
    .await
    .expect("the column is there");
    assert_eq!(app_id_type, "text");

    // New rows carry their app id; event 0 was stored by the previous version and stays as it was.
    let events = (0..4).map(|i| Event { app_id: format!("tv-app-{i}"), ..event(i) });
    assert_eq!(sink.write(&batch(events)).await.expect("write"), SinkReport { written: 3, duplicates: 1, reread: 1 });
    let stored: Vec<(String, Option<String>)> =
        sqlx::query_as(&format!("SELECT event_id, app_id FROM \"{table}\" ORDER BY event_id"))
            .fetch_all(sink.pool())
            .await
            .expect("read app ids");
    let expected: Vec<(String, Option<String>)> =
        (0..4).map(|i| (format!("event-{i:06}"), (i > 0).then(|| format!("tv-app-{i}")))).collect();
    assert_eq!(stored, expected);
    let (old, _) = read_back(&sink, "event-000000").await;
    assert_eq!((old.app_id.as_str(), old.user_id.as_str()), ("", "user-0"));
    let (new, _) = read_back(&sink, "event-000002").await;
    assert_eq!(new, Event { app_id: "tv-app-2".to_owned(), ..event(2) });

    // A duplicate with another app id stores nothing: the first write of an event is the one kept.
    let again = batch([Event { app_id: "tv-other".to_owned(), ..event(2) }]);
    assert_eq!(sink.write(&again).await.expect("write again"), SinkReport { written: 0, duplicates: 1, reread: 0 });
    assert_eq!(read_back(&sink, "event-000002").await.0.app_id, "tv-app-2");
    let again = sink.migrate().await.expect("migrate again");
    assert!(again.added_columns.is_empty() && again.created_tables.is_empty(), "{again:?}");
    drop_tables(&sink).await;
}

#[tokio::test]
async fn migrate_names_a_column_of_the_wrong_type_and_a_missing_key() {
    let url = database_url();
    let table = unique_table("wrong");
    let sink = PostgresSink::connect_with(&url, &table, config()).await.expect("PostgreSQL is up");
    sqlx::query(&format!("CREATE TABLE \"{table}\" (event_id TEXT, occurred_at TEXT)"))
        .execute(sink.pool())
        .await
        .expect("create a wrong table");
    let error = sink.migrate().await.expect_err("cannot work");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.message().contains("column occurred_at") && error.message().contains("ALTER TABLE"), "{error}");
    assert!(error.message().contains("no primary key or unique index on (event_id)"), "{error}");
    // Nothing was half-done: the transaction rolled back.
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
    )
    .bind(&table)
    .fetch_one(sink.pool())
    .await
    .expect("count columns");
    assert_eq!(columns, 2);
    drop_tables(&sink).await;
}

#[tokio::test]
async fn writing_before_migrate_says_to_migrate() {
    let url = database_url();
    let sink = PostgresSink::connect_with(&url, &unique_table("nomigrate"), config()).await.expect("PostgreSQL is up");
    let error = sink.write(&batch((0..2).map(event))).await.expect_err("no table");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.message().contains("42P01") && error.message().contains("run migrate()"), "{error}");
    sink.close().await;
}

#[tokio::test]
async fn batch_write_time_for_1000_events() {
    let sink = sink("timing").await;
    // The first write prepares the statement on the connection; the batches timed are the next.
    sink.write(&batch((0..1000).map(event))).await.expect("warm-up write");
    let fresh = batch((1000..2000).map(event));
    let started = Instant::now();
    let report = sink.write(&fresh).await.expect("write");
    let insert_time = started.elapsed();
    assert_eq!(report, SinkReport { written: 1000, duplicates: 0, reread: 0 });
    let started = Instant::now();
    let report = sink.write(&fresh).await.expect("write again");
    let duplicate_time = started.elapsed();
    assert_eq!(report, SinkReport { written: 0, duplicates: 1000, reread: 1000 });
    println!("postgres: 1,000 new events in {insert_time:?}, 1,000 duplicates in {duplicate_time:?}");
    assert!(insert_time < Duration::from_secs(10), "{insert_time:?}");
    drop_tables(&sink).await;
}

/// PostgreSQL's TEXT and JSONB cannot hold NUL: an event with one in a text field or an attribute
/// is stored with U+FFFD in its place, instead of failing its batch forever.
#[tokio::test]
async fn nul_characters_are_stored_as_replacement_characters() {
    let sink = sink("nul").await;
    let mut e = event(1);
    e.content_title = "before\0after".to_owned();
    e.attributes.insert("k\0ey".to_owned(), "va\0lue".to_owned());
    let mut nul_batch = batch([e]);
    nul_batch.dead_letters.push(DeadLetter {
        shard_id: "shardId-000000000000".to_owned(),
        sequence_number: "4960".to_owned(),
        sub_sequence_number: 0,
        partition_key: "key\0".to_owned(),
        data: Bytes::from_static(b"\0\0"),
        reason: "not an event".to_owned(),
        arrival: None,
    });
    assert_eq!(sink.write(&nul_batch).await.expect("write"), SinkReport { written: 1, duplicates: 0, reread: 0 });
    let (stored, _) = read_back(&sink, &nul_batch.events[0].event.event_id).await;
    assert_eq!(stored.content_title, "before\u{FFFD}after");
    assert_eq!(stored.attributes.get("k\u{FFFD}ey").map(String::as_str), Some("va\u{FFFD}lue"));
    assert_eq!(count(&sink, &sink.dead_letter_table()).await, 1);
    drop_tables(&sink).await;
}
