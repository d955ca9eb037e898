//! The `consumer` binary refuses bad settings at start, naming the variable, with exit status 2.
//! (Its runs against LocalStack and PostgreSQL are in `tests/tests/pipeline_e2e.rs`, which uses the
//! binary this test makes cargo build.)

use std::process::Command;

fn consumer(vars: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_consumer"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KTK_") {
            command.env_remove(name);
        }
    }
    command.envs(vars.iter().copied());
    let output = command.output().expect("run consumer");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn missing_and_bad_settings_exit_2_naming_the_variable() {
    let (code, stderr) = consumer(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KTK_STREAM"), "{stderr}");

    let (code, stderr) = consumer(&[("KTK_STREAM", "events"), ("KTK_APPLICATION", "app")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no sink"), "{stderr}");

    let (code, stderr) = consumer(&[
        ("KTK_STREAM", "events"),
        ("KTK_APPLICATION", "app"),
        ("KTK_S3_BUCKET", "b"),
        ("KTK_S3_FORMAT", "csv"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KTK_S3_FORMAT"), "{stderr}");
}
