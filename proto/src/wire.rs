//! The few protobuf wire-format primitives the aggregation codec needs, written out by hand so the
//! encoder can predict sizes exactly and the decoder can hand out slices of its input.
//!
//! Reference: <https://protobuf.dev/programming-guides/encoding/>.

/// Wire type of varint fields.
pub(crate) const WIRE_VARINT: u8 = 0;
/// Wire type of 64-bit fields.
pub(crate) const WIRE_I64: u8 = 1;
/// Wire type of length-delimited fields (strings, bytes, messages).
pub(crate) const WIRE_LEN: u8 = 2;
/// Wire type of 32-bit fields.
pub(crate) const WIRE_I32: u8 = 5;

/// The one-byte tag of field `number` (1..=15) with `wire_type`.
pub(crate) const fn tag(number: u8, wire_type: u8) -> u8 {
    (number << 3) | wire_type
}

/// Bytes needed to encode `value` as a varint.
#[inline]
pub(crate) const fn varint_len(value: u64) -> usize {
    // Each byte carries 7 bits; zero still takes one byte.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[inline]
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Bytes a length-delimited field with a one-byte tag and `len` bytes of payload takes.
#[inline]
pub(crate) const fn len_field_size(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Why a buffer is not a well-formed protobuf message of the expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    Truncated,
    VarintTooLong,
    BadWireType(u8),
    BadFieldNumber,
}

/// A forward-only reader over a protobuf message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(WireError::Truncated)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                // The tenth byte may only carry the top bit of a u64.
                if shift == 63 && byte > 1 {
                    return Err(WireError::VarintTooLong);
                }
                return Ok(value);
            }
        }
        Err(WireError::VarintTooLong)
    }

    /// Reads a field key: (field number, wire type).
    #[inline]
    pub(crate) fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(WireError::BadFieldNumber);
        }
        Ok((number as u32, (key & 7) as u8))
    }

    /// Reads the payload of a length-delimited field; returns its byte range in the buffer.
    #[inline]
    pub(crate) fn len_delimited(&mut self) -> Result<std::ops::Range<usize>, WireError> {
        let len = self.varint()?;
        let start = self.pos;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= self.buf.len())
            .ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(start..end)
    }

    /// Skips a field of an unknown number, so that messages written by newer writers still parse.
    pub(crate) fn skip(&mut self, wire_type: u8) -> Result<(), WireError> {
        match wire_type {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_I64 => self.advance(8),
            WIRE_LEN => self.len_delimited().map(drop),
            WIRE_I32 => self.advance(4),
            // Groups (3, 4) are deprecated and never written by the KPL; 6 and 7 do not exist.
            other => Err(WireError::BadWireType(other)),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError::Truncated);
        }
        self.pos += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "length of {v}");
            let mut r = Reader::new(&buf);
            assert_eq!(r.varint(), Ok(v));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn overlong_and_truncated_varints_are_errors() {
        assert_eq!(Reader::new(&[0x80]).varint(), Err(WireError::Truncated));
        assert_eq!(Reader::new(&[0xff; 11]).varint(), Err(WireError::VarintTooLong));
        let mut ten = [0xffu8; 10];
        ten[9] = 0x02;
        assert_eq!(Reader::new(&ten).varint(), Err(WireError::VarintTooLong));
        ten[9] = 0x01;
        assert_eq!(Reader::new(&ten).varint(), Ok(u64::MAX));
    }

    #[test]
    fn length_delimited_bounds_are_checked() {
        assert_eq!(Reader::new(&[0x05, 1, 2]).len_delimited(), Err(WireError::Truncated));
        assert_eq!(Reader::new(&[0x02, 1, 2]).len_delimited(), Ok(1..3));
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(Reader::new(&huge).len_delimited(), Err(WireError::Truncated));
    }
}
