//! Records written by Amazon's KPL (and the awslabs aggregation libraries), decoded byte for byte,
//! and re-encoded to the same bytes. The fixture's `_note` says where each vector comes from.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ktk_proto::aggregation::{Aggregator, AggregatorConfig, Deaggregator, RecordFormat, UserRecord};
use ktk_proto::keys::HashKeyRange;
use serde_json::Value;

struct Vector {
    name: String,
    record_partition_key: String,
    data: Bytes,
    aggregated: bool,
    /// (partition key, explicit hash key, data)
    user_records: Vec<(String, Option<String>, Vec<u8>)>,
}

fn vectors() -> Vec<Vector> {
    let text = include_str!("fixtures/kpl_vectors.json");
    let json: Value = serde_json::from_str(text).expect("fixture is JSON");
    let list = json["vectors"].as_array().expect("vectors array");
    list.iter()
        .map(|v| {
            let s = |key: &str| v[key].as_str().map(str::to_owned);
            Vector {
                name: s("name").expect("name"),
                record_partition_key: s("record_partition_key").unwrap_or_else(|| "unknown".into()),
                data: Bytes::from(B64.decode(s("data_base64").expect("data")).expect("base64")),
                aggregated: v["aggregated"].as_bool().expect("aggregated flag"),
                user_records: v["user_records"]
                    .as_array()
                    .expect("user records")
                    .iter()
                    .map(|u| {
                        (
                            u["partition_key"].as_str().expect("pk").to_owned(),
                            u["explicit_hash_key"].as_str().map(str::to_owned),
                            B64.decode(u["data_base64"].as_str().expect("data")).expect("base64"),
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn fixture_has_real_aggregates_and_plain_records() {
    let all = vectors();
    assert!(all.iter().filter(|v| v.aggregated).count() >= 4, "expected at least 4 aggregates");
    assert!(all.iter().filter(|v| !v.aggregated).count() >= 4, "expected plain and corrupt records");
}

#[test]
fn every_vector_decodes_to_its_user_records() {
    for v in vectors() {
        let out = Deaggregator::new().deaggregate(v.data.clone(), &v.record_partition_key, None);
        assert_eq!(out.format.is_aggregated(), v.aggregated, "{}: format {:?}", v.name, out.format);
        assert_eq!(out.records.len(), v.user_records.len(), "{}: record count", v.name);
        assert!(out.out_of_range.is_empty());
        for (i, (got, (pk, ehk, data))) in out.records.iter().zip(&v.user_records).enumerate() {
            assert_eq!(&*got.partition_key, pk, "{} #{i}: partition key", v.name);
            assert_eq!(got.explicit_hash_key.as_deref(), ehk.as_deref(), "{} #{i}: explicit hash key", v.name);
            assert_eq!(&got.data[..], &data[..], "{} #{i}: data", v.name);
            assert_eq!(got.aggregated, v.aggregated, "{} #{i}", v.name);
            let expected_ssn = if v.aggregated { i as u64 } else { 0 };
            assert_eq!(got.sub_sequence_number, expected_ssn, "{} #{i}: sub-sequence number", v.name);
        }
        if !v.aggregated {
            // A plain record comes back whole, byte for byte.
            assert_eq!(out.records[0].data, v.data, "{}", v.name);
        }
    }
}

#[test]
fn corrupt_vectors_say_why_they_are_plain() {
    let formats: Vec<(String, RecordFormat)> = vectors()
        .into_iter()
        .map(|v| {
            let format = Deaggregator::new().deaggregate(v.data, &v.record_partition_key, None).format;
            (v.name, format)
        })
        .collect();
    let format_of =
        |needle: &str| formats.iter().find(|(name, _)| name.contains(needle)).map(|(_, f)| *f).expect(needle);
    assert_eq!(format_of("magic_first_byte_removed"), RecordFormat::Plain);
    assert_eq!(format_of("truncated_to_19"), RecordFormat::PlainTooShort);
    assert_eq!(format_of("md5_last_byte_removed"), RecordFormat::PlainDigestMismatch);
    assert_eq!(format_of("non_aggregated_No"), RecordFormat::Plain);
}

/// Our encoder, given the same user records in the same order, writes the KPL's exact bytes.
#[test]
fn encoder_reproduces_kpl_bytes() {
    let mut reproduced = 0;
    for v in vectors().into_iter().filter(|v| v.aggregated) {
        let config = AggregatorConfig::default().with_max_record_size(10 * 1024 * 1024).expect("config");
        let config = config.with_max_aggregate_size(10 * 1024 * 1024).expect("config");
        let mut aggregator = Aggregator::new(config);
        for (pk, ehk, data) in &v.user_records {
            let mut record = UserRecord::new(pk.clone(), data.clone()).expect("valid key");
            if let Some(ehk) = ehk {
                record = record.with_explicit_hash_key(ehk.clone()).expect("valid hash key");
            }
            aggregator.try_add(record).expect("fits");
        }
        let predicted = aggregator.size();
        let record = aggregator.finish().expect("one record");
        assert_eq!(record.data.len(), predicted, "{}: predicted size", v.name);
        assert_eq!(record.user_records, v.user_records.len());
        assert_eq!(hex::encode(&record.data), hex::encode(&v.data), "{}: bytes differ from the KPL's", v.name);
        reproduced += 1;
    }
    assert!(reproduced >= 4);
}

#[test]
fn shard_filter_sets_aside_sub_records_outside_the_range() {
    let v = vectors().into_iter().find(|v| v.name.starts_with("kpl_4_records_with_explicit")).expect("vector 1");
    // Its four records carry explicit hash keys spread over the key space; keep the lower half.
    let lower_half = HashKeyRange::new(0, u128::MAX / 2).expect("range");
    let out = Deaggregator::new().with_shard_range(lower_half).deaggregate(v.data.clone(), "a", None);
    assert!(out.format.is_aggregated());
    assert_eq!(out.records.len() + out.out_of_range.len(), v.user_records.len());
    for r in &out.records {
        let hash: u128 = r.explicit_hash_key.as_deref().expect("ehk").parse().expect("decimal");
        assert!(lower_half.contains(hash));
    }
    for r in &out.out_of_range {
        let hash: u128 = r.explicit_hash_key.as_deref().expect("ehk").parse().expect("decimal");
        assert!(!lower_half.contains(hash));
    }
    assert!(!out.records.is_empty() && !out.out_of_range.is_empty(), "the vector spans both halves");
    // Sub-sequence numbers stay those of the aggregate, whatever is set aside.
    let mut ssns: Vec<u64> = out.records.iter().chain(&out.out_of_range).map(|r| r.sub_sequence_number).collect();
    ssns.sort_unstable();
    assert_eq!(ssns, (0..v.user_records.len() as u64).collect::<Vec<_>>());
}
