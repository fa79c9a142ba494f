//! A row group's content digest: a 64-bit hash of the raw (still compressed) bytes of the
//! column chunks a run reads, seeded with everything else that shapes its rows' fingerprints
//! (the id column, the model's inputs in order, the null policy). Every run stores it in
//! the row group's fingerprint index; an incremental run that finds the same digest knows
//! the row group holds the same rows as when that index was written, and carries all of
//! them without decoding a byte. A table that changes by partition (new days appended,
//! a few files rewritten) then costs little more than reading its changed files.
//!
//! Where the store versions its objects (an ETag: S3, GCS, Azure, and the local file system's
//! inode, size and modification time), the index also records the version it read, under
//! a condition that the object had not changed since it was listed; a later run that lists
//! the same version skips the group without reading a byte of it.
//!
//! Not cryptographic: it guards against accidental change (a rewritten file, another
//! table), not against someone crafting collisions. It reads eight bytes at a time in four
//! independent lanes, so hashing costs a small fraction of decoding the same bytes.

use bytes::Bytes;
use millrace_crds::spec::MissingFeatures;

/// Odd 64-bit multipliers, one per lane (from the splitmix64 / Murmur3 finalizers).
const MULTIPLIERS: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xbf58_476d_1ce4_e5b9,
    0x94d0_49bb_1331_11eb,
    0xff51_afd7_ed55_8ccd,
];

/// The seed of a run's digests: what, besides a row group's bytes, decides its rows'
/// fingerprints. Runs that read other columns or fill missing values otherwise get other
/// digests, so an index written under other settings is never trusted whole.
pub fn seed(id_column: &str, inputs: &[String], missing: &MissingFeatures) -> u64 {
    let mut settings = format!("v1\0{id_column}\0");
    for input in inputs {
        settings.push_str(input);
        settings.push('\0');
    }
    settings.push_str(&format!(
        "{:?}\0{}",
        missing.policy,
        missing.fill_value.to_bits()
    ));
    of_chunks(0, std::slice::from_ref(&Bytes::from(settings)))
}

/// The token of a file version (its ETag, from the store's listing) under `seed`: equal
/// tokens mean the same file, unchanged since, read under the same settings. Never 0 (0
/// stands for no version).
pub fn of_version(seed: u64, e_tag: &str) -> u64 {
    let tag = Bytes::copy_from_slice(e_tag.as_bytes());
    of_chunks(
        seed.rotate_left(1) ^ MULTIPLIERS[1],
        std::slice::from_ref(&tag),
    )
    .max(1)
}

/// The digest of a row group: the types its file's schema gives the columns read (the
/// same bytes read as another type are other values), then its `chunks` in file order.
pub fn of_group(seed: u64, column_types: &str, chunks: &[Bytes]) -> u64 {
    let mut digest = Digest::of_group(seed, column_types);
    for chunk in chunks {
        digest.update(chunk);
        digest.end_chunk();
    }
    digest.finish()
}

/// The digest of `chunks` (in order) under `seed`. Each chunk's length is folded in too,
/// so moving a byte from one chunk to the next changes the digest.
pub fn of_chunks(seed: u64, chunks: &[Bytes]) -> u64 {
    let mut digest = Digest::new(seed);
    for chunk in chunks {
        digest.update(chunk);
        digest.end_chunk();
    }
    digest.finish()
}

/// A digest computed as the bytes arrive: a row group too large to hold in memory is
/// hashed while it streams to disk, and gets the digest [`of_group`] gives the same chunks
/// held in memory (both are this).
#[derive(Debug, Clone)]
pub struct Digest {
    lanes: [u64; 4],
    /// The current chunk's bytes not yet a whole 32-byte block.
    pending: [u8; 32],
    pending_len: usize,
    /// The current chunk's length so far.
    chunk_len: u64,
}

impl Digest {
    /// An empty digest under `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            lanes: [
                seed ^ MULTIPLIERS[0],
                seed.rotate_left(16) ^ MULTIPLIERS[1],
                seed.rotate_left(32) ^ MULTIPLIERS[2],
                seed.rotate_left(48) ^ MULTIPLIERS[3],
            ],
            pending: [0; 32],
            pending_len: 0,
            chunk_len: 0,
        }
    }

    /// The digest of a row group whose columns have `column_types`, before its chunks.
    pub fn of_group(seed: u64, column_types: &str) -> Self {
        let types = Bytes::copy_from_slice(column_types.as_bytes());
        Self::new(of_chunks(seed, std::slice::from_ref(&types)))
    }

    /// Adds `bytes` to the current chunk.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.chunk_len += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = bytes.len().min(32 - self.pending_len);
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 32 {
                return;
            }
            let block = self.pending;
            mix_block(&mut self.lanes, &block);
            self.pending_len = 0;
        }
        // The lanes in locals for the hot loop: it runs at memory speed only in registers.
        let mut lanes = self.lanes;
        let (blocks, rest) = bytes.as_chunks::<32>();
        for block in blocks {
            mix_block(&mut lanes, block);
        }
        self.lanes = lanes;
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// Ends the current chunk: its last partial block, zero-padded, and its length.
    pub fn end_chunk(&mut self) {
        let mut tail = [0u8; 32];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        mix_block(&mut self.lanes, &tail);
        self.lanes[0] = mix(self.lanes[0], self.chunk_len, MULTIPLIERS[0]);
        self.pending_len = 0;
        self.chunk_len = 0;
    }

    /// The digest of every chunk ended so far.
    pub fn finish(&self) -> u64 {
        let combined = self.lanes.iter().fold(0u64, |acc, &lane| {
            (acc ^ finish(lane)).wrapping_mul(MULTIPLIERS[0])
        });
        finish(combined)
    }
}

/// Mixes one 32-byte block into the lanes, a word each.
#[inline]
fn mix_block(lanes: &mut [u64; 4], block: &[u8; 32]) {
    let (words, _) = block.as_chunks::<8>();
    for ((lane, word), multiplier) in lanes.iter_mut().zip(words).zip(MULTIPLIERS) {
        *lane = mix(*lane, u64::from_le_bytes(*word), multiplier);
    }
}

/// One step of a lane: a bijection in both the lane and the word.
#[inline]
fn mix(lane: u64, word: u64, multiplier: u64) -> u64 {
    (lane ^ word).wrapping_mul(multiplier).rotate_left(29)
}

/// Murmur3's 64-bit finalizer.
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_crds::spec::MissingFeaturePolicy;

    fn chunks(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[test]
    fn any_changed_byte_or_boundary_changes_the_digest() {
        let base: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = of_chunks(1, &chunks(&[&base, b"tail"]));
        assert_eq!(digest, of_chunks(1, &chunks(&[&base, b"tail"])), "stable");
        for at in [0, 7, 31, 32, 500, 999] {
            let mut changed = base.clone();
            changed[at] ^= 1;
            assert_ne!(
                digest,
                of_chunks(1, &chunks(&[&changed, b"tail"])),
                "byte {at}"
            );
        }
        // The same bytes cut elsewhere, in another order, or under another seed.
        assert_ne!(
            digest,
            of_chunks(1, &chunks(&[&base[..999], &base[999..], b"tail"]))
        );
        assert_ne!(digest, of_chunks(1, &chunks(&[b"tail", &base])));
        assert_ne!(digest, of_chunks(2, &chunks(&[&base, b"tail"])));
        // Trailing zeros are not padding.
        assert_ne!(
            of_chunks(1, &chunks(&[b"ab"])),
            of_chunks(1, &chunks(&[b"ab\0"]))
        );
    }

    /// The digest as it was before it could stream (each chunk hashed whole), kept to
    /// prove the streaming one gives the same digests, so indexes stay valid.
    fn of_chunks_whole(seed: u64, chunks: &[Bytes]) -> u64 {
        let mut lanes = [
            seed ^ MULTIPLIERS[0],
            seed.rotate_left(16) ^ MULTIPLIERS[1],
            seed.rotate_left(32) ^ MULTIPLIERS[2],
            seed.rotate_left(48) ^ MULTIPLIERS[3],
        ];
        for chunk in chunks {
            let mut blocks = chunk.chunks_exact(32);
            for block in &mut blocks {
                for (lane, (word, m)) in
                    lanes.iter_mut().zip(block.chunks_exact(8).zip(MULTIPLIERS))
                {
                    *lane = mix(
                        *lane,
                        u64::from_le_bytes(word.try_into().expect("8 bytes")),
                        m,
                    );
                }
            }
            let mut tail = [0u8; 32];
            let rest = blocks.remainder();
            tail[..rest.len()].copy_from_slice(rest);
            for (lane, (word, m)) in lanes.iter_mut().zip(tail.chunks_exact(8).zip(MULTIPLIERS)) {
                *lane = mix(
                    *lane,
                    u64::from_le_bytes(word.try_into().expect("8 bytes")),
                    m,
                );
            }
            lanes[0] = mix(lanes[0], chunk.len() as u64, MULTIPLIERS[0]);
        }
        finish(lanes.iter().fold(0u64, |acc, &lane| {
            (acc ^ finish(lane)).wrapping_mul(MULTIPLIERS[0])
        }))
    }

    #[test]
    fn bytes_fed_in_any_pieces_give_the_digest_of_the_whole_chunks() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 253) as u8).collect();
        let parts = chunks(&[
            &data[..1234],
            &data[1234..1234],
            &data[1234..4000],
            &data[4000..],
        ]);
        let whole = of_chunks_whole(9, &parts);
        assert_eq!(of_chunks(9, &parts), whole);
        for piece in [1, 7, 31, 32, 33, 100, 4096] {
            let mut digest = Digest::new(9);
            for part in &parts {
                for bytes in part.chunks(piece) {
                    digest.update(bytes);
                }
                digest.end_chunk();
            }
            assert_eq!(digest.finish(), whole, "pieces of {piece}");
        }
        let mut group = Digest::of_group(9, "f:Float32;");
        for part in &parts {
            for bytes in part.chunks(13) {
                group.update(bytes);
            }
            group.end_chunk();
        }
        assert_eq!(group.finish(), of_group(9, "f:Float32;", &parts));
    }

    #[test]
    fn a_version_token_depends_on_the_tag_and_the_seed() {
        assert_eq!(of_version(1, "\"abc\""), of_version(1, "\"abc\""));
        assert_ne!(of_version(1, "\"abc\""), of_version(1, "\"abd\""));
        assert_ne!(of_version(1, "\"abc\""), of_version(2, "\"abc\""));
        assert_ne!(of_version(1, ""), 0);
    }

    #[test]
    fn a_group_read_as_other_types_has_another_digest() {
        let bytes = chunks(&[b"0123456789abcdef"]);
        assert_eq!(
            of_group(1, "f:Float32;", &bytes),
            of_group(1, "f:Float32;", &bytes)
        );
        assert_ne!(
            of_group(1, "f:Float32;", &bytes),
            of_group(1, "f:Int32;", &bytes)
        );
    }

    #[test]
    fn the_seed_covers_columns_their_order_and_the_null_policy() {
        let inputs = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let fill = MissingFeatures {
            policy: MissingFeaturePolicy::Fill,
            fill_value: 0.0,
        };
        let base = seed("id", &inputs(&["a", "b"]), &fill);
        assert_eq!(base, seed("id", &inputs(&["a", "b"]), &fill));
        assert_ne!(base, seed("user", &inputs(&["a", "b"]), &fill));
        assert_ne!(base, seed("id", &inputs(&["b", "a"]), &fill));
        assert_ne!(base, seed("id", &inputs(&["ab"]), &fill));
        let other_fill = MissingFeatures {
            fill_value: 1.0,
            ..fill.clone()
        };
        assert_ne!(base, seed("id", &inputs(&["a", "b"]), &other_fill));
        let fallback = MissingFeatures {
            policy: MissingFeaturePolicy::Fallback,
            ..fill
        };
        assert_ne!(base, seed("id", &inputs(&["a", "b"]), &fallback));
    }
}
