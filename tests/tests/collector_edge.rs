//! The `collector` binary as the public edge, against LocalStack: write keys from a Secrets
//! Manager secret and from a file, reloaded without a restart (on a timer, and on SIGHUP); the
//! app id of each key in the events on the stream; `/metrics` only on the admin listener.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ktk_proto::events::v1::Event;
use ktk_tests::collector_support::CollectorProcess as Collector;
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, read_stream, unique_name, wait_stream_active};
use prost::Message;
use serde_json::json;

/// Longest any step waits.
const BOUND: Duration = Duration::from_secs(30);

const WEB_KEY: &str = "wk_web_e2e_0123456789abcdef";
const ROKU_KEY: &str = "wk_roku_e2e_0123456789abcdef";

fn document(app_id: &str, key: &str) -> String {
    json!({"keys": [{"app_id": app_id, "key": key, "origins": ["https://tv.example.com"]}]}).to_string()
}

/// Event id -> app id of every event on the stream.
async fn apps_on(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> HashMap<String, String> {
    read_stream(kinesis, stream)
        .await
        .into_iter()
        .map(|record| Event::decode(record.data.clone()).expect("an events.v1.Event"))
        .map(|event| (event.event_id, event.app_id))
        .collect()
}

#[tokio::test]
async fn keys_from_a_secret_are_reloaded_and_name_the_app_of_each_event() {
    let kinesis = kinesis().await;
    let secrets = aws_sdk_secretsmanager::Client::new(&aws_config().await);
    let stream = unique_name("ktk-edge-secret");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;
    let secret = unique_name("ktk-edge-keys");
    secrets
        .create_secret()
        .name(&secret)
        .secret_string(document("tv-web", WEB_KEY))
        .send()
        .await
        .expect("Secrets Manager answers (LocalStack with secretsmanager in SERVICES)");

    let collector = Collector::start(&stream, ("KTK_KEYS_SECRET", secret.clone()), 1).await;
    assert_eq!(collector.post(Some(WEB_KEY), "s-1").await, 200);
    assert_eq!(collector.post(None, "s-2").await, 401);
    assert_eq!(collector.post(Some(ROKU_KEY), "s-3").await, 401);

    // A new version of the secret: in force within the reload interval, without a restart.
    secrets
        .put_secret_value()
        .secret_id(&secret)
        .secret_string(document("tv-roku", ROKU_KEY))
        .send()
        .await
        .expect("put");
    collector.until(ROKU_KEY, 200, "s-4").await;
    assert_eq!(collector.post(Some(WEB_KEY), "s-5").await, 401, "the old key is revoked");

    let metrics = collector.metrics().await;
    assert!(metrics.contains("collector_keys_reloads"), "{metrics}");
    assert!(metrics.contains("collector_requests_refused{reason=\"unknown_key\"}"), "{metrics}");
    assert!(!metrics.contains(WEB_KEY) && !metrics.contains(ROKU_KEY));
    let public_metrics = collector.http.get(format!("{}/metrics", collector.public)).send().await.expect("answer");
    assert_eq!(public_metrics.status(), 404, "metrics are on the admin listener only");
    collector.stop().await;

    let apps = apps_on(&kinesis, &stream).await;
    assert_eq!(apps.get("s-1").map(String::as_str), Some("tv-web"));
    assert_eq!(apps.get("s-4").map(String::as_str), Some("tv-roku"));
    assert!(!apps.contains_key("s-2") && !apps.contains_key("s-3") && !apps.contains_key("s-5"), "{apps:?}");
    assert!(apps.values().all(|app| app != "spoofed"), "{apps:?}");
    secrets.delete_secret().secret_id(&secret).force_delete_without_recovery(true).send().await.expect("delete");
    delete_stream(&kinesis, &stream).await;
}

fn write(path: &Path, text: &str) {
    // Written whole and renamed, as an operator's tool (or a mounted secret) replaces a file.
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

#[tokio::test]
async fn a_keys_file_is_read_again_on_sighup_and_a_broken_one_keeps_the_keys_in_force() {
    let kinesis = kinesis().await;
    let stream = unique_name("ktk-edge-file");
    create_stream(&kinesis, &stream, 1).await;
    wait_stream_active(&kinesis, &stream).await;
    let path = std::env::temp_dir().join(format!("{}.json", unique_name("ktk-edge-keys")));
    write(&path, &document("tv-web", WEB_KEY));

    // Read again hourly only: what changes within this test is SIGHUP's doing.
    let collector = Collector::start(&stream, ("KTK_KEYS_FILE", path.display().to_string()), 3600).await;
    assert_eq!(collector.post(Some(WEB_KEY), "f-1").await, 200);
    let hangup = |pid: u32| async move {
        let sent = tokio::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().await.expect("kill");
        assert!(sent.success());
    };
    let pid = collector.child.id().expect("running");

    write(&path, &document("tv-roku", ROKU_KEY));
    hangup(pid).await;
    collector.until(ROKU_KEY, 200, "f-2").await;
    assert_eq!(collector.post(Some(WEB_KEY), "f-3").await, 401);

    // A broken document: the keys in force stay, and the admin /health says why.
    write(&path, r#"{"keys": [{"app_id": "tv-roku", "key": "short"}]}"#);
    hangup(pid).await;
    let started = Instant::now();
    let health = loop {
        let health: serde_json::Value = collector
            .http
            .get(format!("{}/health", collector.admin))
            .send()
            .await
            .expect("an answer")
            .json()
            .await
            .expect("JSON");
        if !health["keys_reload_error"].is_null() {
            break health;
        }
        assert!(started.elapsed() < BOUND, "the broken document was never reported: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(health["keys_reload_error"].as_str().is_some_and(|e| e.contains("keys[0]")), "{health}");
    assert_eq!(health["keys"], 1);
    assert_eq!(collector.post(Some(ROKU_KEY), "f-4").await, 200, "the keys in force still work");
    collector.stop().await;

    let apps = apps_on(&kinesis, &stream).await;
    assert_eq!(apps.get("f-1").map(String::as_str), Some("tv-web"));
    assert_eq!(apps.get("f-2").map(String::as_str), Some("tv-roku"));
    assert_eq!(apps.get("f-4").map(String::as_str), Some("tv-roku"));
    assert!(!apps.contains_key("f-3"));
    let _ = std::fs::remove_file(&path);
    delete_stream(&kinesis, &stream).await;
}
