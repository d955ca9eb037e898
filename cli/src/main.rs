//! `ktk`, the toolkit's command line. Parsing only: the work is in the modules it calls.

use std::io::{self, BufWriter};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod agg;
mod dashboard;
mod demo;
mod etl;
mod leases;
mod produce;
mod s3;
mod tail;

#[derive(Debug, Parser)]
#[command(name = "ktk", version, about = "Kinesis toolkit: KPL-compatible aggregation and more")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Aggregate or deaggregate records in the KPL format (JSON Lines on stdin and stdout).
    #[command(subcommand)]
    Agg(AggCommand),
    /// Put records from stdin into a stream with the KPL-style producer (aggregation, batching,
    /// retries, rate limits).
    ///
    /// Input, one record per line: by default the JSON objects `ktk agg encode` reads
    /// ({"partition_key", "explicit_hash_key" (optional), "data": "<base64>"}); with --lines, any
    /// text, each line's bytes being one record's data. AWS settings come from the environment
    /// (AWS_REGION, AWS_ENDPOINT_URL, credentials...). A summary goes to stderr, and to stdout as
    /// JSON with --summary-json. Exit status: 0 when every record was put, 1 when a line was
    /// malformed or a record failed (each is reported with its line number), 2 for bad options or
    /// a stream that cannot be used.
    Produce(ProduceArgs),
    /// Print the user records of every shard of a stream as JSON Lines (KPL aggregates unpacked).
    ///
    /// One line per user record: {"shard", "partition_key", "explicit_hash_key" (when set),
    /// "sequence_number", "sub_sequence_number", "approximate_arrival_ms", "aggregated",
    /// "data": "<base64>"}; with --events, "event" (the data as an events.v1 Event in proto3 JSON)
    /// instead of "data", or, for a record that is not an Event, "data" and "error". All shards are
    /// read at once, without leases; lines of one shard come in shard order, and a shard's children
    /// are read only after it has been read to its end, so the records of a partition key come in
    /// the order they were put, across splits and merges.
    ///
    /// Without --follow, each shard is read until it is caught up: a GetRecords call returns no
    /// records and MillisBehindLatest 0 (an open shard), or the shard ends (a closed shard is
    /// always read to its end; its children are then read the same way). The command exits when
    /// every shard is caught up or ended. With --follow it keeps reading, and starts the children
    /// of shards that end (from their first record), until Ctrl-C or SIGTERM.
    ///
    /// AWS settings come from the environment (AWS_REGION, AWS_ENDPOINT_URL, credentials...).
    /// Throttling is waited out; other transient errors are retried with a backoff (without
    /// --follow, up to 10 times in a row per shard). Exit status: 0 when the run ended (caught up,
    /// --limit reached, interrupted, or standard output closed), 1 when the stream cannot be read
    /// (not found, access denied, an error that retrying did not cure) or standard output fails
    /// otherwise, 2 for bad options.
    Tail(TailArgs),
    /// Print a KCL-layout lease table: one row per lease, sorted by shard.
    ///
    /// Columns: shard (leaseKey), owner ("-" if none; "from->to" during a KCL 3.x hand-off),
    /// counter, checkpoint (sequence/sub-sequence, or a sentinel: TRIM_HORIZON, LATEST,
    /// AT_TIMESTAMP, SHARD_END), parents, children, owner_switches (since the last checkpoint),
    /// and with --stream, behind_ms: how far the checkpoint is behind the tip of its shard, from one
    /// GetRecords call at the checkpoint ("-" for finished shards and AT_TIMESTAMP checkpoints,
    /// "?" when the call failed). With --json, one object per lease instead: "shard", "owner",
    /// "checkpoint_owner", "counter", "checkpoint", "checkpoint_sub_sequence_number",
    /// "pending_checkpoint", "pending_checkpoint_sub_sequence_number", "parents", "children",
    /// "owner_switches", "starting_hash_key", "ending_hash_key", and with --stream "behind_ms" (null
    /// when not measured) and "behind_error" (when the call failed). Items that are not leases are
    /// counted and explained on stderr.
    /// Exit status: 0 when the table was printed, 1 when it cannot be read (missing table, no
    /// access) or, with --stream, when a shard's distance behind could not be read, 2 for bad
    /// options.
    Leases(LeasesArgs),
    /// The daily ETL: versioned SQL jobs over the S3 sink's day partitions, computed into
    /// derived tables (Parquet with an atomic manifest), their status, and dead-letter reports.
    #[command(subcommand)]
    Etl(etl::EtlCommand),
    /// Read what the consumer's S3 sink wrote.
    #[command(subcommand)]
    S3(S3Command),
    /// Serve the real-time dashboard: audience, segments and pipeline health from the store and
    /// the consumers' and collector's /metrics, as a web page with live charts.
    ///
    /// Reads the events table and <table>_dead_letters through a read-only pool of two
    /// connections (indexed, bounded queries; each answer computed at most once per refresh
    /// whoever asks), and scrapes every --metrics URL. Prints the page's URL and serves until
    /// Ctrl-C or SIGTERM. A store that is down does not stop it: the page says so until it is
    /// back. Exit status: 0 when stopped, 1 when serving failed, 2 for bad options or an address
    /// it cannot listen on.
    Dashboard(dashboard::DashboardArgs),
    /// Run the whole system on this machine and check it: a stream, the collector, two consumers,
    /// S3 and PostgreSQL, with simulated streaming-app traffic.
    ///
    /// Creates a stream, a bucket (objects under demo/<run>/) and a PostgreSQL table (unique names
    /// unless given); starts `collector` and two `consumer` processes (found next to ktk); sends
    /// sessions of app events from simulated devices on every platform to POST /v1/events, with
    /// about 1% duplicates and 0.5% malformed events, and puts a few poison records straight into
    /// the stream; prints progress once a second. When the traffic stops it waits for the
    /// consumers, then prints a report: sent, accepted, rejected, duplicates, delivered (counted in
    /// the store), dead letters, lost, delays, lag, top titles and platforms from the store, and
    /// the S3 objects read back and compared with the store. Everything created is deleted unless
    /// --keep. AWS settings come from the environment (AWS_ENDPOINT_URL for LocalStack,
    /// AWS_REGION, credentials...); scripts/demo.sh sets them and starts LocalStack and
    /// PostgreSQL. Exit status: 0 when every accepted event was delivered exactly once to both
    /// sinks and every poison record became a dead letter, 1 when not (or when the run broke),
    /// 2 for bad options or missing services or binaries, 130 when interrupted.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum S3Command {
    /// Print every event under an S3 prefix once, as JSON Lines (Parquet and gzip JSON Lines
    /// objects alike).
    ///
    /// Lists the prefix (all pages), reads every events object under it
    /// (`.../events/dt=YYYY-MM-DD/hour=HH/*.parquet` or `*.jsonl.gz`), and prints each event once
    /// (the first copy of an event_id, in key order) in canonical proto3 JSON with sorted keys, one
    /// per line; with --json, each line is {"shard_id", "sequence_number", "sub_sequence_number",
    /// "arrival_ms", "event"}. A summary goes to stderr: events, duplicates (copies of an event_id
    /// already printed), objects, bytes. AWS settings come from the environment (AWS_REGION,
    /// AWS_ENDPOINT_URL, credentials...). Exit status: 0 when everything was read (or standard
    /// output closed), 1 when the bucket or an object cannot be read, 2 for bad options.
    Read(S3ReadArgs),
}

#[derive(Debug, clap::Args)]
struct S3ReadArgs {
    /// The bucket.
    #[arg(long, value_name = "NAME")]
    bucket: String,
    /// The S3 key prefix, used as is: the sink's prefix, or one of its partitions
    /// (`<prefix>/events/dt=2026-03-01/`).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    prefix: String,
    /// Print each event with its position in the stream, in the JSON Lines object format.
    #[arg(long)]
    json: bool,
    /// Put the bucket in the URL path rather than the host name (LocalStack, MinIO, or any
    /// endpoint reached by IP address).
    #[arg(long)]
    path_style: bool,
}

/// `--from` of `ktk tail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FromPosition {
    /// Every shard from its oldest record.
    TrimHorizon,
    /// The open shards, from the records put after the start.
    Latest,
    /// Every shard from the first record that arrived at or after --timestamp.
    AtTimestamp,
}

#[derive(Debug, clap::Args)]
struct TailArgs {
    /// The stream to read (name).
    #[arg(long, value_name = "NAME")]
    stream: String,
    /// Where to start [default: trim-horizon, or at-timestamp when --timestamp is given].
    #[arg(long, value_enum, value_name = "POSITION")]
    from: Option<FromPosition>,
    /// With --from at-timestamp: an RFC 3339 date-time (2025-01-31T12:00:00Z) or Unix epoch
    /// milliseconds.
    #[arg(long, value_name = "TIME", value_parser = tail::parse_timestamp, required_if_eq("from", "at-timestamp"))]
    timestamp: Option<std::time::SystemTime>,
    /// Keep reading new records, and follow resharding, until Ctrl-C or SIGTERM.
    #[arg(long)]
    follow: bool,
    /// Decode each record's data as an events.v1 Event ("event" instead of "data").
    #[arg(long)]
    events: bool,
    /// Stop after printing N records.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct LeasesArgs {
    /// The lease table (DynamoDB table name; a KCL application's table is named after it).
    #[arg(long, value_name = "NAME")]
    table: String,
    /// Print one JSON object per lease instead of a table.
    #[arg(long)]
    json: bool,
    /// The stream the leases are for: adds how far behind the tip each checkpoint is (behind_ms).
    #[arg(long, value_name = "NAME")]
    stream: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ProduceArgs {
    /// The stream to put into (name or ARN).
    #[arg(long, value_name = "NAME")]
    stream: String,
    /// Read text lines: each line (without its line terminator) is one record's data; blank lines
    /// are skipped.
    #[arg(long)]
    lines: bool,
    /// With --lines: the partition key is this top-level field of a line that is a JSON object
    /// (a string or a number); lines without it get a random key (a UUID).
    #[arg(long, value_name = "FIELD", requires = "lines")]
    key_field: Option<String>,
    /// Put each record as its own Kinesis record instead of packing records into KPL aggregates.
    #[arg(long)]
    no_aggregation: bool,
    /// Longest a record waits to be batched before it is sent, in milliseconds (KPL
    /// RecordMaxBufferedTime).
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_buffered_ms: u64,
    /// Per-shard rate limit as a percentage of the shard's quota (KPL RateLimit).
    #[arg(long, value_name = "PERCENT", default_value_t = 150)]
    rate_limit: u32,
    /// Most records accepted and not yet acknowledged at once; bounds memory.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_outstanding: u64,
    /// Also print the summary to stdout as one JSON object.
    #[arg(long)]
    summary_json: bool,
    /// Print a line of progress on stderr every N seconds: records put, failed, retried, and the
    /// adaptive PutRecords concurrency limit and request timeout. 0: none.
    #[arg(long, value_name = "N", default_value_t = 0)]
    progress_secs: u64,
}

#[derive(Debug, Subcommand)]
enum AggCommand {
    /// Pack user records into the Kinesis records the KPL would put.
    ///
    /// Input, one JSON object per line:
    /// {"partition_key": "...", "explicit_hash_key": "..." (optional), "data": "<base64>"}.
    /// Output, one line per Kinesis record:
    /// {"partition_key", "explicit_hash_key" (when set), "data": "<base64>", "user_records": n}.
    Encode {
        /// Largest aggregate to write, in bytes (the KPL's AggregationMaxSize).
        #[arg(long, default_value_t = ktk_proto::aggregation::DEFAULT_MAX_AGGREGATE_SIZE)]
        max_size: usize,
        /// The stream's maximum record size in bytes (data plus partition key).
        #[arg(long, default_value_t = ktk_proto::aggregation::DEFAULT_MAX_RECORD_SIZE)]
        max_record_size: usize,
    },
    /// Unpack Kinesis records into their user records.
    ///
    /// Input, one JSON object per line: {"partition_key", "explicit_hash_key" (optional),
    /// "data": "<base64>", "sequence_number" (optional)}. Output, one line per user record:
    /// {"partition_key", "explicit_hash_key" (when set), "data": "<base64>", "sequence_number"
    /// (when given), "sub_sequence_number", "aggregated": true|false}.
    Decode,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Produce(args) => return produce_main(args),
        Command::Tail(args) => return tail_main(args),
        Command::Leases(args) => return leases_main(args),
        Command::S3(S3Command::Read(args)) => return s3_read_main(args),
        Command::Demo(args) => return demo::main(args),
        Command::Etl(command) => return etl::main(command),
        Command::Dashboard(args) => return dashboard::main(args),
        command => command,
    };
    let stdin = io::stdin().lock();
    let mut stdout = BufWriter::new(io::stdout().lock());
    let mut stderr = io::stderr().lock();
    let result = match command {
        Command::Agg(AggCommand::Encode { max_size, max_record_size }) => {
            match agg::EncodeOptions::new(max_size, max_record_size) {
                Ok(options) => agg::encode(stdin, &mut stdout, &mut stderr, &options),
                Err(error) => {
                    eprintln!("ktk agg encode: {error}");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Agg(AggCommand::Decode) => agg::decode(stdin, &mut stdout, &mut stderr),
        Command::Produce(_)
        | Command::Tail(_)
        | Command::Leases(_)
        | Command::S3(_)
        | Command::Demo(_)
        | Command::Dashboard(_)
        | Command::Etl(_) => {
            unreachable!("handled above")
        }
    };
    match result {
        Ok(summary) if summary.bad_lines == 0 => ExitCode::SUCCESS,
        Ok(summary) => {
            eprintln!("ktk agg: {} malformed input line(s) skipped", summary.bad_lines);
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("ktk agg: {error}");
            ExitCode::FAILURE
        }
    }
}

fn produce_main(args: ProduceArgs) -> ExitCode {
    let max_outstanding = usize::try_from(args.max_outstanding).unwrap_or(usize::MAX);
    let config = produce::producer_config(
        &args.stream,
        !args.no_aggregation,
        Duration::from_millis(args.max_buffered_ms),
        args.rate_limit,
        max_outstanding,
    );
    if let Err(error) = config.validate() {
        eprintln!("ktk produce: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ktk produce: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = produce::Options {
        input: match args.lines {
            true => produce::InputFormat::Text { key_field: args.key_field },
            false => produce::InputFormat::JsonLines,
        },
        max_outstanding,
        progress: (args.progress_secs > 0).then(|| Duration::from_secs(args.progress_secs)),
    };
    let code = runtime.block_on(async {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let producer = match ktk_producer::Producer::new(config, &aws).await {
            Ok(producer) => producer,
            Err(error) => {
                eprintln!("ktk produce: {error}");
                return ExitCode::from(2);
            }
        };
        let mut stderr = io::stderr();
        let report = match produce::run(&producer, &options, io::stdin(), &mut stderr, produce::interrupt()).await {
            Ok(report) => report,
            Err(error) => {
                eprintln!("ktk produce: cannot write to stderr: {error}");
                return ExitCode::FAILURE;
            }
        };
        let _ = report.write_text(&mut stderr);
        if args.summary_json {
            println!("{}", report.to_json());
        }
        if report.all_put() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    });
    // A reader blocked on a terminal after an interrupt must not hold the process.
    runtime.shutdown_background();
    code
}

/// A multi-threaded runtime, or the exit status after saying why there is none.
fn runtime(command: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|error| {
        eprintln!("ktk {command}: cannot start the async runtime: {error}");
        ExitCode::FAILURE
    })
}

fn tail_main(args: TailArgs) -> ExitCode {
    let start = match (args.from, args.timestamp) {
        (None | Some(FromPosition::AtTimestamp), Some(time)) => tail::Start::AtTimestamp(time),
        (None | Some(FromPosition::TrimHorizon), None) => tail::Start::TrimHorizon,
        (Some(FromPosition::Latest), None) => tail::Start::Latest,
        (Some(_), Some(_)) => {
            eprintln!("ktk tail: --timestamp goes with --from at-timestamp only");
            return ExitCode::from(2);
        }
        (Some(FromPosition::AtTimestamp), None) => unreachable!("clap requires --timestamp"),
    };
    let options =
        tail::Options { stream: args.stream, start, follow: args.follow, events: args.events, limit: args.limit };
    let runtime = match runtime("tail") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = runtime.block_on(async {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let client = aws_sdk_kinesis::Client::new(&aws);
        match tail::run(client, options, io::stdout(), tail::stop_signal()).await {
            Ok(summary) => {
                if summary.shards_not_started > 0 {
                    eprintln!(
                        "ktk tail: {} shard(s) not read: a parent was not read to its end",
                        summary.shards_not_started
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ktk tail: {error}");
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_background();
    code
}

fn leases_main(args: LeasesArgs) -> ExitCode {
    let runtime = match runtime("leases") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let table = ktk_consumer::lease::LeaseTable::new(&aws, &args.table);
        let kinesis = args.stream.as_ref().map(|_| aws_sdk_kinesis::Client::new(&aws));
        let options = leases::Options { json: args.json, stream: args.stream };
        let mut stdout = BufWriter::new(io::stdout().lock());
        let mut stderr = io::stderr();
        match leases::run(&table, kinesis.as_ref(), &options, &mut stdout, &mut stderr).await {
            Ok(summary) if summary.behind_failures == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(leases::LeasesError::Table(ktk_consumer::Error::TableNotFound { table })) => {
                eprintln!("ktk leases: lease table {table:?} does not exist; check the table name and the AWS region");
                ExitCode::FAILURE
            }
            Err(leases::LeasesError::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ktk leases: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

fn s3_read_main(args: S3ReadArgs) -> ExitCode {
    let runtime = match runtime("s3 read") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let client = ktk_pipeline::s3::client(&aws, args.path_style);
        let options = s3::ReadOptions { bucket: args.bucket, prefix: args.prefix, json: args.json };
        let mut stdout = BufWriter::new(io::stdout().lock());
        match s3::read(&client, &options, &mut stdout, &mut io::stderr()).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(s3::ReadError::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ktk s3 read: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
