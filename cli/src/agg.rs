//! `ktk agg encode` and `ktk agg decode`: the aggregation codec over JSON Lines.
//!
//! Both read one JSON object per line and write one per output record. A line that cannot be used
//! is reported on the error stream with its line number and skipped; the rest are still processed,
//! and the summary says how many were bad so the caller can exit non-zero. The field names are a
//! public interface: scripts depend on them.

use std::io::{self, BufRead, Write};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use bytes::Bytes;
use ktk_proto::aggregation::{
    Aggregator, AggregatorConfig, Deaggregator, KinesisRecord, RecordFormat, Rejected, UserRecord,
};
use serde::{Deserialize, Serialize};

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub lines: usize,
    pub bad_lines: usize,
    pub records_out: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    config: AggregatorConfig,
}

impl EncodeOptions {
    pub fn new(max_size: usize, max_record_size: usize) -> ktk_proto::Result<Self> {
        let config =
            AggregatorConfig::default().with_max_record_size(max_record_size)?.with_max_aggregate_size(max_size)?;
        Ok(EncodeOptions { config })
    }
}

/// Unknown fields are refused: a misspelt `explicit_hash_key` must not silently change routing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRecordLine {
    partition_key: String,
    #[serde(default)]
    explicit_hash_key: Option<String>,
    data: String,
}

#[derive(Debug, Serialize)]
struct KinesisRecordLine<'a> {
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<&'a str>,
    data: String,
    user_records: usize,
}

/// Other fields are ignored, so `ktk agg encode | ktk agg decode` works and so do records dumped
/// with extra attributes (arrival timestamps, shard ids).
#[derive(Debug, Deserialize)]
struct KinesisRecordIn {
    partition_key: String,
    #[serde(default)]
    explicit_hash_key: Option<String>,
    data: String,
    #[serde(default)]
    sequence_number: Option<String>,
}

#[derive(Debug, Serialize)]
struct UserRecordOut<'a> {
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<&'a str>,
    data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence_number: Option<&'a str>,
    sub_sequence_number: u64,
    aggregated: bool,
}

/// Reads user records, writes the Kinesis records the KPL would put for them, in order.
pub fn encode(
    input: impl BufRead,
    out: &mut impl Write,
    err: &mut impl Write,
    options: &EncodeOptions,
) -> io::Result<Summary> {
    let mut summary = Summary::default();
    let mut aggregator = Aggregator::new(options.config);
    for item in numbered_lines(input) {
        let Some((number, line)) = counted_line(item?, &mut summary, err)? else { continue };
        let record = match parse_user_record(line.as_bytes()) {
            Ok(record) => record,
            Err(reason) => {
                summary.bad_lines += 1;
                writeln!(err, "line {number}: {reason}")?;
                continue;
            }
        };
        match aggregator.add(record) {
            Ok(Some(finished)) => {
                write_kinesis_record(out, &finished)?;
                summary.records_out += 1;
            }
            Ok(None) => {}
            Err(rejected @ Rejected::TooLarge { .. }) => {
                summary.bad_lines += 1;
                if let Some(error) = rejected.error() {
                    writeln!(err, "line {number}: {error}")?;
                }
            }
            Err(Rejected::Full(_)) => {
                // `add` finishes a full aggregate and retries on an empty one, which takes any
                // record up to the size limit; a record it still refuses is too large.
                summary.bad_lines += 1;
                writeln!(err, "line {number}: the record does not fit in an empty aggregate")?;
            }
        }
    }
    if let Some(finished) = aggregator.finish() {
        write_kinesis_record(out, &finished)?;
        summary.records_out += 1;
    }
    out.flush()?;
    Ok(summary)
}

/// Reads Kinesis records, writes their user records, in order.
pub fn decode(input: impl BufRead, out: &mut impl Write, err: &mut impl Write) -> io::Result<Summary> {
    let mut summary = Summary::default();
    let deaggregator = Deaggregator::new();
    let mut records = Vec::new();
    let mut out_of_range = Vec::new();
    for item in numbered_lines(input) {
        let Some((number, line)) = counted_line(item?, &mut summary, err)? else { continue };
        let parsed = serde_json::from_str::<KinesisRecordIn>(&line)
            .map_err(|e| format!("not a Kinesis record object: {e}"))
            .and_then(|r| decode_base64(&r.data).map(|data| (r, data)));
        let (input_record, data) = match parsed {
            Ok(parsed) => parsed,
            Err(reason) => {
                summary.bad_lines += 1;
                writeln!(err, "line {number}: {reason}")?;
                continue;
            }
        };
        records.clear();
        let format = deaggregator.deaggregate_into(
            data,
            &input_record.partition_key,
            input_record.explicit_hash_key.as_deref(),
            &mut records,
            &mut out_of_range,
        );
        if let Some(note) = suspicious(format) {
            writeln!(err, "line {number}: warning: {note}; passed through as one plain record")?;
        }
        for record in &records {
            let line = UserRecordOut {
                partition_key: &record.partition_key,
                explicit_hash_key: record.explicit_hash_key.as_deref(),
                data: STANDARD.encode(&record.data),
                sequence_number: input_record.sequence_number.as_deref(),
                sub_sequence_number: record.sub_sequence_number,
                aggregated: record.aggregated,
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            summary.records_out += 1;
        }
    }
    out.flush()?;
    Ok(summary)
}

/// The input's lines, numbered from 1, each as text or, when it is not UTF-8, why not: a bad line
/// is reported on its own and the lines after it are still read.
fn numbered_lines(input: impl BufRead) -> impl Iterator<Item = io::Result<(usize, Result<String, String>)>> {
    input.split(b'\n').enumerate().map(|(index, line)| {
        line.map(|mut bytes| {
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            let text = String::from_utf8(bytes)
                .map_err(|e| format!("not UTF-8 (an invalid byte at offset {})", e.utf8_error().valid_up_to()));
            (index + 1, text)
        })
    })
}

/// A line to work on, counted; `None` for a blank line, or for one that is not text (reported).
fn counted_line(
    (number, line): (usize, Result<String, String>),
    summary: &mut Summary,
    err: &mut impl Write,
) -> io::Result<Option<(usize, String)>> {
    match line {
        Ok(line) if line.trim().is_empty() => Ok(None),
        Ok(line) => {
            summary.lines += 1;
            Ok(Some((number, line)))
        }
        Err(reason) => {
            summary.lines += 1;
            summary.bad_lines += 1;
            writeln!(err, "line {number}: {reason}")?;
            Ok(None)
        }
    }
}

/// One `ktk agg encode` input line (also `ktk produce`'s), keys checked.
pub(crate) fn parse_user_record(line: &[u8]) -> Result<UserRecord, String> {
    let parsed: UserRecordLine = serde_json::from_slice(line).map_err(|e| format!("not a user record object: {e}"))?;
    let data = decode_base64(&parsed.data)?;
    let record = UserRecord::new(parsed.partition_key, data).map_err(|e| e.to_string())?;
    match parsed.explicit_hash_key {
        Some(ehk) => record.with_explicit_hash_key(ehk).map_err(|e| e.to_string()),
        None => Ok(record),
    }
}

fn decode_base64(text: &str) -> Result<Bytes, String> {
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .map(Bytes::from)
        .map_err(|e| format!("\"data\" is not valid base64: {e}"))
}

fn write_kinesis_record(out: &mut impl Write, record: &KinesisRecord) -> io::Result<()> {
    let line = KinesisRecordLine {
        partition_key: &record.partition_key,
        explicit_hash_key: record.explicit_hash_key.as_deref(),
        data: STANDARD.encode(&record.data),
        user_records: record.user_records,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

fn suspicious(format: RecordFormat) -> Option<String> {
    match format {
        RecordFormat::Aggregated | RecordFormat::Plain => None,
        RecordFormat::PlainTooShort => {
            Some("the record starts with the KPL magic but is too short to be an aggregate".into())
        }
        RecordFormat::PlainDigestMismatch => {
            Some("the record starts with the KPL magic but its MD5 digest does not match".into())
        }
        RecordFormat::PlainMalformed(why) => Some(format!(
            "the record starts with the KPL magic and its digest matches, but its message is malformed ({why:?})"
        )),
        _ => Some(format!("unrecognised record format {format:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn run_encode(input: &str, max_size: usize) -> (Vec<Value>, String, Summary) {
        let options = EncodeOptions::new(max_size, 1024 * 1024).expect("options");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = encode(input.as_bytes(), &mut out, &mut err, &options).expect("io");
        (lines(&out), String::from_utf8(err).expect("utf8"), summary)
    }

    fn run_decode(input: &str) -> (Vec<Value>, String, Summary) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = decode(input.as_bytes(), &mut out, &mut err).expect("io");
        (lines(&out), String::from_utf8(err).expect("utf8"), summary)
    }

    fn lines(out: &[u8]) -> Vec<Value> {
        String::from_utf8(out.to_vec())
            .expect("utf8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("output lines are JSON"))
            .collect()
    }

    fn user_line(pk: &str, data: &[u8]) -> String {
        format!(r#"{{"partition_key": "{pk}", "data": "{}"}}"#, STANDARD.encode(data))
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let input: String =
            (0..100).map(|i| user_line(&format!("user-{}", i % 7), format!("event {i}").as_bytes()) + "\n").collect();
        let (kinesis, err, summary) = run_encode(&input, 512);
        assert!(err.is_empty(), "{err}");
        assert_eq!(summary, Summary { lines: 100, bad_lines: 0, records_out: kinesis.len() });
        assert!(kinesis.len() > 1, "a 512-byte cap splits 100 records");
        assert_eq!(kinesis.iter().map(|k| k["user_records"].as_u64().expect("n")).sum::<u64>(), 100);

        let decode_input: String = kinesis
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut k = k.clone();
                let obj = k.as_object_mut().expect("object");
                obj.remove("user_records");
                obj.insert("sequence_number".into(), Value::from(format!("4960{i}")));
                k.to_string() + "\n"
            })
            .collect();
        let (users, err, summary) = run_decode(&decode_input);
        assert!(err.is_empty(), "{err}");
        assert_eq!(summary.records_out, 100);
        for (i, u) in users.iter().enumerate() {
            assert_eq!(u["partition_key"], format!("user-{}", i % 7));
            assert_eq!(
                STANDARD.decode(u["data"].as_str().expect("data")).expect("b64"),
                format!("event {i}").as_bytes()
            );
            assert!(u["sequence_number"].as_str().expect("seq").starts_with("4960"));
            assert_eq!(u["aggregated"], true);
            assert!(u.get("explicit_hash_key").is_none());
        }
    }

    #[test]
    fn bad_lines_are_reported_with_their_numbers_and_skipped() {
        let input = [
            user_line("ok-1", b"a"),
            "{not json".into(),
            r#"{"partition_key": "", "data": "eA=="}"#.into(),
            r#"{"partition_key": "k", "data": "%%%"}"#.into(),
            r#"{"partition_key": "k", "explicit_hash_key": "01", "data": "eA=="}"#.into(),
            user_line("ok-2", b"b"),
        ]
        .join("\n");
        let (kinesis, err, summary) = run_encode(&input, 51_200);
        assert_eq!(summary.bad_lines, 4);
        for n in 2..=5 {
            assert!(err.contains(&format!("line {n}: ")), "line {n} reported in {err}");
        }
        assert!(!err.contains("line 1:") && !err.contains("line 6:"));
        assert_eq!(kinesis.len(), 1);
        assert_eq!(kinesis[0]["user_records"], 2);
    }

    #[test]
    fn decode_passes_plain_and_corrupt_records_through() {
        let mut corrupt = ktk_proto::aggregation::MAGIC.to_vec();
        corrupt.extend_from_slice(&[0u8; 30]);
        let input = format!(
            "{}\n{}\n{}\n",
            r#"{"partition_key": "p", "explicit_hash_key": "5", "data": "aGVsbG8=", "sequence_number": "1"}"#,
            format_args!(r#"{{"partition_key": "q", "data": "{}"}}"#, STANDARD.encode(&corrupt)),
            r#"{"partition_key": "q", "data": 7}"#,
        );
        let (users, err, summary) = run_decode(&input);
        assert_eq!(summary, Summary { lines: 3, bad_lines: 1, records_out: 2 });
        assert_eq!(users[0]["data"], "aGVsbG8=");
        assert_eq!(users[0]["explicit_hash_key"], "5");
        assert_eq!(users[0]["sequence_number"], "1");
        assert_eq!(users[0]["sub_sequence_number"], 0);
        assert_eq!(users[0]["aggregated"], false);
        assert_eq!(STANDARD.decode(users[1]["data"].as_str().expect("data")).expect("b64"), corrupt);
        assert!(users[1].get("sequence_number").is_none());
        assert!(err.contains("line 2: warning: ") && err.contains("digest"), "{err}");
        assert!(err.contains("line 3: "), "{err}");
    }

    #[test]
    fn a_line_that_is_not_utf8_is_reported_with_its_number_and_the_rest_is_read() {
        let good = r#"{"partition_key": "p", "data": "aGVsbG8="}"#;
        let mut input = format!("{good}\n").into_bytes();
        input.extend_from_slice(b"{\"partition_key\": \"\xff\xfe\"}\r\n");
        input.extend_from_slice(format!("{good}\r\n{good}").as_bytes());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = decode(input.as_slice(), &mut out, &mut err).expect("io");
        assert_eq!(summary, Summary { lines: 4, bad_lines: 1, records_out: 3 });
        let err = String::from_utf8(err).expect("utf8");
        assert!(err.contains("line 2: not UTF-8 (an invalid byte at offset 19)"), "{err}");
        assert_eq!(lines(&out).len(), 3);

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let options = EncodeOptions::new(51_200, 1024 * 1024).expect("options");
        let summary = encode(&b"\xc3\n"[..], &mut out, &mut err, &options).expect("io");
        assert_eq!((summary.lines, summary.bad_lines), (1, 1));
        assert!(String::from_utf8(err).expect("utf8").contains("line 1: not UTF-8"));
    }
}
