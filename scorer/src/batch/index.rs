//! The fingerprint index of a batch run: per input row group, the (entity, features
//! fingerprint) pairs the run scored, stored beside the generation
//! ([`millrace_crds::keys::Keyspace::fingerprint_index`]) with the batch TTL.
//!
//! An incremental run reads one index per row group (one `GET` of 16 bytes per row) and
//! decides every row whose entity is in it without reading its prediction: the same
//! fingerprint is unchanged (neither read nor written), another is changed (rescored; the
//! write expects a value with the old fingerprint, which is how a duplicate id is still
//! caught). Only rows the index does not know (new entities, or a row group laid out anew)
//! are read back and compared with the fingerprint inside their stored value, as without an
//! index. Every run writes the index of each row group it scored.
//!
//! The index is trusted: a prediction evicted from Redis while its index entry stays would
//! not be recomputed until the next full run (the same TTL makes both expire together).

use std::collections::HashMap;

/// The first byte of an encoded index: its format.
const FORMAT: u8 = 1;

/// A 64-bit FNV-1a hash of an entity id: the index's key.
pub fn id_hash(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `pairs` (entity hash, fingerprint) as stored: the format byte, then 16 bytes per pair.
pub fn encode(pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + pairs.len() * 16);
    out.push(FORMAT);
    for (id, fingerprint) in pairs {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&fingerprint.to_le_bytes());
    }
    out
}

/// The pairs of a stored index; empty for anything that is not one (a missing, truncated
/// or foreign value makes every row of the group go the slow, exact way).
pub fn decode(bytes: &[u8]) -> HashMap<u64, u64> {
    let Some((&FORMAT, body)) = bytes.split_first() else {
        return HashMap::new();
    };
    if body.len() % 16 != 0 {
        return HashMap::new();
    }
    body.chunks_exact(16)
        .map(|pair| {
            let (id, fingerprint) = pair.split_at(8);
            (
                u64::from_le_bytes(id.try_into().unwrap_or_default()),
                u64::from_le_bytes(fingerprint.try_into().unwrap_or_default()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_garbage_decodes_to_nothing() {
        let pairs = vec![(id_hash("u1"), 7), (id_hash("u2"), 9)];
        let decoded = decode(&encode(&pairs));
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded.get(&id_hash("u2")), Some(&9));
        assert!(decode(b"").is_empty());
        assert!(decode(&[FORMAT, 1, 2, 3]).is_empty());
        assert!(decode(&[9; 17]).is_empty());
        assert_ne!(id_hash("u1"), id_hash("u2"));
    }
}
