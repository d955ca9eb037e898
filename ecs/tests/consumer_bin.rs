//! The `consumer` binary lists every setting in `--help` and refuses bad settings at start, naming
//! the flag and its variable in one line, with exit status 2.
//! (Its runs against LocalStack and PostgreSQL are in `tests/tests/pipeline_e2e.rs`, which uses the
//! binary this test makes cargo build.)

use std::process::Command;

fn consumer(vars: &[(&str, &str)]) -> (i32, String) {
    consumer_with(vars, &[])
}

fn consumer_with(vars: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_consumer"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KTK_") {
            command.env_remove(name);
        }
    }
    command.envs(vars.iter().copied()).args(args);
    let output = command.output().expect("run consumer");
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn missing_and_bad_settings_exit_2_naming_the_variable() {
    let (code, stderr) = consumer(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KTK_STREAM"), "{stderr}");

    let (code, stderr) = consumer(&[("KTK_STREAM", "events"), ("KTK_APPLICATION", "app")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KTK_S3_BUCKET") && stderr.contains("KTK_POSTGRES_URL"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let (code, stderr) = consumer(&[
        ("KTK_STREAM", "events"),
        ("KTK_APPLICATION", "app"),
        ("KTK_S3_BUCKET", "b"),
        ("KTK_S3_FORMAT", "csv"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KTK_S3_FORMAT"), "{stderr}");
}

#[test]
fn an_unknown_variable_exits_2_naming_the_nearest_setting() {
    let (code, stderr) = consumer(&[
        ("KTK_STREAM", "events"),
        ("KTK_APPLICATION", "app"),
        ("KTK_S3_BUCKETS", "b"),
        // Tooling variables of the scripts are not settings, and are accepted.
        ("KTK_CACHE", "/tmp"),
        ("KTK_FLAKY_ENDPOINT_URL", "http://127.0.0.1:1"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    let line = stderr.lines().next().unwrap_or_default();
    assert!(line.contains("KTK_S3_BUCKETS") && line.contains("did you mean KTK_S3_BUCKET?"), "{stderr}");
    assert!(!stderr.contains("KTK_CACHE") && !stderr.contains("KTK_FLAKY"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // --help still works with the typo in the environment.
    let (code, help) = consumer_with(&[("KTK_S3_BUCKETS", "b")], &["--help"]);
    assert_eq!(code, 0, "{help}");
}

#[test]
fn help_lists_every_setting_with_its_variable() {
    let (code, help) = consumer_with(&[], &["--help"]);
    assert_eq!(code, 0, "{help}");
    for variable in [
        "KTK_STREAM",
        "KTK_APPLICATION",
        "KTK_WORKER_ID",
        "KTK_INITIAL_POSITION",
        "KTK_INITIAL_TIMESTAMP_MS",
        "KTK_FAN_OUT",
        "KTK_FAILOVER_MS",
        "KTK_RENEW_MS",
        "KTK_TAKING_MS",
        "KTK_DISCOVERY_MS",
        "KTK_SHARD_SYNC_MS",
        "KTK_PARENT_POLL_MS",
        "KTK_IDLE_MS",
        "KTK_SHUTDOWN_TIMEOUT_MS",
        "KTK_LISTEN",
        "KTK_LOG_FORMAT",
        "KTK_UNHEALTHY_AFTER_MS",
    ]
    .into_iter()
    .chain(ktk_pipeline::settings::SHARED_VARIABLES)
    {
        assert!(help.contains(&format!("env: {variable}")), "{variable} missing from --help:\n{help}");
    }
    assert!(help.contains("[default: 10000]") && help.contains("MS"), "{help}");
}
