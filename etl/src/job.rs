//! Jobs as files. A job is a directory `<name>/` holding `job.toml` (what it reads, its partition
//! key, and per version the output columns) and one `v<N>.sql` per version:
//!
//! ```toml
//! description = "Plays per title per day."
//! inputs = ["events"]
//! partition_key = "dt"
//!
//! [versions.1]
//! columns = ["content_id string", "plays bigint"]
//! ```
//!
//! The SQL reads the table `events` and must filter it with `dt = '{{dt}}'`: the runner puts the
//! day there, so the same text runs here (where `events` holds only that day) and in Athena (where
//! it holds every day). Column types are `string`, `bigint` and `double`, as in Athena. The
//! shipped jobs are embedded at build time (`jobs/` beside this crate); `--jobs-dir` reads another
//! directory of the same shape.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{Day, EtlError};

include!(concat!(env!("OUT_DIR"), "/embedded_jobs.rs"));

/// The placeholder the runner replaces with the day (`YYYY-MM-DD`).
pub const DAY_PLACEHOLDER: &str = "{{dt}}";

/// The type of an output column, named as in Athena (and Parquet's physical types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text: Parquet `BYTE_ARRAY (STRING)`.
    String,
    /// 64-bit signed integer: Parquet `INT64`.
    Bigint,
    /// IEEE 754 double: Parquet `DOUBLE`.
    Double,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Bigint => "bigint",
            ColumnType::Double => "double",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "string" => Some(ColumnType::String),
            "bigint" => Some(ColumnType::Bigint),
            "double" => Some(ColumnType::Double),
            _ => None,
        }
    }
}

/// A declared output column. Every column may be null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub column_type: ColumnType,
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.column_type.name())
    }
}

/// One version of a job: its SQL and the columns it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobVersion {
    pub job: String,
    pub version: u32,
    pub sql: String,
    pub columns: Vec<Column>,
    /// SHA-256 (hex) of the job's name, version, columns and SQL: what the manifest records, so a
    /// change to any of them makes the committed days stale.
    pub sha256: String,
}

impl JobVersion {
    /// The SQL with the day in place of [`DAY_PLACEHOLDER`].
    pub fn sql_for(&self, day: Day) -> String {
        self.sql.replace(DAY_PLACEHOLDER, &day.to_string())
    }
}

/// A job: its description and versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub description: String,
    pub inputs: Vec<String>,
    pub partition_key: String,
    pub versions: BTreeMap<u32, JobVersion>,
}

impl Job {
    /// The version asked for, or the latest.
    pub fn version(&self, version: Option<u32>) -> Result<&JobVersion, EtlError> {
        let found = match version {
            Some(v) => self.versions.get(&v),
            None => self.versions.values().next_back(),
        };
        found.ok_or_else(|| EtlError::UnknownVersion {
            job: self.name.clone(),
            version: version.unwrap_or(0),
            known: self.versions.keys().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", "),
        })
    }
}

/// Every job, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub jobs: BTreeMap<String, Job>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    description: String,
    inputs: Vec<String>,
    partition_key: String,
    versions: BTreeMap<String, VersionFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    columns: Vec<String>,
}

impl Catalog {
    /// The jobs shipped in `etl/jobs/`, embedded at build time.
    pub fn builtin() -> Result<Catalog, EtlError> {
        let files = EMBEDDED_JOB_FILES.iter().map(|(path, text)| ((*path).to_owned(), (*text).to_owned())).collect();
        Catalog::from_files(Path::new("etl/jobs"), &files)
    }

    /// The jobs in `dir` (`dir/<name>/job.toml`, `dir/<name>/v<N>.sql`).
    pub fn from_dir(dir: &Path) -> Result<Catalog, EtlError> {
        let mut files = BTreeMap::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| job_file_error(dir, format!("cannot read the jobs directory: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| job_file_error(dir, e.to_string()))?;
            let job_dir = entry.path();
            if !job_dir.is_dir() {
                continue;
            }
            let job_entries = std::fs::read_dir(&job_dir).map_err(|e| job_file_error(&job_dir, e.to_string()))?;
            for file in job_entries {
                let file = file.map_err(|e| job_file_error(&job_dir, e.to_string()))?.path();
                let Some(name) = file.file_name().and_then(|n| n.to_str()) else { continue };
                if !(name.ends_with(".toml") || name.ends_with(".sql")) {
                    continue;
                }
                let text = std::fs::read_to_string(&file).map_err(|e| job_file_error(&file, e.to_string()))?;
                let job = entry.file_name().to_string_lossy().into_owned();
                files.insert(format!("{job}/{name}"), text);
            }
        }
        Catalog::from_files(dir, &files)
    }

    /// Jobs from (path under the jobs directory, contents) pairs.
    fn from_files(root: &Path, files: &BTreeMap<String, String>) -> Result<Catalog, EtlError> {
        let mut catalog = Catalog::default();
        for (path, text) in files {
            let Some(name) = path.strip_suffix("/job.toml") else { continue };
            let job = parse_job(root, name, text, files)?;
            catalog.jobs.insert(job.name.clone(), job);
        }
        for path in files.keys() {
            let job = path.split('/').next().unwrap_or_default();
            if !catalog.jobs.contains_key(job) {
                return Err(job_file_error(&root.join(path), format!("no {job}/job.toml beside it")));
            }
        }
        Ok(catalog)
    }

    pub fn job(&self, name: &str) -> Result<&Job, EtlError> {
        self.jobs.get(name).ok_or_else(|| EtlError::UnknownJob(name.to_owned()))
    }
}

fn job_file_error(path: &Path, message: impl Into<String>) -> EtlError {
    EtlError::JobFile { path: path.to_path_buf(), message: message.into() }
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && text.len() <= 64
}

fn parse_job(root: &Path, name: &str, text: &str, files: &BTreeMap<String, String>) -> Result<Job, EtlError> {
    let path: PathBuf = root.join(name).join("job.toml");
    let error = |message: String| job_file_error(&path, message);
    if !is_identifier(name) {
        return Err(error(format!(
            "the job's name {name:?} must be lower-case letters, digits and _ (it names S3 prefixes and Athena tables)"
        )));
    }
    let file: JobFile = toml::from_str(text).map_err(|e| error(e.to_string()))?;
    if file.inputs != ["events"] {
        return Err(error(format!("inputs = {:?}: the one input a job reads is [\"events\"]", file.inputs)));
    }
    if file.partition_key != "dt" {
        return Err(error(format!("partition_key = {:?}: jobs are partitioned by day, \"dt\"", file.partition_key)));
    }
    if file.versions.is_empty() {
        return Err(error("no [versions.N] table".into()));
    }
    let mut versions = BTreeMap::new();
    for (key, declared) in file.versions {
        let version = key
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= 1 && key == v.to_string())
            .ok_or_else(|| error(format!("[versions.{key}]: a version is a number from 1")))?;
        let mut columns = Vec::new();
        for spec in &declared.columns {
            let mut parts = spec.split_whitespace();
            let (Some(column), Some(column_type), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(error(format!("v{version} column {spec:?}: expected \"<name> <type>\"")));
            };
            let column_type = ColumnType::parse(column_type).ok_or_else(|| {
                error(format!("v{version} column {column}: type {column_type:?} is not string, bigint or double"))
            })?;
            if !is_identifier(column) || column == "dt" {
                return Err(error(format!(
                    "v{version} column {column:?}: lower-case letters, digits and _, and not dt (the partition column)"
                )));
            }
            if columns.iter().any(|c: &Column| c.name == column) {
                return Err(error(format!("v{version} column {column} is declared twice")));
            }
            columns.push(Column { name: column.to_owned(), column_type });
        }
        if columns.is_empty() {
            return Err(error(format!("v{version} declares no columns")));
        }
        let sql_path = format!("{name}/v{version}.sql");
        let sql = files.get(&sql_path).ok_or_else(|| error(format!("v{version} has no {sql_path}")))?.clone();
        if !sql.contains(DAY_PLACEHOLDER) {
            return Err(job_file_error(
                &root.join(&sql_path),
                format!(
                    "the SQL must filter events by day with dt = '{DAY_PLACEHOLDER}' (so Athena reads one partition)"
                ),
            ));
        }
        let sha256 = job_hash(name, version, &columns, &sql);
        versions.insert(version, JobVersion { job: name.to_owned(), version, sql, columns, sha256 });
    }
    for path in files.keys().filter(|p| p.starts_with(&format!("{name}/")) && p.ends_with(".sql")) {
        let declared = path
            .strip_prefix(&format!("{name}/v"))
            .and_then(|rest| rest.strip_suffix(".sql"))
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|v| versions.contains_key(&v));
        if !declared {
            return Err(job_file_error(&root.join(path), "no [versions.N] in job.toml declares this file".to_owned()));
        }
    }
    Ok(Job {
        name: name.to_owned(),
        description: file.description,
        inputs: file.inputs,
        partition_key: file.partition_key,
        versions,
    })
}

fn job_hash(name: &str, version: u32, columns: &[Column], sql: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(format!("ktk-etl job\n{name}\nv{version}\n").as_bytes());
    for column in columns {
        hash.update(format!("{column}\n").as_bytes());
    }
    hash.update(b"--\n");
    hash.update(sql.as_bytes());
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
    }

    const TOML: &str = "description = \"d\"\ninputs = [\"events\"]\npartition_key = \"dt\"\n[versions.1]\ncolumns = [\"a string\", \"n bigint\"]\n";
    const SQL: &str = "SELECT platform AS a, COUNT(*) AS n FROM events WHERE dt = '{{dt}}' GROUP BY platform";

    #[test]
    fn the_shipped_jobs_parse() {
        let catalog = Catalog::builtin().expect("the shipped jobs are valid");
        let names: Vec<&str> = catalog.jobs.keys().map(String::as_str).collect();
        assert_eq!(names, ["ad_completion", "daily_active_users", "plays_per_title", "user_segments"]);
        let dau = catalog.job("daily_active_users").expect("job");
        assert_eq!(dau.version(None).expect("latest").version, 2);
        assert_eq!(dau.version(Some(1)).expect("v1").columns.len(), 4);
        assert!(matches!(dau.version(Some(3)), Err(EtlError::UnknownVersion { .. })));
    }

    #[test]
    fn a_job_is_a_toml_and_its_sql() {
        let catalog =
            Catalog::from_files(Path::new("jobs"), &files(&[("j/job.toml", TOML), ("j/v1.sql", SQL)])).expect("valid");
        let version = catalog.job("j").expect("job").version(None).expect("v1");
        assert_eq!(version.columns[1], Column { name: "n".into(), column_type: ColumnType::Bigint });
        assert!(version.sql_for("2026-03-01".parse().expect("day")).contains("dt = '2026-03-01'"));
        assert_eq!(version.sha256.len(), 64);
    }

    #[test]
    fn the_hash_covers_the_sql_and_the_columns() {
        let base =
            Catalog::from_files(Path::new("jobs"), &files(&[("j/job.toml", TOML), ("j/v1.sql", SQL)])).expect("valid");
        let sql2 = format!("{SQL}\n");
        let other_sql = Catalog::from_files(Path::new("jobs"), &files(&[("j/job.toml", TOML), ("j/v1.sql", &sql2)]))
            .expect("valid");
        let toml2 = TOML.replace("n bigint", "n double");
        let other_columns =
            Catalog::from_files(Path::new("jobs"), &files(&[("j/job.toml", &toml2), ("j/v1.sql", SQL)]))
                .expect("valid");
        let hash = |c: &Catalog| c.job("j").expect("job").version(None).expect("v").sha256.clone();
        assert_ne!(hash(&base), hash(&other_sql));
        assert_ne!(hash(&base), hash(&other_columns));
    }

    #[test]
    fn bad_jobs_are_refused_with_what_to_fix() {
        let cases: Vec<(BTreeMap<String, String>, &str)> = vec![
            (files(&[("j/job.toml", TOML)]), "has no j/v1.sql"),
            (files(&[("j/job.toml", TOML), ("j/v1.sql", "SELECT 1 AS a, 2 AS n FROM events")]), "dt = '{{dt}}'"),
            (
                files(&[("j/job.toml", &TOML.replace("bigint", "int")), ("j/v1.sql", SQL)]),
                "is not string, bigint or double",
            ),
            (files(&[("j/job.toml", &TOML.replace("\"a string\"", "\"dt string\"")), ("j/v1.sql", SQL)]), "not dt"),
            (files(&[("j/job.toml", &TOML.replace("[\"events\"]", "[\"clicks\"]")), ("j/v1.sql", SQL)]), "inputs"),
            (files(&[("j/job.toml", &format!("{TOML}color = 1\n")), ("j/v1.sql", SQL)]), "unknown field"),
            (files(&[("j/job.toml", TOML), ("j/v1.sql", SQL), ("j/v2.sql", SQL)]), "declares this file"),
            (files(&[("Bad-Name/job.toml", TOML), ("Bad-Name/v1.sql", SQL)]), "lower-case"),
            (files(&[("j/v1.sql", SQL)]), "no j/job.toml"),
            (
                files(&[("j/job.toml", &TOML.replace("versions.1", "versions.01")), ("j/v1.sql", SQL)]),
                "a version is a number",
            ),
        ];
        for (case, expected) in cases {
            let error = Catalog::from_files(Path::new("jobs"), &case).expect_err("refused").to_string();
            assert!(error.contains(expected), "{error} should contain {expected}");
        }
    }
}
