//! One job, one day: plan, compute, commit.
//!
//! A run lists the day's events objects and reads the partition's manifest. When the manifest was
//! computed from exactly these objects (key, ETag, size), by this job version (its hash) on this
//! engine, and its data file is there, the run does nothing (besides repairing Athena's pointer
//! and removing data files no manifest names). Otherwise it computes:
//!
//! 1. every input is read at the ETag it was listed with (`If-Match`), so the manifest names
//!    exactly what was read; a rewritten input fails the run ([`EtlError::InputChanged`]);
//! 2. the rows go to a content-addressed `part-<sha256>.parquet` (invisible until committed);
//! 3. the manifest is written with a conditional PUT (`If-Match` the manifest read at the start,
//!    or `If-None-Match: *`): the commit point. A run killed before it leaves the old partition,
//!    after it the new one; two runs racing on one partition cannot both commit;
//! 4. Athena's pointer (`_symlink/.../manifest`) is rewritten; then data files the manifest does
//!    not name (an older version of the partition, or a killed run's) are deleted.

use std::time::{Instant, SystemTime};

use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use ktk_pipeline::s3::{decode_events_object, is_events_object};
use ktk_pipeline::time::{datetime_millis, unix_millis};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::engine::{DEFAULT_CACHE_MIB, DEFAULT_MAX_OUTPUT_ROWS, Engine, LoadCounts, engine_version};
use crate::manifest::{InputChanges, InputObject, MANIFEST_FORMAT, Manifest, OutputObject};
use crate::output::{Value, read_parquet, write_parquet};
use crate::store::{Condition, Layout, Store, is_part};
use crate::{Day, EtlError, JobVersion};

/// Input objects fetched at once.
pub const DEFAULT_READ_CONCURRENCY: usize = 8;

/// Where the ETL reads and writes, and its bounds.
#[derive(Debug, Clone)]
pub struct EtlConfig {
    pub layout: Layout,
    /// SQLite's page cache, MiB.
    pub cache_mib: u32,
    pub max_output_rows: usize,
    pub read_concurrency: usize,
    /// For tests of crashes: at the named point of a run (`listed`, `loaded`, `computed`,
    /// `part-written`, `manifest-committed`, `symlink-written`), or at that point of the run of
    /// one day only (`<point>@<YYYY-MM-DD>`), print `ktk etl: failpoint <name> reached` on
    /// stderr and wait forever (to be killed there).
    pub failpoint: Option<String>,
}

impl EtlConfig {
    pub fn new(layout: Layout) -> EtlConfig {
        EtlConfig {
            layout,
            cache_mib: DEFAULT_CACHE_MIB,
            max_output_rows: DEFAULT_MAX_OUTPUT_ROWS,
            read_concurrency: DEFAULT_READ_CONCURRENCY,
            failpoint: None,
        }
    }

    pub fn with_cache_mib(mut self, mib: u32) -> Self {
        self.cache_mib = mib.max(1);
        self
    }

    pub fn with_failpoint(mut self, failpoint: Option<String>) -> Self {
        self.failpoint = failpoint;
        self
    }
}

/// Why a run computed, compared with the manifest it replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// No manifest was there.
    pub first: bool,
    /// A manifest was there but could not be read (it is replaced).
    pub unreadable_manifest: Option<String>,
    pub inputs: InputChanges,
    pub job_changed: bool,
    pub engine_changed: bool,
    pub output_missing: bool,
    pub forced: bool,
    /// Rows of the partition replaced.
    pub rows_before: Option<u64>,
}

impl Changes {
    /// One line: why the partition was (re)computed.
    pub fn describe(&self) -> String {
        let mut reasons = Vec::new();
        if self.first {
            reasons.push("first run".to_owned());
        }
        if let Some(error) = &self.unreadable_manifest {
            reasons.push(format!("the manifest there was unreadable ({error})"));
        }
        let inputs = &self.inputs;
        if !inputs.added.is_empty() {
            reasons.push(format!(
                "{} new input object(s) (late data): {}",
                inputs.added.len(),
                inputs.added.join(", ")
            ));
        }
        if !inputs.removed.is_empty() {
            reasons.push(format!("{} input object(s) gone: {}", inputs.removed.len(), inputs.removed.join(", ")));
        }
        if !inputs.changed.is_empty() {
            reasons.push(format!("{} input object(s) rewritten: {}", inputs.changed.len(), inputs.changed.join(", ")));
        }
        if self.job_changed {
            reasons.push("the job's SQL or columns changed".to_owned());
        }
        if self.engine_changed {
            reasons.push("another engine version".to_owned());
        }
        if self.output_missing {
            reasons.push("the data file was missing".to_owned());
        }
        if self.forced {
            reasons.push("--force".to_owned());
        }
        reasons.join("; ")
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The manifest matched: nothing computed. `repaired` lists what was fixed on the way (Athena's
    /// pointer, stray data files removed).
    UpToDate { manifest: Manifest, repaired: Vec<String> },
    /// Computed and committed.
    Computed { manifest: Manifest, changes: Changes, elapsed_ms: u64 },
}

impl RunOutcome {
    pub fn manifest(&self) -> &Manifest {
        match self {
            RunOutcome::UpToDate { manifest, .. } | RunOutcome::Computed { manifest, .. } => manifest,
        }
    }
}

/// The ETL over one bucket.
#[derive(Debug, Clone)]
pub struct Etl {
    store: Store,
    config: EtlConfig,
}

fn hour_of(key: &str) -> String {
    key.split('/').find_map(|segment| segment.strip_prefix("hour=")).map(str::to_owned).unwrap_or_default()
}

impl Etl {
    pub fn new(client: Client, config: EtlConfig) -> Etl {
        Etl { store: Store::new(client, config.layout.bucket.clone()), config }
    }

    pub fn layout(&self) -> &Layout {
        &self.config.layout
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn failpoint(&self, point: &str, day: Day) {
        let Some(failpoint) = self.config.failpoint.as_deref() else { return };
        let (name, only_day) = match failpoint.split_once('@') {
            Some((name, only_day)) => (name, Some(only_day)),
            None => (failpoint, None),
        };
        if name == point && only_day.is_none_or(|d| d == day.to_string()) {
            eprintln!("ktk etl: failpoint {point} reached");
            std::future::pending::<()>().await;
        }
    }

    /// The events objects of a day's partition, in key order.
    pub async fn inputs(&self, day: Day) -> Result<Vec<InputObject>, EtlError> {
        let mut objects = self.store.list(&self.config.layout.events_day(day)).await?;
        objects.retain(|o| is_events_object(&o.key));
        Ok(objects)
    }

    /// The manifest of a partition and its ETag, if there is one.
    pub async fn manifest(
        &self,
        job: &str,
        version: u32,
        day: Day,
    ) -> Result<Option<(Result<Manifest, String>, String)>, EtlError> {
        let key = self.config.layout.manifest(job, version, day);
        Ok(self.store.get(&key, None).await?.map(|(bytes, etag)| (Manifest::from_json(&bytes), etag)))
    }

    /// The committed rows of a partition: its manifest, column names and rows (`None` when the
    /// partition has no manifest). The data file is checked against the manifest's SHA-256.
    pub async fn read_partition(
        &self,
        job: &str,
        version: u32,
        day: Day,
    ) -> Result<Option<(Manifest, Vec<String>, Vec<Vec<Value>>)>, EtlError> {
        let key = self.config.layout.manifest(job, version, day);
        let Some((manifest, _)) = self.manifest(job, version, day).await? else { return Ok(None) };
        let manifest =
            manifest.map_err(|message| EtlError::Manifest { bucket: self.store.bucket().to_owned(), key, message })?;
        let Some((bytes, _)) = self.store.get(&manifest.output.key, None).await? else {
            return Err(EtlError::Manifest {
                bucket: self.store.bucket().to_owned(),
                key: manifest.output.key.clone(),
                message: "the data file the manifest names is missing (run the job again)".into(),
            });
        };
        if hex::encode(Sha256::digest(&bytes)) != manifest.output.sha256 {
            return Err(EtlError::Manifest {
                bucket: self.store.bucket().to_owned(),
                key: manifest.output.key.clone(),
                message: "the data file's SHA-256 is not the manifest's (run the job again)".into(),
            });
        }
        let (names, rows) = read_parquet(bytes)?;
        Ok(Some((manifest, names, rows)))
    }

    /// Computes `job` for `day` unless the partition is up to date (or `force`).
    pub async fn run(&self, job: &JobVersion, day: Day, force: bool) -> Result<RunOutcome, EtlError> {
        let started = Instant::now();
        let layout = &self.config.layout;
        let engine = engine_version();
        let inputs = self.inputs(day).await?;
        let manifest_key = layout.manifest(&job.job, job.version, day);
        let previous = self.manifest(&job.job, job.version, day).await?;
        let mut changes = Changes { forced: force, ..Changes::default() };
        let previous_etag = previous.as_ref().map(|(_, etag)| etag.clone());
        match &previous {
            None => changes.first = true,
            Some((Err(error), _)) => changes.unreadable_manifest = Some(error.clone()),
            Some((Ok(manifest), _)) => {
                let output_there = self.store.head(&manifest.output.key).await? == Some(manifest.output.size);
                if !force && output_there && manifest.matches(&job.sha256, &engine, &inputs) {
                    let repaired = self.settle(job, day, manifest).await?;
                    return Ok(RunOutcome::UpToDate { manifest: manifest.clone(), repaired });
                }
                changes.inputs = InputChanges::between(&manifest.inputs, &inputs);
                changes.job_changed = manifest.job_sha256 != job.sha256;
                changes.engine_changed = manifest.engine != engine;
                changes.output_missing = !output_there;
                changes.rows_before = Some(manifest.rows);
            }
        }
        self.failpoint("listed", day).await;

        let (counts, rows) = self.compute(job, day, &inputs).await?;
        let body = write_parquet(&format!("{}_v{}", job.job, job.version), &job.columns, &rows)?;
        let sha256 = hex::encode(Sha256::digest(&body));
        let output =
            OutputObject { key: layout.part(&job.job, job.version, day, &sha256), size: body.len() as u64, sha256 };
        self.failpoint("computed", day).await;

        // Content-addressed: the same rows make the same key, so writing it again is harmless.
        self.store.put(&output.key, body.clone(), "application/vnd.apache.parquet", Condition::None).await?;
        self.failpoint("part-written", day).await;

        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            job: job.job.clone(),
            version: job.version,
            dt: day.to_string(),
            job_sha256: job.sha256.clone(),
            engine,
            inputs,
            input_events: counts.events,
            input_duplicates: counts.duplicates,
            rows: rows.len() as u64,
            columns: job.columns.iter().map(ToString::to_string).collect(),
            output,
            computed_at: datetime_millis(unix_millis(SystemTime::now())),
        };
        let condition = match &previous_etag {
            Some(etag) => Condition::Matches(etag),
            None => Condition::Absent,
        };
        self.store.put(&manifest_key, manifest.to_json(), "application/json", condition).await?;
        self.failpoint("manifest-committed", day).await;

        // A concurrent run's clean-up may have removed this run's data file before the commit
        // (it was not named by the manifest then): write it again if so.
        if self.store.head(&manifest.output.key).await? != Some(manifest.output.size) {
            self.store.put(&manifest.output.key, body, "application/vnd.apache.parquet", Condition::None).await?;
        }
        self.settle(job, day, &manifest).await?;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        info!(job = %job.job, version = job.version, %day, rows = manifest.rows, elapsed_ms, "partition committed");
        Ok(RunOutcome::Computed { manifest, changes, elapsed_ms })
    }

    /// After a commit (or finding one): Athena's pointer names the committed data file, and data
    /// files the manifest does not name are gone. Returns what it fixed.
    async fn settle(&self, job: &JobVersion, day: Day, manifest: &Manifest) -> Result<Vec<String>, EtlError> {
        let layout = &self.config.layout;
        let mut fixed = Vec::new();
        let symlink = layout.symlink(&job.job, job.version, day);
        let pointer = format!("{}\n", layout.uri(&manifest.output.key));
        let current = self.store.get(&symlink, None).await?;
        if current.as_ref().map(|(bytes, _)| bytes.as_ref()) != Some(pointer.as_bytes()) {
            self.store.put(&symlink, pointer.into_bytes(), "text/plain", Condition::None).await?;
            fixed.push(format!("Athena pointer {symlink}"));
        }
        self.failpoint("symlink-written", day).await;
        // The manifest as it is now: a concurrent run may have committed since.
        let named = match self.manifest(&job.job, job.version, day).await? {
            Some((Ok(now), _)) => now.output.key,
            _ => manifest.output.key.clone(),
        };
        for object in self.store.list(&layout.partition(&job.job, job.version, day)).await? {
            if is_part(&object.key) && object.key != named && object.key != manifest.output.key {
                self.store.delete(&object.key).await?;
                fixed.push(format!("removed {}", object.key));
            }
        }
        Ok(fixed)
    }

    /// Reads the inputs into a new engine (fetching a few at a time while a blocking thread
    /// decodes and loads them) and runs the job.
    async fn compute(
        &self,
        job: &JobVersion,
        day: Day,
        inputs: &[InputObject],
    ) -> Result<(LoadCounts, Vec<Vec<Value>>), EtlError> {
        let mut engine = Engine::open(self.config.cache_mib)?;
        let (sender, mut receiver) = mpsc::channel::<(String, Bytes)>(2);
        let bucket = self.store.bucket().to_owned();
        let loader = tokio::task::spawn_blocking(move || -> Result<Engine, EtlError> {
            while let Some((key, body)) = receiver.blocking_recv() {
                let records = decode_events_object(&bucket, &key, body).map_err(|error| EtlError::Decode {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    message: error.to_string(),
                })?;
                engine.load(day, &hour_of(&key), &records)?;
            }
            Ok(engine)
        });
        let fetched = async {
            let mut bodies = futures::stream::iter(inputs)
                .map(|input| async move {
                    let (body, _) =
                        self.store.get(&input.key, Some(&input.etag)).await?.ok_or_else(|| EtlError::InputChanged {
                            bucket: self.store.bucket().to_owned(),
                            key: input.key.clone(),
                            etag: input.etag.clone(),
                        })?;
                    Ok::<_, EtlError>((input.key.clone(), body))
                })
                .buffered(self.config.read_concurrency.max(1));
            while let Some(object) = bodies.try_next().await? {
                if sender.send(object).await.is_err() {
                    break; // the loader stopped: its error says why
                }
            }
            drop(sender);
            Ok::<_, EtlError>(())
        };
        let fetch_result = fetched.await;
        let engine = loader.await.map_err(|e| EtlError::Engine(format!("the loader thread failed: {e}")))?;
        let mut engine = engine?;
        fetch_result?;
        self.failpoint("loaded", day).await;
        let job = job.clone();
        let max_rows = self.config.max_output_rows;
        let (counts, rows) = tokio::task::spawn_blocking(move || -> Result<_, EtlError> {
            let counts = engine.finish_load()?;
            let rows = engine.query(&job, day, max_rows)?;
            Ok((counts, rows))
        })
        .await
        .map_err(|e| EtlError::Engine(format!("the query thread failed: {e}")))??;
        debug!(events = counts.events, duplicates = counts.duplicates, rows = rows.len(), "computed");
        Ok((counts, rows))
    }
}
