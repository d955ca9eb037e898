//! The manifest of a committed partition (`<derived>/<job>/v=<V>/dt=<D>/_manifest.json`): what it
//! was computed from and what it holds. Readers trust a partition only through its manifest: the
//! data file it names is the partition, and files it does not name are not part of it.

use serde::{Deserialize, Serialize};

/// The `format` of manifests this build writes.
pub const MANIFEST_FORMAT: &str = "ktk-etl-manifest/1";

/// An input object as listed when the run started.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InputObject {
    pub key: String,
    /// The ETag S3 listed (quoted, as S3 gives it).
    pub etag: String,
    pub size: u64,
}

/// The data file of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputObject {
    pub key: String,
    pub size: u64,
    /// SHA-256 (hex) of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub job: String,
    pub version: u32,
    /// The day, `YYYY-MM-DD`.
    pub dt: String,
    /// The job version's hash (name, version, columns, SQL).
    pub job_sha256: String,
    /// The engine and its version (`sqlite 3.x.y`).
    pub engine: String,
    /// Every events object of the day's partition, in key order.
    pub inputs: Vec<InputObject>,
    /// Distinct events read (one per `event_id`).
    pub input_events: u64,
    /// Further copies of an `event_id` read, not counted.
    pub input_duplicates: u64,
    /// Rows of the output.
    pub rows: u64,
    /// The output's columns, `<name> <type>`.
    pub columns: Vec<String>,
    pub output: OutputObject,
    /// When this run committed (UTC, `YYYY-MM-DD HH:MM:SS.mmm`); not part of what is compared.
    pub computed_at: String,
}

impl Manifest {
    /// Whether this manifest was computed from exactly `inputs`, by `job_sha256` on `engine`.
    pub fn matches(&self, job_sha256: &str, engine: &str, inputs: &[InputObject]) -> bool {
        self.job_sha256 == job_sha256 && self.engine == engine && self.inputs == inputs
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(format!("format {:?}; this build reads {MANIFEST_FORMAT:?}", manifest.format));
        }
        Ok(manifest)
    }
}

/// How the inputs of a day differ from those a manifest names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputChanges {
    /// Objects there now that the manifest does not name (late data).
    pub added: Vec<String>,
    /// Objects the manifest names that are gone.
    pub removed: Vec<String>,
    /// Objects there under the same key with another ETag or size (rewritten).
    pub changed: Vec<String>,
}

impl InputChanges {
    pub fn between(before: &[InputObject], now: &[InputObject]) -> InputChanges {
        let mut changes = InputChanges::default();
        for object in now {
            match before.iter().find(|b| b.key == object.key) {
                None => changes.added.push(object.key.clone()),
                Some(b) if b != object => changes.changed.push(object.key.clone()),
                Some(_) => {}
            }
        }
        for object in before {
            if !now.iter().any(|n| n.key == object.key) {
                changes.removed.push(object.key.clone());
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(key: &str, etag: &str) -> InputObject {
        InputObject { key: key.into(), etag: etag.into(), size: 10 }
    }

    #[test]
    fn input_changes_name_added_removed_and_rewritten_objects() {
        let before = [input("a", "1"), input("b", "1"), input("c", "1")];
        let now = [input("a", "1"), input("c", "2"), input("d", "1")];
        let changes = InputChanges::between(&before, &now);
        assert_eq!(changes.added, ["d"]);
        assert_eq!(changes.removed, ["b"]);
        assert_eq!(changes.changed, ["c"]);
        assert!(InputChanges::between(&now, &now).is_empty());
    }

    #[test]
    fn manifests_round_trip_and_other_formats_are_refused() {
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            job: "j".into(),
            version: 1,
            dt: "2026-03-01".into(),
            job_sha256: "ab".into(),
            engine: "sqlite 3".into(),
            inputs: vec![input("a", "1")],
            input_events: 5,
            input_duplicates: 1,
            rows: 2,
            columns: vec!["a string".into()],
            output: OutputObject { key: "k".into(), size: 3, sha256: "cd".into() },
            computed_at: "2026-03-02 00:00:00.000".into(),
        };
        assert_eq!(Manifest::from_json(&manifest.to_json()).expect("parses"), manifest);
        assert!(manifest.matches("ab", "sqlite 3", &[input("a", "1")]));
        assert!(!manifest.matches("ab", "sqlite 3", &[input("a", "2")]));
        assert!(!manifest.matches("ab", "sqlite 4", &[input("a", "1")]));
        let other =
            String::from_utf8(manifest.to_json()).expect("utf-8").replace(MANIFEST_FORMAT, "ktk-etl-manifest/9");
        assert!(Manifest::from_json(other.as_bytes()).expect_err("refused").contains("format"));
    }
}
