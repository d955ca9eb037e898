//! The consumers' and the collector's Prometheus metrics, scraped by the dashboard itself: every
//! [`ScrapeConfig::interval`] it reads each target's `/metrics`, keeps the samples it charts, and
//! turns counters into rates (per target, so a restarted process's reset counter is a new start,
//! not a negative rate). It keeps [`ScrapeConfig::history`] scrapes, so the pipeline charts cover
//! the time since the dashboard started, up to that history (an hour at the defaults).
//!
//! Each scrape is bounded: a 2 s timeout, at most [`MAX_BODY_BYTES`] of body and
//! [`MAX_SERIES`] samples kept per target.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::store::{Chart, Series};

/// The most bytes of a `/metrics` answer the dashboard reads.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// The most samples kept from one scrape of one target.
pub const MAX_SERIES: usize = 20_000;

/// The metrics the dashboard charts, and the label each is broken down by (`None`: summed).
/// Names are matched with and without a `_total` suffix.
const WANTED: [(&str, Option<&str>); 10] = [
    ("collector_events_received", None),
    ("collector_events_accepted", None),
    ("collector_events_rejected", None),
    ("collector_events_failed", None),
    ("EventsDelivered", None),
    ("DuplicatesDropped", Some("cause")),
    ("DeadLetters", None),
    ("SinkErrors", Some("sink")),
    ("MillisBehindLatest", Some("shard")),
    ("RecordsProcessed", None),
];

/// How the dashboard scrapes.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// The `/metrics` URLs of the consumers and the collector.
    pub targets: Vec<String>,
    pub interval: Duration,
    /// Scrapes kept.
    pub history: usize,
}

impl Default for ScrapeConfig {
    /// No targets; every 5 s; an hour kept.
    fn default() -> Self {
        ScrapeConfig { targets: Vec::new(), interval: Duration::from_secs(5), history: 720 }
    }
}

/// One sample: the metric, the label it is broken down by (or empty), its value.
type Key = (String, String);

/// One scrape of one target.
#[derive(Debug, Clone, Default)]
struct Scrape {
    /// Seconds since the epoch.
    at: f64,
    /// Per target: `None` when it could not be read.
    targets: Vec<Option<HashMap<Key, f64>>>,
}

/// A target's state for the page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetStatus {
    pub url: String,
    pub up: bool,
    pub last_error: Option<String>,
}

/// What the page charts from the metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsView {
    pub targets: Vec<TargetStatus>,
    /// Seconds of history the charts cover.
    pub covered_secs: f64,
    /// Events per second: received and accepted by the collector, delivered by the consumers.
    pub throughput: Chart,
    /// Duplicates dropped per minute, by cause (`resent`, `reread`).
    pub duplicates: Chart,
    /// Dead letters per minute.
    pub dead_letters: Chart,
    /// Failed sink writes per minute, by sink.
    pub sink_errors: Chart,
    /// Milliseconds behind the tip of each shard (the highest any target reports).
    pub lag: Chart,
}

#[derive(Debug, Default)]
struct State {
    scrapes: VecDeque<Scrape>,
    status: Vec<TargetStatus>,
}

/// The scraper's shared state: the background task writes, the server reads.
#[derive(Debug, Clone)]
pub struct Metrics {
    config: ScrapeConfig,
    state: Arc<Mutex<State>>,
}

impl Metrics {
    pub fn new(config: ScrapeConfig) -> Self {
        let status =
            config.targets.iter().map(|url| TargetStatus { url: url.clone(), up: false, last_error: None }).collect();
        Metrics { config, state: Arc::new(Mutex::new(State { scrapes: VecDeque::new(), status })) }
    }

    pub fn has_targets(&self) -> bool {
        !self.config.targets.is_empty()
    }

    /// Scrapes every target every interval until the task is dropped or aborted.
    pub async fn run(self) {
        if self.config.targets.is_empty() {
            return;
        }
        let client = match reqwest::Client::builder().timeout(Duration::from_secs(2)).build() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client for scraping metrics");
                return;
            }
        };
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.scrape_once(&client).await;
        }
    }

    /// One scrape of every target, kept in the history.
    pub async fn scrape_once(&self, client: &reqwest::Client) {
        let results = futures::future::join_all(self.config.targets.iter().map(|url| fetch(client, url))).await;
        let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut scrape = Scrape { at, targets: Vec::with_capacity(results.len()) };
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(body) => {
                    scrape.targets.push(Some(parse(&body)));
                    if let Some(s) = state.status.get_mut(i) {
                        s.up = true;
                        s.last_error = None;
                    }
                }
                Err(e) => {
                    scrape.targets.push(None);
                    if let Some(s) = state.status.get_mut(i) {
                        s.up = false;
                        s.last_error = Some(e);
                    }
                }
            }
        }
        state.scrapes.push_back(scrape);
        while state.scrapes.len() > self.config.history.max(2) {
            state.scrapes.pop_front();
        }
    }

    /// The charts over the scrapes of the last `range_secs` seconds.
    pub fn view(&self, range_secs: i64) -> MetricsView {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let newest = state.scrapes.back().map_or(0.0, |s| s.at);
        let scrapes: Vec<&Scrape> = state.scrapes.iter().filter(|s| s.at >= newest - range_secs as f64).collect();
        let covered_secs = match (scrapes.first(), scrapes.last()) {
            (Some(a), Some(b)) => b.at - a.at,
            _ => 0.0,
        };
        // Points are the intervals between consecutive scrapes, stamped with the later one.
        let times: Vec<i64> = scrapes.iter().skip(1).map(|s| s.at.round() as i64).collect();
        let rate = |metric: &str, per: f64| -> Vec<(String, Vec<f64>)> { rates(&scrapes, metric, per) };
        let mut throughput = Vec::new();
        for (metric, name) in [
            ("collector_events_received", "received"),
            ("collector_events_accepted", "accepted"),
            ("EventsDelivered", "delivered"),
        ] {
            let values = rate(metric, 1.0).into_iter().map(|(_, v)| v).reduce(add).unwrap_or_default();
            if !values.is_empty() {
                throughput.push(series(name, values));
            }
        }
        let lines = |metric: &str, per: f64| -> Vec<Series> {
            rate(metric, per)
                .into_iter()
                .map(|(label, values)| series(if label.is_empty() { metric } else { &label }, values))
                .collect()
        };
        MetricsView {
            targets: state.status.clone(),
            covered_secs,
            throughput: chart(times.clone(), throughput),
            duplicates: chart(times.clone(), lines("DuplicatesDropped", 60.0)),
            dead_letters: chart(times.clone(), lines("DeadLetters", 60.0)),
            sink_errors: chart(times.clone(), lines("SinkErrors", 60.0)),
            lag: chart(times, gauges(&scrapes, "MillisBehindLatest")),
        }
    }
}

fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

fn series(name: &str, values: Vec<f64>) -> Series {
    let total = values.iter().sum();
    Series { name: name.to_owned(), values, total }
}

fn chart(times: Vec<i64>, mut series: Vec<Series>) -> Chart {
    series.sort_by(|a, b| a.name.cmp(&b.name));
    Chart { times, series }
}

/// Per label value of `metric`: its increase per `per` seconds between consecutive scrapes,
/// summed over targets. A counter that went down restarted: its new value is the increase. A
/// target missing from either scrape adds nothing to that interval.
fn rates(scrapes: &[&Scrape], metric: &str, per: f64) -> Vec<(String, Vec<f64>)> {
    let points = scrapes.len().saturating_sub(1);
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (i, pair) in scrapes.windows(2).enumerate() {
        let (before, after) = (pair[0], pair[1]);
        let seconds = (after.at - before.at).max(0.001);
        for (t, now) in after.targets.iter().enumerate() {
            let (Some(now), Some(Some(then))) = (now, before.targets.get(t)) else { continue };
            for ((name, label), value) in now {
                if name != metric {
                    continue;
                }
                let previous = then.get(&(name.clone(), label.clone())).copied().unwrap_or(0.0);
                let increase = if *value >= previous { value - previous } else { *value };
                out.entry(label.clone()).or_insert_with(|| vec![0.0; points])[i] += increase * per / seconds;
            }
        }
    }
    out.into_iter().collect()
}

/// Per label value of a gauge: the highest value any target reports, per scrape after the first.
fn gauges(scrapes: &[&Scrape], metric: &str) -> Vec<Series> {
    let points = scrapes.len().saturating_sub(1);
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (i, scrape) in scrapes.iter().skip(1).enumerate() {
        for target in scrape.targets.iter().flatten() {
            for ((name, label), value) in target {
                if name == metric {
                    let slot = &mut out.entry(label.clone()).or_insert_with(|| vec![0.0; points])[i];
                    *slot = slot.max(*value);
                }
            }
        }
    }
    out.into_iter().map(|(label, values)| series(&label, values)).collect()
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut response = client.get(url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(format!("{url}: the answer is over {MAX_BODY_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| format!("{url}: the answer is not UTF-8"))
}

/// The wanted samples of a Prometheus text exposition, summed by (metric, breakdown label).
/// Lines that do not parse are skipped.
pub(crate) fn parse(body: &str) -> HashMap<Key, f64> {
    let mut out: HashMap<Key, f64> = HashMap::new();
    for line in body.lines() {
        if out.len() >= MAX_SERIES {
            break;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else { continue };
        let base = name.strip_suffix("_total").unwrap_or(name);
        let Some((metric, by)) = WANTED.iter().find(|(m, _)| *m == base) else { continue };
        let label = by.and_then(|by| labels.iter().find(|(k, _)| k == by).map(|(_, v)| v.clone())).unwrap_or_default();
        *out.entry(((*metric).to_owned(), label)).or_default() += value;
    }
    out
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// `name{a="x",b="y"} value [timestamp]`.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_owned();
            let quoted = s[eq + 1..].trim_start().strip_prefix('"')?;
            let mut value = String::new();
            let (mut escaped, mut close) = (false, None);
            for (i, c) in quoted.char_indices() {
                if escaped {
                    value.push(if c == 'n' { '\n' } else { c });
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    close = Some(i);
                    break;
                } else {
                    value.push(c);
                }
            }
            s = &quoted[close? + 1..];
            labels.push((key, value));
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    value.is_finite().then_some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"# TYPE EventsDelivered counter
EventsDelivered{stream="s",shard="shardId-000"} 10
EventsDelivered{stream="s",shard="shardId-001"} 5
DuplicatesDropped{stream="s",shard="shardId-000",cause="resent"} 3
DuplicatesDropped{stream="s",shard="shardId-000",cause="reread"} 1
MillisBehindLatest{stream="s",shard="shardId-000"} 250
SinkErrors{stream="s",sink="post\"gres"} 2
collector_events_received_total 40
unrelated_metric{a="b"} 7
garbage line {
"#;

    #[test]
    fn parses_the_wanted_samples_summed_by_their_breakdown_label() {
        let samples = parse(BODY);
        let get = |m: &str, l: &str| samples.get(&(m.to_owned(), l.to_owned())).copied();
        assert_eq!(get("EventsDelivered", ""), Some(15.0));
        assert_eq!(get("DuplicatesDropped", "resent"), Some(3.0));
        assert_eq!(get("DuplicatesDropped", "reread"), Some(1.0));
        assert_eq!(get("MillisBehindLatest", "shardId-000"), Some(250.0));
        assert_eq!(get("SinkErrors", "post\"gres"), Some(2.0));
        assert_eq!(get("collector_events_received", ""), Some(40.0));
        assert_eq!(samples.len(), 6, "{samples:?}");
    }

    fn scrape(at: f64, targets: Vec<Option<&str>>) -> Scrape {
        Scrape { at, targets: targets.into_iter().map(|t| t.map(parse)).collect() }
    }

    #[test]
    fn rates_are_per_target_and_survive_restarts_and_gaps() {
        let a = scrape(0.0, vec![Some("EventsDelivered 100"), Some("EventsDelivered 10")]);
        let b = scrape(10.0, vec![Some("EventsDelivered 200"), Some("EventsDelivered 30")]);
        // Target 0 restarted (its counter went down to 5); target 1 did not answer.
        let c = scrape(20.0, vec![Some("EventsDelivered 5"), None]);
        let d = scrape(30.0, vec![Some("EventsDelivered 25"), Some("EventsDelivered 50")]);
        let scrapes = [&a, &b, &c, &d];
        let rates = rates(&scrapes, "EventsDelivered", 1.0);
        assert_eq!(rates, vec![(String::new(), vec![12.0, 0.5, 2.0])]);
    }

    #[test]
    fn views_chart_rates_gauges_and_targets() {
        let metrics =
            Metrics::new(ScrapeConfig { targets: vec!["http://x/metrics".into()], ..ScrapeConfig::default() });
        {
            let mut state = metrics.state.lock().expect("lock");
            state.scrapes.push_back(scrape(
                100.0,
                vec![Some("DuplicatesDropped{cause=\"resent\"} 1\nMillisBehindLatest{shard=\"a\"} 5")],
            ));
            state.scrapes.push_back(scrape(160.0, vec![Some("DuplicatesDropped{cause=\"resent\"} 4\nDuplicatesDropped{cause=\"reread\"} 2\nMillisBehindLatest{shard=\"a\"} 7")]));
        }
        let view = metrics.view(3600);
        assert_eq!(view.duplicates.times, vec![160]);
        let resent = view.duplicates.series.iter().find(|s| s.name == "resent").expect("resent");
        let reread = view.duplicates.series.iter().find(|s| s.name == "reread").expect("reread");
        assert_eq!((resent.values.clone(), reread.values.clone()), (vec![3.0], vec![2.0]));
        assert_eq!(view.lag.series[0].values, vec![7.0]);
        assert_eq!(view.covered_secs, 60.0);
        assert!(view.throughput.series.is_empty());
    }
}
