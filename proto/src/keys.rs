//! Partition keys, explicit hash keys and shard hash-key ranges.
//!
//! Kinesis maps every record to a shard by a 128-bit *hash key*: the explicit hash key when the
//! producer gives one, otherwise the MD5 of the partition key's UTF-8 bytes read as a big-endian
//! integer. Each shard owns a closed range `[starting_hash_key, ending_hash_key]` of that space.

use md5::{Digest, Md5};

use crate::error::{Error, Result};

/// Most Unicode characters a partition key may have
/// ([PutRecords](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecordsRequestEntry.html)).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Most decimal digits an explicit hash key may have (2^128-1 has 39).
const MAX_HASH_KEY_DIGITS: usize = 39;

/// Checks that a partition key has 1 to [`MAX_PARTITION_KEY_CHARS`] Unicode characters.
pub fn validate_partition_key(partition_key: &str) -> Result<()> {
    if partition_key.is_empty() {
        return Err(Error::EmptyPartitionKey);
    }
    // Cheap first: a key of at most 256 bytes has at most 256 characters.
    if partition_key.len() > MAX_PARTITION_KEY_CHARS {
        let chars = partition_key.chars().count();
        if chars > MAX_PARTITION_KEY_CHARS {
            return Err(Error::PartitionKeyTooLong { chars });
        }
    }
    Ok(())
}

/// The hash key Kinesis derives from a partition key: MD5 of its UTF-8 bytes, big-endian.
pub fn partition_key_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// Parses an explicit hash key as Kinesis accepts it: a decimal integer in `0..=2^128-1`, without
/// sign, spaces or leading zeros (the API's pattern is `0|([1-9]\d{0,38})`).
pub fn parse_explicit_hash_key(value: &str) -> Result<u128> {
    let invalid = |reason: &'static str| Error::InvalidExplicitHashKey { value: value.to_owned(), reason };
    if value.is_empty() {
        return Err(invalid("it is empty"));
    }
    if value.len() > MAX_HASH_KEY_DIGITS {
        return Err(invalid("it has more than 39 digits"));
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("it is not a decimal integer"));
    }
    if value.len() > 1 && value.starts_with('0') {
        return Err(invalid("it has a leading zero"));
    }
    value.parse::<u128>().map_err(|_| invalid("it is greater than 2^128-1"))
}

/// The hash key a record is routed by: its explicit hash key if it has one, else its partition
/// key's hash.
pub fn effective_hash_key(partition_key: &str, explicit_hash_key: Option<&str>) -> Result<u128> {
    match explicit_hash_key {
        Some(ehk) => parse_explicit_hash_key(ehk),
        None => Ok(partition_key_hash(partition_key)),
    }
}

/// A shard's closed range of hash keys, `[start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashKeyRange {
    pub start: u128,
    pub end: u128,
}

impl HashKeyRange {
    /// The whole hash-key space: what a stream's single shard owns.
    pub const FULL: HashKeyRange = HashKeyRange { start: 0, end: u128::MAX };

    /// A range from its bounds; `start` must not be greater than `end`.
    pub fn new(start: u128, end: u128) -> Result<Self> {
        if start > end {
            return Err(Error::InvalidHashKeyRange { start: start.to_string(), end: end.to_string() });
        }
        Ok(HashKeyRange { start, end })
    }

    /// A range from the decimal strings Kinesis returns in `ListShards`
    /// (`HashKeyRange.StartingHashKey` / `EndingHashKey`).
    pub fn parse(start: &str, end: &str) -> Result<Self> {
        let range_error = || Error::InvalidHashKeyRange { start: start.to_owned(), end: end.to_owned() };
        let s = parse_explicit_hash_key(start).map_err(|_| range_error())?;
        let e = parse_explicit_hash_key(end).map_err(|_| range_error())?;
        HashKeyRange::new(s, e).map_err(|_| range_error())
    }

    pub fn contains(&self, hash_key: u128) -> bool {
        self.start <= hash_key && hash_key <= self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_key_hash_is_md5_big_endian() {
        // md5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(partition_key_hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        // md5("") = d41d8cd98f00b204e9800998ecf8427e (not a valid key, but the hash is defined)
        assert_eq!(partition_key_hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

    #[test]
    fn partition_key_lengths() {
        assert!(matches!(validate_partition_key(""), Err(Error::EmptyPartitionKey)));
        assert!(validate_partition_key("x").is_ok());
        assert!(validate_partition_key(&"x".repeat(256)).is_ok());
        assert!(matches!(validate_partition_key(&"x".repeat(257)), Err(Error::PartitionKeyTooLong { chars: 257 })));
        // 256 four-byte characters: 1,024 bytes but 256 characters, so valid.
        assert!(validate_partition_key(&"𝄞".repeat(256)).is_ok());
        assert!(matches!(validate_partition_key(&"é".repeat(257)), Err(Error::PartitionKeyTooLong { chars: 257 })));
    }

    #[test]
    fn explicit_hash_keys() {
        assert_eq!(parse_explicit_hash_key("0").ok(), Some(0));
        assert_eq!(parse_explicit_hash_key("340282366920938463463374607431768211455").ok(), Some(u128::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            "01",
            "1.0",
            " 1",
            "abc",
            "340282366920938463463374607431768211456",
            "1234567890123456789012345678901234567890",
        ] {
            assert!(
                matches!(parse_explicit_hash_key(bad), Err(Error::InvalidExplicitHashKey { .. })),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn ranges() {
        let r = HashKeyRange::parse("10", "20").expect("valid range");
        assert!(r.contains(10) && r.contains(20) && r.contains(15));
        assert!(!r.contains(9) && !r.contains(21));
        assert!(HashKeyRange::parse("20", "10").is_err());
        assert!(HashKeyRange::parse("x", "10").is_err());
        assert!(HashKeyRange::FULL.contains(u128::MAX));
    }
}
