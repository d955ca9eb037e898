//! `bootstrap --help` lists every setting with its variable; a bad setting outside Lambda (no
//! Runtime API to report to) still exits 2 with one line naming the flag and the variable.

use std::process::Command;

fn bootstrap(vars: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bootstrap"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KTK_") || name.starts_with("AWS_LAMBDA_") {
            command.env_remove(name);
        }
    }
    // An address where nothing listens: reporting the init error fails fast.
    command.env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9").envs(vars.iter().copied()).args(args);
    let output = command.output().expect("run bootstrap");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn help_lists_every_setting_with_its_variable() {
    let (code, help) = bootstrap(&[], &["--help"]);
    assert_eq!(code, 0, "{help}");
    for variable in [
        "KTK_STREAM",
        "KTK_SINK_MAX_ATTEMPTS",
        "KTK_DEADLINE_MARGIN_MS",
        "KTK_STORE_MAX_CONNECTIONS",
        "KTK_METRICS_NAMESPACE",
    ]
    .into_iter()
    .chain(ktk_pipeline::settings::SHARED_VARIABLES)
    {
        assert!(help.contains(&format!("env: {variable}")), "{variable} missing from --help:\n{help}");
    }
}

#[test]
fn an_unknown_variable_exits_2_naming_the_nearest_setting() {
    let (code, text) = bootstrap(&[("KTK_S3_BUCKETS", "b"), ("KTK_LOCALSTACK_PORT", "4566")], &[]);
    assert_eq!(code, 2, "{text}");
    let line = text.lines().find(|l| l.starts_with("bootstrap:")).unwrap_or_default();
    assert!(line.contains("KTK_S3_BUCKETS") && line.contains("did you mean KTK_S3_BUCKET?"), "{text}");
    assert!(!line.contains("KTK_LOCALSTACK_PORT"), "{text}");
    // A consumer-only setting is not one of the function's.
    let (code, text) = bootstrap(&[("KTK_S3_BUCKET", "b"), ("KTK_FAILOVER_MS", "3000")], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("KTK_FAILOVER_MS is not a setting of bootstrap"), "{text}");
}

#[test]
fn a_bad_setting_exits_2_naming_it() {
    let (code, text) = bootstrap(&[("KTK_S3_BUCKET", "b"), ("KTK_BATCH_MAX_RECORDS", "0")], &[]);
    assert_eq!(code, 2, "{text}");
    let line = text.lines().find(|l| l.starts_with("bootstrap:")).unwrap_or_default();
    assert!(line.contains("--batch-max-records / KTK_BATCH_MAX_RECORDS"), "{text}");
    let (code, text) = bootstrap(&[], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("KTK_S3_BUCKET") && text.contains("KTK_POSTGRES_URL"), "{text}");
}
