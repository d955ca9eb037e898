//! The demo's ETL step: once the traffic is delivered, every shipped job runs (its latest version)
//! for each day the demo's events fall on, over the demo's own S3 prefix, and the plays per title
//! it computed are compared with the store's top titles.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ktk_etl::output::Value;
use ktk_etl::store::Layout;
use ktk_etl::{Catalog, Day, Etl, EtlConfig};

use super::store::Ranked;
use super::thousands;

/// What the ETL step did.
#[derive(Debug, Clone, Default)]
pub struct EtlSummary {
    pub days: Vec<String>,
    /// (job, version, rows over all days).
    pub jobs: Vec<(String, u32, u64)>,
    pub elapsed: Duration,
    /// Where the derived tables are.
    pub location: String,
    /// Store top titles whose plays the ETL counted differently: (title, store, ETL).
    pub mismatches: Vec<(String, i64, i64)>,
    /// Top titles compared.
    pub compared: usize,
    pub error: Option<String>,
}

impl EtlSummary {
    pub fn line(&self) -> String {
        if let Some(error) = &self.error {
            return format!("FAILED: {error}");
        }
        let mut text =
            format!("{} jobs for {} in {:.1} s:", self.jobs.len(), self.days.join(", "), self.elapsed.as_secs_f64());
        for (i, (job, version, rows)) in self.jobs.iter().enumerate() {
            let _ = write!(text, "{} {job} v{version} {} rows", if i == 0 { "" } else { "," }, thousands(*rows));
        }
        let _ = write!(
            text,
            "; plays of the top {} titles {} ({})",
            self.compared,
            if self.mismatches.is_empty() { "equal the store's" } else { "DIFFER from the store's" },
            self.location
        );
        text
    }

    pub fn problem(&self) -> Option<String> {
        if let Some(error) = &self.error {
            return Some(format!("the ETL failed: {error}"));
        }
        (!self.mismatches.is_empty()).then(|| {
            let examples: Vec<String> =
                self.mismatches.iter().map(|(t, s, e)| format!("{t}: store {s}, ETL {e}")).collect();
            format!("the ETL's plays per title differ from the store's: {}", examples.join("; "))
        })
    }
}

/// Runs every shipped job for `days` and checks plays per title against `top_titles`.
pub async fn run(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    days: &BTreeSet<String>,
    top_titles: &[Ranked],
) -> EtlSummary {
    let started = Instant::now();
    let layout = Layout::new(bucket, prefix, None);
    let mut summary = EtlSummary {
        days: days.iter().cloned().collect(),
        location: format!("s3://{bucket}/{}/", layout.derived),
        ..EtlSummary::default()
    };
    match compute(s3, layout, days, top_titles, &mut summary).await {
        Ok(()) => {}
        Err(error) => summary.error = Some(error),
    }
    summary.elapsed = started.elapsed();
    summary
}

async fn compute(
    s3: &aws_sdk_s3::Client,
    layout: Layout,
    days: &BTreeSet<String>,
    top_titles: &[Ranked],
    summary: &mut EtlSummary,
) -> Result<(), String> {
    let catalog = Catalog::builtin().map_err(|e| e.to_string())?;
    let etl = Etl::new(s3.clone(), EtlConfig::new(layout));
    let days: Vec<Day> = days.iter().map(|d| d.parse::<Day>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let mut plays: BTreeMap<String, i64> = BTreeMap::new();
    for job in catalog.jobs.values() {
        let version = job.version(None).map_err(|e| e.to_string())?;
        let mut rows = 0;
        for day in &days {
            let outcome = etl.run(version, *day, false).await.map_err(|e| format!("{} {day}: {e}", job.name))?;
            rows += outcome.manifest().rows;
            if job.name == "plays_per_title" {
                let (_, names, table) = etl
                    .read_partition(&job.name, version.version, *day)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{} {day} is not committed", job.name))?;
                let column = |name: &str| names.iter().position(|n| n == name);
                let (Some(title), Some(count)) = (column("content_title"), column("plays")) else {
                    return Err("plays_per_title has no content_title or plays column".into());
                };
                for row in table {
                    if let (Value::Text(name), Value::Int(n)) = (&row[title], &row[count]) {
                        *plays.entry(name.clone()).or_default() += n;
                    }
                }
            }
        }
        summary.jobs.push((job.name.clone(), version.version, rows));
    }
    summary.compared = top_titles.len();
    for title in top_titles {
        let computed = plays.get(&title.name).copied().unwrap_or(0);
        if computed != title.count {
            summary.mismatches.push((title.name.clone(), title.count, computed));
        }
    }
    Ok(())
}
