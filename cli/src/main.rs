//! `ktk`, the toolkit's command line. Parsing only: the work is in the modules it calls.

use std::io::{self, BufWriter};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agg;

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
    let stdin = io::stdin().lock();
    let mut stdout = BufWriter::new(io::stdout().lock());
    let mut stderr = io::stderr().lock();
    let result = match cli.command {
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
