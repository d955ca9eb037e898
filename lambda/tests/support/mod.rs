//! Event fixtures shared by the handler tests and the Runtime API test: events, KPL aggregates
//! (built with ktk-proto's encoder, as the producer builds them) and mapping batches in the JSON
//! Lambda sends.
#![allow(dead_code)] // Each test file uses a part.

use base64::Engine as _;
use ktk_proto::aggregation::{Aggregator, AggregatorConfig, UserRecord};
use ktk_proto::events::v1::{Event, EventType, Platform};
use prost::Message as _;
use serde_json::{Value, json};

pub const SHARD: &str = "shardId-000000000003";
pub const STREAM: &str = "app-events";
pub const ARN: &str = "arn:aws:kinesis:eu-west-1:123456789012:stream/app-events";

/// The sequence number of record `i` (56 digits, like Kinesis's).
pub fn sequence(i: usize) -> String {
    format!("4965691031824412345678901234567890123456789012345678{i:04}")
}

pub fn event(id: &str) -> Event {
    Event {
        event_id: id.to_owned(),
        r#type: EventType::Play as i32,
        occurred_at_ms: 1_730_000_000_000,
        user_id: "user-1".to_owned(),
        platform: Platform::Roku as i32,
        content_id: "content-42".to_owned(),
        ..Event::default()
    }
}

/// An event as a plain record's data (protobuf).
pub fn plain(id: &str) -> Vec<u8> {
    event(id).encode_to_vec()
}

/// A KPL aggregate of these events (protobuf), as the producer writes it.
pub fn aggregate(ids: &[&str]) -> Vec<u8> {
    let mut aggregator = Aggregator::new(AggregatorConfig::default());
    for id in ids {
        let record = UserRecord::new(format!("pk-{id}"), plain(id)).expect("user record");
        assert!(aggregator.add(record).expect("fits").is_none());
    }
    let record = aggregator.finish().expect("an aggregate");
    assert!(record.is_aggregated());
    record.data.to_vec()
}

/// Record `i` of a mapping's batch (as Lambda sends it), holding `data`.
pub fn kinesis_record(i: usize, data: &[u8]) -> Value {
    json!({
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": format!("pk-{i}"),
            "sequenceNumber": sequence(i),
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "approximateArrivalTimestamp": 1_730_000_001.5 + i as f64,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{SHARD}:{}", sequence(i)),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/ktk-lambda",
        "awsRegion": "eu-west-1",
        "eventSourceARN": ARN,
    })
}

/// A mapping's batch whose records are numbered from `first`: record `first + k` holds `data[k]`.
pub fn batch_json(first: usize, data: &[Vec<u8>]) -> Value {
    let records: Vec<_> = data.iter().enumerate().map(|(k, d)| kinesis_record(first + k, d)).collect();
    json!({ "Records": records })
}
