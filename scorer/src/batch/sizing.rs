//! How much a batch shard decodes at once, so that its memory follows neither the table's
//! length nor its width: the decoding memory its decoders share ([`decode_budget`]), what
//! decoding one column chunk holds ([`column_decode_bytes`]), and the rows of a record batch
//! ([`rows_per_batch`]).
//!
//! Why width needs its own limits: a decoder holds, per column, the chunk's dictionary and
//! one data page, so a row group of 512 features held about 190 MiB while it was decoded
//! whatever its rows, and a record batch of 8,192 rows of them was 16 MiB, several of which
//! are in flight between decoding, scoring and writing. With two decoders and full-size
//! batches a full run of 512 features x 256Ki entities peaked at 679 MiB; within the default
//! budget (one group at a time) and in batches of 2,048 rows, at 343 MiB, taking 3.99 s
//! against 3.21 s with two groups at once at 530 MiB (the bench). Memory is what a pod is
//! killed for; time is not.
//!
//! The container limit is read where a container sees its own cgroup (`/sys/fs/cgroup`,
//! as Kubernetes mounts it); a process outside a container reads the root's, which has
//! none.

/// The decoding memory of a shard when neither `--decode-memory` nor a container memory
/// limit says otherwise: row groups of 64Ki rows and 32 features (about 27 MiB each, the
/// group held in memory included) decode two at a time from local disk and eight from an
/// object store, groups of a million rows (about 69 MiB each, spooled) two at a time; a
/// group of 512 features (about 200 MiB) takes all of it and is decoded alone.
pub const DEFAULT_DECODE_BYTES: u64 = 256 << 20;

/// The share of the container's memory limit decoding takes: the rest is the model, the
/// batches in flight, the Redis pipelines and the allocator's slack.
const LIMIT_SHARE: u64 = 3;

/// A data page as most writers cut them (pyarrow, parquet-rs and Spark: 1 MiB), for chunks
/// whose pages are not listed in the footer.
const PAGE_BYTES: u64 = 1 << 20;

/// The features one record batch holds at most: 8,192 rows of 128 features, 1,024 of 1,024.
const BATCH_FEATURE_BYTES: usize = 4 << 20;

/// The fewest rows a record batch is cut to, however wide the table: fewer would spend more
/// on each ONNX run and pipeline than on the rows.
const MIN_BATCH_ROWS: usize = 64;

/// The decoding memory of a shard: `requested` (`--decode-memory`) if given; otherwise a
/// third of the container's memory limit, which is the pod's statement of what it may use;
/// otherwise [`DEFAULT_DECODE_BYTES`].
pub fn decode_budget(requested: Option<u64>, container_limit: Option<u64>) -> u64 {
    requested
        .or(container_limit.map(|limit| limit / LIMIT_SHARE))
        .unwrap_or(DEFAULT_DECODE_BYTES)
}

/// The memory limit of the container this process runs in (cgroup v2's `memory.max`, or
/// v1's `memory.limit_in_bytes`); `None` when there is none or it cannot be read.
pub fn container_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .and_then(|text| parse_memory_limit(&text))
}

/// A cgroup memory limit as the kernel writes it: bytes, or `max` (v2) or a number near
/// `i64::MAX` (v1, rounded down to a page) for none.
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|&bytes| bytes < 1 << 62)
}

/// What decoding one column chunk holds at once, from its footer entry: its dictionary
/// (decoded, as large as it is uncompressed) and one data page, uncompressed. The
/// dictionary's compressed size is the distance from its page to the first data page; its
/// uncompressed size is taken in the chunk's own ratio.
pub fn column_decode_bytes(
    dictionary_page_offset: Option<i64>,
    data_page_offset: i64,
    compressed_size: i64,
    uncompressed_size: i64,
) -> u64 {
    let compressed = u64::try_from(compressed_size).unwrap_or(0);
    let uncompressed = u64::try_from(uncompressed_size).unwrap_or(0);
    let dictionary_compressed = dictionary_page_offset
        .and_then(|offset| u64::try_from(data_page_offset.checked_sub(offset)?).ok())
        .unwrap_or(0)
        .min(compressed);
    let dictionary = match compressed {
        0 => 0,
        _ => {
            let scaled = u128::from(dictionary_compressed) * u128::from(uncompressed)
                / u128::from(compressed);
            u64::try_from(scaled)
                .unwrap_or(uncompressed)
                .min(uncompressed)
        }
    };
    dictionary + (uncompressed - dictionary).min(PAGE_BYTES)
}

/// Rows per record batch: the configured `batch_size`, cut so that a batch holds at most
/// 4 MiB of features (`BATCH_FEATURE_BYTES`) when the table is wide, but never below 64
/// rows (or `batch_size`, if smaller).
pub fn rows_per_batch(batch_size: usize, features: usize) -> usize {
    let row_bytes = features.max(1) * std::mem::size_of::<f32>();
    let fit = (BATCH_FEATURE_BYTES / row_bytes).max(MIN_BATCH_ROWS);
    batch_size.clamp(1, fit.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_asked_for_or_a_third_of_the_container_limit() {
        assert_eq!(decode_budget(None, None), DEFAULT_DECODE_BYTES);
        assert_eq!(decode_budget(Some(64 << 20), None), 64 << 20);
        assert_eq!(decode_budget(None, Some(384 << 20)), 128 << 20);
        assert_eq!(decode_budget(None, Some(3 << 30)), 1 << 30);
        assert_eq!(decode_budget(Some(64 << 20), Some(3 << 30)), 64 << 20);
        assert_eq!(decode_budget(Some(1 << 30), Some(768 << 20)), 1 << 30);
    }

    #[test]
    fn cgroup_limits_read_as_bytes_or_none() {
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_memory_limit("max\n"), None);
        // cgroup v1 without a limit.
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit(""), None);
        assert_eq!(parse_memory_limit("lots"), None);
    }

    #[test]
    fn a_chunk_holds_its_dictionary_and_one_page() {
        // pyarrow, 64Ki distinct floats: a 256 KiB dictionary, then 128 KiB of indices.
        let dictionary = 262_150;
        let chunk = column_decode_bytes(Some(4), 4 + dictionary, 393_300, 393_260);
        assert!((393_000..=393_300).contains(&chunk), "{chunk}");
        // A million rows: a 1 MiB dictionary, then pages of 1 MiB.
        let chunk = column_decode_bytes(Some(0), 1 << 20, 6 << 20, 6 << 20);
        assert_eq!(chunk, 2 << 20);
        // Snappy halved the chunk: the dictionary and the page are counted uncompressed.
        let chunk = column_decode_bytes(Some(0), 1 << 19, 1 << 21, 1 << 22);
        assert_eq!(chunk, (1 << 20) + PAGE_BYTES);
        // No dictionary: one page, or the whole chunk if smaller.
        assert_eq!(column_decode_bytes(None, 0, 10 << 20, 10 << 20), PAGE_BYTES);
        assert_eq!(column_decode_bytes(None, 0, 1000, 1200), 1200);
    }

    #[test]
    fn a_broken_footer_entry_counts_what_it_can() {
        assert_eq!(column_decode_bytes(Some(100), 50, 1000, 1000), 1000);
        assert_eq!(column_decode_bytes(Some(0), 5000, 1000, 1000), 1000);
        assert_eq!(column_decode_bytes(Some(0), 10, -1, -1), 0);
        assert_eq!(column_decode_bytes(Some(0), 10, 0, 500), 500);
    }

    #[test]
    fn wide_tables_get_shorter_batches() {
        assert_eq!(rows_per_batch(8192, 32), 8192);
        assert_eq!(rows_per_batch(8192, 128), 8192);
        assert_eq!(rows_per_batch(8192, 512), 2048);
        assert_eq!(rows_per_batch(4096, 1024), 1024);
        assert_eq!(rows_per_batch(100_000, 1 << 20), MIN_BATCH_ROWS);
        assert_eq!(rows_per_batch(10, 1 << 20), 10);
        assert_eq!(rows_per_batch(0, 0), 1);
    }
}
