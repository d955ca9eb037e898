//! The jobs' SQL parses in both engines' dialects: `etl/lint-sql.sh` (sqlfluff, dialects athena,
//! trino and sqlite) passes on every shipped job, and fails, naming the file and the dialect, on
//! SQL that only one side reads. The script installs sqlfluff on first use; these tests never
//! skip: when it cannot, they fail with its output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const DIALECTS: [&str; 3] = ["athena", "trino", "sqlite"];

fn etl_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What one run of the script did.
struct Lint {
    success: bool,
    /// Its stdout and stderr, in that order.
    output: String,
}

fn lint(files: &[PathBuf]) -> Lint {
    let script = etl_dir().join("lint-sql.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (bash is needed)", script.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Lint {
        success: output.status.success(),
        output: format!("--- exit: {}\n--- stdout\n{stdout}--- stderr\n{stderr}", output.status),
    }
}

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempJobs(PathBuf);

impl TempJobs {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ktk-etl-sql-dialects-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self(dir)
    }

    fn write(&self, name: &str, sql: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, sql).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempJobs {
    fn drop(&mut self) {
        // Best effort: a leftover directory under the temporary directory harms nothing.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that the script failed, that `file` failed in exactly the dialects `failing` (with
/// `unparsable` in the reported section) and parsed in the others.
fn assert_fails_only_in(lint: &Lint, file: &Path, failing: &[&str], unparsable: &str) {
    assert!(!lint.success, "lint-sql.sh passed on {}:\n{}", file.display(), lint.output);
    for dialect in DIALECTS {
        let (expected, other) = if failing.contains(&dialect) { ("FAIL", "OK  ") } else { ("OK  ", "FAIL") };
        let line = |verdict: &str| format!("] {verdict} {} ({dialect})", file.display());
        assert!(lint.output.contains(&line(expected)), "expected `{}` in:\n{}", line(expected), lint.output);
        assert!(!lint.output.contains(&line(other)), "unexpected `{}` in:\n{}", line(other), lint.output);
    }
    assert!(
        lint.output.contains(&format!("Found unparsable section: \"{unparsable}"))
            || lint.output.contains(&format!("Found unparsable section: '{unparsable}")),
        "expected the unparsable section to start with {unparsable:?} in:\n{}",
        lint.output
    );
}

#[test]
fn the_shipped_jobs_parse_in_every_dialect() {
    let jobs = etl_dir().join("jobs");
    let mut files = Vec::new();
    for job in std::fs::read_dir(&jobs).unwrap_or_else(|e| panic!("read {}: {e}", jobs.display())) {
        let job = job.expect("a directory entry").path();
        for entry in std::fs::read_dir(&job).unwrap_or_else(|e| panic!("read {}: {e}", job.display())) {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with('v') && name.ends_with(".sql") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 5, "expected the shipped jobs' SQL files, found {files:?}");

    // No arguments: the script finds the same files itself.
    let lint = lint(&[]);
    assert!(lint.success, "lint-sql.sh failed on the shipped jobs:\n{}", lint.output);
    for file in &files {
        let name = file.strip_prefix(etl_dir()).expect("under the crate").display().to_string();
        for dialect in DIALECTS {
            let ok = format!("] OK   {name} ({dialect})");
            assert!(lint.output.contains(&ok), "expected `{ok}` in:\n{}", lint.output);
        }
    }
    print!("{}", lint.output);
}

#[test]
fn sqlite_only_sql_fails_in_athena_and_trino() {
    let dir = TempJobs::new("sqlite-only");
    // GLOB is SQLite's pattern operator; Trino has no such operator.
    let glob = dir.write(
        "glob.sql",
        "SELECT content_id, COUNT(*) AS plays\nFROM events\nWHERE dt = '{{dt}}' AND content_id GLOB 'tt[0-9]*'\nGROUP BY content_id\n",
    );
    assert_fails_only_in(&lint(std::slice::from_ref(&glob)), &glob, &["athena", "trino"], "GLOB");

    // Neither a `-- noqa` comment nor an in-file sqlfluff setting hides it.
    let noqa =
        dir.write("noqa.sql", "SELECT content_id FROM events WHERE dt = '{{dt}}' AND content_id GLOB 'tt*' -- noqa\n");
    assert_fails_only_in(&lint(std::slice::from_ref(&noqa)), &noqa, &["athena", "trino"], "GLOB");
    let setting = dir.write(
        "setting.sql",
        "-- sqlfluff:ignore:parsing\nSELECT content_id FROM events WHERE dt = '{{dt}}' AND content_id GLOB 'tt*'\n",
    );
    let lint = lint(std::slice::from_ref(&setting));
    assert!(!lint.success, "lint-sql.sh passed on {}:\n{}", setting.display(), lint.output);
    let refused = format!("] FAIL {}: sqlfluff settings in the file", setting.display());
    assert!(lint.output.contains(&refused), "expected `{refused}` in:\n{}", lint.output);
}

#[test]
fn athena_only_sql_fails_in_sqlite() {
    let dir = TempJobs::new("athena-only");
    // An interval literal: Athena's timestamps (occurred_at_ms and received_at_ms are timestamps
    // there) take one; SQLite has none.
    let interval = dir.write(
        "interval.sql",
        "SELECT platform, COUNT(*) AS late\nFROM events\nWHERE dt = '{{dt}}' AND received_at_ms > occurred_at_ms + INTERVAL '1' HOUR\nGROUP BY platform\n",
    );
    assert_fails_only_in(&lint(std::slice::from_ref(&interval)), &interval, &["sqlite"], "HOUR");
}

#[test]
fn backquoted_identifiers_fail_in_trino() {
    let dir = TempJobs::new("backticks");
    // Backquoted identifiers: SQLite and sqlfluff's athena dialect (Athena's DDL) accept them,
    // Athena's queries (Trino) do not; the trino dialect catches it.
    let backticks = dir.write("backticks.sql", "SELECT `platform`, COUNT(*) AS n FROM events WHERE dt = '{{dt}}'\n");
    assert_fails_only_in(&lint(std::slice::from_ref(&backticks)), &backticks, &["trino"], "`platform`");
}
