//! The real `bootstrap` binary against a Lambda Runtime API served by the test (the HTTP protocol
//! Lambda speaks to a custom runtime: `invocation/next`, `response`, `error`, `init/error`, and the
//! extension registration the graceful-shutdown helper makes), with LocalStack's S3 and a real
//! PostgreSQL as the sinks. (LocalStack cannot invoke functions here: its runtimes need Docker.)
//!
//! These tests need LocalStack (`localstack/up.sh`) and PostgreSQL (`localstack/databases.sh`,
//! or `DATABASE_URL`); a missing one fails them, never skips them.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ktk_pipeline::s3::{read_dead_letters, read_events};
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{STREAM, aggregate, batch_json, plain, sequence};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const FUNCTION_ARN: &str = "arn:aws:lambda:eu-west-1:123456789012:function:ktk-lambda-test";
const PREFIX: &str = "lambda";

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The Runtime API

/// An invocation waiting to be handed out by `GET /invocation/next`.
#[derive(Debug)]
struct Invocation {
    id: String,
    event: Value,
    deadline_ms: u64,
}

/// What the runtime posted back.
#[derive(Debug)]
enum Posted {
    Response { id: String, body: Value, at: Instant },
    Error { id: String, body: Value, error_type: Option<String> },
    InitError { body: Value, error_type: Option<String> },
}

#[derive(Clone)]
struct ApiState {
    pending: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Invocation>>>,
    /// When each invocation was handed out.
    served: Arc<Mutex<HashMap<String, Instant>>>,
    posted: mpsc::UnboundedSender<Posted>,
}

/// The Runtime API on 127.0.0.1 (a free port), and the test's ends of it.
struct RuntimeApi {
    address: String,
    invocations: mpsc::UnboundedSender<Invocation>,
    posted: mpsc::UnboundedReceiver<Posted>,
    served: Arc<Mutex<HashMap<String, Instant>>>,
    server: tokio::task::JoinHandle<()>,
    next_id: usize,
}

fn json_body(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn error_type(headers: &HeaderMap) -> Option<String> {
    headers.get("Lambda-Runtime-Function-Error-Type").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn next_invocation(State(api): State<ApiState>) -> Response {
    let invocation = api.pending.lock().await.recv().await;
    let Some(invocation) = invocation else {
        // The test is over: the runtime may wait forever.
        std::future::pending::<()>().await;
        return StatusCode::GONE.into_response();
    };
    api.served.lock().expect("lock").insert(invocation.id.clone(), Instant::now());
    let headers = [
        ("Lambda-Runtime-Aws-Request-Id", invocation.id.clone()),
        ("Lambda-Runtime-Deadline-Ms", invocation.deadline_ms.to_string()),
        ("Lambda-Runtime-Invoked-Function-Arn", FUNCTION_ARN.to_owned()),
        (
            "Lambda-Runtime-Trace-Id",
            format!("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1;Lineage=a:{}", invocation.id),
        ),
    ];
    (headers, axum::Json(invocation.event)).into_response()
}

async fn invocation_response(State(api): State<ApiState>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let _ = api.posted.send(Posted::Response { id, body: json_body(&body), at: Instant::now() });
    StatusCode::ACCEPTED
}

async fn invocation_error(
    State(api): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let _ = api.posted.send(Posted::Error { id, body: json_body(&body), error_type: error_type(&headers) });
    StatusCode::ACCEPTED
}

async fn init_error(State(api): State<ApiState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let _ = api.posted.send(Posted::InitError { body: json_body(&body), error_type: error_type(&headers) });
    StatusCode::ACCEPTED
}

/// The Extensions API, as far as the no-op extension of lambda_runtime's graceful-shutdown helper
/// uses it: it registers (so that Lambda sends the runtime SIGTERM), then waits for events that
/// never come.
async fn register_extension() -> Response {
    let body = json!({ "functionName": "ktk-lambda-test", "functionVersion": "$LATEST", "handler": "bootstrap" });
    ([("Lambda-Extension-Identifier", "ktk-test-extension")], axum::Json(body)).into_response()
}

async fn next_extension_event() -> StatusCode {
    std::future::pending::<()>().await;
    StatusCode::OK
}

impl RuntimeApi {
    async fn start() -> RuntimeApi {
        let (invocations, pending) = mpsc::unbounded_channel();
        let (posted_tx, posted) = mpsc::unbounded_channel();
        let served = Arc::new(Mutex::new(HashMap::new()));
        let state = ApiState {
            pending: Arc::new(tokio::sync::Mutex::new(pending)),
            served: Arc::clone(&served),
            posted: posted_tx,
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next_invocation))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(invocation_response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(invocation_error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .route("/2020-01-01/extension/register", post(register_extension))
            .route("/2020-01-01/extension/event/next", get(next_extension_event))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the Runtime API");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RuntimeApi { address, invocations, posted, served, server, next_id: 0 }
    }

    /// Hands `event` to the runtime with `timeout` to answer; returns what it posted back and how
    /// long after handing it out.
    async fn invoke(&mut self, event: Value, timeout: Duration) -> (Posted, Duration) {
        self.next_id += 1;
        let id = format!("request-{:04}", self.next_id);
        let deadline = SystemTime::now() + timeout;
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.invocations.send(Invocation { id: id.clone(), event, deadline_ms }).expect("the server is running");
        let posted = self.posted_within(timeout + Duration::from_secs(30)).await;
        let served = self.served.lock().expect("lock").get(&id).copied();
        match &posted {
            Posted::Response { id: answered, at, .. } => {
                assert_eq!(answered, &id, "the response is for the invocation handed out");
                let latency = served.map(|s| at.duration_since(s)).unwrap_or_default();
                (posted, latency)
            }
            Posted::Error { id: answered, .. } => {
                assert_eq!(answered, &id);
                (posted, Duration::ZERO)
            }
            Posted::InitError { .. } => panic!("the function failed its init: {posted:?}"),
        }
    }

    async fn posted_within(&mut self, timeout: Duration) -> Posted {
        match tokio::time::timeout(timeout, self.posted.recv()).await {
            Ok(Some(posted)) => posted,
            Ok(None) => panic!("the Runtime API stopped"),
            Err(_) => panic!("the runtime posted nothing within {timeout:?}"),
        }
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The function

/// A running `bootstrap`, its output collected.
struct Function {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Function {
    fn start(api: &RuntimeApi, vars: &[(&str, String)]) -> Function {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bootstrap"));
        for (name, _) in std::env::vars() {
            if name.starts_with("KTK_") || name.starts_with("AWS_LAMBDA_") {
                command.env_remove(name);
            }
        }
        command
            .env("AWS_LAMBDA_RUNTIME_API", &api.address)
            .env("AWS_LAMBDA_FUNCTION_NAME", "ktk-lambda-test")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/01/01/[$LATEST]0123456789abcdef")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/ktk-lambda-test")
            .env("AWS_LAMBDA_LOG_LEVEL", "info")
            .envs(ktk_tests::child_aws_env())
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start bootstrap");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut output = output.lock().expect("lock");
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Function { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Sends SIGTERM (what Lambda sends before it shuts an idle container down) and waits.
    async fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(status.success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("bootstrap exits within 20 s of SIGTERM")
            .expect("wait");
        // Let the readers take the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (exit, self.output())
    }

    /// The `n`th embedded-metric-format line the function logged (1 for the first), parsed;
    /// waits up to 5 s for the output reader to get it.
    async fn emf_line(&self, n: usize) -> Value {
        let started = Instant::now();
        loop {
            let output = self.output();
            let lines: Vec<Value> = output
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|json| json.get("_aws").is_some())
                .collect();
            if let Some(line) = lines.into_iter().nth(n - 1) {
                return line;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no EMF line number {n} in:\n{output}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn exit_within(mut self, timeout: Duration) -> (ExitStatus, String) {
        let exit = tokio::time::timeout(timeout, self.child.wait()).await.expect("bootstrap exits").expect("wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
        (exit, self.output())
    }
}

// ---------------------------------------------------------------------------------------------
// The sinks

struct Sinks {
    s3: ktk_pipeline::s3::Client,
    bucket: String,
    db: PgPool,
    table: String,
}

impl Sinks {
    /// A bucket in LocalStack (created unless `create_bucket` is false) and a table name in
    /// PostgreSQL, both unused by anything else.
    async fn new(tag: &str, create_bucket: bool) -> Sinks {
        let aws = ktk_tests::aws_config().await;
        let s3 = ktk_pipeline::s3::client(&aws, true);
        let bucket = ktk_tests::unique_name(&format!("ktk-lambda-{tag}")).to_lowercase();
        if create_bucket {
            s3.create_bucket().bucket(&bucket).send().await.unwrap_or_else(|e| {
                panic!(
                    "cannot create an S3 bucket in LocalStack ({}); start it with localstack/up.sh: {}",
                    aws.endpoint_url().unwrap_or(ktk_tests::DEFAULT_ENDPOINT),
                    aws_sdk_s3_error(&e)
                )
            });
        }
        let url = database_url();
        let db = PgPool::connect(&url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url} ({e}); start it with localstack/databases.sh or set DATABASE_URL"
            )
        });
        let table = ktk_tests::store_support::unique_table(&format!("lambda_{tag}"));
        Sinks { s3, bucket, db, table }
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KTK_S3_BUCKET", self.bucket.clone()),
            ("KTK_S3_PREFIX", PREFIX.to_owned()),
            ("KTK_S3_PATH_STYLE", "true".to_owned()),
            ("KTK_POSTGRES_URL", database_url()),
            ("KTK_STORE_TABLE", self.table.clone()),
        ]
    }

    async fn s3_event_ids(&self) -> (BTreeSet<String>, u64) {
        let read = read_events(&self.s3, &self.bucket, PREFIX).await.expect("read the events back from S3");
        (read.events.iter().map(|e| e.event.event_id.clone()).collect(), read.duplicates)
    }

    async fn store_event_ids(&self) -> Vec<String> {
        let sql = format!(r#"SELECT event_id FROM "{}" ORDER BY event_id"#, self.table);
        sqlx::query_scalar(&sql).fetch_all(&self.db).await.expect("read the events back from PostgreSQL")
    }

    async fn store_dead_letters(&self) -> Vec<(String, String)> {
        let sql =
            format!(r#"SELECT sequence_number, reason FROM "{}_dead_letters" ORDER BY sequence_number"#, self.table);
        sqlx::query_as(&sql).fetch_all(&self.db).await.expect("read the dead letters back from PostgreSQL")
    }

    async fn drop_tables(&self) {
        for table in [self.table.clone(), format!("{}_dead_letters", self.table)] {
            let _ = sqlx::query(&format!(r#"DROP TABLE IF EXISTS "{table}""#)).execute(&self.db).await;
        }
    }
}

fn aws_sdk_s3_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn ids(range: std::ops::Range<usize>, tag: &str) -> Vec<String> {
    range.map(|i| format!("{tag}-{i:04}")).collect()
}

fn response_of(posted: &Posted) -> &Value {
    match posted {
        Posted::Response { body, .. } => body,
        other => panic!("expected a response, got {other:?}"),
    }
}

fn no_failures() -> Value {
    json!({ "batchItemFailures": [] })
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_delivers_plain_and_aggregated_records_dead_letters_poison_and_drops_duplicates() {
    let sinks = Sinks::new("e2e", true).await;
    let mut api = RuntimeApi::start().await;
    let function = Function::start(&api, &sinks.vars());

    // 1. Plain records, a KPL aggregate, a poison record (not an event) and a truncated aggregate.
    let mut truncated = aggregate(&["t-0", "t-1"]);
    truncated.truncate(truncated.len() - 5);
    let first = batch_json(
        0,
        &[
            plain("e-0000"),
            plain("e-0001"),
            aggregate(&["e-0002", "e-0003", "e-0004"]),
            b"{\"not\": \"an event".to_vec(),
            truncated,
            plain("e-0005"),
        ],
    );
    let (posted, _) = api.invoke(first.clone(), Duration::from_secs(30)).await;
    assert_eq!(response_of(&posted), &no_failures(), "{}", function.output());

    // 2. A duplicate of e-0001 (a producer retry, new sequence number) and a new event.
    let (posted, _) = api.invoke(batch_json(6, &[plain("e-0001"), plain("e-0006")]), Duration::from_secs(30)).await;
    assert_eq!(response_of(&posted), &no_failures());

    // 3. The first batch again (the mapping retrying after a timeout): nothing new.
    let (posted, _) = api.invoke(first.clone(), Duration::from_secs(30)).await;
    assert_eq!(response_of(&posted), &no_failures());

    // 4. Not a Kinesis event: a function error, for the mapping to retry and bisect.
    let (posted, _) = api.invoke(json!({ "hello": "world" }), Duration::from_secs(30)).await;
    match &posted {
        Posted::Error { body, error_type, .. } => {
            assert!(error_type.is_some(), "the error's type is in a header");
            assert!(body["errorMessage"].as_str().unwrap_or_default().contains("not a Kinesis event"), "{body}")
        }
        other => panic!("expected an error, got {other:?}"),
    }

    let expected: BTreeSet<String> = ids(0..7, "e").into_iter().collect();
    let (in_s3, s3_duplicates) = sinks.s3_event_ids().await;
    assert_eq!(in_s3, expected);
    // The window hit of step 2 stays in that batch's object (objects do not depend on what a
    // container remembers), so e-0001 is in two objects and the reader keeps one; step 3 rebuilt
    // the first batch's object byte for byte, adding no copy.
    assert_eq!(s3_duplicates, 1, "only the resent e-0001 is in two objects");
    assert_eq!(sinks.store_event_ids().await, ids(0..7, "e"));
    let letters = read_dead_letters(&sinks.s3, &sinks.bucket, PREFIX).await.expect("dead letters from S3");
    let in_s3: Vec<_> = letters.dead_letters.iter().map(|d| (d.sequence_number.clone(), d.reason.clone())).collect();
    assert_eq!(in_s3.len(), 2, "{in_s3:?}");
    assert_eq!(in_s3[0].0, sequence(3));
    assert!(in_s3[0].1.contains("JSON"), "{in_s3:?}");
    assert_eq!(in_s3[1].0, sequence(4));
    assert!(in_s3[1].1.contains("not a valid KPL aggregate"), "{in_s3:?}");
    assert_eq!(letters.dead_letters[0].data.as_ref(), b"{\"not\": \"an event");
    let in_store = sinks.store_dead_letters().await;
    assert_eq!(in_store.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(), vec![sequence(3), sequence(4)]);
    let (stream, arrival_ms): (String, i64) = sqlx::query_as(&format!(
        r#"SELECT stream, (extract(epoch from arrival) * 1000)::bigint FROM "{}" WHERE event_id = 'e-0003'"#,
        sinks.table
    ))
    .fetch_one(&sinks.db)
    .await
    .expect("e-0003");
    assert_eq!((stream.as_str(), arrival_ms), (STREAM, 1_730_000_003_500), "stream from the ARN, exact arrival");

    // SIGTERM: the pools are closed and the process exits 0.
    let (status, output) = function.terminate().await;
    assert!(status.success(), "{status:?}\n{output}");
    assert!(output.contains("shut down"), "{output}");

    // A new container (cold start) gets the first batch again: it has no memory of it, the sinks
    // are idempotent, and nothing changes.
    let function = Function::start(&api, &sinks.vars());
    let (posted, _) = api.invoke(first, Duration::from_secs(30)).await;
    assert_eq!(response_of(&posted), &no_failures(), "{}", function.output());
    let (in_s3, s3_duplicates) = sinks.s3_event_ids().await;
    assert_eq!((in_s3, s3_duplicates), (expected, 1), "the same S3 objects, written once (no new copy)");
    assert_eq!(sinks.store_event_ids().await, ids(0..7, "e"));
    assert_eq!(sinks.store_dead_letters().await.len(), 2);
    drop(function);
    sinks.drop_tables().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_failure_reports_the_first_undelivered_record_and_the_retry_delivers_it() {
    // The bucket does not exist yet: S3 refuses every batch.
    let sinks = Sinks::new("failure", false).await;
    let mut api = RuntimeApi::start().await;
    let mut vars = sinks.vars();
    vars.extend([("KTK_BATCH_MAX_RECORDS", "2".to_owned()), ("KTK_SINK_MAX_ATTEMPTS", "2".to_owned())]);
    let function = Function::start(&api, &vars);
    let data: Vec<_> = ids(0..6, "f").iter().map(|id| plain(id)).collect();
    let (posted, _) = api.invoke(batch_json(0, &data), Duration::from_secs(30)).await;
    assert_eq!(
        response_of(&posted),
        &json!({ "batchItemFailures": [{ "itemIdentifier": sequence(0) }] }),
        "{}",
        function.output()
    );
    // The store took the first batch (sinks are written at once), nothing after it.
    assert_eq!(sinks.store_event_ids().await, ids(0..2, "f"));
    // The invocation's metrics say a sink is failing, and why.
    let emf = function.emf_line(1).await;
    assert_eq!(emf["_aws"]["CloudWatchMetrics"][0]["Namespace"], "ktk/lambda", "{emf}");
    assert_eq!(emf["FunctionName"], "ktk-lambda-test", "{emf}");
    assert_eq!(
        (&emf["SinkFailing"], &emf["Failures"], &emf["UserRecords"]),
        (&json!(1), &json!(1), &json!(6)),
        "{emf}"
    );
    assert_eq!(emf["failingSinks"], json!(["s3"]), "{emf}");
    let reasons = emf["reasons"].to_string();
    assert!(reasons.contains("sink s3 has failed every write for ") && reasons.contains("does not exist"), "{emf}");

    sinks.s3.create_bucket().bucket(&sinks.bucket).send().await.expect("create the bucket");
    let (posted, _) = api.invoke(batch_json(0, &data), Duration::from_secs(30)).await;
    assert_eq!(response_of(&posted), &no_failures(), "{}", function.output());
    assert_eq!(sinks.s3_event_ids().await.0, ids(0..6, "f").into_iter().collect());
    assert_eq!(sinks.store_event_ids().await, ids(0..6, "f"));
    let emf = function.emf_line(2).await;
    assert_eq!((&emf["SinkFailing"], &emf["Failures"], &emf["reasons"]), (&json!(0), &json!(0), &json!([])), "{emf}");
    drop(function);
    sinks.drop_tables().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_is_reported_to_init_error_naming_the_variable() {
    let mut api = RuntimeApi::start().await;
    let function = Function::start(&api, &[("KTK_S3_BUCKET", "b".to_owned()), ("KTK_S3_FORMAT", "csv".to_owned())]);
    match api.posted_within(Duration::from_secs(30)).await {
        Posted::InitError { body, error_type } => {
            assert_eq!(error_type.as_deref(), Some("Runtime.InitError"));
            assert_eq!(body["errorType"], "InvalidSetting");
            assert!(body["errorMessage"].as_str().unwrap_or_default().contains("KTK_S3_FORMAT"), "{body}");
        }
        other => panic!("expected an init error, got {other:?}"),
    }
    let (status, output) = function.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2), "a bad setting exits 2: {output}");

    let function = Function::start(&api, &[]);
    match api.posted_within(Duration::from_secs(30)).await {
        Posted::InitError { body, .. } => {
            let message = body["errorMessage"].as_str().unwrap_or_default();
            assert!(message.contains("missing required settings (one of --s3-bucket / KTK_S3_BUCKET"), "{body}")
        }
        other => panic!("expected an init error, got {other:?}"),
    }
    let (status, _) = function.exit_within(Duration::from_secs(10)).await;
    assert!(!status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_invocation_latency_of_a_100_record_batch() {
    const RECORDS: usize = 100;
    const INVOCATIONS: usize = 8;
    let sinks = Sinks::new("latency", true).await;
    let mut api = RuntimeApi::start().await;
    let function = Function::start(&api, &sinks.vars());
    let mut latencies = Vec::new();
    for n in 0..INVOCATIONS {
        let data: Vec<_> = ids(n * RECORDS..(n + 1) * RECORDS, "l").iter().map(|id| plain(id)).collect();
        let (posted, latency) = api.invoke(batch_json(n * RECORDS, &data), Duration::from_secs(60)).await;
        assert_eq!(response_of(&posted), &no_failures(), "{}", function.output());
        latencies.push(latency);
    }
    assert_eq!(sinks.store_event_ids().await.len(), RECORDS * INVOCATIONS);
    assert_eq!(sinks.s3_event_ids().await.0.len(), RECORDS * INVOCATIONS);
    let first = latencies[0];
    let mut warm = latencies[1..].to_vec();
    warm.sort();
    println!(
        "per-invocation latency, {RECORDS}-record batch to S3 (Parquet) and PostgreSQL, debug build: first {:.1} ms; \
         warm (n={}) p50 {:.1} ms, max {:.1} ms",
        first.as_secs_f64() * 1e3,
        warm.len(),
        warm[warm.len() / 2].as_secs_f64() * 1e3,
        warm[warm.len() - 1].as_secs_f64() * 1e3,
    );
    drop(function);
    sinks.drop_tables().await;
}
