//! `ktk-settings`: how every ktk binary (`consumer`, `bootstrap`, `collector`) reads its `KTK_*`
//! settings, in one place.
//!
//! Each binary describes its settings as a clap command in which every setting is a `--flag` and
//! a `KTK_*` variable. Before the values are used:
//! - [`check_environment`] refuses any `KTK_*` variable the command does not read (a typo such as
//!   `KTK_S3_BUCKETS` would otherwise be ignored silently and the default used), naming the
//!   nearest variable it does read;
//! - [`one_line`] turns a clap error into one line naming each flag and its variable;
//! - [`parse_or_exit`] does both and exits with status 2 on anything wrong.
//!
//! [`stdio`] is where the binaries write their logs and messages: a closed or broken stdout or
//! stderr loses them but never panics a binary or blocks its shutdown.
#![deny(unsafe_code)]

pub mod stdio;

use std::ffi::OsString;

/// `KTK_*` variables that are not settings of any binary but of the scripts around them (the
/// LocalStack scripts, `scripts/test.sh`, the benchmarks). A shell that ran those scripts may
/// still export them, and the test harness exports some to every process it starts, so the
/// binaries accept them (and ignore them) rather than refuse to start.
pub const TOOLING_VARIABLES: [&str; 8] = [
    // Cache directory of the LocalStack, cfn-lint and benchmark scripts (localstack/common.sh).
    "KTK_CACHE",
    // Which LocalStack instance the scripts work on, and how long they wait for it.
    "KTK_LOCALSTACK_PORT",
    "KTK_LOCALSTACK_TIMEOUT",
    // The Python the scripts build their virtual environments with.
    "KTK_PYTHON",
    // How long localstack/databases.sh waits for each database.
    "KTK_DB_TIMEOUT",
    // The fault-injecting LocalStack the tests use (scripts/test.sh exports it).
    "KTK_FLAKY_ENDPOINT_URL",
    // The benchmark scripts' virtual environment and work directory (bench/).
    "KTK_BENCH_VENV",
    "KTK_BENCH_WORK",
];

/// Checks the process environment against `command`: every variable whose name starts with
/// `KTK_` must be read by one of the command's arguments (or be one of [`TOOLING_VARIABLES`]).
/// The error is one line naming each unknown variable and the nearest known one.
pub fn check_environment(command: &clap::Command) -> Result<(), String> {
    check_variables(command, std::env::vars_os().map(|(name, _)| name))
}

/// [`check_environment`] over the variable names given instead of the process environment.
pub fn check_variables(command: &clap::Command, names: impl IntoIterator<Item = OsString>) -> Result<(), String> {
    let known: Vec<String> =
        command.get_arguments().filter_map(|arg| arg.get_env()).map(|env| env.to_string_lossy().into_owned()).collect();
    let mut unknown: Vec<String> = names
        .into_iter()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.starts_with("KTK_"))
        .filter(|name| !known.iter().any(|k| k == name) && !TOOLING_VARIABLES.contains(&name.as_str()))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    let binary = command.get_name();
    let problems: Vec<String> = unknown
        .iter()
        .map(|name| match nearest(name, &known) {
            Some(near) => format!("{name} is not a setting of {binary} (did you mean {near}?)"),
            None => format!("{name} is not a setting of {binary}"),
        })
        .collect();
    Err(format!("{binary}: {}; unset it or fix its name (`{binary} --help` lists every setting)", problems.join("; ")))
}

/// The known name closest to `name` by edit distance (the first of equals, in `known`'s order).
fn nearest<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    known.iter().min_by_key(|k| edit_distance(name, k)).map(String::as_str)
}

/// Levenshtein distance: the fewest one-character insertions, deletions and substitutions that
/// turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the dynamic-programming table at a time: `row[j]` is the distance between the
    // prefix of `a` read so far and the first `j` characters of `b`.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Parses a binary's settings from its arguments and `KTK_*` variables. `--help` and `--version`
/// print and exit 0; an unknown `KTK_*` variable ([`check_environment`]) or anything wrong with a
/// value is one line on stderr naming each flag and its variable, and exit status 2.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    let parsed = T::try_parse();
    if let Err(error) = &parsed
        && !error.use_stderr()
    {
        error.exit();
    }
    // Unknown variables first: a misspelt one is often why a required setting is missing.
    if let Err(line) = check_environment(&T::command()) {
        stdio::eprint_line(&line);
        std::process::exit(2);
    }
    parsed.unwrap_or_else(|error| {
        stdio::eprint_line(&one_line(&T::command(), &error));
        std::process::exit(2);
    })
}

/// A clap error as one line: `<binary>: <what is wrong> (--flag / KTK_VARIABLE, ...)`.
pub fn one_line(command: &clap::Command, error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let rendered = error.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|line| !line.is_empty());
    let what = lines.next().unwrap_or("bad settings").trim_start_matches("error: ").trim_end_matches(':');
    let mentioned = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => vec![arg.clone()],
        Some(ContextValue::Strings(args)) => args.clone(),
        _ => Vec::new(),
    };
    let mut names = Vec::new();
    for text in &mentioned {
        // A group's members come as one text, `<--a <A>|--b <B>>`: any one of them will do.
        let alternatives: Vec<String> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--"))
            .map(|flag| {
                let long = flag.trim_start_matches("--");
                let env = command.get_arguments().find(|a| a.get_long() == Some(long)).and_then(|a| a.get_env());
                match env {
                    Some(env) => format!("{flag} / {}", env.to_string_lossy()),
                    None => flag.to_owned(),
                }
            })
            .collect();
        match alternatives.len() {
            0 => {}
            1 => names.extend(alternatives),
            _ => names.push(format!("one of {}", alternatives.join(", "))),
        }
    }
    let what = if error.kind() == ErrorKind::MissingRequiredArgument { "missing required settings" } else { what };
    if names.is_empty() {
        format!("{}: {what}", command.get_name())
    } else {
        format!("{}: {what} ({})", command.get_name(), names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    fn command() -> Command {
        Command::new("consumer")
            .arg(Arg::new("s3_bucket").long("s3-bucket").env("KTK_S3_BUCKET"))
            .arg(Arg::new("s3_prefix").long("s3-prefix").env("KTK_S3_PREFIX"))
            .arg(Arg::new("stream").long("stream").env("KTK_STREAM"))
            .arg(Arg::new("verbose").long("verbose"))
    }

    fn check(names: &[&str]) -> Result<(), String> {
        check_variables(&command(), names.iter().map(OsString::from))
    }

    #[test]
    fn known_tooling_and_other_variables_pass() {
        assert_eq!(check(&["KTK_S3_BUCKET", "KTK_STREAM", "KTK_CACHE", "PATH", "AWS_REGION", "ktk_lower"]), Ok(()));
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn an_unknown_variable_names_the_nearest_known_one() {
        let line = check(&["KTK_STREAM", "KTK_S3_BUCKETS"]).expect_err("typo");
        assert!(line.starts_with("consumer: KTK_S3_BUCKETS is not a setting of consumer"), "{line}");
        assert!(line.contains("did you mean KTK_S3_BUCKET?"), "{line}");
        assert!(!line.contains('\n'));
        let line = check(&["KTK_STRAEM", "KTK_S3_PREFX"]).expect_err("two typos");
        assert!(line.contains("KTK_S3_PREFX is not a setting of consumer (did you mean KTK_S3_PREFIX?)"), "{line}");
        assert!(line.contains("KTK_STRAEM is not a setting of consumer (did you mean KTK_STREAM?)"), "{line}");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("KTK_S3_BUCKETS", "KTK_S3_BUCKET"), 1);
        assert_eq!(edit_distance("KTK_STRAEM", "KTK_STREAM"), 2);
        assert_eq!(edit_distance("flaw", "lawn"), 2);
    }
}
