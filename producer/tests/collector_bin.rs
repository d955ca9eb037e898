//! The `collector` binary's command line: `--help` lists every setting with its variable, and a
//! bad value in the environment exits 2 naming the variable. Neither needs AWS: both stop before
//! the producer starts.

use std::process::{Command, Output};

/// Every variable the collector reads (see `ktk_producer::collector::Settings`).
const VARIABLES: [&str; 23] = [
    "KTK_STREAM",
    "KTK_LISTEN",
    "KTK_ADMIN_LISTEN",
    "KTK_KEYS_FILE",
    "KTK_KEYS_SECRET",
    "KTK_KEYS_RELOAD_SECS",
    "KTK_WRITE_TIMEOUT_SECS",
    "KTK_MAX_BODY_BYTES_IN_FLIGHT",
    "KTK_MAX_BODY_BYTES",
    "KTK_MAX_EVENT_AGE_SECS",
    "KTK_RETRY_AFTER_SECS",
    "KTK_MAX_CONCURRENT_REQUESTS",
    "KTK_DRAIN_TIMEOUT_SECS",
    "KTK_FLUSH_TIMEOUT_SECS",
    "KTK_MAX_CONNECTIONS",
    "KTK_HEADER_TIMEOUT_SECS",
    "KTK_BODY_TIMEOUT_SECS",
    "KTK_IDLE_TIMEOUT_SECS",
    "KTK_MAX_EVENTS_PER_REQUEST",
    "KTK_MAX_EVENT_BYTES",
    "KTK_RECORD_MAX_BUFFERED_MS",
    "KTK_MAX_OUTSTANDING_RECORDS",
    "KTK_LOG_FORMAT",
];

/// Runs the collector with `args`, `vars` and none of the caller's `KTK_*` variables.
fn collector(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_collector"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KTK_") {
            command.env_remove(name);
        }
    }
    command.args(args).envs(vars.iter().copied()).output().expect("the collector binary runs")
}

#[test]
fn help_lists_every_variable_with_its_default_and_unit() {
    let out = collector(&["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for variable in VARIABLES {
        assert!(help.contains(&format!("[env: {variable}")), "{variable} missing from:\n{help}");
    }
    for shown in [
        "[default: 1048576]",
        "[default: 100]",
        "[default: 127.0.0.1:8080]",
        "[default: 4096]",
        "[default: 500]",
        "[default: 32768]",
        "<MS>",
        "<BYTES>",
        "<SECS>",
        "<CONNECTIONS>",
        "<EVENTS>",
    ] {
        assert!(help.contains(shown), "{shown} missing from:\n{help}");
    }
}

#[test]
fn an_unknown_variable_exits_2_naming_the_nearest_setting() {
    let out = collector(&[], &[("KTK_STREAM", "events"), ("KTK_MAX_BODY_BYTE", "10"), ("KTK_CACHE", "/tmp")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.contains("KTK_MAX_BODY_BYTE is not a setting of collector"), "{stderr}");
    assert!(first.contains("did you mean KTK_MAX_BODY_BYTES?") && !first.contains("KTK_CACHE"), "{stderr}");
}

#[test]
fn a_bad_variable_exits_2_and_names_it() {
    for (variable, value) in [
        ("KTK_RECORD_MAX_BUFFERED_MS", "soon"),
        ("KTK_MAX_OUTSTANDING_RECORDS", "0"),
        ("KTK_LISTEN", "localhost"),
        ("KTK_LOG_FORMAT", "xml"),
    ] {
        let out = collector(&[], &[("KTK_STREAM", "events"), ("KTK_KEYS_FILE", "keys.json"), (variable, value)]);
        assert_eq!(out.status.code(), Some(2), "{variable}={value}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains(variable) && first.contains(value), "{variable}={value}: {stderr}");
    }
}

#[test]
fn a_missing_stream_exits_2_and_names_it() {
    // An empty variable counts as unset.
    let out = collector(&[], &[("KTK_STREAM", " ")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KTK_STREAM") && stderr.contains("--stream"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn without_a_keys_document_it_exits_2_naming_both_settings() {
    let out = collector(&[], &[("KTK_STREAM", "events")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KTK_KEYS_FILE") && stderr.contains("KTK_KEYS_SECRET"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn a_keys_document_that_cannot_be_used_stops_it_before_it_listens() {
    let dir = std::env::temp_dir().join(format!("ktk-collector-bin-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let missing = dir.join("missing.json");
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"keys": [{"app_id": "tv-web", "key": "wk_tiny_secret"}]}"#).expect("write");
    // A port nothing listens on: the collector must stop before binding it (or reaching AWS).
    let vars = |path: &std::path::Path| {
        vec![
            ("KTK_STREAM", "events".to_owned()),
            ("KTK_KEYS_FILE", path.display().to_string()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_owned()),
        ]
    };
    for (path, expected) in [(&missing, "missing.json"), (&broken, "keys[0]: a key must be 16")] {
        let vars = vars(path);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = collector(&[], &vars);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let logs = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(logs.contains(expected), "{logs}");
        assert!(!logs.contains("wk_tiny_secret"), "a key is never logged: {logs}");
        assert!(!logs.contains("listening"), "{logs}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}
