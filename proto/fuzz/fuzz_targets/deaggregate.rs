//! Feeds arbitrary bytes to the deaggregator, with and without a shard range, and checks what
//! must hold for any input: no panic, and nothing lost (a non-aggregate comes back whole; an
//! aggregate's sub-records are all accounted for, in order, as slices of the input).
//!
//! Run: `cd proto/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run deaggregate -- -max_total_time=60`
//! (the seed corpus is built by `proto/fuzz/seed.sh`).
#![no_main]

use bytes::Bytes;
use ktk_proto::aggregation::Deaggregator;
use ktk_proto::keys::HashKeyRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first byte chooses the shard range, so both code paths are explored.
    let (selector, data) = match input.split_first() {
        Some((s, rest)) => (*s, rest),
        None => (0, input),
    };
    let data = Bytes::copy_from_slice(data);
    let deaggregator = match selector % 3 {
        0 => Deaggregator::new(),
        1 => Deaggregator::new().with_shard_range(HashKeyRange::new(0, u128::MAX / 2).expect("valid")),
        _ => Deaggregator::new().with_shard_range(HashKeyRange::new(u128::MAX / 2, u128::MAX).expect("valid")),
    };
    let out = deaggregator.deaggregate(data.clone(), "pk", None);
    if out.format.is_aggregated() {
        let mut ssns: Vec<u64> = out.records.iter().chain(&out.out_of_range).map(|r| r.sub_sequence_number).collect();
        ssns.sort_unstable();
        assert!(ssns.iter().enumerate().all(|(i, s)| *s == i as u64), "sub-sequence numbers are 0..n");
        for r in out.records.iter().chain(&out.out_of_range) {
            assert!(r.aggregated);
            assert!(r.data.len() < data.len());
        }
    } else {
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].data, data, "a non-aggregate comes back whole");
        assert!(out.out_of_range.is_empty());
    }
});
