//! Property tests of the aggregation codec: round trips, exact size prediction, de-duplicated
//! tables, agreement with a generated protobuf implementation (prost), and a decoder that takes
//! any bytes without panicking or losing them.

use bytes::Bytes;
use ktk_proto::aggregation::{
    AGGREGATE_PARTITION_KEY, Aggregator, AggregatorConfig, Deaggregator, FRAMING_LEN, MAGIC, Rejected, UserRecord,
};
use ktk_proto::keys::{HashKeyRange, partition_key_hash};
use ktk_proto::kpl;
use proptest::prelude::*;
use prost::Message as _;

/// Partition keys from a small pool (so tables de-duplicate) plus arbitrary Unicode ones.
fn partition_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["user-1", "user-2", "device-7", "é", "𝄞-key"]).prop_map(str::to_owned),
        1 => "\\PC{1,40}",
    ]
}

fn explicit_hash_key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(None),
        1 => prop::sample::select(vec![0u128, 1, 42, u128::MAX / 3, u128::MAX]).prop_map(|k| Some(k.to_string())),
        1 => any::<u128>().prop_map(|k| Some(k.to_string())),
    ]
}

fn user_record() -> impl Strategy<Value = UserRecord> {
    (partition_key(), explicit_hash_key(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(pk, ehk, data)| {
        let record = UserRecord::new(pk, data).expect("strategy makes valid keys");
        match ehk {
            Some(ehk) => record.with_explicit_hash_key(ehk).expect("strategy makes valid hash keys"),
            None => record,
        }
    })
}

/// Packs records with the default caps, asserting the size prediction at every step.
fn aggregate_all(
    records: &[UserRecord],
    config: AggregatorConfig,
) -> Vec<(ktk_proto::aggregation::KinesisRecord, Vec<UserRecord>)> {
    let mut aggregator = Aggregator::new(config);
    let mut out = Vec::new();
    let mut current = Vec::new();
    for record in records {
        let predicted = aggregator.size_with(record);
        match aggregator.try_add(record.clone()) {
            Ok(()) => {
                assert_eq!(aggregator.size(), predicted, "size_with predicts size after add");
                current.push(record.clone());
            }
            Err(Rejected::Full(back)) => {
                assert!(predicted > config.max_aggregate_size(), "rejected only when over the cap");
                let before = aggregator.size();
                let finished = aggregator.finish().expect("non-empty");
                assert_eq!(finished.data.len(), before, "finish emits exactly the predicted size");
                out.push((finished, std::mem::take(&mut current)));
                aggregator.try_add(back).expect("an empty aggregator takes any record");
                current.push(record.clone());
            }
            Err(Rejected::TooLarge { .. }) => panic!("records are small"),
        }
    }
    let before = aggregator.size();
    if let Some(finished) = aggregator.finish() {
        assert_eq!(finished.data.len(), before);
        out.push((finished, current));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_with_exact_sizes(records in prop::collection::vec(user_record(), 1..60), cap in 64usize..4096) {
        let config = AggregatorConfig::default().with_max_aggregate_size(cap).expect("valid cap");
        let packed = aggregate_all(&records, config);
        let mut decoded = Vec::new();
        for (kinesis_record, members) in &packed {
            prop_assert_eq!(kinesis_record.user_records, members.len());
            if members.len() > 1 {
                prop_assert!(kinesis_record.data.len() <= cap);
                prop_assert_eq!(kinesis_record.partition_key.as_str(), AGGREGATE_PARTITION_KEY);
                // Routed by the first record's hash key.
                let ehk = kinesis_record.explicit_hash_key.as_deref().expect("aggregates carry a hash key");
                prop_assert_eq!(ehk.parse::<u128>().ok(), Some(members[0].hash_key()));
            } else {
                // A lone record goes out plain, with its own keys.
                prop_assert_eq!(&kinesis_record.partition_key, members[0].partition_key());
                prop_assert_eq!(kinesis_record.explicit_hash_key.as_deref(), members[0].explicit_hash_key());
                prop_assert_eq!(&kinesis_record.data, members[0].data());
            }
            let out = Deaggregator::new().deaggregate(
                kinesis_record.data.clone(),
                &kinesis_record.partition_key,
                kinesis_record.explicit_hash_key.as_deref(),
            );
            prop_assert_eq!(out.format.is_aggregated(), members.len() > 1);
            prop_assert_eq!(out.records.len(), members.len());
            for (i, r) in out.records.iter().enumerate() {
                prop_assert_eq!(r.sub_sequence_number, if members.len() > 1 { i as u64 } else { 0 });
            }
            decoded.extend(out.records);
        }
        prop_assert_eq!(decoded.len(), records.len());
        for (got, want) in decoded.iter().zip(&records) {
            prop_assert_eq!(&*got.partition_key, want.partition_key());
            prop_assert_eq!(got.data.as_ref(), want.data().as_ref());
            // A plain record's explicit hash key is the Kinesis record's; an aggregate's members
            // keep their own.
            prop_assert_eq!(got.explicit_hash_key.as_deref(), want.explicit_hash_key());
        }
    }

    /// The message between magic and digest is exactly what prost writes for the same records,
    /// with each key in its table once, in first-use order.
    #[test]
    fn bytes_match_prost_and_tables_are_deduplicated(records in prop::collection::vec(user_record(), 2..40)) {
        let config = AggregatorConfig::default().with_max_aggregate_size(1024 * 1024).expect("cap");
        let mut aggregator = Aggregator::new(config);
        for r in &records {
            aggregator.try_add(r.clone()).expect("fits");
        }
        let kinesis_record = aggregator.finish().expect("aggregate");
        let data = &kinesis_record.data;
        prop_assert_eq!(&data[..4], &MAGIC[..]);
        let message = &data[4..data.len() - 16];

        let mut pks: Vec<String> = Vec::new();
        let mut ehks: Vec<String> = Vec::new();
        let mut expected = kpl::AggregatedRecord::default();
        for r in &records {
            let pk_index = match pks.iter().position(|k| k == r.partition_key()) {
                Some(i) => i,
                None => { pks.push(r.partition_key().to_owned()); pks.len() - 1 }
            };
            let ehk_index = r.explicit_hash_key().map(|ehk| match ehks.iter().position(|k| k == ehk) {
                Some(i) => i,
                None => { ehks.push(ehk.to_owned()); ehks.len() - 1 }
            });
            expected.records.push(kpl::Record {
                partition_key_index: pk_index as u64,
                explicit_hash_key_index: ehk_index.map(|i| i as u64),
                data: r.data().clone(),
                tags: vec![],
            });
        }
        expected.partition_key_table = pks.clone();
        expected.explicit_hash_key_table = ehks.clone();
        prop_assert_eq!(message, &expected.encode_to_vec()[..]);

        let parsed = kpl::AggregatedRecord::decode(message).expect("prost parses our bytes");
        let mut unique = parsed.partition_key_table.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), parsed.partition_key_table.len());
        prop_assert_eq!(parsed.partition_key_table, pks);
        prop_assert_eq!(parsed.explicit_hash_key_table, ehks);
    }

    /// Anything prost can encode as an aggregate (including unknown tags and empty tables), our
    /// decoder reads identically.
    #[test]
    fn decoder_reads_what_prost_writes(
        pks in prop::collection::vec("\\PC{1,12}", 1..6),
        ehks in prop::collection::vec(any::<u128>(), 0..4),
        raw in prop::collection::vec((any::<usize>(), any::<Option<usize>>(), prop::collection::vec(any::<u8>(), 0..50), any::<bool>()), 0..20),
    ) {
        let mut message = kpl::AggregatedRecord {
            partition_key_table: pks.clone(),
            explicit_hash_key_table: ehks.iter().map(u128::to_string).collect(),
            records: vec![],
        };
        for (pk, ehk, data, tagged) in &raw {
            message.records.push(kpl::Record {
                partition_key_index: (pk % pks.len()) as u64,
                explicit_hash_key_index: if ehks.is_empty() { None } else { ehk.map(|e| (e % ehks.len()) as u64) },
                data: Bytes::from(data.clone()),
                tags: if *tagged { vec![kpl::Tag { key: "k".into(), value: Some("v".into()) }] } else { vec![] },
            });
        }
        let body = message.encode_to_vec();
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&body);
        data.extend_from_slice(&md5_of(&body));
        let out = Deaggregator::new().deaggregate(Bytes::from(data), "outer", None);
        if body.is_empty() {
            // magic + digest alone is too short to be an aggregate: delivered as a plain record.
            prop_assert_eq!(out.records.len(), 1);
            prop_assert!(!out.format.is_aggregated());
        } else {
            prop_assert!(out.format.is_aggregated());
            prop_assert_eq!(out.records.len(), message.records.len());
            for (got, want) in out.records.iter().zip(&message.records) {
                prop_assert_eq!(&*got.partition_key, message.partition_key_table[want.partition_key_index as usize].as_str());
                let ehk = want.explicit_hash_key_index.map(|i| message.explicit_hash_key_table[i as usize].as_str());
                prop_assert_eq!(got.explicit_hash_key.as_deref(), ehk);
                prop_assert_eq!(&got.data, &want.data);
            }
        }
    }

    /// Any bytes at all: no panic, and the bytes are never lost (a non-aggregate comes back whole).
    #[test]
    fn decoder_never_panics_or_loses_bytes(data in prop::collection::vec(any::<u8>(), 0..400), with_magic in any::<bool>(), fix_digest in any::<bool>()) {
        let mut bytes = if with_magic { MAGIC.to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&data);
        if with_magic && fix_digest {
            let digest = md5_of(&data);
            bytes.extend_from_slice(&digest);
        }
        let bytes = Bytes::from(bytes);
        let out = Deaggregator::new().with_shard_range(HashKeyRange::new(0, u128::MAX / 2).expect("range")).deaggregate(bytes.clone(), "pk", None);
        if !out.format.is_aggregated() {
            prop_assert_eq!(out.records.len(), 1);
            prop_assert_eq!(&out.records[0].data, &bytes);
            prop_assert!(out.out_of_range.is_empty());
        } else {
            prop_assert!(bytes.len() > FRAMING_LEN);
        }
    }

    /// With a shard range, every sub-record lands in exactly one of the two lists, by its hash.
    #[test]
    fn shard_filter_partitions_by_hash_key(records in prop::collection::vec(user_record(), 2..40), split in any::<u128>()) {
        let config = AggregatorConfig::default().with_max_aggregate_size(1024 * 1024).expect("cap");
        let mut aggregator = Aggregator::new(config);
        for r in &records {
            aggregator.try_add(r.clone()).expect("fits");
        }
        let k = aggregator.finish().expect("aggregate");
        let range = HashKeyRange::new(0, split).expect("range");
        let out = Deaggregator::new().with_shard_range(range).deaggregate(k.data, &k.partition_key, None);
        prop_assert_eq!(out.records.len() + out.out_of_range.len(), records.len());
        for r in &out.records {
            prop_assert!(range.contains(hash_of(r)));
        }
        for r in &out.out_of_range {
            prop_assert!(!range.contains(hash_of(r)));
        }
    }
}

fn hash_of(r: &ktk_proto::aggregation::DeaggregatedRecord) -> u128 {
    match &r.explicit_hash_key {
        Some(ehk) => ehk.parse().expect("decimal"),
        None => partition_key_hash(&r.partition_key),
    }
}

fn md5_of(bytes: &[u8]) -> [u8; 16] {
    use md5::Digest as _;
    md5::Md5::digest(bytes).into()
}
