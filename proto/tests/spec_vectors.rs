//! Aggregates written out by hand from the format's definition, byte by byte, and the ways a
//! record that starts with the magic can still fail to be an aggregate.

use bytes::Bytes;
use ktk_proto::Error;
use ktk_proto::aggregation::{
    Aggregator, AggregatorConfig, Deaggregator, MAGIC, Malformed, RecordFormat, Rejected, UserRecord,
};
use md5::Digest as _;

/// `records: [("a", -, "x"), ("b", ehk "1", "yz"), ("a", -, "")]`, field by field.
const HAND_MESSAGE: &str = concat!(
    "0a0161", // partition_key_table[0] = "a"   (field 1, len 1)
    "0a0162", // partition_key_table[1] = "b"
    "120131", // explicit_hash_key_table[0] = "1" (field 2)
    "1a05", "0800", "1a0178", // records[0]: pk index 0, data "x"
    "1a08", "0801", "1000", "1a02797a", // records[1]: pk index 1, ehk index 0, data "yz"
    "1a04", "0800", "1a00", // records[2]: pk index 0, data ""
);

fn framed(message: &[u8]) -> Bytes {
    let mut data = MAGIC.to_vec();
    data.extend_from_slice(message);
    data.extend_from_slice(&md5::Md5::digest(message));
    Bytes::from(data)
}

fn hand_records() -> Vec<UserRecord> {
    vec![
        UserRecord::new("a", "x").expect("valid"),
        UserRecord::new("b", "yz").expect("valid").with_explicit_hash_key("1").expect("valid"),
        UserRecord::new("a", "").expect("valid"),
    ]
}

#[test]
fn encoder_writes_the_hand_made_bytes() {
    let mut aggregator = Aggregator::default();
    for r in hand_records() {
        aggregator.try_add(r).expect("fits");
    }
    assert_eq!(aggregator.size(), 4 + 32 + 16);
    let record = aggregator.finish().expect("aggregate");
    let message = hex::decode(HAND_MESSAGE).expect("hex");
    assert_eq!(message.len(), 32);
    assert_eq!(record.data, framed(&message));
    assert_eq!(record.partition_key, "a");
    // Routed by md5("a"), the first record's partition key.
    assert_eq!(record.explicit_hash_key.as_deref(), Some("16955237001963240173058271559858726497"));
    assert_eq!(record.user_records, 3);
    assert!(aggregator.is_empty());
}

#[test]
fn decoder_reads_the_hand_made_bytes() {
    let message = hex::decode(HAND_MESSAGE).expect("hex");
    let out = Deaggregator::new().deaggregate(framed(&message), "a", None);
    assert_eq!(out.format, RecordFormat::Aggregated);
    let got: Vec<(&str, Option<&str>, &[u8], u64)> = out
        .records
        .iter()
        .map(|r| (&*r.partition_key, r.explicit_hash_key.as_deref(), &r.data[..], r.sub_sequence_number))
        .collect();
    assert_eq!(got, vec![("a", None, &b"x"[..], 0), ("b", Some("1"), &b"yz"[..], 1), ("a", None, &b""[..], 2)]);
}

#[test]
fn a_lone_record_is_put_plain_with_its_own_keys() {
    let mut aggregator = Aggregator::default();
    let record = UserRecord::new("user-9", "hello").expect("valid").with_explicit_hash_key("7").expect("valid");
    aggregator.try_add(record).expect("fits");
    assert_eq!(aggregator.size(), 5);
    let out = aggregator.finish().expect("record");
    assert_eq!(
        (out.partition_key.as_str(), out.explicit_hash_key.as_deref(), &out.data[..]),
        ("user-9", Some("7"), &b"hello"[..])
    );
    assert!(!out.is_aggregated());
    assert!(aggregator.finish().is_none(), "finish on an empty aggregator emits nothing");
}

#[test]
fn malformed_aggregates_are_delivered_whole_with_the_reason() {
    let cases: &[(&str, Malformed)] = &[
        // a record refers to partition key 5 of a one-entry table
        ("0a0161 1a04 0805 1a00", Malformed::IndexOutOfRange),
        // a record without its required data
        ("0a0161 1a02 0800", Malformed::MissingField),
        // explicit hash key "01" is not canonical decimal
        ("0a0161 12023031 1a04 0800 1a00", Malformed::InvalidExplicitHashKey),
        // a partition key that is not UTF-8
        ("0a01ff 1a04 0800 1a00", Malformed::InvalidUtf8),
        // a record claims 9 bytes, 4 follow
        ("0a0161 1a09 0800 1a05", Malformed::Encoding),
        // field 3 (records) with the varint wire type
        ("0a0161 1805", Malformed::FieldType),
    ];
    for (bytes, reason) in cases {
        let message = hex::decode(bytes.replace(' ', "")).expect("hex");
        let data = framed(&message);
        let out = Deaggregator::new().deaggregate(data.clone(), "outer-key", Some("12"));
        assert_eq!(out.format, RecordFormat::PlainMalformed(*reason), "{bytes}");
        assert_eq!(out.records.len(), 1);
        let r = &out.records[0];
        assert_eq!(
            (r.data.clone(), &*r.partition_key, r.explicit_hash_key.as_deref()),
            (data, "outer-key", Some("12"))
        );
        assert!(!r.aggregated);
    }
}

#[test]
fn an_aggregate_with_no_records_yields_none() {
    // A valid message with only a table: an aggregate of zero user records, as the KCL reads it.
    let out = Deaggregator::new().deaggregate(framed(&hex::decode("0a0161").expect("hex")), "a", None);
    assert_eq!(out.format, RecordFormat::Aggregated);
    assert!(out.records.is_empty());
}

#[test]
fn magic_and_digest_of_an_empty_message_is_too_short() {
    let out = Deaggregator::new().deaggregate(framed(&[]), "a", None);
    assert_eq!(out.format, RecordFormat::PlainTooShort);
    assert_eq!(out.records.len(), 1);
}

#[test]
fn records_too_large_for_the_stream_come_back() {
    let mut aggregator = Aggregator::default();
    let big = UserRecord::new("k", vec![0u8; 1024 * 1024]).expect("valid");
    match aggregator.try_add(big) {
        Err(rejected @ Rejected::TooLarge { .. }) => {
            let Some(Error::RecordTooLarge { size, max }) = rejected.error() else {
                panic!("TooLarge carries RecordTooLarge")
            };
            let record = rejected.into_record();
            assert_eq!((size, max), (1024 * 1024 + 1, 1024 * 1024));
            assert_eq!(record.data().len(), 1024 * 1024);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Just under the limit is fine alone, even though it is far over the aggregate cap...
    let ok = UserRecord::new("k", vec![0u8; 1024 * 1024 - 1]).expect("valid");
    aggregator.try_add(ok).expect("a lone record up to the record limit is accepted");
    // ...and then nothing joins it.
    let small = UserRecord::new("k", "x").expect("valid");
    assert!(matches!(aggregator.try_add(small.clone()), Err(Rejected::Full(_))));
    // `add` finishes the full record and starts the next with the small one.
    let finished = aggregator.add(small).expect("accepted").expect("previous record finished");
    assert_eq!(finished.user_records, 1);
    assert_eq!(aggregator.len(), 1);
}

#[test]
fn a_record_too_large_for_the_stream_leaves_the_aggregate_alone() {
    let mut aggregator = Aggregator::default();
    aggregator.add(UserRecord::new("a", "one").expect("valid")).expect("fits");
    aggregator.add(UserRecord::new("b", "two").expect("valid")).expect("fits");
    let size = aggregator.size();
    let big = UserRecord::new("c", vec![7u8; 2 * 1024 * 1024]).expect("valid");
    let rejected = aggregator.add(big).expect_err("too large");
    assert!(matches!(rejected.error(), Some(Error::RecordTooLarge { .. })));
    assert_eq!(rejected.into_record().data().len(), 2 * 1024 * 1024);
    // Nothing was finished, nothing was lost.
    assert_eq!((aggregator.len(), aggregator.size()), (2, size));
    assert_eq!(aggregator.finish().expect("aggregate").user_records, 2);
}

#[test]
fn aggregates_stay_within_the_cap_and_the_record_limit() {
    let config = AggregatorConfig::default().with_max_record_size(4096).expect("valid");
    // The aggregate cap follows the record limit down...
    assert_eq!(config.max_aggregate_size(), 4096);
    let mut aggregator = Aggregator::new(config);
    let mut emitted = Vec::new();
    for i in 0..500 {
        if let Some(done) =
            aggregator.add(UserRecord::new(format!("k{i}"), vec![1u8; 37]).expect("valid")).expect("fits")
        {
            emitted.push(done);
        }
    }
    emitted.extend(aggregator.finish());
    assert_eq!(emitted.iter().map(|r| r.user_records).sum::<usize>(), 500);
    for r in &emitted {
        // ...and, with the one-byte partition key "a", an aggregate never passes the record limit.
        assert!(r.size() <= 4096, "{} bytes", r.size());
    }
    assert!(emitted.len() >= 5);

    assert!(AggregatorConfig::default().with_max_aggregate_size(63).is_err());
    assert!(AggregatorConfig::default().with_max_aggregate_size(2 * 1024 * 1024).is_err());
    assert!(AggregatorConfig::default().with_max_record_size(11 * 1024 * 1024).is_err());
}

#[test]
fn invalid_keys_are_typed_errors() {
    assert!(matches!(UserRecord::new("", "x"), Err(Error::EmptyPartitionKey)));
    assert!(matches!(UserRecord::new("k".repeat(257), "x"), Err(Error::PartitionKeyTooLong { chars: 257 })));
    let with_bad_ehk = UserRecord::new("k", "x").expect("valid").with_explicit_hash_key("-5");
    assert!(matches!(with_bad_ehk, Err(Error::InvalidExplicitHashKey { .. })));
}
