//! The gateway's own id of a request (`x-request-id`, the audit log's `request_id`): 128
//! random bits written as lowercase hex in the 8-4-4-4-12 shape of a UUID.
//!
//! The bits come from a per-thread xoshiro generator seeded from the OS (`SmallRng`): ids
//! need to be unique, not secret, and this is a few instructions where the cryptographic
//! thread generator costs a few hundred. The id is kept as its 16 bytes and written out
//! where it is used (the response head, the audit line on its own thread).

use std::cell::RefCell;
use std::fmt;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestId(u128);

thread_local! {
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_entropy());
}

/// Two hex digits per byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

impl RequestId {
    pub fn new() -> Self {
        RequestId(IDS.with(|rng| rng.borrow_mut().gen()))
    }

    /// The id as text: 36 bytes of hex digits and dashes.
    pub fn text(&self) -> [u8; 36] {
        let mut out = [b'-'; 36];
        let mut at = 0;
        for (i, &b) in self.0.to_be_bytes().iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            out[at..at + 2].copy_from_slice(&HEX_PAIRS[usize::from(b)]);
            at += 2;
        }
        out
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits and dashes only.
        f.write_str(std::str::from_utf8(&self.text()).unwrap_or_default())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl serde::Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_shaped_lowercase_hex_and_distinct() {
        let ids: Vec<String> = (0..10_000).map(|_| RequestId::new().to_string()).collect();
        for s in &ids {
            let groups: Vec<&str> = s.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{s}"
            );
            assert!(groups
                .iter()
                .all(|g| g.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))));
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Another thread has its own generator, seeded apart.
        let other = std::thread::spawn(|| RequestId::new().to_string())
            .join()
            .unwrap();
        assert!(!distinct.contains(&other));
    }

    #[test]
    fn every_byte_is_written_in_order() {
        let id = RequestId(0x0123_4567_89ab_cdef_00ff_1032_5476_98ba);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-00ff-1032547698ba");
        assert_eq!(&id.text(), b"01234567-89ab-cdef-00ff-1032547698ba");
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"01234567-89ab-cdef-00ff-1032547698ba\""
        );
        assert_eq!(
            RequestId::default().to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
    }
}
