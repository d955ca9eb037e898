//! Which open shard owns a hash key: the producer's prediction of where a record will land.

use std::sync::Arc;

use ktk_proto::keys::HashKeyRange;

use crate::api::ShardInfo;

/// The open shards of a stream, sorted by hash-key range.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardMap {
    shards: Vec<(HashKeyRange, Arc<str>)>,
}

impl ShardMap {
    /// A map of the open shards among `shards` (`ListShards` also returns closed ones).
    pub(crate) fn new(shards: &[ShardInfo]) -> Self {
        let mut open: Vec<(HashKeyRange, Arc<str>)> =
            shards.iter().filter(|s| s.open).map(|s| (s.range, Arc::from(s.shard_id.as_str()))).collect();
        open.sort_by_key(|(range, _)| range.start);
        ShardMap { shards: open }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The shard whose range holds `hash_key`. Open shards cover the whole key space; should a
    /// listing ever have a gap (a reshard caught half-way), the nearest shard below is used and
    /// Kinesis routes the record correctly anyway: a wrong prediction only costs aggregation.
    pub(crate) fn shard_for(&self, hash_key: u128) -> Option<&Arc<str>> {
        let index = self.shards.partition_point(|(range, _)| range.end < hash_key);
        let index = index.min(self.shards.len().checked_sub(1)?);
        self.shards.get(index).map(|(_, id)| id)
    }

    pub(crate) fn contains(&self, shard_id: &str) -> bool {
        self.shards.iter().any(|(_, id)| &**id == shard_id)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.shards.iter().map(|(_, id)| id)
    }

    /// Whether two maps route every key the same way.
    pub(crate) fn same_as(&self, other: &ShardMap) -> bool {
        self.shards == other.shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::even_shards;

    #[test]
    fn routes_by_range_and_ignores_closed_shards() {
        let mut shards = even_shards(4);
        shards.push(ShardInfo { shard_id: "closed".into(), range: HashKeyRange::FULL, open: false });
        let map = ShardMap::new(&shards);
        assert_eq!(map.len(), 4);
        assert_eq!(map.shard_for(0).map(|s| &**s), Some("shardId-000000000000"));
        assert_eq!(map.shard_for(u128::MAX).map(|s| &**s), Some("shardId-000000000003"));
        let second = shards[1].range;
        assert_eq!(map.shard_for(second.start).map(|s| &**s), Some("shardId-000000000001"));
        assert_eq!(map.shard_for(second.end).map(|s| &**s), Some("shardId-000000000001"));
        assert_eq!(map.shard_for(second.end + 1).map(|s| &**s), Some("shardId-000000000002"));
        assert!(!map.contains("closed"));
        assert!(ShardMap::new(&[]).shard_for(5).is_none());
    }
}
