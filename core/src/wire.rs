//! The little binary codec shared by the records kept in shared memory: u32 little-endian length
//! prefixes for strings, i64 little-endian for times. Reading never panics and never allocates.

/// Why a byte string could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    Truncated,
    Utf8,
}

pub(crate) fn put_u8(out: &mut Vec<u8>, value: u8) {
    out.push(value);
}

pub(crate) fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_len(out: &mut Vec<u8>, len: usize) {
    // Every field comes from a provider response capped at 1 MiB or from our own randoms.
    put_u32(out, u32::try_from(len).expect("record field shorter than 4 GiB"));
}

pub(crate) fn put_str(out: &mut Vec<u8>, value: &str) {
    put_len(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// Bytes a string takes once encoded.
pub(crate) fn str_size(value: &str) -> usize {
    4 + value.len()
}

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.rest.len() {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take_array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.take_array()?))
    }

    /// A length-prefixed field as raw bytes (no UTF-8 check).
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = usize::try_from(self.u32()?).map_err(|_| WireError::Truncated)?;
        self.take(len)
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, WireError> {
        let len = usize::try_from(self.u32()?).map_err(|_| WireError::Truncated)?;
        let bytes = self.take(len)?;
        core::str::from_utf8(bytes).map_err(|_| WireError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        let mut out = Vec::new();
        put_u8(&mut out, 7);
        put_u32(&mut out, 0xdead_beef);
        put_i64(&mut out, -42);
        put_str(&mut out, "héllo");
        assert_eq!(out.len(), 1 + 4 + 8 + str_size("héllo"));
        let mut reader = Reader::new(&out);
        assert_eq!(reader.u8(), Ok(7));
        assert_eq!(reader.u32(), Ok(0xdead_beef));
        assert_eq!(reader.i64(), Ok(-42));
        assert_eq!(reader.str(), Ok("héllo"));
        assert!(reader.is_empty());
    }

    #[test]
    fn short_input_is_truncated_not_a_panic() {
        let mut reader = Reader::new(&[1, 2, 3]);
        assert_eq!(reader.i64(), Err(WireError::Truncated));
        let mut reader = Reader::new(&[0xff, 0xff, 0xff, 0xff, b'a']);
        assert_eq!(reader.str(), Err(WireError::Truncated));
    }

    #[test]
    fn invalid_utf8_is_reported() {
        let mut reader = Reader::new(&[2, 0, 0, 0, 0xc3, 0x28]);
        assert_eq!(reader.str(), Err(WireError::Utf8));
    }
}
