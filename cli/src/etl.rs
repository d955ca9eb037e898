//! `ktk etl`: the daily ETL's command line (the work is in the `ktk-etl` library).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use ktk_etl::dead_letters::{DeadLetterReport, report};
use ktk_etl::status::{PartitionStatus, StatusFilter, status};
use ktk_etl::store::Layout;
use ktk_etl::{Catalog, Day, Etl, EtlConfig, EtlError, RunOutcome};
use serde_json::json;

/// Where the ETL reads and writes (every subcommand that touches S3).
#[derive(Debug, clap::Args)]
pub struct Place {
    /// The S3 sink's bucket.
    #[arg(long, env = "KTK_S3_BUCKET", value_name = "NAME")]
    bucket: String,
    /// The S3 sink's prefix (events are under `<prefix>/events/dt=.../`).
    #[arg(long, env = "KTK_S3_PREFIX", value_name = "PREFIX", default_value = "")]
    prefix: String,
    /// Where derived tables go: `<derived-prefix>/<job>/v=<version>/dt=<day>/` [default:
    /// <prefix>/derived].
    #[arg(long, env = "KTK_ETL_DERIVED_PREFIX", value_name = "PREFIX")]
    derived_prefix: Option<String>,
    /// Path-style S3 addressing (LocalStack, MinIO, an endpoint reached by IP address).
    #[arg(long, env = "KTK_S3_PATH_STYLE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set, value_name = "BOOL")]
    path_style: bool,
    /// Read the jobs from this directory (`<dir>/<job>/job.toml`, `v<N>.sql`) instead of the
    /// ones built in.
    #[arg(long, env = "KTK_ETL_JOBS_DIR", value_name = "DIR")]
    jobs_dir: Option<PathBuf>,
    /// SQLite's page cache per run, MiB: the bound on the engine's memory (a larger day spills
    /// to a temporary file).
    #[arg(long, env = "KTK_ETL_CACHE_MIB", default_value_t = ktk_etl::engine::DEFAULT_CACHE_MIB, value_name = "MIB")]
    cache_mib: u32,
}

#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The job (`ktk etl jobs` lists them).
    #[arg(long, value_name = "NAME")]
    job: String,
    /// The job version [default: its latest].
    #[arg(long, value_name = "N")]
    version: Option<u32>,
}

#[derive(Debug, clap::Subcommand)]
pub enum EtlCommand {
    /// List the jobs: name, versions, columns, description.
    Jobs {
        #[arg(long, env = "KTK_ETL_JOBS_DIR", value_name = "DIR")]
        jobs_dir: Option<PathBuf>,
    },
    /// Compute one job for one day, unless its partition is up to date.
    ///
    /// Up to date: the partition's manifest names exactly the day's events objects there now
    /// (key, ETag, size), the job version's SQL and columns are unchanged, the engine is the
    /// same, and its data file is there. Then nothing is computed. Otherwise the day is computed
    /// and committed atomically (the manifest last); the output says why (first run, late
    /// objects, rewritten objects, a changed job). Exit status: 0 done or up to date, 1 failed
    /// (nothing of the run is visible), 2 bad options.
    Run {
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        job: JobArgs,
        /// The day, YYYY-MM-DD (UTC; the `dt=` partition).
        #[arg(long, value_name = "DAY")]
        date: String,
        /// Compute even when the partition is up to date.
        #[arg(long)]
        force: bool,
        /// Print the outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Compute one job for every day of a range (both ends included), skipping days that are
    /// up to date: running it again after a crash resumes where it stopped.
    ///
    /// A progress bar on a terminal, one line per day otherwise. A day whose run lost a race (an
    /// input rewritten while it was read, another run committing first) is tried up to 3 times;
    /// a day that fails is reported, and the backfill goes on.
    /// Exit status: 0 when every day is done, 1 when a day failed, 2 bad options.
    Backfill {
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, value_name = "DAY")]
        from: String,
        #[arg(long, value_name = "DAY")]
        to: String,
    },
    /// Which days are computed, for which job version, from how many inputs, and whether they
    /// are fresh, stale (new, gone or rewritten inputs; a changed job), or missing (events but
    /// no partition of the latest version).
    Status {
        #[command(flatten)]
        place: Place,
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        #[arg(long, value_name = "DAY")]
        from: Option<String>,
        #[arg(long, value_name = "DAY")]
        to: Option<String>,
        /// One JSON object per partition on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a committed partition's rows (tab-separated with a header, or JSON Lines).
    Show {
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, value_name = "DAY")]
        date: String,
        #[arg(long)]
        json: bool,
    },
    /// A day's dead letters, counted by reason.
    DeadLetters {
        #[command(flatten)]
        place: Place,
        #[arg(long, value_name = "DAY")]
        date: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a job's SQL for a day, to run in Athena over the Glue tables (infra/analytics.yaml).
    Sql {
        #[arg(long, env = "KTK_ETL_JOBS_DIR", value_name = "DIR")]
        jobs_dir: Option<PathBuf>,
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, value_name = "DAY")]
        date: String,
    },
}

/// A failure and its exit status.
struct Failure(u8, String);

impl From<EtlError> for Failure {
    fn from(error: EtlError) -> Self {
        let status = match error {
            EtlError::BadDay(_)
            | EtlError::BadRange(_)
            | EtlError::UnknownJob(_)
            | EtlError::UnknownVersion { .. }
            | EtlError::JobFile { .. }
            | EtlError::Job { .. } => 2,
            _ => 1,
        };
        Failure(status, error.to_string())
    }
}

fn catalog(jobs_dir: Option<&PathBuf>) -> Result<Catalog, EtlError> {
    match jobs_dir {
        Some(dir) => Catalog::from_dir(dir),
        None => Catalog::builtin(),
    }
}

async fn etl(place: &Place) -> Etl {
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = ktk_pipeline::s3::client(&aws, place.path_style);
    let layout = Layout::new(&place.bucket, &place.prefix, place.derived_prefix.as_deref());
    // A test hook: stop at a named point of a run (see EtlConfig::failpoint).
    let failpoint = std::env::var("KTK_ETL_FAILPOINT").ok().filter(|f| !f.is_empty());
    Etl::new(client, EtlConfig::new(layout).with_cache_mib(place.cache_mib).with_failpoint(failpoint))
}

pub fn main(command: EtlCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ktk etl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(status, message)) => {
            if !message.is_empty() {
                eprintln!("ktk etl: {message}");
            }
            ExitCode::from(status)
        }
    }
}

fn out(line: impl AsRef<str>) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match writeln!(stdout, "{}", line.as_ref()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(Failure(1, format!("cannot write the output: {error}")))
        }
        _ => Ok(()),
    }
}

fn outcome_line(outcome: &RunOutcome) -> String {
    let m = outcome.manifest();
    let head = format!("{} v{} {}", m.job, m.version, m.dt);
    match outcome {
        RunOutcome::UpToDate { repaired, .. } => {
            let repaired =
                if repaired.is_empty() { String::new() } else { format!("; repaired: {}", repaired.join(", ")) };
            format!(
                "{head}: up to date ({} rows from {} input objects, computed {}){repaired}",
                m.rows,
                m.inputs.len(),
                m.computed_at
            )
        }
        RunOutcome::Computed { changes, elapsed_ms, .. } => format!(
            "{head}: computed ({}): {} rows from {} events ({} duplicates) in {} input objects{} -> s3://{}; {:.1} s",
            changes.describe(),
            m.rows,
            m.input_events,
            m.input_duplicates,
            m.inputs.len(),
            changes.rows_before.map(|r| format!(", was {r} rows")).unwrap_or_default(),
            m.output.key,
            *elapsed_ms as f64 / 1000.0
        ),
    }
}

fn outcome_json(outcome: &RunOutcome) -> serde_json::Value {
    let manifest = serde_json::to_value(outcome.manifest()).unwrap_or_default();
    match outcome {
        RunOutcome::UpToDate { repaired, .. } => {
            json!({"outcome": "up_to_date", "repaired": repaired, "manifest": manifest})
        }
        RunOutcome::Computed { changes, elapsed_ms, .. } => json!({
            "outcome": "computed",
            "reason": changes.describe(),
            "first": changes.first,
            "added_inputs": changes.inputs.added,
            "removed_inputs": changes.inputs.removed,
            "changed_inputs": changes.inputs.changed,
            "job_changed": changes.job_changed,
            "rows_before": changes.rows_before,
            "elapsed_ms": elapsed_ms,
            "manifest": manifest,
        }),
    }
}

async fn dispatch(command: EtlCommand) -> Result<(), Failure> {
    match command {
        EtlCommand::Jobs { jobs_dir } => {
            let catalog = catalog(jobs_dir.as_ref())?;
            for job in catalog.jobs.values() {
                out(format!("{}: {}", job.name, job.description))?;
                for version in job.versions.values() {
                    let columns: Vec<String> = version.columns.iter().map(ToString::to_string).collect();
                    out(format!("  v{}: {} (sha256 {})", version.version, columns.join(", "), &version.sha256[..12]))?;
                }
            }
            Ok(())
        }
        EtlCommand::Sql { jobs_dir, job, date } => {
            let day: Day = date.parse()?;
            let catalog = catalog(jobs_dir.as_ref())?;
            let version = catalog.job(&job.job)?.version(job.version)?;
            out(version.sql_for(day).trim_end())
        }
        EtlCommand::Run { place, job, date, force, json } => {
            let day: Day = date.parse()?;
            let catalog = catalog(place.jobs_dir.as_ref())?;
            let version = catalog.job(&job.job)?.version(job.version)?.clone();
            let etl = etl(&place).await;
            let outcome = etl.run(&version, day, force).await?;
            if json { out(outcome_json(&outcome).to_string()) } else { out(outcome_line(&outcome)) }
        }
        EtlCommand::Backfill { place, job, from, to } => {
            let days = Day::range(from.parse()?, to.parse()?)?;
            let catalog = catalog(place.jobs_dir.as_ref())?;
            let version = catalog.job(&job.job)?.version(job.version)?.clone();
            let etl = etl(&place).await;
            backfill(&etl, &version, &days).await
        }
        EtlCommand::Status { place, job, from, to, json } => {
            let filter = StatusFilter {
                job,
                from: from.map(|d| d.parse()).transpose()?,
                to: to.map(|d| d.parse()).transpose()?,
            };
            let catalog = catalog(place.jobs_dir.as_ref())?;
            if let Some(name) = &filter.job {
                catalog.job(name)?;
            }
            let etl = etl(&place).await;
            let rows = status(&etl, &catalog, &filter).await?;
            print_status(&rows, json)
        }
        EtlCommand::Show { place, job, date, json } => {
            let day: Day = date.parse()?;
            let catalog = catalog(place.jobs_dir.as_ref())?;
            let version = catalog.job(&job.job)?.version(job.version)?.version;
            let etl = etl(&place).await;
            let Some((_, names, rows)) = etl.read_partition(&job.job, version, day).await? else {
                return Err(Failure(1, format!("{} v{version} {day} is not computed (ktk etl run)", job.job)));
            };
            if !json {
                out(names.join("\t"))?;
            }
            for row in rows {
                if json {
                    let object: serde_json::Map<String, serde_json::Value> =
                        names.iter().cloned().zip(row.iter().map(|v| v.to_json())).collect();
                    out(serde_json::Value::Object(object).to_string())?;
                } else {
                    let cells: Vec<String> = row
                        .iter()
                        .map(|v| match v.to_json() {
                            serde_json::Value::Null => String::new(),
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .collect();
                    out(cells.join("\t"))?;
                }
            }
            Ok(())
        }
        EtlCommand::DeadLetters { place, date, json } => {
            let day: Day = date.parse()?;
            let etl = etl(&place).await;
            let report = report(&etl, day).await?;
            print_dead_letters(&report, json)
        }
    }
}

async fn backfill(etl: &Etl, version: &ktk_etl::JobVersion, days: &[Day]) -> Result<(), Failure> {
    let bar = ProgressBar::new(days.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} days {msg} ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let (mut computed, mut up_to_date, mut failed) = (0, 0, Vec::new());
    for day in days {
        bar.set_message(format!("{} v{} {day}", version.job, version.version));
        let mut attempt = 0;
        loop {
            match etl.run(version, *day, false).await {
                Ok(outcome) => {
                    match outcome {
                        RunOutcome::Computed { .. } => computed += 1,
                        RunOutcome::UpToDate { .. } => up_to_date += 1,
                    }
                    say(outcome_line(&outcome));
                    break;
                }
                // S3 calls are retried by the SDK already; a run is retried only when it lost a race.
                Err(error @ (EtlError::InputChanged { .. } | EtlError::ConcurrentCommit { .. })) if attempt < 2 => {
                    attempt += 1;
                    let delay = ktk_backoff::delay(attempt, Duration::from_millis(500), Duration::from_secs(10));
                    say(format!(
                        "{} v{} {day}: {error}; retrying in {} ms",
                        version.job,
                        version.version,
                        delay.as_millis()
                    ));
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    say(format!("{} v{} {day}: FAILED: {error}", version.job, version.version));
                    failed.push(day.to_string());
                    break;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = format!(
        "{} v{}: {} days: {computed} computed, {up_to_date} up to date, {} failed",
        version.job,
        version.version,
        days.len(),
        failed.len()
    );
    out(&summary)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure(1, format!("failed days: {} (run the backfill again to retry them)", failed.join(", "))))
    }
}

fn print_status(rows: &[PartitionStatus], json: bool) -> Result<(), Failure> {
    if !json {
        out("job\tversion\tdt\tstate\trows\tinputs\tevents\tcomputed_at\tdetail")?;
    }
    for row in rows {
        let manifest = row.manifest.as_ref();
        if json {
            out(json!({
                "job": row.job,
                "version": row.version,
                "dt": row.day.to_string(),
                "state": row.state.label(),
                "detail": row.state.detail(),
                "rows": manifest.map(|m| m.rows),
                "inputs": manifest.map(|m| m.inputs.len()),
                "input_events": manifest.map(|m| m.input_events),
                "job_sha256": manifest.map(|m| m.job_sha256.clone()),
                "engine": manifest.map(|m| m.engine.clone()),
                "output": manifest.map(|m| m.output.key.clone()),
                "computed_at": manifest.map(|m| m.computed_at.clone()),
            })
            .to_string())?;
        } else {
            let field = |f: &dyn Fn(&ktk_etl::Manifest) -> String| manifest.map(f).unwrap_or_else(|| "-".into());
            out(format!(
                "{}\tv{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                row.job,
                row.version,
                row.day,
                row.state.label(),
                field(&|m| m.rows.to_string()),
                field(&|m| m.inputs.len().to_string()),
                field(&|m| m.input_events.to_string()),
                field(&|m| m.computed_at.clone()),
                row.state.detail()
            ))?;
        }
    }
    Ok(())
}

fn print_dead_letters(report: &DeadLetterReport, json: bool) -> Result<(), Failure> {
    let day = report.day.map(|d| d.to_string()).unwrap_or_default();
    if json {
        let reasons: Vec<serde_json::Value> = report
            .reasons
            .iter()
            .map(|r| json!({"class": r.class, "count": r.count, "example": r.example, "shards": r.shards}))
            .collect();
        return out(json!({
            "dt": day,
            "objects": report.objects,
            "bytes": report.bytes,
            "dead_letters": report.dead_letters,
            "duplicates": report.duplicates,
            "reasons": reasons,
        })
        .to_string());
    }
    out(format!(
        "{day}: {} dead letters ({} duplicate copies) in {} objects, {} bytes",
        report.dead_letters, report.duplicates, report.objects, report.bytes
    ))?;
    for reason in &report.reasons {
        out(format!(
            "{:>8}  {}  (e.g. {:?}; shards: {})",
            reason.count,
            reason.class,
            reason.example,
            reason.shards.join(", ")
        ))?;
    }
    Ok(())
}
