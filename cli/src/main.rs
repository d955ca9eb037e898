//! `ktk`, the toolkit's command line. Parsing only: the work is in the modules it calls.

use std::io::{self, BufWriter};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod agg;
mod produce;

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
        Command::Produce(_) => unreachable!("handled above"),
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
