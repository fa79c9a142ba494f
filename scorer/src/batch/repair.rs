//! Buckets an incremental run finds absent: their entities are scored again.
//!
//! An incremental run trusts the fingerprint index: an entity whose features did not change
//! keeps the prediction stored for it, unread. That prediction can be gone while the index
//! stays: Redis evicted its bucket (a `maxmemory` policy such as `allkeys-lru`, common for a
//! cache), or the bucket expired. Without this, such an entity would have no batch
//! prediction until the next rebuild (`batch.rebuildAfter`, a week by default), and every
//! request for it would be computed in real time.
//!
//! The run already refreshes every bucket's TTL when it starts (`PEXPIRE`, which answers
//! whether the bucket exists), so finding the absent ones costs nothing more:
//!
//! 1. **Recorded before any write.** [`refresh`] refreshes every bucket and adds those absent
//!    to the set [`Keyspace::absent_buckets`] of the generation the run updates, then marks
//!    the run as refreshed ([`Keyspace::buckets_refreshed`]); a shard (or retry) that finds
//!    the mark reads the set instead of refreshing again. No shard writes before its own
//!    refresh (or the mark) is done, so the first refresh to finish saw every bucket before
//!    any write of the run could recreate it: a bucket evicted, then recreated by another
//!    shard's write of one changed entity, is still recorded. (Refreshing only a share of
//!    the buckets per shard would miss exactly that.) The shards of an Indexed Job start
//!    together, before any mark is set, so one of them claims the refresh
//!    ([`Keyspace::refresh_claim`], `SET NX` with a short TTL it keeps renewing) and the
//!    others wait for the mark, decoding meanwhile: one `PEXPIRE` per bucket per run,
//!    where each shard refreshing every bucket itself made it one per bucket per shard (16
//!    shards over 100M entities: 25M commands on Redis at once, where 1.6M do). A claim
//!    whose holder died lapses within [`CLAIM_MS`], and a waiting shard takes over. A shard
//!    that wins the claim looks for the mark once more before it refreshes (the refresh
//!    may have finished, and its claim been released, since its first look), and if a
//!    stalled holder resumes, whichever of the two finishes second uses the record, not
//!    what it saw alone: writes may have begun during its pass.
//! 2. **Repaired by every shard, in its own row groups.** A bucket's entities lie anywhere
//!    in the input, so each shard repairs those of its own row groups, before it counts
//!    itself done: the operator cannot publish the run before every repair is in.
//!    - **Inline**, for a row group decided once the refresh is done (all but the first few
//!      of a 1M-entity table, whose 16Ki buckets are refreshed in tens of milliseconds;
//!      fewer of a very large one, whose refresh takes seconds): a row the index finds unchanged in an absent bucket is scored
//!      again in the shard's own pass (read back first, like any row the index cannot vouch
//!      for), and a group the file version or the content digest would carry whole is
//!      decoded if its index lists such an entity. This costs nothing more than the write.
//!    - **In a repair pass**, for the row groups decided before: once its own pass is done,
//!      the shard reads their indexes, picks those listing an entity in an absent bucket
//!      (and those whose index is missing: they may), decodes them again and scores exactly
//!      the rows in absent buckets.
//!
//!    The run's last shard to finish then clears the set. A shard killed midway is retried
//!    and repairs again. (The first design left the whole repair to the last shard, after
//!    its pass: with many buckets evicted, every row group holds one of their entities, so
//!    that one shard decoded the whole input a second time while the others sat done.)
//!
//! A run where no bucket was absent (the usual case) does none of this.

use std::time::Duration;

use millrace_crds::keys::{BatchLayout, Keyspace};
use redis::RedisError;
use tracing::{info, warn};

use super::index;
use super::shard::Unit;
use super::writer::PredictionWriter;

/// Where a run records what its TTL refresh found.
#[derive(Debug, Clone)]
pub struct RefreshKeys {
    /// The set of absent buckets of the generation updated ([`Keyspace::absent_buckets`]).
    pub absent: String,
    /// The run's mark that the refresh is done ([`Keyspace::buckets_refreshed`]).
    pub refreshed: String,
    /// The run's claim on the refresh ([`Keyspace::refresh_claim`]).
    pub claim: String,
    /// Who this shard is, as the claim names it in the other shards' logs (shard and pod).
    pub holder: String,
    /// How long the claim lives unless renewed, in milliseconds: [`CLAIM_MS`] (a test
    /// shortens it to see the renewals at work).
    pub claim_ms: u64,
}

/// How long a claim on the refresh lives unless its holder renews it: how long the other
/// shards wait for one that died before one of them takes over.
pub const CLAIM_MS: u64 = 10_000;

/// How often the holder renews a claim that lives `claim_ms`: every third of its life, so a
/// slow round trip or two does not let it lapse.
fn claim_renewal(claim_ms: u64) -> Duration {
    Duration::from_millis((claim_ms / 3).max(1))
}

/// Renews (`ARGV[2]`: a TTL in milliseconds) or, with no `ARGV[2]`, releases the claim
/// `KEYS[1]` only if `ARGV[1]` still holds it: a holder whose claim lapsed and was taken over
/// must not extend or delete its successor's.
const IF_HELD: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
if ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
return redis.call('DEL', KEYS[1])";

/// The first wait between two looks for the mark: a small generation is refreshed in
/// milliseconds.
const FIRST_LOOK: Duration = Duration::from_millis(20);

/// The longest wait between two looks: a large generation takes seconds, and each look
/// costs two round trips.
const LONGEST_LOOK: Duration = Duration::from_millis(500);

/// Refreshes the batch TTL of every bucket of `layout` and records those absent, unless a
/// shard of this run already did (then its record is read instead) or is doing it (then
/// this one waits for it, or takes over if its claim lapses); marks the buckets found on
/// `writer`, so their writes need no transaction. Returns the absent buckets.
pub async fn refresh(
    writer: &PredictionWriter,
    layout: &BatchLayout,
    keys: &RefreshKeys,
) -> Result<Vec<u32>, RedisError> {
    let mut look = FIRST_LOOK;
    let mut waited_for: Option<String> = None;
    loop {
        if refreshed(writer, keys).await? {
            return read_record(writer, layout, keys).await;
        }
        let mut claim = redis::cmd("SET");
        claim
            .arg(&keys.claim)
            .arg(&keys.holder)
            .arg("NX")
            .arg("PX")
            .arg(keys.claim_ms);
        let claimed: Option<String> = writer.command(&keys.claim, &claim).await?;
        if claimed.is_some() {
            // The shard that refreshed may have set the mark and released its claim between
            // this shard's look and its claim: refreshing again now, while other shards may
            // be writing, would find buckets their writes recreated and miss them as absent.
            if refreshed(writer, keys).await? {
                release_claim(writer, keys).await?;
                return read_record(writer, layout, keys).await;
            }
            if let Some(holder) = waited_for {
                info!(%holder, "the claim on the TTL refresh lapsed (did its shard die?): this shard takes over");
            }
            return refresh_claimed(writer, layout, keys).await;
        }
        if waited_for.is_none() {
            let holder: Option<String> = writer
                .command(&keys.claim, redis::cmd("GET").arg(&keys.claim))
                .await?;
            let holder = holder.unwrap_or_default();
            info!(%holder, "another shard refreshes the buckets' TTL: its first write waits for it");
            waited_for = Some(holder);
        }
        tokio::time::sleep(look).await;
        look = (look * 2).min(LONGEST_LOOK);
    }
}

/// Whether a shard of this run has finished the refresh (its mark is set).
async fn refreshed(writer: &PredictionWriter, keys: &RefreshKeys) -> Result<bool, RedisError> {
    let done: i64 = writer
        .command(&keys.refreshed, redis::cmd("EXISTS").arg(&keys.refreshed))
        .await?;
    Ok(done == 1)
}

/// What the shard that refreshed recorded: the absent buckets, the others marked as having
/// their TTL on `writer`.
async fn read_record(
    writer: &PredictionWriter,
    layout: &BatchLayout,
    keys: &RefreshKeys,
) -> Result<Vec<u32>, RedisError> {
    let absent = recorded(writer, &keys.absent).await?;
    writer.assume_refreshed(layout, &absent);
    Ok(absent)
}

/// The refresh itself, by the shard holding the claim: renewed while it runs, released once
/// the mark is set (not before: a shard finding neither would refresh again).
async fn refresh_claimed(
    writer: &PredictionWriter,
    layout: &BatchLayout,
    keys: &RefreshKeys,
) -> Result<Vec<u32>, RedisError> {
    let refreshing = async {
        let absent = writer.adopt_buckets(layout).await?;
        if !absent.is_empty() {
            record_absent(writer, &keys.absent, &absent).await?;
        }
        // Already marked only if two shards refreshed at once (a claim lapsed while its
        // holder stalled, and another shard took over) and the other finished first.
        let second = refreshed(writer, keys).await?;
        writer.set_with_ttl(&keys.refreshed, "1").await?;
        Ok::<_, RedisError>((absent, second))
    };
    tokio::pin!(refreshing);
    let mut renewal = tokio::time::interval(claim_renewal(keys.claim_ms));
    renewal.tick().await; // the first tick is immediate, and the claim is fresh
    let mut lost = false;
    let (absent, second) = loop {
        tokio::select! {
            done = &mut refreshing => break done?,
            // Lost: no use renewing it again (see below).
            _ = renewal.tick(), if !lost => lost = !renew_claim(writer, keys).await?,
        }
    };
    if !release_claim(writer, keys).await? {
        warn!(holder = %keys.holder, "this shard's claim on the TTL refresh lapsed while it refreshed (stalled?) and another shard took over");
    }
    if !second {
        // The first to finish: every bucket was looked at before the mark let any shard
        // write, so what this shard found is whole.
        return Ok(absent);
    }
    // Another shard set the mark first, so the other shards' writes may have recreated
    // absent buckets before this shard looked at them: what it found alone can miss some.
    // The first to finish saw every bucket before any write and recorded them, so the
    // record (both shards' findings) is whole.
    read_record(writer, layout, keys).await
}

/// Gives `keys.holder`'s claim on the refresh another `keys.claim_ms`; `false` (and nothing
/// done) if it no longer holds it.
pub async fn renew_claim(
    writer: &PredictionWriter,
    keys: &RefreshKeys,
) -> Result<bool, RedisError> {
    if_held(writer, keys, Some(keys.claim_ms)).await
}

/// Deletes `keys.holder`'s claim on the refresh; `false` (and nothing done) if it no longer
/// holds it.
pub async fn release_claim(
    writer: &PredictionWriter,
    keys: &RefreshKeys,
) -> Result<bool, RedisError> {
    if_held(writer, keys, None).await
}

/// [`IF_HELD`]: renews the claim for `ttl_ms`, or releases it with none.
async fn if_held(
    writer: &PredictionWriter,
    keys: &RefreshKeys,
    ttl_ms: Option<u64>,
) -> Result<bool, RedisError> {
    let mut script = redis::cmd("EVAL");
    script
        .arg(IF_HELD)
        .arg(1)
        .arg(&keys.claim)
        .arg(&keys.holder);
    if let Some(ttl_ms) = ttl_ms {
        script.arg(ttl_ms);
    }
    let done: i64 = writer.command(&keys.claim, &script).await?;
    Ok(done == 1)
}

/// Row group indexes read per round trip (about 1 MiB each for 64Ki rows).
const INDEXES_PER_READ: usize = 8;

/// Adds `buckets` to the set at `key` (4-byte little-endian members, with the batch TTL).
pub async fn record_absent(
    writer: &PredictionWriter,
    key: &str,
    buckets: &[u32],
) -> Result<(), RedisError> {
    let members: Vec<[u8; 4]> = buckets.iter().map(|b| b.to_le_bytes()).collect();
    writer.add_to_set(key, &members).await
}

/// The buckets recorded at `key` (members that are not 4-byte bucket numbers are ignored).
pub async fn recorded(writer: &PredictionWriter, key: &str) -> Result<Vec<u32>, RedisError> {
    let members: Vec<Vec<u8>> = writer.command(key, redis::cmd("SMEMBERS").arg(key)).await?;
    Ok(members
        .iter()
        .filter_map(|m| <[u8; 4]>::try_from(m.as_slice()).ok())
        .map(u32::from_le_bytes)
        .collect())
}

/// Forgets the set at `key` (its buckets were repaired).
pub async fn clear(writer: &PredictionWriter, key: &str) -> Result<(), RedisError> {
    let _: i64 = writer.command(key, redis::cmd("DEL").arg(key)).await?;
    Ok(())
}

/// Which of `count` buckets are among `buckets`, as a lookup table (numbers past `count`
/// are ignored: they belong to no layout of this generation).
pub fn absent_table(buckets: &[u32], count: u32) -> Vec<bool> {
    let mut table = vec![false; count as usize];
    for &bucket in buckets {
        if let Some(slot) = table.get_mut(bucket as usize) {
            *slot = true;
        }
    }
    table
}

/// Whether the row group whose stored index is `stored` may hold an entity in an absent
/// bucket: it lists one, or there is no index of this release's format to say it does not.
pub fn may_hold_absent(stored: Option<&[u8]>, layout: &BatchLayout, absent: &[bool]) -> bool {
    match stored.and_then(index::entities) {
        Some(mut entities) => entities.any(|entity| in_absent(layout, absent, entity)),
        None => true,
    }
}

/// Whether the entity whose hash is `entity` falls in a bucket of `absent` (a table by
/// bucket: [`absent_table`]).
pub fn in_absent(layout: &BatchLayout, absent: &[bool], entity: u64) -> bool {
    absent
        .get(layout.bucket_of_hash(entity) as usize)
        .copied()
        .unwrap_or(false)
}

/// The row groups among `units` to decode again: those that may hold an entity in an absent
/// bucket ([`may_hold_absent`]), found by reading their indexes in `generation`.
pub async fn row_groups_to_repair(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    layout: &BatchLayout,
    units: Vec<Unit>,
    absent: &[bool],
) -> Result<Vec<Unit>, RedisError> {
    let mut chosen = Vec::new();
    for chunk in units.chunks(INDEXES_PER_READ) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|u| keyspace.fingerprint_index(generation, u.file, u.row_group))
            .collect();
        let stored = writer.read(&keys).await?;
        for (unit, stored) in chunk.iter().zip(stored) {
            if may_hold_absent(stored.as_deref(), layout, absent) {
                chosen.push(unit.clone());
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::index::{GroupIndex, encode, id_hash};

    fn layout() -> BatchLayout {
        Keyspace::new("ml/churn", "3").batch_layout("G", 16)
    }

    #[test]
    fn the_table_marks_exactly_the_absent_buckets_of_the_layout() {
        let table = absent_table(&[3, 0, 3, 99], 4);
        assert_eq!(
            table,
            vec![true, false, false, true],
            "99 is past the layout"
        );
    }

    #[test]
    fn a_row_group_needs_repair_only_if_its_index_lists_an_entity_in_an_absent_bucket() {
        let layout = layout();
        let ids = ["user_1", "user_2", "user_3"];
        let stored = encode(&GroupIndex {
            digest: 7,
            version: 0,
            pairs: ids.iter().map(|id| (id_hash(id), 42)).collect(),
        });
        let bucket_of = |id: &str| layout.bucket_of_hash(id_hash(id));
        let holding = absent_table(&[bucket_of("user_2")], layout.buckets());
        assert!(may_hold_absent(Some(&stored), &layout, &holding));
        let elsewhere: Vec<u32> = (0..layout.buckets())
            .filter(|b| !ids.iter().any(|id| bucket_of(id) == *b))
            .collect();
        let not_holding = absent_table(&elsewhere, layout.buckets());
        assert!(!may_hold_absent(Some(&stored), &layout, &not_holding));
    }

    #[test]
    fn a_row_group_without_a_readable_index_may_hold_anything() {
        let layout = layout();
        let none = absent_table(&[], layout.buckets());
        assert!(may_hold_absent(None, &layout, &none));
        assert!(may_hold_absent(Some(b"\x02garbage"), &layout, &none));
    }
}
