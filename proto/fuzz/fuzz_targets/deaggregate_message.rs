//! Fuzzes the aggregate's message parser directly: the input is framed with the magic and its
//! own correct MD5, so every input gets past the digest check. Same invariants as `deaggregate`.
//!
//! Run: `cd proto/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run deaggregate_message -- -max_total_time=60`
#![no_main]

use bytes::Bytes;
use ktk_proto::aggregation::{Deaggregator, MAGIC};
use ktk_proto::keys::HashKeyRange;
use libfuzzer_sys::fuzz_target;
use md5::Digest as _;

fuzz_target!(|message: &[u8]| {
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(message);
    framed.extend_from_slice(&md5::Md5::digest(message));
    let data = Bytes::from(framed);
    let range = HashKeyRange::new(0, u128::MAX / 3).expect("valid");
    for deaggregator in [Deaggregator::new(), Deaggregator::new().with_shard_range(range)] {
        let out = deaggregator.deaggregate(data.clone(), "pk", None);
        if out.format.is_aggregated() {
            let n = out.records.len() + out.out_of_range.len();
            let mut ssns: Vec<u64> = out.records.iter().chain(&out.out_of_range).map(|r| r.sub_sequence_number).collect();
            ssns.sort_unstable();
            assert_eq!(ssns, (0..n as u64).collect::<Vec<_>>());
        } else {
            assert!(message.is_empty() || !matches!(out.format, ktk_proto::aggregation::RecordFormat::PlainDigestMismatch));
            assert_eq!(out.records.len(), 1);
            assert_eq!(out.records[0].data, data);
        }
    }
});
