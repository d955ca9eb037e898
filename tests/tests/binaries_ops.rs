//! The `consumer` and `collector` binaries as an operator runs them, against LocalStack:
//! - with standard output and error broken (a pipe whose reader is gone, so every write fails
//!   with EPIPE), SIGTERM still stops each of them with exit status 0;
//! - a consumer whose S3 bucket is missing answers /health 503 naming the sink once it has failed
//!   for longer than KTK_UNHEALTHY_AFTER_MS, and 200 again once the bucket is created;
//! - a consumer whose lease table is deleted under it answers 503 naming the lease table, and 200
//!   again once the table is back and it holds its lease again;
//! - a consumer whose stream is deleted under it answers 503 naming Kinesis;
//! - a consumer pointed at a stream that does not exist exits at once with a message naming
//!   KTK_STREAM, and creates no lease table.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, consumer_binary, free_port};
use ktk_tests::{create_stream, delete_stream, dynamodb, kinesis, unique_name, wait_stream_active};

/// A pipe whose read end is already closed: whatever is written to it fails with EPIPE.
fn broken_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Stdio::from(writer)
}

/// Waits for `child` to exit within `within` of now; its exit status code.
async fn exit_code(child: &mut tokio::process::Child, within: Duration, what: &str) -> Option<i32> {
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not exit within {within:?}"))
        .expect("exit status");
    status.code()
}

async fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(status.success(), "kill -TERM {pid}");
}

#[tokio::test]
async fn sigterm_stops_the_consumer_and_the_collector_with_stdout_and_stderr_broken() {
    let kinesis = kinesis().await;
    let stream = unique_name("ktk-ops-stdout");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;

    // The consumer: its sink bucket does not exist, so it also logs warnings as it runs.
    let application = unique_name("ktk-ops-stdout-app");
    let spec = ConsumerSpec::new(&stream, &application, "w1", &unique_name("ktk-ops-none"), "p", "ops_stdout")
        .with_env("RUST_LOG", "info");
    let mut consumer = ConsumerProcess::spawn_with_output(&spec, broken_pipe(), broken_pipe());
    // Up and serving /health (so it has logged, into the broken pipe, since it started).
    let started = Instant::now();
    while consumer.health().await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "the consumer never answered /health");
        if let Ok(Some(status)) = consumer.child.try_wait() {
            panic!("the consumer exited before SIGTERM: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sigterm(&consumer.child).await;
    assert_eq!(exit_code(&mut consumer.child, Duration::from_secs(25), "the consumer").await, Some(0));

    // The collector.
    let collector_binary = consumer_binary().with_file_name("collector");
    assert!(collector_binary.exists(), "{} is missing: run `cargo build -p ktk-producer`", collector_binary.display());
    let mut command = tokio::process::Command::new(&collector_binary);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KTK_") {
            command.env_remove(name);
        }
    }
    let port = free_port();
    let keys = std::env::temp_dir().join(format!("{}.json", unique_name("ktk-ops-keys")));
    std::fs::write(&keys, r#"{"anonymous": {"app_id": "ops"}}"#).expect("write the keys file");
    let mut collector = command
        .env("KTK_STREAM", &stream)
        .env("KTK_LISTEN", format!("127.0.0.1:{port}"))
        .env("KTK_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KTK_KEYS_FILE", &keys)
        .env("RUST_LOG", "debug")
        .envs(ktk_tests::child_aws_env())
        .stdout(broken_pipe())
        .stderr(broken_pipe())
        .kill_on_drop(true)
        .spawn()
        .expect("start the collector");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the collector never listened");
        if let Ok(Some(status)) = collector.try_wait() {
            panic!("the collector exited before SIGTERM: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigterm(&collector).await;
    assert_eq!(exit_code(&mut collector, Duration::from_secs(30), "the collector").await, Some(0));

    let _ = std::fs::remove_file(&keys);
    delete_stream(&kinesis, &stream).await;
}

#[tokio::test]
async fn a_missing_stream_stops_the_consumer_before_anything_is_created() {
    let dynamodb = dynamodb().await;
    let stream = unique_name("ktk-ops-missing");
    let application = unique_name("ktk-ops-missing-app");
    let spec = ConsumerSpec::new(&stream, &application, "w1", &unique_name("ktk-ops-none"), "p", "ops_missing");
    // The error is a log line: logs go to standard output.
    let mut consumer = ConsumerProcess::spawn_with_output(&spec, Stdio::piped(), Stdio::inherit());
    let mut stdout = consumer.child.stdout.take().expect("stdout");
    let code = exit_code(&mut consumer.child, Duration::from_secs(30), "the consumer").await;
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await.expect("stdout text");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&stream) && text.contains("KTK_STREAM") && text.contains("does not exist"), "{text}");
    assert!(!text.contains("retry"), "{text}");
    let table = dynamodb.describe_table().table_name(&application).send().await;
    let error = table.expect_err("no lease table").into_service_error();
    assert!(error.is_resource_not_found_exception(), "{error:?}");
}

#[tokio::test]
async fn health_is_503_naming_the_sink_while_the_bucket_is_missing_and_200_once_it_exists() {
    use ktk_proto::events::v1::Event;
    use prost::Message as _;
    let kinesis = kinesis().await;
    let stream = unique_name("ktk-ops-health");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;
    let bucket = unique_name("ktk-ops-health");
    let spec = ConsumerSpec::new(&stream, &unique_name("ktk-ops-health-app"), "w1", &bucket, "p", "ops_health")
        .with_env("KTK_UNHEALTHY_AFTER_MS", "2000");
    let consumer = ConsumerProcess::spawn(&spec);
    let event = Event { event_id: unique_name("e"), user_id: "u".into(), ..Event::default() };
    kinesis
        .put_record()
        .stream_name(&stream)
        .partition_key("u")
        .data(aws_sdk_kinesis::primitives::Blob::new(event.encode_to_vec()))
        .send()
        .await
        .expect("put");
    let url = format!("http://127.0.0.1:{}/health", consumer.port);
    let health = || async {
        let response = reqwest::get(&url).await.ok()?;
        let code = response.status().as_u16();
        Some((code, response.json::<serde_json::Value>().await.ok()?))
    };
    let started = Instant::now();
    let unhealthy = loop {
        if let Some((503, body)) = health().await
            && body["status"] == "unhealthy"
        {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "/health never turned 503: {:?}", health().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let reasons = unhealthy["reasons"].to_string();
    assert!(reasons.contains("sink s3 has failed every write"), "{unhealthy}");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/ready", consumer.port)).await.expect("ready");
    assert_eq!(ready.status().as_u16(), 200, "/ready is about the worker, not the sinks");

    let s3 = ktk_pipeline::s3::client(&ktk_tests::aws_config().await, true);
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let started = Instant::now();
    loop {
        if let Some((200, body)) = health().await {
            assert_eq!(body["status"], "ok", "{body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "/health never came back: {:?}", health().await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    consumer.stop(Duration::from_secs(25)).await;
    delete_stream(&kinesis, &stream).await;
}

/// `/health` of the consumer on `port`: status code and JSON body, or `None` while it does not answer.
async fn health_of(port: u16) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/health")).await.ok()?;
    let code = response.status().as_u16();
    Some((code, response.json::<serde_json::Value>().await.ok()?))
}

/// Polls `/health` every 250 ms until `done` says yes (returns that body); panics after `within`.
async fn health_until(
    port: u16,
    within: Duration,
    what: &str,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let health = health_of(port).await;
        if let Some((code, body)) = &health
            && done(*code, body)
        {
            return body.clone();
        }
        assert!(started.elapsed() < within, "{what} within {within:?}; /health is {health:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether `body` is a 200 `ok` with the worker holding `leases` leases.
fn ok_holding(code: u16, body: &serde_json::Value, leases: u64) -> bool {
    code == 200 && body["status"] == "ok" && body["worker"]["leases_held"] == leases
}

/// Whether `body` is a 503 `unhealthy` with a reason that contains `reason`.
fn unhealthy_with(code: u16, body: &serde_json::Value, reason: &str) -> bool {
    code == 503
        && body["status"] == "unhealthy"
        && body["reasons"].as_array().is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.contains(reason))))
}

#[tokio::test]
async fn health_is_503_naming_the_lease_table_while_it_is_deleted_and_200_once_it_is_back() {
    let kinesis = kinesis().await;
    let dynamodb = dynamodb().await;
    let stream = unique_name("ktk-ops-table");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;
    let application = unique_name("ktk-ops-table-app");
    // No record is put: no sink is written, so only the worker can make it unhealthy.
    let spec = ConsumerSpec::new(&stream, &application, "w1", &unique_name("ktk-ops-none"), "p", "ops_table")
        .with_env("KTK_UNHEALTHY_AFTER_MS", "2000");
    let consumer = ConsumerProcess::spawn(&spec);
    let port = consumer.port;
    let healthy = health_until(port, Duration::from_secs(30), "healthy with the shard's lease", |code, body| {
        ok_holding(code, body, 1)
    })
    .await;
    assert_eq!(healthy["worker"]["leases_in_table"], 1, "{healthy}");
    assert_eq!(healthy["worker"]["workers_seen"], 1, "{healthy}");

    dynamodb.delete_table().table_name(&application).send().await.expect("delete the lease table");
    let unhealthy = health_until(port, Duration::from_secs(30), "503 naming the lease table", |code, body| {
        unhealthy_with(code, body, "the lease table has failed every scan for ")
    })
    .await;
    let reasons = unhealthy["reasons"].to_string();
    assert!(
        reasons.contains(&application) && reasons.contains("does not exist"),
        "the reason carries the error: {unhealthy}"
    );
    assert!(!reasons.contains("Kinesis"), "the stream is fine: {unhealthy}");
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/ready")).await.expect("ready");
    assert_eq!(ready.status().as_u16(), 200, "/ready is about the worker running: {unhealthy}");

    // The table back (empty): the shard sync creates the lease again, and the worker takes it.
    let aws = ktk_tests::aws_config().await;
    ktk_consumer::lease::LeaseTable::new(&aws, &application).ensure_table().await.expect("create the lease table");
    health_until(port, Duration::from_secs(40), "healthy again, holding the lease", |code, body| {
        ok_holding(code, body, 1)
    })
    .await;
    consumer.stop(Duration::from_secs(25)).await;
    delete_stream(&kinesis, &stream).await;
    let _ = dynamodb.delete_table().table_name(&application).send().await;
}

#[tokio::test]
async fn health_is_503_naming_kinesis_once_the_stream_is_deleted() {
    let kinesis = kinesis().await;
    let dynamodb = dynamodb().await;
    let stream = unique_name("ktk-ops-gone");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;
    let application = unique_name("ktk-ops-gone-app");
    let spec = ConsumerSpec::new(&stream, &application, "w1", &unique_name("ktk-ops-none"), "p", "ops_gone")
        .with_env("KTK_UNHEALTHY_AFTER_MS", "2000");
    let consumer = ConsumerProcess::spawn(&spec);
    let port = consumer.port;
    let healthy = health_until(port, Duration::from_secs(30), "healthy with the shard's lease", |code, body| {
        ok_holding(code, body, 1)
    })
    .await;
    assert!(healthy["worker"]["last_kinesis_success_ms_ago"].is_u64(), "{healthy}");

    delete_stream(&kinesis, &stream).await;
    let unhealthy = health_until(port, Duration::from_secs(30), "503 naming Kinesis", |code, body| {
        unhealthy_with(code, body, "every Kinesis call has failed for ")
    })
    .await;
    let reasons = unhealthy["reasons"].to_string();
    assert!(reasons.contains("ResourceNotFound"), "the reason carries Kinesis's error: {unhealthy}");
    assert!(!reasons.contains("lease table"), "the lease table is fine: {unhealthy}");
    consumer.stop(Duration::from_secs(25)).await;
    let _ = dynamodb.delete_table().table_name(&application).send().await;
}
