//! Which days are computed, for which version, from which inputs, and whether they are stale.
//!
//! For each job version of the catalog, every committed partition (every `_manifest.json` under
//! `<derived>/<job>/v=V/`) is compared with the day's events objects now and with the job's hash
//! now. Days that have events but no partition of a job's latest version are listed as missing.

use std::collections::BTreeMap;

use crate::engine::engine_version;
use crate::manifest::{InputChanges, InputObject, Manifest};
use crate::run::Etl;
use crate::{Catalog, Day, EtlError};

/// The state of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Computed from exactly the objects there now, by the job version as it is now.
    Fresh,
    /// Computed, but its inputs changed since, or the job's SQL or columns, or the engine.
    Stale { inputs: InputChanges, job_changed: bool, engine_changed: bool },
    /// Events exist for the day; no partition of the job's latest version.
    Missing { objects: usize },
    /// A manifest that cannot be read.
    Unreadable(String),
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale { .. } => "stale",
            State::Missing { .. } => "missing",
            State::Unreadable(_) => "unreadable",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            State::Fresh => String::new(),
            State::Stale { inputs, job_changed, engine_changed } => {
                let mut parts = Vec::new();
                if !inputs.added.is_empty() {
                    parts.push(format!("{} new input(s)", inputs.added.len()));
                }
                if !inputs.removed.is_empty() {
                    parts.push(format!("{} input(s) gone", inputs.removed.len()));
                }
                if !inputs.changed.is_empty() {
                    parts.push(format!("{} input(s) rewritten", inputs.changed.len()));
                }
                if *job_changed {
                    parts.push("job changed".into());
                }
                if *engine_changed {
                    parts.push("engine changed".into());
                }
                parts.join(", ")
            }
            State::Missing { objects } => format!("{objects} input object(s), not computed"),
            State::Unreadable(error) => error.clone(),
        }
    }
}

/// One row of the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub job: String,
    pub version: u32,
    pub day: Day,
    pub state: State,
    /// The manifest, when there is one.
    pub manifest: Option<Manifest>,
}

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct StatusFilter {
    pub job: Option<String>,
    pub from: Option<Day>,
    pub to: Option<Day>,
}

impl StatusFilter {
    fn takes(&self, day: Day) -> bool {
        self.from.is_none_or(|from| day >= from) && self.to.is_none_or(|to| day <= to)
    }
}

fn day_of_dir(dir: &str) -> Option<Day> {
    dir.trim_end_matches('/').rsplit('/').next()?.strip_prefix("dt=")?.parse().ok()
}

/// The day's inputs, listed once per status.
async fn inputs_cached(
    etl: &Etl,
    cache: &mut BTreeMap<Day, Vec<InputObject>>,
    day: Day,
) -> Result<Vec<InputObject>, EtlError> {
    if let Some(inputs) = cache.get(&day) {
        return Ok(inputs.clone());
    }
    let inputs = etl.inputs(day).await?;
    cache.insert(day, inputs.clone());
    Ok(inputs)
}

/// The status of every partition of the catalog's jobs (filtered), ordered by job, version, day.
pub async fn status(etl: &Etl, catalog: &Catalog, filter: &StatusFilter) -> Result<Vec<PartitionStatus>, EtlError> {
    let layout = etl.layout().clone();
    let engine = engine_version();
    let mut inputs_of: BTreeMap<Day, Vec<InputObject>> = BTreeMap::new();
    let mut event_days: Vec<Day> = Vec::new();
    for dir in etl.store().list_dirs(&layout.events_root()).await? {
        if let Some(day) = day_of_dir(&dir).filter(|d| filter.takes(*d)) {
            event_days.push(day);
        }
    }
    let mut rows = Vec::new();
    for job in catalog.jobs.values() {
        if filter.job.as_deref().is_some_and(|name| name != job.name) {
            continue;
        }
        let latest = job.versions.keys().next_back().copied();
        for version in job.versions.values() {
            let mut computed = Vec::new();
            for dir in etl.store().list_dirs(&layout.version_root(&job.name, version.version)).await? {
                let Some(day) = day_of_dir(&dir).filter(|d| filter.takes(*d)) else { continue };
                let Some((manifest, _)) = etl.manifest(&job.name, version.version, day).await? else { continue };
                computed.push(day);
                let manifest = match manifest {
                    Ok(manifest) => manifest,
                    Err(error) => {
                        rows.push(PartitionStatus {
                            job: job.name.clone(),
                            version: version.version,
                            day,
                            state: State::Unreadable(error),
                            manifest: None,
                        });
                        continue;
                    }
                };
                let now = &inputs_cached(etl, &mut inputs_of, day).await?;
                let state = if manifest.matches(&version.sha256, &engine, now) {
                    State::Fresh
                } else {
                    State::Stale {
                        inputs: InputChanges::between(&manifest.inputs, now),
                        job_changed: manifest.job_sha256 != version.sha256,
                        engine_changed: manifest.engine != engine,
                    }
                };
                rows.push(PartitionStatus {
                    job: job.name.clone(),
                    version: version.version,
                    day,
                    state,
                    manifest: Some(manifest),
                });
            }
            if Some(version.version) == latest {
                for day in event_days.iter().filter(|d| !computed.contains(d)) {
                    let objects = inputs_cached(etl, &mut inputs_of, *day).await?.len();
                    if objects > 0 {
                        rows.push(PartitionStatus {
                            job: job.name.clone(),
                            version: version.version,
                            day: *day,
                            state: State::Missing { objects },
                            manifest: None,
                        });
                    }
                }
            }
        }
    }
    rows.sort_by(|a, b| (&a.job, a.version, a.day).cmp(&(&b.job, b.version, b.day)));
    Ok(rows)
}
