//! The schema check of CI (`scripts/buf.sh check`: `buf lint`, then `buf breaking` at category
//! FILE against the released schema in `proto/baseline/`) catches breaking edits and lets
//! compatible ones through. Each test copies `proto/buf.yaml` and `proto/protos` to a folder of
//! its own, makes one edit and runs the same script on the copy. The script installs the pinned
//! Buf CLI from the npm registry when its cache does not have it; without npm (or the registry,
//! the first time) these tests fail, they never skip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const EVENTS: &str = "protos/events/v1/events.proto";
const KPL: &str = "protos/kpl/aggregation.proto";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("proto/ is inside the workspace").to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create folder");
    for entry in fs::read_dir(from).expect("read folder") {
        let entry = entry.expect("folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// What `scripts/buf.sh check` said about the schema after an edit.
struct Outcome {
    passed: bool,
    output: String,
}

/// Copies the schema, replaces `from` (which must be in `file`) by `to`, runs the check.
fn check_after(name: &str, file: &str, from: &str, to: &str) -> Outcome {
    let root = repo_root();
    let dir = std::env::temp_dir().join(format!("ktk-schema-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create folder");
    fs::copy(root.join("proto/buf.yaml"), dir.join("buf.yaml")).expect("copy buf.yaml");
    copy_dir(&root.join("proto/protos"), &dir.join("protos"));
    let path = dir.join(file);
    let text = fs::read_to_string(&path).expect("read schema");
    assert!(text.contains(from), "{file} no longer contains {from:?}: update this test's edit");
    fs::write(&path, text.replacen(from, to, 1)).expect("write schema");

    let output = Command::new(root.join("scripts/buf.sh"))
        .arg("check")
        .arg(&dir)
        .output()
        .expect("scripts/buf.sh runs (bash is needed)");
    let _ = fs::remove_dir_all(&dir);
    Outcome {
        passed: output.status.success(),
        output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    }
}

/// The edit fails the check, with buf's message `expected` and the script's pointer to the docs.
fn assert_caught(name: &str, file: &str, from: &str, to: &str, expected: &str) {
    let outcome = check_after(name, file, from, to);
    assert!(!outcome.passed, "{name}: the check passed a breaking edit:\n{}", outcome.output);
    assert!(outcome.output.contains(expected), "{name}: buf did not say {expected:?}:\n{}", outcome.output);
    assert!(outcome.output.contains("see docs/schema.md"), "{name}:\n{}", outcome.output);
}

fn assert_passes(name: &str, file: &str, from: &str, to: &str) {
    let outcome = check_after(name, file, from, to);
    assert!(outcome.passed, "{name}: the check refused a compatible edit:\n{}", outcome.output);
    assert!(outcome.output.contains("buf lint: ok"), "{}", outcome.output);
    assert!(outcome.output.contains("buf breaking against the released schema"), "{}", outcome.output);
}

#[test]
fn the_schema_as_it_is_passes() {
    assert_passes("unchanged", EVENTS, "syntax = \"proto3\";", "syntax = \"proto3\";");
}

#[test]
fn a_renumbered_field_is_caught() {
    assert_caught(
        "renumbered",
        EVENTS,
        "string event_id = 1;",
        "string event_id = 30;",
        "Previously present field \"1\" with name \"event_id\" on message \"Event\" was deleted.",
    );
}

#[test]
fn a_changed_field_type_is_caught() {
    assert_caught(
        "retyped",
        EVENTS,
        "int64 occurred_at_ms = 3;",
        "string occurred_at_ms = 3;",
        "Field \"3\" with name \"occurred_at_ms\" on message \"Event\" changed type from \"int64\" to \"string\".",
    );
}

#[test]
fn a_removed_enum_value_is_caught() {
    assert_caught(
        "enum-value-removed",
        EVENTS,
        "  EVENT_TYPE_ERROR = 60;\n",
        "",
        "Previously present enum value \"60\" on enum \"EventType\" was deleted.",
    );
}

#[test]
fn a_renamed_json_field_is_caught() {
    assert_caught(
        "json-renamed",
        EVENTS,
        "string user_id = 5;",
        "string user_id = 5 [json_name = \"uid\"];",
        "Field \"5\" with name \"user_id\" on message \"Event\" changed option \"json_name\" from \"userId\" to \"uid\".",
    );
}

#[test]
fn a_renamed_field_is_caught() {
    assert_caught(
        "renamed",
        EVENTS,
        "string device_id = 6;",
        "string device_uid = 6;",
        "Field \"6\" on message \"Event\" changed name from \"device_id\" to \"device_uid\".",
    );
}

/// Wire-safe, but every app that names the field stops compiling: category FILE refuses it.
#[test]
fn a_removed_field_is_caught_even_when_reserved() {
    assert_caught(
        "removed-reserved",
        EVENTS,
        "  string ad_break = 17;\n",
        "  reserved 17;\n  reserved \"ad_break\";\n",
        "Previously present field \"17\" with name \"ad_break\" on message \"Event\" was deleted.",
    );
}

/// The KPL file is exempt from two lint rules only; breaking changes to it are caught like any.
#[test]
fn a_changed_kpl_label_is_caught() {
    assert_caught(
        "kpl-label",
        KPL,
        "required uint64 partition_key_index = 1;",
        "optional uint64 partition_key_index = 1;",
        "changed cardinality from \"required\" to \"optional with explicit presence\"",
    );
}

#[test]
fn a_field_against_the_lint_rules_is_caught() {
    assert_caught(
        "lint",
        EVENTS,
        "string app_id = 25;",
        "string app_id = 25;\n  string newField = 26;",
        "Field name \"newField\" should be lower_snake_case, such as \"new_field\".",
    );
}

#[test]
fn a_new_field_passes() {
    assert_passes("new-field", EVENTS, "string app_id = 25;", "string app_id = 25;\n  string experiment_id = 26;");
}

#[test]
fn a_new_optional_field_passes() {
    assert_passes(
        "new-optional",
        EVENTS,
        "string app_id = 25;",
        "string app_id = 25;\n  optional int64 watched_ms = 26;",
    );
}

#[test]
fn a_new_enum_value_passes() {
    assert_passes(
        "new-enum-value",
        EVENTS,
        "EVENT_TYPE_APP_CLOSE = 44;",
        "EVENT_TYPE_APP_CLOSE = 44;\n  EVENT_TYPE_SHARE = 45;",
    );
}

#[test]
fn a_deprecated_field_passes() {
    assert_passes("deprecated", EVENTS, "string ad_break = 17;", "string ad_break = 17 [deprecated = true];");
}
