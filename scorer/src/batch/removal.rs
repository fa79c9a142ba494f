//! Entities gone from the input of an incremental run: their predictions are removed from
//! the generation the run updates, once all of its shards are done, so an entity deleted
//! upstream stops being served at the next run rather than at the next rebuild.
//!
//! Nobody holds the whole input's id set (memory stays flat), so removal goes through the
//! fingerprint indexes, which already list every scored entity per row group:
//!
//! 1. **Candidates.** A decoder that finishes a row group records the entities its old index
//!    listed that no row matched ([`super::index::KnownIndex::unmatched`]) in the
//!    generation's candidate set ([`Keyspace::removal_candidates`]), *before* the group's
//!    new index replaces the old one, so a run that fails in between leaves them recorded.
//!    They are gone from the input, moved to another row group (or file), or skipped now.
//!    The indexes of row groups the input no longer has (fewer files, or fewer groups in a
//!    file: the [`Keyspace::index_listing`] of the last run says which there were) list
//!    candidates too.
//! 2. **The last shard sweeps.** A shard records itself done only if another shard is still
//!    missing; the last one ([`finish`]) first reads every row group's new index (the input
//!    now, all shards' work) and drops each candidate found in one (moved, not gone); the
//!    rest are removed from their buckets, then the candidate set, the orphaned indexes and
//!    the listing are updated, and only then is the shard recorded done, so the operator
//!    cannot publish the run before its removals are in. A shard killed mid-sweep is retried
//!    and, finding itself still last, sweeps again: every step can be repeated.
//!
//! The sweep is skipped entirely when nothing is a candidate (a run whose rows all stayed in
//! their row groups), and deferred, with nothing removed, when an index it must read is
//! missing (evicted, or written by an older release): without it, a candidate that moved
//! into that group would look gone; the candidates wait for the next run. Past the limit
//! (`--max-removal-candidates`, [`MAX_CANDIDATES`] by default: the table laid out anew, not
//! entities deleted) the candidates are dropped unexamined, counted with `SCARD` before
//! any is read so memory stays bounded: those among them really gone stay until the next
//! rebuild (`batch.rebuildAfter`), and the runs after this one remove again.

use std::collections::HashSet;

use millrace_crds::keys::{BatchLayout, Keyspace, entity_hash};
use redis::RedisError;

use super::index;
use super::writer::PredictionWriter;

/// Candidates one sweep holds in memory by default at most (8 bytes each in a hash set,
/// and again in the list of those to clear).
pub const MAX_CANDIDATES: usize = 1 << 21;

/// Candidates, or index keys, handled per round trip.
const CHUNK: usize = 4_096;

/// Rows whose indexes a sweep reads per round trip (16 bytes each): one large row group
/// at a time, many small ones together.
const INDEX_ROWS_PER_READ: u64 = 1 << 20;

/// Why a sweep with more than [`MAX_CANDIDATES`] candidates is deferred.
const TOO_MANY: &str = "too many entities left their row groups (the table laid out anew?): those gone stay until the rebuild";

/// The input layout: row groups per file, in listing order.
pub fn listing(row_groups: &[Vec<u64>]) -> Vec<usize> {
    row_groups.iter().map(Vec::len).collect()
}

/// A [`listing`] as recorded ("3,0,2"); `None` when `text` is not one.
pub fn parse_listing(text: &str) -> Option<Vec<usize>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',').map(|n| n.parse().ok()).collect()
}

/// The row groups (file, group) of `old` that `new` does not have.
pub fn orphans(old: &[usize], new: &[usize]) -> Vec<(usize, usize)> {
    old.iter()
        .enumerate()
        .flat_map(|(file, &groups)| {
            let kept = new.get(file).copied().unwrap_or(0);
            (kept..groups).map(move |group| (file, group))
        })
        .collect()
}

/// Adds `entities` to the candidate set at `key` (8-byte little-endian members, with the
/// batch TTL).
pub async fn record_candidates(
    writer: &PredictionWriter,
    key: &str,
    entities: &[u64],
) -> Result<(), RedisError> {
    let members: Vec<[u8; 8]> = entities.iter().map(|e| e.to_le_bytes()).collect();
    writer.add_to_set(key, &members).await
}

/// Records shard `shard` in the done hash at `done_key` (with what it wrote) unless every
/// other one of `shards` already is: then returns `true` without recording it, and the
/// caller sweeps first and records it with [`record_done`].
pub async fn finish(
    writer: &PredictionWriter,
    done_key: &str,
    shard: usize,
    shards: usize,
    written: u64,
    ttl_ms: u64,
) -> Result<bool, RedisError> {
    let mut finish = redis::cmd("EVAL");
    finish
        .arg(
            "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) == tonumber(ARGV[4]) - 1 then return 1 end \
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); redis.call('PEXPIRE', KEYS[1], ARGV[3]); return 0",
        )
        .arg(1)
        .arg(done_key)
        .arg(shard)
        .arg(written)
        .arg(ttl_ms)
        .arg(shards);
    let last: i64 = writer.command(done_key, &finish).await?;
    Ok(last == 1)
}

/// Records shard `shard` in the done hash at `done_key`, whatever the others did.
pub async fn record_done(
    writer: &PredictionWriter,
    done_key: &str,
    shard: usize,
    written: u64,
) -> Result<(), RedisError> {
    writer
        .hset_with_ttl(done_key, &[(shard.to_string(), written)])
        .await
}

/// Records what shard `shard` did beyond writing predictions in the run report at `key`
/// (fields `{what}:{shard}`, with the batch TTL), for the operator's status.
pub async fn record_report(
    writer: &PredictionWriter,
    key: &str,
    shard: usize,
    counts: &[(&str, u64)],
) -> Result<(), RedisError> {
    let fields: Vec<(String, u64)> = counts
        .iter()
        .map(|(what, count)| (format!("{what}:{shard}"), *count))
        .collect();
    writer.hset_with_ttl(key, &fields).await
}

/// Records `listing` as the layout of `generation`'s indexes (a full run's last shard).
pub async fn record_listing(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    listing: &[usize],
) -> Result<(), RedisError> {
    writer
        .set_with_ttl(&keyspace.index_listing(generation), listing_text(listing))
        .await
}

fn listing_text(listing: &[usize]) -> String {
    listing
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// The candidates were sorted out.
    Done {
        /// Candidates examined.
        candidates: u64,
        /// Predictions removed (the other candidates had moved, or were gone already).
        removed: u64,
    },
    /// Nothing removed; the candidates wait for a later run (or the rebuild).
    Deferred {
        /// Candidates found.
        candidates: u64,
        /// Why: an index of the input was missing, or there were too many.
        reason: &'static str,
    },
}

/// Removes from `generation` (laid out as `layout`) the predictions of its candidates that
/// no index of the input (`row_groups`: rows per row group, per file) lists, then clears
/// what it handled (module docs).
pub async fn sweep(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    layout: &BatchLayout,
    row_groups: &[Vec<u64>],
    max_candidates: usize,
) -> Result<Sweep, RedisError> {
    let listing = listing(row_groups);
    let candidates_key = keyspace.removal_candidates(generation);
    let recorded_count: u64 = writer
        .command(&candidates_key, redis::cmd("SCARD").arg(&candidates_key))
        .await?;
    let recorded = match recorded_count > max_candidates as u64 {
        true => Vec::new(),
        false => members(writer, &candidates_key).await?,
    };
    let mut candidates: HashSet<u64> = recorded.iter().copied().collect();
    let listing_key = keyspace.index_listing(generation);
    let old: Option<String> = writer
        .command(&listing_key, redis::cmd("GET").arg(&listing_key))
        .await?;
    let orphaned: Vec<String> = old
        .as_deref()
        .and_then(parse_listing)
        .map(|old| orphans(&old, &listing))
        .unwrap_or_default()
        .into_iter()
        .map(|(file, group)| keyspace.fingerprint_index(generation, file, group))
        .collect();
    let mut too_many = recorded_count > max_candidates as u64;
    for keys in orphaned.chunks(CHUNK) {
        if too_many {
            break;
        }
        for stored in writer.read(keys).await?.into_iter().flatten() {
            candidates.extend(index::decode(&stored).pairs.iter().map(|&(id, _)| id));
            too_many = candidates.len() > max_candidates;
            if too_many {
                break;
            }
        }
    }
    if too_many {
        // Dropped, not kept for later: a later run would find them too many again.
        let _: i64 = writer
            .command(&candidates_key, redis::cmd("UNLINK").arg(&candidates_key))
            .await?;
        forget_orphans(writer, keyspace, generation, &orphaned, &listing).await?;
        return Ok(Sweep::Deferred {
            candidates: recorded_count.max(candidates.len() as u64),
            reason: TOO_MANY,
        });
    }
    let examined = candidates.len() as u64;
    if !candidates.is_empty() {
        for keys in reads(keyspace, generation, row_groups) {
            for stored in writer.read(&keys).await? {
                let Some(entities) = stored.as_deref().and_then(index::entities) else {
                    return Ok(Sweep::Deferred {
                        candidates: examined,
                        reason: "a row group's fingerprint index is missing or of an older release: the next run tries again",
                    });
                };
                for entity in entities {
                    candidates.remove(&entity);
                }
            }
            if candidates.is_empty() {
                break;
            }
        }
    }
    let removed = remove(writer, layout, &candidates).await?;
    for chunk in recorded.chunks(CHUNK) {
        let mut clear = redis::cmd("SREM");
        clear.arg(&candidates_key);
        for member in chunk {
            clear.arg(&member.to_le_bytes()[..]);
        }
        let _: i64 = writer.command(&candidates_key, &clear).await?;
    }
    forget_orphans(writer, keyspace, generation, &orphaned, &listing).await?;
    Ok(Sweep::Done {
        candidates: examined,
        removed,
    })
}

/// The members of the candidate set at `key`, read a bounded number at a time (`SSCAN`
/// may repeat one; the caller dedups).
async fn members(writer: &PredictionWriter, key: &str) -> Result<Vec<u64>, RedisError> {
    let mut found = Vec::new();
    let mut cursor = 0_u64;
    loop {
        let (next, page): (u64, Vec<Vec<u8>>) = writer
            .command(
                key,
                redis::cmd("SSCAN")
                    .arg(key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(CHUNK),
            )
            .await?;
        found.extend(
            page.iter()
                .filter_map(|member| member.as_slice().try_into().ok().map(u64::from_le_bytes)),
        );
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Deletes the `orphaned` indexes and records `listing` as the input's layout, so the next
/// sweep does not list their entities again.
async fn forget_orphans(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    orphaned: &[String],
    listing: &[usize],
) -> Result<(), RedisError> {
    for key in orphaned {
        let _: i64 = writer.command(key, redis::cmd("DEL").arg(key)).await?;
    }
    record_listing(writer, keyspace, generation, listing).await
}

/// The index keys of `row_groups` (rows per row group, per file), in reads of about
/// [`INDEX_ROWS_PER_READ`] rows: an index is 16 bytes a row, so memory stays bounded.
fn reads(keyspace: &Keyspace, generation: &str, row_groups: &[Vec<u64>]) -> Vec<Vec<String>> {
    let mut reads: Vec<Vec<String>> = Vec::new();
    let mut rows = INDEX_ROWS_PER_READ;
    for (file, groups) in row_groups.iter().enumerate() {
        for (group, &group_rows) in groups.iter().enumerate() {
            if rows >= INDEX_ROWS_PER_READ {
                reads.push(Vec::new());
                rows = 0;
            }
            rows += group_rows;
            if let Some(read) = reads.last_mut() {
                read.push(keyspace.fingerprint_index(generation, file, group));
            }
        }
    }
    reads
}

/// Deletes the fields of `gone` (entity hashes) from their buckets of `layout`: the index
/// keeps hashes, not ids, so each bucket's fields are listed and matched by hash.
async fn remove(
    writer: &PredictionWriter,
    layout: &BatchLayout,
    gone: &HashSet<u64>,
) -> Result<u64, RedisError> {
    let mut buckets: Vec<u32> = gone.iter().map(|&h| layout.bucket_of_hash(h)).collect();
    buckets.sort_unstable();
    buckets.dedup();
    let mut removed = 0;
    for chunk in buckets.chunks(CHUNK) {
        let fields = writer.bucket_fields(layout, chunk).await?;
        let doomed = fields_of(chunk, fields, gone);
        removed += writer.delete_fields(layout, &doomed).await?;
    }
    Ok(removed)
}

/// The (bucket, field) pairs among `fields` (per bucket of `buckets`) whose entity is in
/// `gone`.
fn fields_of(buckets: &[u32], fields: Vec<Vec<String>>, gone: &HashSet<u64>) -> Vec<(u32, String)> {
    buckets
        .iter()
        .zip(fields)
        .flat_map(|(&bucket, fields)| {
            fields
                .into_iter()
                .filter(|id| gone.contains(&entity_hash(id)))
                .map(move |id| (bucket, id))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_round_trips_and_names_the_groups_gone() {
        let now = listing(&[vec![10, 10, 5], vec![], vec![7, 7]]);
        assert_eq!(listing_text(&now), "3,0,2");
        assert_eq!(parse_listing(&listing_text(&now)), Some(now));
        assert_eq!(parse_listing(""), Some(vec![]));
        assert_eq!(parse_listing("3,x"), None);
        // A file lost a group, the third file is gone.
        assert_eq!(orphans(&[3, 0, 2], &[2, 1]), vec![(0, 2), (2, 0), (2, 1)]);
        assert!(orphans(&[2, 1], &[2, 1, 4]).is_empty(), "only more");
    }

    #[test]
    fn indexes_are_read_a_bounded_number_of_rows_at_a_time() {
        let ks = Keyspace::new("ml/churn", "3");
        let big = INDEX_ROWS_PER_READ;
        let got = reads(&ks, "G", &[vec![big / 2, big / 2, big], vec![7]]);
        let key = |file, group| ks.fingerprint_index("G", file, group);
        assert_eq!(
            got,
            vec![vec![key(0, 0), key(0, 1)], vec![key(0, 2)], vec![key(1, 0)]]
        );
        assert!(reads(&ks, "G", &[vec![], vec![]]).is_empty());
    }

    #[test]
    fn only_fields_of_entities_gone_are_removed() {
        let gone: HashSet<u64> = [entity_hash("b"), entity_hash("x")].into();
        let fields = vec![vec!["a".to_string(), "b".into()], vec!["c".into()]];
        assert_eq!(
            fields_of(&[4, 9], fields, &gone),
            vec![(4, "b".to_string())]
        );
    }
}
