//! One CloudWatch embedded-metric-format (EMF) line per invocation: what the invocation did and
//! its health verdict, as metrics CloudWatch Logs extracts from the function's log group (no
//! `PutMetricData` call, no extra permission; see the EMF specification,
//! <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>).
//!
//! The line is a JSON object written alone on standard output. Its metrics, with the dimension
//! `FunctionName`, in the namespace `KTK_METRICS_NAMESPACE` (`ktk/lambda` by default):
//!
//! | metric | unit | value |
//! | --- | --- | --- |
//! | `SinkFailing` | None | 1 when a sink's latest write in this container failed, else 0: the alarm's metric |
//! | `SinkFailingSeconds` | Seconds | how long the longest-failing sink has failed every write |
//! | `Records` | Count | Kinesis records in the event |
//! | `UserRecords` | Count | user records they held, after deaggregation |
//! | `EventsDelivered` | Count | events delivered to every sink |
//! | `Duplicates` | Count | events dropped as duplicates |
//! | `DuplicatesResent` | Count | of those, events sent again (another Kinesis record with the same `event_id`) |
//! | `DuplicatesReread` | Count | of those, the same Kinesis record read again (a retried invocation) |
//! | `DeadLetters` | Count | records delivered as dead letters |
//! | `SinkErrors` | Count | failed sink writes |
//! | `Failures` | Count | entries of the response's `batchItemFailures` (shards the mapping retries) |
//!
//! Beside them the line carries `requestId`, `failingSinks` (names) and `reasons` (sentences, as
//! the ECS consumer's `/health` gives them), which CloudWatch keeps as log fields.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::handler::InvocationReport;

/// The namespace the metrics go to unless `KTK_METRICS_NAMESPACE` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "ktk/lambda";

/// The dimension every metric carries: the function's name.
pub const DIMENSION: &str = "FunctionName";

/// The EMF line of one invocation (no trailing newline): `namespace` and `function_name` name the
/// metrics, `at` is their timestamp.
pub fn line(
    report: &InvocationReport,
    namespace: &str,
    function_name: &str,
    request_id: &str,
    at: SystemTime,
) -> String {
    let health = &report.health;
    let delivery = &report.delivery;
    let metrics: [(&str, &str, u64); 11] = [
        ("SinkFailing", "None", u64::from(health.is_sink_failing())),
        ("SinkFailingSeconds", "Seconds", health.longest_failing().as_secs()),
        ("Records", "Count", report.records),
        ("UserRecords", "Count", report.user_records),
        ("EventsDelivered", "Count", delivery.events_delivered),
        ("Duplicates", "Count", delivery.duplicates()),
        ("DuplicatesResent", "Count", delivery.duplicates_resent()),
        ("DuplicatesReread", "Count", delivery.duplicates_reread),
        ("DeadLetters", "Count", delivery.dead_letters),
        ("SinkErrors", "Count", delivery.sink_errors),
        ("Failures", "Count", report.failures.len() as u64),
    ];
    let timestamp = at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut object = serde_json::Map::new();
    object.insert(
        "_aws".to_owned(),
        json!({
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [[DIMENSION]],
                "Metrics": metrics.iter().map(|(name, unit, _)| json!({ "Name": name, "Unit": unit })).collect::<Vec<_>>(),
            }],
        }),
    );
    object.insert(DIMENSION.to_owned(), Value::from(function_name));
    for (name, _, value) in metrics {
        object.insert(name.to_owned(), Value::from(value));
    }
    object.insert("requestId".to_owned(), Value::from(request_id));
    object
        .insert("failingSinks".to_owned(), health.failing_sinks.iter().map(|f| Value::from(f.sink.as_str())).collect());
    object.insert("reasons".to_owned(), health.reasons().into_iter().map(Value::from).collect());
    Value::Object(object).to_string()
}

/// Writes the invocation's EMF line to standard output, alone on its line. A write that fails (a
/// closed stdout) is lost, never a panic.
pub fn emit(report: &InvocationReport, namespace: &str, function_name: &str, request_id: &str) {
    let mut text = line(report, namespace, function_name, request_id, SystemTime::now());
    text.push('\n');
    let mut stdout = ktk_settings::stdio::lossy_stdout();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Checks a CloudWatch namespace: 1 to 255 printable ASCII characters, not starting with `AWS/`
/// (reserved for AWS's own metrics).
pub fn parse_namespace(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 255 {
        return Err(format!("a namespace has 1 to 255 characters, not {}", text.len()));
    }
    if !text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err("a namespace has printable ASCII characters only".to_owned());
    }
    if text.starts_with("AWS/") {
        return Err("namespaces starting with AWS/ are AWS's own".to_owned());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::handler::{FailingSink, InvocationHealth};

    fn report(failing: Vec<FailingSink>) -> InvocationReport {
        let mut report = InvocationReport {
            records: 3,
            user_records: 7,
            failures: vec!["4956".to_owned()],
            health: InvocationHealth { failing_sinks: failing },
            ..InvocationReport::default()
        };
        report.delivery.events_delivered = 5;
        report.delivery.dead_letters = 1;
        report.delivery.sink_errors = 2;
        report.delivery.duplicates_in_memory = 4;
        report.delivery.duplicates_in_sinks = 2;
        report.delivery.duplicates_reread = 2;
        report
    }

    fn parse(line: &str) -> Value {
        assert!(!line.contains('\n'), "one line: {line}");
        serde_json::from_str(line).expect("the line is JSON")
    }

    #[test]
    fn the_line_declares_every_metric_and_carries_its_value_at_the_top_level() {
        let at = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        let failing = FailingSink {
            sink: "s3".into(),
            failing_for: Duration::from_millis(75_400),
            last_error: "NoSuchBucket: the bucket does not exist".into(),
        };
        let line = line(&report(vec![failing]), "ktk/lambda", "ktk-delivery", "req-1", at);
        let json = parse(&line);

        let aws = &json["_aws"];
        assert_eq!(aws["Timestamp"], 1_767_225_600_123u64);
        let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
        assert_eq!(directives.len(), 1);
        let directive = &directives[0];
        assert_eq!(directive["Namespace"], "ktk/lambda");
        assert_eq!(directive["Dimensions"], json!([["FunctionName"]]));
        let declared: Vec<(&str, &str)> = directive["Metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .map(|m| (m["Name"].as_str().expect("name"), m["Unit"].as_str().expect("unit")))
            .collect();
        assert_eq!(
            declared,
            [
                ("SinkFailing", "None"),
                ("SinkFailingSeconds", "Seconds"),
                ("Records", "Count"),
                ("UserRecords", "Count"),
                ("EventsDelivered", "Count"),
                ("Duplicates", "Count"),
                ("DuplicatesResent", "Count"),
                ("DuplicatesReread", "Count"),
                ("DeadLetters", "Count"),
                ("SinkErrors", "Count"),
                ("Failures", "Count"),
            ]
        );
        // Each declared metric and the dimension are top-level members (what EMF requires).
        for (name, _) in &declared {
            assert!(json[name].is_u64(), "{name} is a number at the top level: {line}");
        }
        assert_eq!(json["FunctionName"], "ktk-delivery");
        assert_eq!(
            (&json["SinkFailing"], &json["SinkFailingSeconds"], &json["Records"], &json["UserRecords"]),
            (&json!(1), &json!(75), &json!(3), &json!(7))
        );
        assert_eq!(
            (&json["EventsDelivered"], &json["DeadLetters"], &json["SinkErrors"]),
            (&json!(5), &json!(1), &json!(2))
        );
        assert_eq!(
            (&json["Duplicates"], &json["DuplicatesResent"], &json["DuplicatesReread"]),
            (&json!(6), &json!(4), &json!(2))
        );
        assert_eq!(json["Failures"], 1);
        assert_eq!(json["requestId"], "req-1");
        assert_eq!(json["failingSinks"], json!(["s3"]));
        assert_eq!(
            json["reasons"],
            json!(["sink s3 has failed every write for 75 s: NoSuchBucket: the bucket does not exist"])
        );
    }

    #[test]
    fn a_healthy_invocation_reports_zero_and_no_reasons() {
        let json = parse(&line(&report(Vec::new()), "app/metrics", "f", "req-2", SystemTime::now()));
        assert_eq!((&json["SinkFailing"], &json["SinkFailingSeconds"]), (&json!(0), &json!(0)));
        assert_eq!(json["failingSinks"], json!([]));
        assert_eq!(json["reasons"], json!([]));
        assert_eq!(json["_aws"]["CloudWatchMetrics"][0]["Namespace"], "app/metrics");
    }

    #[test]
    fn namespaces_are_checked() {
        assert_eq!(parse_namespace("ktk/lambda").as_deref(), Ok("ktk/lambda"));
        assert!(parse_namespace("").is_err());
        assert!(parse_namespace("AWS/Lambda").is_err());
        assert!(parse_namespace("tab\there").is_err());
        assert!(parse_namespace(&"x".repeat(256)).is_err());
        assert!(parse_namespace(&"x".repeat(255)).is_ok());
    }
}
