//! `ktk demo`: the whole system on one machine, checked end to end.
//!
//! # How a run goes
//! 1. **Resources**: a Kinesis stream (`--shards`), an S3 bucket with a prefix of the run's own,
//!    and a PostgreSQL table name that is not taken; the consumers create the table (and its
//!    dead-letter table) and their lease table. Names are unique per run unless given.
//! 2. **Processes**: one `collector` and two `consumer`s (the binaries next to `ktk`, or
//!    `--collector-bin` / `--consumer-bin`), each on a free port, logging to a file. The consumers
//!    cut batches on 2-second windows and use short lease timings, so the run stays short.
//! 3. **Traffic** ([`traffic`], [`sender`]): simulated devices on every platform send their
//!    sessions' events to `POST /v1/events` at `--rate` events/s for `--duration`, in protobuf or
//!    JSON batches, with about 1% duplicates and 0.5% malformed events. A few poison records
//!    (random bytes, an event without `event_id`, broken JSON) go straight into the stream with the
//!    producer library, since the collector would refuse them: they must become dead letters.
//!    A progress line a second shows what was sent, accepted, refused, delivered, dropped as a
//!    duplicate and dead-lettered, the backlog and how far the consumers are behind.
//! 4. **Drain**: the collector is stopped (it flushes), then the demo waits (at most `--wait`)
//!    until the consumers report every accepted event delivered and every poison record
//!    dead-lettered, and stops them with SIGTERM.
//! 5. **Report** ([`Report`]): the store is counted and compared id by id with what the collector
//!    accepted, S3 is read back and compared with the store, the dead letters are counted in
//!    both, and the store answers the top titles, the platforms and the collector-to-store delay.
//!    The daily ETL jobs then run over the demo's S3 objects (`ktk etl`'s library, every day the
//!    events fall on) and their plays per title are compared with the store's top titles.
//!    Exit status 1 if any accepted event is missing (lost), S3 and the store disagree, a poison
//!    record is not a dead letter, the ETL fails or counts plays differently, the collector
//!    answered against the plan, or a process did not stop cleanly.
//! 6. **Clean-up**: everything created is deleted, unless `--keep`.

mod dashboard;
mod etl;
mod processes;
mod resources;
mod sender;
mod store;
mod traffic;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::DisplayErrorContext;
use ktk_pipeline::s3::{read_dead_letters, read_events};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use prost::Message as _;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::processes::Service;
use self::sender::{AppKeys, Counts, Sender, Tally};
use self::store::{Delays, Ranked, Store};
use self::traffic::{Audience, Plan};

/// Poison records put straight into the stream, spread over the traffic.
const POISON_RECORDS: usize = 6;
/// Requests to the collector in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// How long a process may take to answer `/health` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the traffic waits for the consumers to share the shards. Traffic during the first
/// hand-offs is fine (nothing is lost), but events a shard's new owner reads again after one land
/// a second time in S3 (the reader keeps one copy): a clean start keeps the numbers simple.
const BALANCE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the collector may take to stop (its drain and flush timeouts are 10 s and 15 s).
const COLLECTOR_GRACE: Duration = Duration::from_secs(40);
/// How long a consumer may take to stop (its shutdown timeout is set to 10 s).
const CONSUMER_GRACE: Duration = Duration::from_secs(30);
/// The consumers' batch window, and its grace.
const BATCH_WINDOW_MS: u64 = 2_000;
const BATCH_GRACE_MS: u64 = 500;
/// Titles in the report.
const TOP_TITLES: i64 = 5;
/// PostgreSQL when neither --postgres-url nor DATABASE_URL says otherwise.
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Width of the labels of the header and the report.
const LABEL: usize = 15;

/// `ktk demo`'s options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to send traffic: 60s, 1500ms, 2m, or seconds.
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Events per second sent to the collector (duplicates and malformed events come on top).
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// Shards of the stream.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    shards: u32,
    /// The PostgreSQL real-time store [default: $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test].
    #[arg(long, value_name = "URL")]
    postgres_url: Option<String>,
    /// Keep the stream, the bucket's objects, the tables, the lease table and the logs, and print
    /// how to look at them.
    #[arg(long)]
    keep: bool,
    /// The stream to create [default: ktk-demo-<run>].
    #[arg(long, value_name = "NAME")]
    stream: Option<String>,
    /// The bucket to write to; created if missing, and deleted at the end only if created
    /// [default: ktk-demo-<run>]. Objects go under demo/<run>/ either way.
    #[arg(long, value_name = "NAME")]
    bucket: Option<String>,
    /// The store's table; must not exist yet [default: demo_<run>].
    #[arg(long, value_name = "NAME")]
    table: Option<String>,
    /// Simulated devices [default: the rate, from 20 to 5,000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    devices: Option<u32>,
    /// Seed of the simulated traffic, to send the same traffic again [default: random].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Where the report and the dashboard's screenshot are saved (report-<run>.txt,
    /// dashboard-<run>.png) [default: ktk-demo-output in the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The port of the dashboard the demo serves on 127.0.0.1 while it runs [default: any free
    /// port].
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    dashboard_port: u16,
    /// After the traffic, the longest to wait for the consumers to deliver everything.
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    wait: Duration,
    /// The collector binary [default: `collector` next to ktk].
    #[arg(long, value_name = "PATH")]
    collector_bin: Option<PathBuf>,
    /// The consumer binary [default: `consumer` next to ktk].
    #[arg(long, value_name = "PATH")]
    consumer_bin: Option<PathBuf>,
}

/// "60s", "1500ms", "2m" or "90" (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 60s, 1500ms or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("{text:?}: use ms, s or m")),
    };
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!("{text:?}: give more than 0 and at most a day"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The names of a run's resources.
#[derive(Debug, Clone)]
struct Names {
    run: String,
    stream: String,
    /// The consumers' application name, which names their lease table: always the run's own, so
    /// no checkpoint of an earlier run can apply.
    application: String,
    bucket: String,
    prefix: String,
    table: String,
}

/// The options, checked, with the binaries found.
#[derive(Debug)]
struct Options {
    duration: Duration,
    rate: u32,
    shards: u32,
    postgres_url: String,
    keep: bool,
    names: Names,
    devices: usize,
    seed: u64,
    wait: Duration,
    collector_bin: PathBuf,
    consumer_bin: PathBuf,
    out_dir: PathBuf,
    dashboard_port: u16,
}

impl Options {
    fn new(args: DemoArgs) -> Result<Self, String> {
        let run = format!("{:08x}", fastrand::u32(..));
        let names = Names {
            stream: args.stream.unwrap_or_else(|| format!("ktk-demo-{run}")),
            application: format!("ktk-demo-{run}"),
            bucket: args.bucket.unwrap_or_else(|| format!("ktk-demo-{run}")),
            prefix: format!("demo/{run}"),
            table: args.table.unwrap_or_else(|| format!("demo_{run}")),
            run,
        };
        store::check_table_name(&names.table)?;
        let postgres_url = args
            .postgres_url
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_owned());
        Ok(Options {
            duration: args.duration,
            rate: args.rate,
            shards: args.shards,
            postgres_url,
            keep: args.keep,
            devices: args.devices.map_or_else(|| args.rate.clamp(20, 5_000) as usize, |d| d as usize),
            seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
            wait: args.wait,
            collector_bin: binary(args.collector_bin, "collector", "ktk-producer")?,
            consumer_bin: binary(args.consumer_bin, "consumer", "ktk-ecs")?,
            out_dir: args.out_dir.unwrap_or_else(|| std::env::temp_dir().join("ktk-demo-output")),
            dashboard_port: args.dashboard_port,
            names,
        })
    }
}

/// The binary given, or the one of that name next to the running `ktk`.
fn binary(given: Option<PathBuf>, name: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() { Ok(path) } else { Err(format!("--{name}-bin {}: no such file", path.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot tell where ktk is: {e}"))?;
    let dir = exe.parent().ok_or_else(|| format!("cannot tell the directory of {}", exe.display()))?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it next to ktk (cargo build [--release] -p {package} --bin {name}, with the same \
             profile and target directory as ktk) or pass --{name}-bin PATH",
            path.display()
        ))
    }
}

/// Why a run did not get to its report.
#[derive(Debug)]
enum Stopped {
    /// A bad option, or a service or binary missing: nothing was checked (exit status 2).
    Setup(String),
    /// Something broke during the run (exit status 1).
    Broken(String),
    /// Ctrl-C or SIGTERM (exit status 130).
    Interrupted,
}

/// Runs the demo; the exit status is 0 when every check passed.
pub fn main(args: DemoArgs) -> ExitCode {
    let options = match Options::new(args) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("ktk demo: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ktk demo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        match run(&options, &stop).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(Stopped::Setup(error)) => {
                eprintln!("ktk demo: {error}");
                ExitCode::from(2)
            }
            Err(Stopped::Broken(error)) => {
                eprintln!("ktk demo: {error}");
                ExitCode::FAILURE
            }
            Err(Stopped::Interrupted) => {
                eprintln!("ktk demo: interrupted");
                ExitCode::from(130)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Cancels `stop` at the first Ctrl-C or SIGTERM; a second one ends the process at once.
async fn cancel_on_signal(stop: CancellationToken) {
    signal().await;
    eprintln!("ktk demo: stopping the processes and deleting the resources (Ctrl-C again to quit now)");
    stop.cancel();
    signal().await;
    std::process::exit(130);
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The clients and places of a run.
struct Run<'a> {
    options: &'a Options,
    aws: aws_config::SdkConfig,
    kinesis: aws_sdk_kinesis::Client,
    s3: aws_sdk_s3::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    store: Store,
    http: reqwest::Client,
    /// S3 addressing for the consumers: path style when an endpoint is set (LocalStack, MinIO).
    path_style: bool,
    log_dir: PathBuf,
    /// The apps' write keys (one per platform), also written to `log_dir/keys.json` for the
    /// collector.
    keys: AppKeys,
    stop: &'a CancellationToken,
}

/// What a run created, for the clean-up.
#[derive(Debug, Default)]
struct Created {
    stream: bool,
    bucket: bool,
    consumers: bool,
}

async fn run(options: &Options, stop: &CancellationToken) -> Result<bool, Stopped> {
    let names = &options.names;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let Some(region) = aws.region().map(ToString::to_string) else {
        return Err(Stopped::Setup(
            "no AWS region: set AWS_REGION (for LocalStack also AWS_ENDPOINT_URL=http://127.0.0.1:4566 \
             AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test; scripts/demo.sh does all of it)"
                .into(),
        ));
    };
    let endpoint = aws.endpoint_url().unwrap_or("the default AWS endpoint").to_owned();
    let kinesis = aws_sdk_kinesis::Client::new(&aws);
    if let Err(error) = kinesis.list_streams().limit(1).send().await {
        return Err(Stopped::Setup(format!(
            "cannot reach Kinesis at {endpoint}: {}. Start LocalStack (localstack/up.sh) and point AWS_ENDPOINT_URL \
             at it, or run scripts/demo.sh, which does both",
            DisplayErrorContext(&error)
        )));
    }
    let path_style = aws.endpoint_url().is_some();
    let store = Store::connect(&options.postgres_url, &names.table).await.map_err(|e| {
        Stopped::Setup(format!(
            "{e} ({}): start it (localstack/databases.sh) or pass --postgres-url",
            redact(&options.postgres_url)
        ))
    })?;
    if store.exists().await.map_err(Stopped::Setup)? {
        return Err(Stopped::Setup(format!(
            "table {} exists already: the demo counts what lands in its table, so it needs a new one; \
             pass another --table",
            names.table
        )));
    }
    let log_dir = std::env::temp_dir().join(format!("ktk-demo-{}", names.run));
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| Stopped::Setup(format!("cannot create {}: {e}", log_dir.display())))?;
    let http =
        reqwest::Client::builder().build().map_err(|e| Stopped::Setup(format!("cannot build the HTTP client: {e}")))?;

    let mut header = format!(
        "ktk demo (run {}): {} of traffic at {} events/s from {} simulated devices (seed {})\n",
        names.run,
        seconds(options.duration),
        options.rate,
        thousands(options.devices as u64),
        options.seed
    );
    let mut line = |label: &str, text: String| {
        let _ = writeln!(header, "  {label:<LABEL$}{text}");
    };
    line("AWS", format!("{endpoint}, {region}"));
    line("stream", format!("{} ({} shards)", names.stream, options.shards));
    line("S3", format!("s3://{}/{}/", names.bucket, names.prefix));
    line("PostgreSQL", format!("{}, table {}", redact(&options.postgres_url), names.table));
    line("lease table", names.application.clone());
    line("logs", format!("{}/", log_dir.display()));
    print!("{header}");

    let run = Run {
        options,
        s3: ktk_pipeline::s3::client(&aws, path_style),
        dynamodb: aws_sdk_dynamodb::Client::new(&aws),
        aws,
        kinesis,
        store,
        http,
        path_style,
        log_dir,
        keys: AppKeys::generate(),
        stop,
    };
    let mut created = Created::default();
    let outcome = run.go(&mut created, region.as_str()).await;
    let passed = matches!(outcome, Ok(true));
    if options.keep {
        run.print_kept();
    } else {
        run.clean_up(&created, passed).await;
    }
    outcome
}

/// The processes of a run.
struct Services {
    collector: Service,
    /// The collector's admin port (`/metrics`).
    collector_admin_port: u16,
    consumers: Vec<Service>,
}

impl Services {
    fn all_mut(&mut self) -> impl Iterator<Item = &mut Service> {
        std::iter::once(&mut self.collector).chain(self.consumers.iter_mut())
    }

    /// A process that ended, with its status.
    fn exited(&mut self) -> Option<(String, ExitStatus)> {
        self.all_mut().find_map(|s| s.exited().map(|status| (s.name.clone(), status)))
    }

    /// A consumer that ended, with its status.
    fn consumer_exited(&mut self) -> Option<(String, ExitStatus)> {
        self.consumers.iter_mut().find_map(|s| s.exited().map(|status| (s.name.clone(), status)))
    }

    fn print_log_tails(&self) {
        for service in std::iter::once(&self.collector).chain(&self.consumers) {
            eprintln!("---- last lines of {} ----\n{}", service.log.display(), service.log_tail(15));
        }
    }
}

/// How a process stopped.
#[derive(Debug, Clone)]
struct ProcessExit {
    name: String,
    status: Option<ExitStatus>,
    killed: bool,
}

impl ProcessExit {
    fn clean(&self) -> bool {
        !self.killed && self.status.is_some_and(|s| s.success())
    }
}

/// One look at the run's progress.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    elapsed: Duration,
    counts: Counts,
    delivered: u64,
    duplicates_dropped: u64,
    /// Of `duplicates_dropped`, Kinesis records read again (after a hand-off or a restart).
    duplicates_reread: u64,
    dead_letters: u64,
    /// The most any shard is behind, taking for each shard the smallest figure any consumer
    /// reports (the other one's is from before a hand-off).
    behind_ms: Option<f64>,
}

impl Sample {
    /// Accepted events not delivered yet.
    fn backlog(&self) -> u64 {
        (self.counts.accepted - self.counts.duplicates.min(self.counts.accepted)).saturating_sub(self.delivered)
    }
}

/// The poison records put.
#[derive(Debug, Clone, Default)]
struct PoisonOutcome {
    put: u64,
    failures: Vec<String>,
}

impl Run<'_> {
    async fn go(&self, created: &mut Created, region: &str) -> Result<bool, Stopped> {
        let names = &self.options.names;
        resources::create_stream(&self.kinesis, &names.stream, self.options.shards).await.map_err(Stopped::Setup)?;
        created.stream = true;
        created.bucket =
            resources::create_bucket(&self.s3, &names.bucket, Some(region)).await.map_err(Stopped::Setup)?;

        let mut services = self.start_services(created).await?;
        let result = self.traffic_and_report(&mut services).await;
        if result.is_err() {
            // The report was not reached: stop whatever still runs.
            for service in services.all_mut() {
                service.stop(CONSUMER_GRACE).await;
            }
            if matches!(result, Err(Stopped::Broken(_))) {
                services.print_log_tails();
            }
        }
        result
    }

    async fn start_services(&self, created: &mut Created) -> Result<Services, Stopped> {
        let names = &self.options.names;
        let port = || processes::free_port().map_err(|e| Stopped::Setup(format!("no free port on 127.0.0.1: {e}")));
        let collector_port = port()?;
        let admin_port = port()?;
        let keys_file = self.log_dir.join("keys.json");
        std::fs::write(&keys_file, self.keys.document())
            .map_err(|e| Stopped::Setup(format!("cannot write {}: {e}", keys_file.display())))?;
        let collector = Service::spawn(
            "collector",
            &self.options.collector_bin,
            &[
                var("KTK_STREAM", &names.stream),
                var("KTK_LISTEN", &format!("127.0.0.1:{collector_port}")),
                var("KTK_ADMIN_LISTEN", &format!("127.0.0.1:{admin_port}")),
                var("KTK_KEYS_FILE", &keys_file.display().to_string()),
                var("KTK_LOG_FORMAT", "text"),
                var("RUST_LOG", &log_filter()),
            ],
            collector_port,
            &self.log_dir,
        )
        .map_err(Stopped::Setup)?;
        let mut services = Services { collector, collector_admin_port: admin_port, consumers: Vec::new() };
        created.consumers = true;
        for name in ["consumer-a", "consumer-b"] {
            let consumer_port = port()?;
            let vars = self.consumer_vars(name, consumer_port);
            match Service::spawn(name, &self.options.consumer_bin, &vars, consumer_port, &self.log_dir) {
                Ok(service) => services.consumers.push(service),
                Err(error) => {
                    services.collector.stop(COLLECTOR_GRACE).await;
                    for consumer in &mut services.consumers {
                        consumer.stop(CONSUMER_GRACE).await;
                    }
                    return Err(Stopped::Setup(error));
                }
            }
        }
        let http = &self.http;
        let ready = async {
            let Services { collector, consumers, .. } = &mut services;
            let mut waits = vec![collector.wait_ready(http, READY_TIMEOUT)];
            waits.extend(consumers.iter_mut().map(|c| c.wait_ready(http, READY_TIMEOUT)));
            futures::future::join_all(waits).await.into_iter().collect::<Result<Vec<()>, String>>()
        };
        let ready = tokio::select! {
            ready = ready => ready.map_err(Stopped::Broken),
            () = self.stop.cancelled() => Err(Stopped::Interrupted),
        };
        if let Err(stopped) = ready {
            for service in services.all_mut() {
                service.stop(CONSUMER_GRACE).await;
            }
            if matches!(stopped, Stopped::Broken(_)) {
                services.print_log_tails();
            }
            return Err(stopped);
        }
        let balance = tokio::select! {
            balance = self.wait_for_balance(&services) => balance,
            () = self.stop.cancelled() => {
                for service in services.all_mut() {
                    service.stop(CONSUMER_GRACE).await;
                }
                return Err(Stopped::Interrupted);
            }
        };
        let list: Vec<String> = std::iter::once(&services.collector)
            .chain(&services.consumers)
            .map(|s| format!("{} :{}", s.name, s.port))
            .collect();
        println!("  {:<LABEL$}{} (ready)", "processes", list.join(", "));
        println!("  {:<LABEL$}{balance}", "leases");
        Ok(services)
    }

    /// Waits (at most [`BALANCE_TIMEOUT`]) until the consumers hold every shard between them, as
    /// evenly as can be; says how they share them.
    async fn wait_for_balance(&self, services: &Services) -> String {
        let started = Instant::now();
        let shards = u64::from(self.options.shards);
        loop {
            let texts =
                futures::future::join_all(services.consumers.iter().map(|c| processes::metrics(&self.http, c.port)))
                    .await;
            let held: Vec<u64> = texts.iter().map(|t| t.as_deref().map_or(0, processes::current_leases)).collect();
            let (most, least) = (held.iter().max().copied().unwrap_or(0), held.iter().min().copied().unwrap_or(0));
            let balanced = held.iter().sum::<u64>() == shards && most - least <= 1;
            if balanced || started.elapsed() >= BALANCE_TIMEOUT {
                let each: Vec<String> =
                    services.consumers.iter().zip(&held).map(|(c, n)| format!("{} {n}", c.name)).collect();
                let how = if balanced {
                    format!("balanced after {}", seconds(started.elapsed()))
                } else {
                    format!("not balanced after {}; sending anyway", seconds(started.elapsed()))
                };
                return format!("{} (of {shards} shards): {how}", each.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn consumer_vars(&self, worker: &str, port: u16) -> Vec<(String, String)> {
        let names = &self.options.names;
        vec![
            var("KTK_STREAM", &names.stream),
            var("KTK_APPLICATION", &names.application),
            var("KTK_WORKER_ID", worker),
            var("KTK_S3_BUCKET", &names.bucket),
            var("KTK_S3_PREFIX", &names.prefix),
            var("KTK_S3_PATH_STYLE", if self.path_style { "true" } else { "false" }),
            var("KTK_POSTGRES_URL", &self.options.postgres_url),
            var("KTK_STORE_TABLE", &names.table),
            var("KTK_BATCH_WINDOW_MS", &BATCH_WINDOW_MS.to_string()),
            var("KTK_BATCH_GRACE_MS", &BATCH_GRACE_MS.to_string()),
            // Short lease timings: a demo of a minute should not wait out the KCL's 10 s defaults.
            var("KTK_FAILOVER_MS", "3000"),
            var("KTK_RENEW_MS", "1000"),
            var("KTK_TAKING_MS", "2000"),
            var("KTK_DISCOVERY_MS", "250"),
            var("KTK_SHARD_SYNC_MS", "5000"),
            var("KTK_PARENT_POLL_MS", "500"),
            var("KTK_IDLE_MS", "250"),
            var("KTK_SHUTDOWN_TIMEOUT_MS", "10000"),
            var("KTK_LISTEN", &format!("127.0.0.1:{port}")),
            var("KTK_LOG_FORMAT", "text"),
            var("RUST_LOG", &log_filter()),
        ]
    }

    async fn traffic_and_report(&self, services: &mut Services) -> Result<bool, Stopped> {
        let options = self.options;
        let sender = Sender::new(&format!("http://127.0.0.1:{}", services.collector.port), self.keys.clone())
            .map_err(|e| Stopped::Setup(format!("cannot build the HTTP client: {e}")))?;
        // The dashboard over the run's table and the processes' metrics, live while it runs.
        let mut metrics = vec![format!("http://127.0.0.1:{}/metrics", services.collector_admin_port)];
        metrics.extend(services.consumers.iter().map(|c| format!("http://127.0.0.1:{}/metrics", c.port)));
        let title = format!("ktk demo {}", options.names.run);
        let dashboard = dashboard::DemoDashboard::start(
            &options.postgres_url,
            &options.names.table,
            metrics,
            options.dashboard_port,
            &title,
        )
        .await
        .map_err(Stopped::Setup)?;
        println!("  {:<LABEL$}{} (live while the demo runs)", "dashboard", dashboard.url());
        let started = Instant::now();
        let sending = Arc::new(AtomicBool::new(true));
        let (samples_tx, mut samples) = watch::channel(Sample::default());
        let progress_stop = CancellationToken::new();
        let progress = tokio::spawn(progress(
            self.http.clone(),
            services.consumers.iter().map(|c| c.port).collect(),
            sender.clone(),
            started,
            Arc::clone(&sending),
            samples_tx,
            progress_stop.clone(),
        ));
        let poison = tokio::spawn(put_poison(
            self.aws.clone(),
            options.names.stream.clone(),
            started,
            options.duration,
            self.stop.clone(),
        ));

        // Traffic: as many valid events as the rate says by now, a request at a time.
        let mut audience = Audience::new(options.seed, options.devices);
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut requests = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut last_check = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => break,
            }
            let elapsed = started.elapsed();
            if elapsed >= options.duration {
                break;
            }
            let due = (f64::from(options.rate) * elapsed.as_secs_f64()) as u64;
            while audience.plan().valid < due && !self.stop.is_cancelled() {
                let request = audience.next_request(sender::now_ms());
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
                let sender = sender.clone();
                requests.spawn(async move {
                    sender.deliver(request).await;
                    drop(permit);
                });
                while requests.try_join_next().is_some() {}
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                if let Some((name, status)) = services.exited() {
                    progress_stop.cancel();
                    return Err(Stopped::Broken(format!("{name} ended during the run ({status})")));
                }
            }
        }
        let traffic_time = started.elapsed().min(options.duration);
        while requests.join_next().await.is_some() {}
        let poison = match poison.await {
            Ok(Ok(poison)) => poison,
            Ok(Err(error)) => {
                progress_stop.cancel();
                return Err(Stopped::Broken(error));
            }
            Err(error) => {
                progress_stop.cancel();
                return Err(Stopped::Broken(format!("the poison task failed: {error}")));
            }
        };
        if self.stop.is_cancelled() {
            progress_stop.cancel();
            return Err(Stopped::Interrupted);
        }
        sending.store(false, Ordering::Relaxed);
        // The collector flushes what it accepted into the stream as it stops.
        let (status, killed) = services.collector.stop(COLLECTOR_GRACE).await;
        let mut exits = vec![ProcessExit { name: services.collector.name.clone(), status, killed }];
        let tally = sender.finished();
        let unique = tally.accepted_ids.len() as u64;
        println!(
            "  traffic done: {} events sent, {} accepted ({} unique), {} rejected; {} poison records put; waiting \
             for the consumers",
            thousands(tally.sent),
            thousands(tally.accepted),
            thousands(unique),
            thousands(tally.rejected),
            poison.put
        );

        // Drain: until the consumers report everything delivered, or --wait passes.
        let deadline = tokio::time::Instant::now() + options.wait;
        let mut drained = false;
        loop {
            let sample = *samples.borrow_and_update();
            // Duplicates too: a batch resent late can follow the last new event.
            if sample.delivered >= unique
                && sample.dead_letters >= poison.put
                && sample.duplicates_dropped >= tally.duplicates
            {
                drained = true;
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if let Some((name, status)) = services.consumer_exited() {
                eprintln!("ktk demo: {name} ended while draining ({status})");
                break;
            }
            tokio::select! {
                changed = samples.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
                () = self.stop.cancelled() => {
                    progress_stop.cancel();
                    return Err(Stopped::Interrupted);
                }
            }
        }
        progress_stop.cancel();
        let peaks = progress.await.unwrap_or_default();
        let last = *samples.borrow();
        // The screenshot, with everything delivered and the consumers still up.
        let screenshot = options.out_dir.join(format!("dashboard-{}.png", options.names.run));
        let dashboard_line = match dashboard.screenshot(&screenshot).await {
            Ok(()) => format!("{} (screenshot of the last 15 minutes: {})", dashboard.url(), screenshot.display()),
            Err(e) => format!("{} (no screenshot: {e})", dashboard.url()),
        };
        dashboard.stop().await;
        let stops = futures::future::join_all(services.consumers.iter_mut().map(|c| async {
            let (status, killed) = c.stop(CONSUMER_GRACE).await;
            ProcessExit { name: c.name.clone(), status, killed }
        }))
        .await;
        exits.extend(stops);

        let mut report =
            self.check(traffic_time, audience.plan().clone(), tally, poison, last, peaks, exits, drained).await?;
        report.dashboard = dashboard_line;
        let text = report.render();
        print!("{text}");
        let file = options.out_dir.join(format!("report-{}.txt", options.names.run));
        match std::fs::create_dir_all(&options.out_dir).and_then(|()| std::fs::write(&file, &text)) {
            Ok(()) => println!("report saved to {}", file.display()),
            Err(e) => eprintln!("ktk demo: cannot save the report to {}: {e}", file.display()),
        }
        Ok(report.problems().is_empty())
    }

    /// Reads the store and S3 back and builds the report.
    #[allow(clippy::too_many_arguments)]
    async fn check(
        &self,
        traffic_time: Duration,
        plan: Plan,
        tally: Tally,
        poison: PoisonOutcome,
        last: Sample,
        peaks: Peaks,
        processes: Vec<ProcessExit>,
        drained: bool,
    ) -> Result<Report, Stopped> {
        let names = &self.options.names;
        let broken = Stopped::Broken;
        let store_count = self.store.count().await.map_err(broken)?;
        let store_ids = self.store.event_ids().await.map_err(broken)?;
        let lost = tally.accepted_ids.iter().filter(|id| !store_ids.contains(*id)).count() as u64;
        let unexpected = store_ids
            .iter()
            .filter(|id| !tally.accepted_ids.contains(*id) && !tally.unanswered_ids.contains(*id))
            .count() as u64;
        let dead_in_store = self.store.dead_letter_count().await.map_err(broken)?;
        let s3_events = read_events(&self.s3, &names.bucket, &names.prefix)
            .await
            .map_err(|e| Stopped::Broken(format!("cannot read the events back from S3: {e}")))?;
        let s3_dead = read_dead_letters(&self.s3, &names.bucket, &names.prefix)
            .await
            .map_err(|e| Stopped::Broken(format!("cannot read the dead letters back from S3: {e}")))?;
        let s3_ids: HashSet<&str> = s3_events.events.iter().map(|e| e.event.event_id.as_str()).collect();
        let s3_missing = store_ids.iter().filter(|id| !s3_ids.contains(id.as_str())).count() as u64;
        let s3_extra = s3_ids.iter().filter(|id| !store_ids.contains(**id)).count() as u64;
        let top_titles = self.store.top_titles(TOP_TITLES).await.map_err(broken)?;
        // The daily jobs over what the sink wrote: every day the events fall on (UTC).
        let days =
            s3_events.events.iter().map(|e| ktk_pipeline::time::date_and_hour(e.event.occurred_at_ms).0).collect();
        let etl = etl::run(&self.s3, &names.bucket, &names.prefix, &days, &top_titles).await;
        Ok(Report {
            run: names.run.clone(),
            traffic_time,
            rate: self.options.rate,
            devices: self.options.devices,
            plan,
            poison,
            consumers: last,
            peak_behind_ms: peaks.behind_ms,
            peak_backlog: peaks.backlog,
            table: names.table.clone(),
            store_count,
            lost,
            unexpected,
            dead_in_store,
            dead_in_s3: s3_dead.dead_letters.len() as u64,
            delays: self.store.delays().await.map_err(broken)?,
            top_titles,
            etl,
            platforms: self.store.platforms().await.map_err(broken)?,
            s3_location: format!("s3://{}/{}/", names.bucket, names.prefix),
            s3_objects: s3_events.objects + s3_dead.objects,
            s3_dead_objects: s3_dead.objects,
            s3_bytes: s3_events.bytes + s3_dead.bytes,
            s3_events: s3_ids.len() as u64,
            s3_copies: s3_events.duplicates,
            s3_missing,
            s3_extra,
            processes,
            drained,
            wait: self.options.wait,
            tally,
            dashboard: String::new(),
        })
    }

    fn print_kept(&self) {
        let names = &self.options.names;
        let url = redact(&self.options.postgres_url);
        println!("kept (--keep):");
        println!(
            "  ktk s3 read --bucket {} --prefix {}{} | head",
            names.bucket,
            names.prefix,
            path_style_flag(self.path_style)
        );
        println!("  psql '{url}' -c 'SELECT event_type, count(*) FROM {} GROUP BY 1 ORDER BY 2 DESC'", names.table);
        println!("  ktk leases --table {} --stream {}", names.application, names.stream);
        println!("  logs in {}/", self.log_dir.display());
    }

    /// Deletes what the run created (the logs only when the run passed); failures are reported,
    /// not fatal.
    async fn clean_up(&self, created: &Created, passed: bool) {
        let names = &self.options.names;
        let mut problems = Vec::new();
        if created.consumers {
            if let Err(e) = self.store.drop_tables().await {
                problems.push(e);
            }
            if let Err(e) = resources::delete_lease_table(&self.dynamodb, &names.application).await {
                problems.push(e);
            }
        }
        match resources::delete_prefix(&self.s3, &names.bucket, &names.prefix).await {
            Ok(_) if created.bucket => {
                if let Err(e) = resources::delete_bucket(&self.s3, &names.bucket).await {
                    problems.push(e);
                }
            }
            Ok(_) => {}
            Err(e) if created.stream => problems.push(e),
            Err(_) => {}
        }
        if created.stream
            && let Err(e) = resources::delete_stream(&self.kinesis, &names.stream).await
        {
            problems.push(e);
        }
        if passed {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        } else {
            eprintln!("ktk demo: the processes' logs are in {}/", self.log_dir.display());
        }
        for problem in &problems {
            eprintln!("ktk demo: clean-up: {problem}");
        }
        if problems.is_empty() && created.stream {
            println!(
                "cleaned up: stream, S3 objects{}, tables, lease table",
                if created.bucket { " and bucket" } else { "" }
            );
        }
    }
}

fn path_style_flag(path_style: bool) -> &'static str {
    if path_style { " --path-style" } else { "" }
}

fn var(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

/// The children's log filter: RUST_LOG if set, else `info` (the logs go to files).
fn log_filter() -> String {
    std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| "info".to_owned())
}

/// The worst moments of a run, from the progress samples.
#[derive(Debug, Clone, Copy, Default)]
struct Peaks {
    behind_ms: Option<f64>,
    backlog: u64,
}

/// Samples the consumers once a second, prints a progress line, and publishes the sample; returns
/// the peaks.
async fn progress(
    http: reqwest::Client,
    consumer_ports: Vec<u16>,
    sender: Sender,
    started: Instant,
    sending: Arc<AtomicBool>,
    samples: watch::Sender<Sample>,
    stop: CancellationToken,
) -> Peaks {
    let mut previous = Sample::default();
    let mut peaks = Peaks::default();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return peaks,
        }
        let sample = sample(&http, &consumer_ports, &sender, started).await;
        if let Some(behind) = sample.behind_ms {
            peaks.behind_ms = Some(peaks.behind_ms.map_or(behind, |p| p.max(behind)));
        }
        peaks.backlog = peaks.backlog.max(sample.backlog());
        let phase = if sending.load(Ordering::Relaxed) { "sending " } else { "draining" };
        println!("{}", progress_line(phase, &previous, &sample));
        previous = sample;
        samples.send_replace(sample);
    }
}

async fn sample(http: &reqwest::Client, consumer_ports: &[u16], sender: &Sender, started: Instant) -> Sample {
    let healths = futures::future::join_all(consumer_ports.iter().map(|&p| processes::health(http, p))).await;
    let metrics = futures::future::join_all(consumer_ports.iter().map(|&p| processes::metrics(http, p))).await;
    let field = |name: &str| -> u64 { healths.iter().flatten().filter_map(|h| h[name].as_u64()).sum() };
    let mut per_shard: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for text in metrics.iter().flatten() {
        for (shard, ms) in processes::millis_behind(text) {
            per_shard.entry(shard).and_modify(|v| *v = v.min(ms)).or_insert(ms);
        }
    }
    Sample {
        elapsed: started.elapsed(),
        counts: sender.counts(),
        delivered: field("events_delivered"),
        duplicates_dropped: field("duplicates"),
        duplicates_reread: field("duplicates_reread"),
        dead_letters: field("dead_letters"),
        behind_ms: per_shard.values().copied().reduce(f64::max),
    }
}

fn progress_line(phase: &str, previous: &Sample, now: &Sample) -> String {
    let seconds = (now.elapsed.as_secs_f64() - previous.elapsed.as_secs_f64()).max(0.001);
    let per_second = |now: u64, before: u64| (now.saturating_sub(before) as f64 / seconds).round() as u64;
    format!(
        "[{:>4}s] {phase}  sent {} ({}/s)  accepted {}  rejected {}  delivered {} ({}/s)  duplicates dropped {}  \
         dead letters {}  backlog {}  behind {}",
        now.elapsed.as_secs(),
        thousands(now.counts.sent),
        thousands(per_second(now.counts.sent, previous.counts.sent)),
        thousands(now.counts.accepted),
        thousands(now.counts.rejected),
        thousands(now.delivered),
        thousands(per_second(now.delivered, previous.delivered)),
        thousands(now.duplicates_dropped),
        thousands(now.dead_letters),
        thousands(now.backlog()),
        now.behind_ms.map_or_else(|| "-".to_owned(), |ms| format!("{} ms", thousands(ms as u64))),
    )
}

/// Puts [`POISON_RECORDS`] records no consumer can decode straight into the stream, spread over
/// the traffic: random bytes, an event without `event_id`, and broken JSON, in turn.
async fn put_poison(
    aws: aws_config::SdkConfig,
    stream: String,
    started: Instant,
    duration: Duration,
    stop: CancellationToken,
) -> Result<PoisonOutcome, String> {
    let producer = Producer::new(ProducerConfig::new(&stream), &aws)
        .await
        .map_err(|e| format!("cannot start the producer for the poison records: {e}"))?;
    let mut receipts = Vec::new();
    let mut outcome = PoisonOutcome::default();
    for i in 0..POISON_RECORDS {
        let at = started + duration.mul_f64((i + 1) as f64 / (POISON_RECORDS + 1) as f64);
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = stop.cancelled() => break,
        }
        let data: Vec<u8> = match i % 3 {
            // Field number 0 is not valid protobuf, and no JSON starts with a zero byte.
            0 => std::iter::once(0u8).chain((0..40).map(|_| fastrand::u8(..))).collect(),
            1 => Event {
                r#type: EventType::Play as i32,
                occurred_at_ms: sender::now_ms(),
                user_id: format!("user-poison-{i}"),
                platform: Platform::Web as i32,
                ..Event::default()
            }
            .encode_to_vec(),
            _ => format!("{{\"eventId\": \"poison-{i}\", \"type\": \"EVENT_TYPE_PL").into_bytes(),
        };
        match producer.put(Record::new(format!("poison-{i}"), data)).await {
            Ok(receipt) => receipts.push(receipt),
            Err(error) => outcome.failures.push(error.to_string()),
        }
    }
    producer.shutdown(Duration::from_secs(30)).await;
    for receipt in receipts {
        match receipt.await {
            Ok(_) => outcome.put += 1,
            Err(error) => outcome.failures.push(error.to_string()),
        }
    }
    for failure in &outcome.failures {
        eprintln!("ktk demo: a poison record could not be put: {failure}");
    }
    Ok(outcome)
}

/// Everything the report says.
#[derive(Debug)]
struct Report {
    run: String,
    traffic_time: Duration,
    rate: u32,
    devices: usize,
    plan: Plan,
    tally: Tally,
    poison: PoisonOutcome,
    /// The consumers' own counts at the end.
    consumers: Sample,
    peak_behind_ms: Option<f64>,
    /// The most accepted events not delivered yet, at one look.
    peak_backlog: u64,
    table: String,
    store_count: u64,
    /// Accepted event ids not in the store.
    lost: u64,
    /// Event ids in the store the collector never accepted.
    unexpected: u64,
    dead_in_store: u64,
    dead_in_s3: u64,
    delays: Option<Delays>,
    top_titles: Vec<Ranked>,
    platforms: Vec<Ranked>,
    /// The daily jobs run over the demo's S3 objects.
    etl: etl::EtlSummary,
    s3_location: String,
    s3_objects: usize,
    s3_dead_objects: usize,
    s3_bytes: u64,
    /// Distinct events in S3.
    s3_events: u64,
    /// Copies of an event found in more than one S3 object.
    s3_copies: u64,
    /// Store events missing from S3, and S3 events missing from the store.
    s3_missing: u64,
    s3_extra: u64,
    processes: Vec<ProcessExit>,
    drained: bool,
    wait: Duration,
    /// The dashboard's URL and where its screenshot is.
    dashboard: String,
}

impl Report {
    /// What failed; empty when the run passed.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.lost > 0 {
            problems.push(format!("{} accepted events are not in the store (lost)", thousands(self.lost)));
        }
        if self.unexpected > 0 {
            problems.push(format!("{} events in the store were never accepted", thousands(self.unexpected)));
        }
        if self.s3_missing > 0 || self.s3_extra > 0 {
            problems.push(format!(
                "S3 and the store disagree: {} stored events missing from S3, {} S3 events not in the store",
                thousands(self.s3_missing),
                thousands(self.s3_extra)
            ));
        }
        if self.dead_in_store != self.poison.put || self.dead_in_s3 != self.poison.put {
            problems.push(format!(
                "{} poison records put, but {} dead letters in PostgreSQL and {} in S3",
                self.poison.put, self.dead_in_store, self.dead_in_s3
            ));
        }
        if let Some(problem) = self.etl.problem() {
            problems.push(problem);
        }
        if self.tally.surprises > 0 {
            problems.push(format!(
                "the collector answered {} events against the plan, e.g. {}",
                self.tally.surprises,
                self.tally.surprise_examples.join("; ")
            ));
        }
        for process in self.processes.iter().filter(|p| !p.clean()) {
            let how = match (process.status, process.killed) {
                (_, true) => "had to be killed".to_owned(),
                (Some(status), false) => format!("ended with {status}"),
                (None, false) => "has no exit status".to_owned(),
            };
            problems.push(format!("{} did not stop cleanly on SIGTERM: it {how}", process.name));
        }
        problems
    }

    fn render(&self) -> String {
        let t = &self.tally;
        let unique = t.accepted_ids.len() as u64;
        let mut out = format!("\nktk demo report (run {})\n", self.run);
        let mut line = |label: &str, text: String| {
            let _ = writeln!(out, "  {label:<LABEL$}{text}");
        };
        let json_percent = (self.plan.json_requests * 100).checked_div(self.plan.requests).unwrap_or(0);
        line(
            "traffic",
            format!(
                "{} events sent in {} ({}/s, target {}/s) in {} requests from {} devices ({json_percent}% JSON, \
                 the rest protobuf)",
                thousands(t.sent),
                seconds(self.traffic_time),
                thousands((t.sent as f64 / self.traffic_time.as_secs_f64().max(0.001)).round() as u64),
                thousands(u64::from(self.rate)),
                thousands(t.requests),
                thousands(self.devices as u64),
            ),
        );
        line("accepted", format!("{} ({} unique)", thousands(t.accepted), thousands(unique)));
        let codes: Vec<String> =
            t.rejected_by_code.iter().map(|(code, n)| format!("{code} {}", thousands(*n))).collect();
        line(
            "rejected",
            format!(
                "{} at the edge ({}); {}",
                thousands(t.rejected),
                if codes.is_empty() { "none".to_owned() } else { codes.join(", ") },
                if t.rejected_as_planned == t.rejected {
                    "each malformed on purpose, refused for the planned reason".to_owned()
                } else {
                    format!("{} of them not as planned", thousands(t.rejected - t.rejected_as_planned))
                },
            ),
        );
        line(
            "duplicates",
            format!(
                "{} injected ({} events of {} resent batches, {} reused event ids), {} dropped by the consumers \
                 ({} resent, {} re-read after a hand-off)",
                thousands(t.duplicates),
                thousands(t.resent_accepted),
                thousands(self.plan.resent_batches),
                thousands(t.reused_accepted),
                thousands(self.consumers.duplicates_dropped),
                thousands(self.consumers.duplicates_dropped.saturating_sub(self.consumers.duplicates_reread)),
                thousands(self.consumers.duplicates_reread),
            ),
        );
        line(
            "delivered",
            format!(
                "{} unique events in PostgreSQL table {} (SELECT count(*))",
                thousands(self.store_count),
                self.table
            ),
        );
        line(
            "dead letters",
            format!(
                "{} of {} poison records put straight into Kinesis (PostgreSQL {}, S3 {})",
                thousands(self.dead_in_store.min(self.dead_in_s3)),
                thousands(self.poison.put),
                thousands(self.dead_in_store),
                thousands(self.dead_in_s3),
            ),
        );
        line(
            "lost",
            format!(
                "{} (accepted unique {} - delivered {})",
                thousands(self.lost),
                thousands(unique),
                thousands(unique - self.lost)
            ),
        );
        let mut accounting = format!(
            "sent {} = delivered {} + duplicates {} + rejected {} + lost {}",
            thousands(t.sent),
            thousands(self.store_count),
            thousands(t.duplicates),
            thousands(t.rejected),
            thousands(self.lost)
        );
        if t.unanswered > 0 {
            let _ = write!(accounting, " + unanswered {}", thousands(t.unanswered));
        }
        line("accounting", accounting);
        match self.delays {
            Some(d) => {
                line(
                    "end to end",
                    format!(
                        "{} events from the first received to the last stored in {}: {} events/s",
                        thousands(self.store_count),
                        seconds(Duration::from_secs_f64(d.span_ms.max(0.0) / 1000.0)),
                        thousands((self.store_count as f64 / (d.span_ms / 1000.0).max(0.001)).round() as u64),
                    ),
                );
                line(
                    "delay",
                    format!(
                        "collector to store p50 {} ms, p99 {} ms, max {} ms ({} s batch windows)",
                        thousands(d.p50_ms.round() as u64),
                        thousands(d.p99_ms.round() as u64),
                        thousands(d.max_ms.round() as u64),
                        BATCH_WINDOW_MS / 1000,
                    ),
                );
            }
            None => line("end to end", "nothing stored".to_owned()),
        }
        line(
            "lag",
            format!(
                "{}; at most {} accepted events not delivered yet",
                match self.peak_behind_ms {
                    Some(ms) =>
                        format!("at most {} ms behind the tip of a shard (MillisBehindLatest)", thousands(ms as u64)),
                    None => "MillisBehindLatest not reported".to_owned(),
                },
                thousands(self.peak_backlog)
            ),
        );
        for (i, title) in self.top_titles.iter().enumerate() {
            line(
                if i == 0 { "top titles" } else { "" },
                format!(
                    "{}. {}: {} plays, {} viewers",
                    i + 1,
                    title.name,
                    thousands(title.count as u64),
                    thousands(title.distinct as u64)
                ),
            );
        }
        for (i, platform) in self.platforms.iter().enumerate() {
            line(
                if i == 0 { "platforms" } else { "" },
                format!(
                    "{:<10} {:>9} events from {} devices",
                    traffic::platform_label(&platform.name),
                    thousands(platform.count as u64),
                    thousands(platform.distinct as u64)
                ),
            );
        }
        line(
            "S3",
            format!(
                "{}: {} objects ({} of dead letters), {}; read back: {} unique events{}, {}",
                self.s3_location,
                thousands(self.s3_objects as u64),
                thousands(self.s3_dead_objects as u64),
                human_bytes(self.s3_bytes),
                thousands(self.s3_events),
                if self.s3_copies > 0 {
                    format!(" ({} sent twice are in two objects; the reader keeps one)", thousands(self.s3_copies))
                } else {
                    String::new()
                },
                if self.s3_missing == 0 && self.s3_extra == 0 {
                    "the same as the store".to_owned()
                } else {
                    "NOT the same as the store".to_owned()
                },
            ),
        );
        line("etl", self.etl.line());
        if !self.dashboard.is_empty() {
            line("dashboard", self.dashboard.clone());
        }
        let names: Vec<&str> = self.processes.iter().map(|p| p.name.as_str()).collect();
        line(
            "processes",
            if self.processes.iter().all(ProcessExit::clean) {
                format!("{} stopped on SIGTERM, exit status 0", names.join(", "))
            } else {
                let each: Vec<String> = self
                    .processes
                    .iter()
                    .map(|p| match (p.status, p.killed) {
                        (_, true) => format!("{} killed", p.name),
                        (Some(s), false) => format!("{} {s}", p.name),
                        (None, false) => format!("{} unknown", p.name),
                    })
                    .collect();
                each.join(", ")
            },
        );
        if !self.drained {
            line(
                "note",
                format!(
                    "the consumers did not report everything delivered within --wait {} (delivered {}, dead letters {})",
                    seconds(self.wait),
                    thousands(self.consumers.delivered),
                    thousands(self.consumers.dead_letters)
                ),
            );
        }
        if t.retried > 0 || t.resent_without_answer > 0 {
            line(
                "note",
                format!(
                    "{} events sent again after a retryable refusal, {} requests sent again after no answer",
                    thousands(t.retried),
                    thousands(t.resent_without_answer)
                ),
            );
        }
        let problems = self.problems();
        if problems.is_empty() {
            line(
                "result",
                "OK: every accepted event is in PostgreSQL exactly once and in S3, every poison record is a dead letter, the daily jobs agree with the store"
                    .to_owned(),
            );
        } else {
            line("result", format!("FAILED: {}", problems.join("; ")));
        }
        out
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

/// A URL without its password.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        for bad in ["", "s", "0", "-1s", "10h", "1e9"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(30_123_456), "30,123,456");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_900_000), "1.9 MB");
    }

    #[test]
    fn passwords_stay_out_of_the_output() {
        assert_eq!(redact("postgres://u:secret@db:5432/x"), "postgres://u:***@db:5432/x");
        assert_eq!(redact("postgres://postgres@127.0.0.1:5432/test"), "postgres://postgres@127.0.0.1:5432/test");
    }

    fn report() -> Report {
        let mut tally =
            Tally { sent: 1_020, accepted: 1_012, rejected: 8, duplicates: 12, requests: 200, ..Tally::default() };
        tally.accepted_ids = (0..1_000).map(|i| format!("e-{i}")).collect();
        tally.rejected_by_code.insert("missing_event_id".into(), 8);
        Report {
            run: "0badcafe".into(),
            traffic_time: Duration::from_secs(8),
            rate: 125,
            devices: 125,
            plan: Plan { requests: 200, json_requests: 50, valid: 1_000, ..Plan::default() },
            tally,
            poison: PoisonOutcome { put: 6, failures: Vec::new() },
            consumers: Sample { delivered: 1_000, duplicates_dropped: 12, dead_letters: 6, ..Sample::default() },
            peak_behind_ms: Some(850.0),
            peak_backlog: 400,
            table: "demo_0badcafe".into(),
            store_count: 1_000,
            lost: 0,
            unexpected: 0,
            dead_in_store: 6,
            dead_in_s3: 6,
            delays: Some(Delays { p50_ms: 1500.0, p99_ms: 2900.0, max_ms: 3000.0, span_ms: 10_000.0 }),
            top_titles: vec![Ranked { name: "Paper Moons".into(), count: 40, distinct: 30 }],
            platforms: vec![Ranked { name: "PLATFORM_ROKU".into(), count: 300, distinct: 20 }],
            etl: etl::EtlSummary {
                days: vec!["2026-03-01".into()],
                jobs: vec![("plays_per_title".into(), 1, 12)],
                elapsed: Duration::from_millis(900),
                location: "s3://b/demo/0badcafe/derived/".into(),
                mismatches: Vec::new(),
                compared: 1,
                error: None,
            },
            s3_location: "s3://b/demo/0badcafe/".into(),
            s3_objects: 20,
            s3_dead_objects: 2,
            s3_bytes: 80_000,
            s3_events: 1_000,
            s3_copies: 0,
            s3_missing: 0,
            s3_extra: 0,
            processes: Vec::new(),
            drained: true,
            wait: Duration::from_secs(60),
            dashboard: "http://127.0.0.1:8089/ (screenshot of the last 15 minutes: /tmp/dashboard-run.png)".to_owned(),
        }
    }

    #[test]
    fn a_clean_run_reports_ok_and_adds_up() {
        let report = report();
        assert!(report.problems().is_empty(), "{:?}", report.problems());
        let text = report.render();
        assert!(text.contains("  lost           0 (accepted unique 1,000 - delivered 1,000)"), "{text}");
        assert!(text.contains("sent 1,020 = delivered 1,000 + duplicates 12 + rejected 8 + lost 0"), "{text}");
        assert!(text.contains("6 of 6 poison records"), "{text}");
        assert!(text.contains("Roku"), "{text}");
        assert!(text.contains("etl            1 jobs for 2026-03-01 in 0.9 s: plays_per_title v1 12 rows; plays of the top 1 titles equal the store's"), "{text}");
        assert!(text.contains("result         OK"), "{text}");
        assert!(text.contains("  dashboard      http://127.0.0.1:8089/ (screenshot of the last 15 minutes:"), "{text}");
    }

    #[test]
    fn loss_and_disagreement_fail_the_run() {
        let mut report = report();
        report.lost = 3;
        report.s3_missing = 2;
        report.dead_in_s3 = 5;
        report.etl.mismatches.push(("Paper Moons".into(), 40, 39));
        let problems = report.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[3].contains("Paper Moons: store 40, ETL 39"), "{problems:?}");
        assert!(report.render().contains("result         FAILED: 3 accepted events are not in the store"));
    }
}
