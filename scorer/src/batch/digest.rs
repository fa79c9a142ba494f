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
/// same bytes read as another type are other values), then its `chunks`.
pub fn of_group(seed: u64, column_types: &str, chunks: &[Bytes]) -> u64 {
    let types = Bytes::copy_from_slice(column_types.as_bytes());
    of_chunks(of_chunks(seed, std::slice::from_ref(&types)), chunks)
}

/// The digest of `chunks` (in order) under `seed`. Each chunk's length is folded in too,
/// so moving a byte from one chunk to the next changes the digest.
pub fn of_chunks(seed: u64, chunks: &[Bytes]) -> u64 {
    let mut lanes = [
        seed ^ MULTIPLIERS[0],
        seed.rotate_left(16) ^ MULTIPLIERS[1],
        seed.rotate_left(32) ^ MULTIPLIERS[2],
        seed.rotate_left(48) ^ MULTIPLIERS[3],
    ];
    for chunk in chunks {
        let mut blocks = chunk.chunks_exact(32);
        for block in &mut blocks {
            for (lane, (word, multiplier)) in
                lanes.iter_mut().zip(block.chunks_exact(8).zip(MULTIPLIERS))
            {
                *lane = mix(*lane, word_of(word), multiplier);
            }
        }
        let mut tail = [0u8; 32];
        let rest = blocks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        for (lane, (word, multiplier)) in
            lanes.iter_mut().zip(tail.chunks_exact(8).zip(MULTIPLIERS))
        {
            *lane = mix(*lane, word_of(word), multiplier);
        }
        lanes[0] = mix(lanes[0], chunk.len() as u64, MULTIPLIERS[0]);
    }
    let combined = lanes.iter().fold(0u64, |acc, &lane| {
        (acc ^ finish(lane)).wrapping_mul(MULTIPLIERS[0])
    });
    finish(combined)
}

fn word_of(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
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
