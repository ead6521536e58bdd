//! Which bytes of a read its content chunks have covered.
//!
//! The server "MAY send the content chunks in any order (the client MUST
//! reassemble content chunks into the correct order)", and they "MUST NOT
//! overlap with the bounds of any earlier content chunk": [`Coverage`] keeps the covered
//! ranges merged, refuses overlap, and bounds how many chunks one read may
//! take so that the map stays small whatever the server sends.

use std::collections::BTreeMap;

use super::error::{ClientError, ProtocolError};
use super::reply::invalid;

/// Which bytes of a read the content chunks have covered: merged, disjoint
/// ranges (relative to the request), and a bound on their number.
#[derive(Debug)]
pub(crate) struct Coverage {
    ranges: BTreeMap<u64, u64>,
    pub covered: u64,
    chunks: u64,
    max_chunks: u64,
}

impl Coverage {
    pub fn new(len: u64) -> Coverage {
        Coverage {
            ranges: BTreeMap::new(),
            covered: 0,
            chunks: 0,
            // The server "SHOULD use chunks with lengths and offsets as an
            // integer multiple of 512 bytes, where possible": a read touches at
            // most len/512 + 2 such blocks. More chunks than that is a server
            // flooding us with slivers; refusing keeps this map small.
            max_chunks: len / 512 + 2,
        }
    }

    /// Adds [start, end); fails on overlap or too many chunks.
    pub fn add(&mut self, start: u64, end: u64) -> Result<(), ClientError> {
        self.chunks += 1;
        if self.chunks > self.max_chunks {
            return Err(ProtocolError::TooLong {
                what: "number of chunks in one read reply",
                len: self.chunks,
                max: self.max_chunks,
            }
            .into());
        }
        let before = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        let after = self.ranges.range(start..).next().map(|(&s, &e)| (s, e));
        let overlaps =
            before.is_some_and(|(_, e)| e > start) || after.is_some_and(|(s, _)| s < end);
        if overlaps {
            return Err(invalid(format!(
                "a chunk at +{start}..+{end} overlaps an earlier chunk of the same read"
            )));
        }
        let (mut s, mut e) = (start, end);
        if let Some((bs, be)) = before.filter(|&(_, be)| be == start) {
            self.ranges.remove(&bs);
            s = bs;
            debug_assert_eq!(be, start);
        }
        if let Some((as_, ae)) = after.filter(|&(as_, _)| as_ == end) {
            self.ranges.remove(&as_);
            e = ae;
        }
        self.ranges.insert(s, e);
        self.covered += end - start;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_refuses_overlap() {
        let mut c = Coverage::new(4096);
        c.add(1024, 2048).unwrap();
        c.add(0, 1024).unwrap();
        c.add(3072, 4096).unwrap();
        assert_eq!(c.ranges.len(), 2);
        assert!(c.add(2000, 2100).is_err());
        assert!(c.add(3000, 3073).is_err());
        c.add(2048, 3072).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert_eq!(c.covered, 4096);
    }

    #[test]
    fn coverage_bounds_the_number_of_chunks() {
        let mut c = Coverage::new(1024);
        for i in 0..4 {
            c.add(i * 10, i * 10 + 1).unwrap();
        }
        assert!(matches!(
            c.add(100, 101),
            Err(ClientError::Protocol(ProtocolError::TooLong { .. }))
        ));
    }
}
