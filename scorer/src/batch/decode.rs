//! The decoding stage of a batch shard: Parquet row groups decoded, every row checked and
//! fingerprinted, by several tasks at once (`--decoders`, [`row_groups_in_flight`]), so on a
//! machine with more than one core decoding no longer waits on itself. Each decoder reads
//! its row group's column chunks itself (only if the file is still the version listed) and
//! digests them ([`super::digest`]): into memory, or, for a row group over
//! `--max-group-mib`, into a spool file on local disk that it then decodes page by page
//! ([`Spool`]). In an incremental run it first asks whether the group's index was read from
//! the same file version (then the group is carried without being read), then reads the
//! index: a group whose digest it holds is carried whole, undecoded; otherwise it drops the
//! rows it finds unchanged, so only changed or unknown rows are turned into model input and
//! sent on. Batches reach the scoring stage through a bounded channel (memory stays flat: at
//! most a few batches wait), each row group's end is announced with its new index, and the
//! first error stops the shard.

use std::sync::Arc;

use millrace_crds::keys::{BatchLayout, Keyspace};
use millrace_crds::spec::MissingFeatures;
use tokio::sync::mpsc;

use super::BatchError;
use super::budget::Budget;
use super::convert::{Location, scan};
use super::digest;
use super::index::{self, GroupIndex, KnownIndex, SeenTwice};
use super::input::{GroupSource, Input, InputError};
use super::removal;
use super::repair;
use super::scoring::{Expected, Group};
use super::shard::Unit;
use super::writer::PredictionWriter;

/// The rows of one record batch that need work: every row of a full run; in an incremental
/// run the rows the fingerprint index does not find unchanged.
pub struct DecodedBatch {
    /// Their features, row-major in the model's order.
    pub features: Vec<f32>,
    /// Their entity ids (the fields of their buckets).
    pub ids: Vec<String>,
    /// Their buckets in the generation's layout.
    pub buckets: Vec<u32>,
    /// Their fingerprints.
    pub fingerprints: Vec<u64>,
    /// Per row: whether the index found it unchanged but its bucket was absent, so it is
    /// scored again (an inline repair, [`super::repair`]).
    pub repairs: Vec<bool>,
    /// What each write expects to replace; `None`: not known, read the value back first.
    pub expected: Vec<Option<Expected>>,
    /// An incremental run's rows skipped for a missing feature (bucket, entity id): a
    /// prediction an earlier run stored for them is withdrawn, since the generation is
    /// updated in place and it would otherwise be served, as fresh, in place of the online
    /// computation the fallback policy promises.
    pub withdrawn: Vec<(u32, String)>,
    /// The file's URI, for messages.
    pub file: String,
    /// The row group: the file's position in the listing and the group's index in it.
    pub group: Group,
    /// Rows read (scored, skipped or found unchanged).
    pub rows: u64,
    /// Rows scored with a filled feature.
    pub filled: u64,
    /// Rows skipped for a missing feature.
    pub skipped: u64,
    /// Rows the index found unchanged: nothing more to do.
    pub unchanged: u64,
    /// Rows the index decided (unchanged or changed) without reading their value.
    pub settled: u64,
}

/// What the decoders send.
pub enum Decoded {
    /// A batch to score.
    Batch(DecodedBatch),
    /// Every batch of this row group has been sent; its new fingerprint index (its digest,
    /// the entity hash and fingerprint of every scored row, in order) is to be written once
    /// its writes land.
    GroupDone {
        /// The row group.
        group: Group,
        /// Its new index.
        index: GroupIndex,
        /// Bytes read from the store for it.
        bytes_read: u64,
        /// Whether it was read through a spool file.
        spooled: bool,
        /// Whether its rows were decided knowing the buckets found absent (always, but in an
        /// incremental run whose TTL refresh was still under way): those decided before
        /// are left to the repair pass.
        absent_checked: bool,
    },
    /// An incremental run found the row group's content digest in its index: the group was
    /// not decoded, and every row it scored last time is carried.
    Unchanged {
        /// The row group.
        group: Group,
        /// As in [`Decoded::GroupDone`].
        absent_checked: bool,
        /// Rows in the group.
        rows: u64,
        /// Of them, rows scored when the index was written (the others were skipped for a
        /// missing feature).
        scored: u64,
        /// Bytes read from the store for it: none when the file was still the version the
        /// index was read from.
        bytes_read: u64,
        /// Whether it was read through a spool file.
        spooled: bool,
    },
}

/// What every decoder needs.
#[derive(Clone)]
pub struct DecodePlan {
    /// The input.
    pub input: Arc<Input>,
    /// The id column, then the model's inputs.
    pub columns: Vec<String>,
    /// The id column.
    pub id_column: String,
    /// The model's inputs, in order.
    pub inputs: Vec<String>,
    /// The null policy.
    pub missing: MissingFeatures,
    /// Rows per record batch.
    pub batch_size: usize,
    /// Where predictions go.
    pub keyspace: Keyspace,
    /// The generation written (an incremental run's base).
    pub generation: String,
    /// Its buckets.
    pub layout: Arc<BatchLayout>,
    /// Where an incremental run reads (and keeps) the fingerprint indexes of the generation
    /// it updates: a connection of its own, so these round trips do not queue behind the
    /// prediction writes' pipelines; `None` for a full run.
    pub known: Option<Arc<PredictionWriter>>,
    /// A repair pass ([`super::repair`]): the buckets found absent, as a table by bucket.
    /// Only rows in one are scored (each read back before it is written); every other row is
    /// left alone, and no index is read. `None` for a shard's own pass.
    pub repair: Option<Arc<Vec<bool>>>,
    /// An incremental run's own pass: the buckets found absent, as a table by bucket, once
    /// its TTL refresh is done. A row group decided after that scores again the rows the
    /// index would carry in an absent bucket (an inline repair); one decided before is left
    /// to the repair pass. `None` for a full run and a repair pass.
    pub absent: Option<Arc<std::sync::OnceLock<Arc<Vec<bool>>>>>,
    /// The seed of row groups' content digests ([`digest::seed`]).
    pub digest_seed: u64,
    /// The batch TTL: an index kept for an unchanged group gets it again.
    pub ttl_ms: u64,
    /// Where row groups too large for memory go.
    pub spool: Spool,
    /// The memory the decoders share: each reserves what its row group is estimated to hold
    /// while it is decoded ([`Input::decode_bytes`]) before reading it.
    pub memory: Arc<Budget>,
}

/// Row groups whose chunks (the columns read, compressed) exceed `max_group_bytes` are
/// streamed to an anonymous file in `dir` and decoded from there, one page per column in
/// memory at a time; smaller ones are read into memory whole (one request, no disk).
#[derive(Debug, Clone)]
pub struct Spool {
    /// The directory.
    pub dir: std::path::PathBuf,
    /// The largest row group held in memory.
    pub max_group_bytes: u64,
    /// The disk the shard may spool to at once.
    pub scratch: Arc<Budget>,
}

/// Row groups an object store's reads may hold in memory (or on disk, spooled) at once.
const REMOTE_READ_BUDGET: u64 = 128 << 20;

/// How many row groups to read and decode at once by default, the largest holding
/// `largest_group_bytes` (the columns read, compressed). From a local file system, 2:
/// reading is a copy from the page cache, decoding is the work, and two tasks keep two cores
/// busy beside Redis. From an object store, as many as fit in 128 MiB
/// (`REMOTE_READ_BUDGET`), 2 to 8: each read waits most of its time on the store's latency
/// and per-request rate, which concurrent requests hide.
pub fn row_groups_in_flight(remote: bool, largest_group_bytes: u64) -> usize {
    if !remote {
        return 2;
    }
    let fit = REMOTE_READ_BUDGET / largest_group_bytes.max(1);
    usize::try_from(fit).unwrap_or(usize::MAX).clamp(2, 8)
}

/// Decodes `units` with at most `decoders` at once; returns the receiving end. The channel
/// closes when every unit is done or after the first error (sent as the last message).
pub fn start(
    plan: DecodePlan,
    units: Vec<Unit>,
    decoders: usize,
) -> mpsc::Receiver<Result<Decoded, BatchError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let next = Arc::new(std::sync::Mutex::new(units.into_iter()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..decoders.max(1) {
            let (plan, next, tx) = (plan.clone(), Arc::clone(&next), tx.clone());
            workers.spawn(async move {
                loop {
                    let unit = next.lock().ok().and_then(|mut units| units.next());
                    let Some(unit) = unit else { return };
                    if let Err(error) = decode_unit(&plan, &unit, &tx).await {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    });
    rx
}

/// Reads row group `group`'s index in the background; a failed or missing read is an empty
/// index (every row then goes the exact way).
fn read_index(plan: &DecodePlan, key: &str) -> Option<tokio::task::JoinHandle<KnownIndex>> {
    let writer = Arc::clone(plan.known.as_ref()?);
    let key = key.to_string();
    Some(tokio::spawn(async move {
        let stored = writer
            .read(std::slice::from_ref(&key))
            .await
            .ok()
            .and_then(|values| values.into_iter().next().flatten());
        KnownIndex::from_stored(stored.as_deref())
    }))
}

/// In an incremental run, when `index_key` was written from the file version whose token
/// is `version`: refreshes its TTL and returns how many rows it scored. One round trip.
async fn kept_by_version(
    plan: &DecodePlan,
    index_key: &str,
    version: u64,
) -> Result<Option<u64>, BatchError> {
    let Some(writer) = plan.known.as_ref().filter(|_| version != 0) else {
        return Ok(None);
    };
    let mut keep = redis::cmd("EVAL");
    keep.arg(index::KEEP_IF_READ_FROM)
        .arg(1)
        .arg(index_key)
        .arg(&version.to_le_bytes()[..])
        .arg(plan.ttl_ms)
        .arg(index::FORMAT_WITH_VERSION);
    let scored: i64 =
        writer
            .command(index_key, &keep)
            .await
            .map_err(|source| BatchError::Redis {
                during: "reading a row group's index",
                source,
            })?;
    Ok(u64::try_from(scored).ok())
}

/// Announces `unit` carried whole: `scored` of its rows as the index has them.
async fn carried_whole(
    tx: &mpsc::Sender<Result<Decoded, BatchError>>,
    unit: &Unit,
    absent_checked: bool,
    scored: u64,
    bytes_read: u64,
    spooled: bool,
) -> Result<(), BatchError> {
    let _ = tx
        .send(Ok(Decoded::Unchanged {
            group: (unit.file, unit.row_group),
            absent_checked,
            rows: unit.rows,
            scored,
            bytes_read,
            spooled,
        }))
        .await;
    Ok(())
}

async fn decode_unit(
    plan: &DecodePlan,
    unit: &Unit,
    tx: &mpsc::Sender<Result<Decoded, BatchError>>,
) -> Result<(), BatchError> {
    let group = (unit.file, unit.row_group);
    let file = plan
        .input
        .files
        .get(unit.file)
        .map(|f| f.uri.clone())
        .unwrap_or_default();
    let columns: Vec<&str> = plan.columns.iter().map(String::as_str).collect();
    let version = plan
        .input
        .version(unit.file)
        .map_or(0, |tag| digest::of_version(plan.digest_seed, tag));
    let index_key = plan
        .keyspace
        .fingerprint_index(&plan.generation, group.0, group.1);
    // The buckets found absent, if the TTL refresh is done; only a table with one matters.
    let absent_now = plan.absent.as_ref().and_then(|known| known.get().cloned());
    let absent_checked = plan.absent.is_none() || absent_now.is_some();
    let absent = absent_now.filter(|table| table.contains(&true));
    // The file is the version the index was read from: the group is not even read (unless
    // a bucket is absent: then the index must say whether the group holds its entities).
    if absent.is_none()
        && let Some(scored) = kept_by_version(plan, &index_key, version).await?
    {
        return carried_whole(tx, unit, absent_checked, scored, 0, false).await;
    }
    let reading = read_index(plan, &index_key);
    let types = plan.input.column_types(unit.file, &columns);
    let size = plan.input.chunk_bytes(unit, &columns)?;
    // A row group larger than the limit goes to local disk first and is decoded from
    // there page by page, so memory does not grow with row group size.
    let spooled = size > plan.spool.max_group_bytes;
    // Both held until the group is decoded and its spool file gone (the function's end).
    // Memory first, then disk, in every decoder: none holds one while another, holding the
    // other, waits for it.
    let _memory = plan
        .memory
        .reserve(plan.input.decode_bytes(unit, &columns, !spooled))
        .await;
    let _scratch = match spooled {
        true => Some(plan.spool.scratch.reserve(size).await),
        false => None,
    };
    let (source, digest, bytes_read) = if spooled {
        let mut digest = digest::Digest::of_group(plan.digest_seed, &types);
        let spool = plan
            .input
            .spool(unit, &columns, &plan.spool.dir, &mut digest)
            .await?;
        let bytes_read = spool.bytes_read;
        (GroupSource::Spooled(spool), digest.finish(), bytes_read)
    } else {
        let fetched = plan.input.fetch(unit, &columns).await?;
        let digest = digest::of_group(plan.digest_seed, &types, &fetched.chunks);
        let bytes_read = fetched.bytes_read;
        (GroupSource::Memory(fetched), digest, bytes_read)
    };
    let mut known: Option<KnownIndex> = match reading {
        Some(read) => Some(read.await.unwrap_or_default()),
        None => None,
    };
    let holds_absent = |index: &KnownIndex| {
        absent.as_deref().is_some_and(|absent| {
            index
                .pairs()
                .iter()
                .any(|&(entity, _)| repair::in_absent(&plan.layout, absent, entity))
        })
    };
    if let (Some(index), Some(writer)) = (&known, &plan.known)
        && index.describes(digest)
        && !holds_absent(index)
    {
        // The same bytes as when the index was written: the same rows, scored as they are.
        // The index is written again, now with the version these bytes were read from.
        let kept = GroupIndex {
            digest,
            version,
            pairs: index.pairs().to_vec(),
        };
        index::store(writer, &index_key, &kept)
            .await
            .map_err(|source| BatchError::Redis {
                during: "keeping an unchanged row group's index",
                source,
            })?;
        return carried_whole(
            tx,
            unit,
            absent_checked,
            index.len() as u64,
            bytes_read,
            spooled,
        )
        .await;
    }
    let mut batches = plan
        .input
        .batches(unit, &columns, plan.batch_size, source)?;
    let mut first_row = 0;
    let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(unit.rows as usize);
    while let Some(record_batch) =
        batches
            .next_batch()
            .await
            .transpose()
            .map_err(|source| InputError::Decode {
                file: file.clone(),
                row_group: unit.row_group,
                source,
            })?
    {
        let at = Location {
            file: file.clone(),
            row_group: unit.row_group,
            first_row,
        };
        first_row += record_batch.num_rows();
        let scanned = scan(
            &record_batch,
            &plan.id_column,
            &plan.inputs,
            &plan.missing,
            &at,
        )?;
        let (mut rows, mut expected, mut withdrawn) = (Vec::new(), Vec::new(), Vec::new());
        let mut repairs = Vec::new();
        let (mut unchanged, mut settled) = (0, 0);
        for i in 0..scanned.len() {
            if !scanned.is_scored(i) {
                if known.is_some() {
                    let bucket = plan.layout.bucket_of_hash(scanned.id_hashes[i]);
                    withdrawn.push((bucket, scanned.id(i).to_string()));
                }
                continue;
            }
            let (id_hash, fingerprint) = (scanned.id_hashes[i], scanned.fingerprints[i]);
            let mut repaired = false;
            let decision = match (known.as_mut(), plan.repair.as_deref()) {
                // A repair: only entities whose bucket was absent, whatever their value
                // holds now (this run may have written it since: it is then read back as
                // this run's own).
                (_, Some(absent)) => {
                    repair::in_absent(&plan.layout, absent, id_hash).then_some(None)
                }
                // A full run: a key of this generation that already holds a value was
                // written by a retry of this shard or by a duplicate row.
                (None, None) => Some(Some(Expected::Value(None))),
                (Some(known), None) => match known.lookup(pairs.len(), id_hash) {
                    // Unchanged, but its bucket is gone: scored again, read back first.
                    Ok(Some(old))
                        if old == fingerprint
                            && absent.as_deref().is_some_and(|absent| {
                                repair::in_absent(&plan.layout, absent, id_hash)
                            }) =>
                    {
                        repaired = true;
                        Some(None)
                    }
                    Ok(Some(old)) if old == fingerprint => None,
                    Ok(Some(old)) => Some(Some(Expected::Fingerprint(old))),
                    Ok(None) => Some(None),
                    Err(SeenTwice) => {
                        return Err(BatchError::Duplicate {
                            id: scanned.id(i).to_string(),
                            file,
                            row_group: unit.row_group,
                        });
                    }
                },
            };
            pairs.push((id_hash, fingerprint));
            match decision {
                None => {
                    unchanged += 1;
                    settled += 1;
                }
                Some(expect) => {
                    settled += u64::from(matches!(expect, Some(Expected::Fingerprint(_))));
                    repairs.push(repaired);
                    rows.push(i);
                    expected.push(expect);
                }
            }
        }
        let batch = DecodedBatch {
            ids: rows.iter().map(|&i| scanned.id(i).to_string()).collect(),
            buckets: rows
                .iter()
                .map(|&i| plan.layout.bucket_of_hash(scanned.id_hashes[i]))
                .collect(),
            fingerprints: rows.iter().map(|&i| scanned.fingerprints[i]).collect(),
            repairs,
            features: scanned.gather(&rows),
            expected,
            withdrawn,
            file: file.clone(),
            group,
            rows: scanned.len() as u64,
            filled: scanned.filled,
            skipped: scanned.skipped,
            unchanged,
            settled,
        };
        if tx.send(Ok(Decoded::Batch(batch))).await.is_err() {
            return Ok(()); // the shard stopped
        }
    }
    // Entities the old index listed and no row matched: recorded before the new index
    // replaces the old one, which is all that knew them (removal module docs).
    if let (Some(index), Some(writer)) = (&known, &plan.known) {
        let gone = index.unmatched();
        if !gone.is_empty() {
            let key = plan.keyspace.removal_candidates(&plan.generation);
            removal::record_candidates(writer, &key, &gone)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "recording entities gone from a row group",
                    source,
                })?;
        }
    }
    let index = GroupIndex {
        digest,
        version,
        pairs,
    };
    let _ = tx
        .send(Ok(Decoded::GroupDone {
            group,
            index,
            bytes_read,
            spooled,
            absent_checked,
        }))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_store_reads_more_row_groups_at_once_as_far_as_the_budget_allows() {
        assert_eq!(row_groups_in_flight(false, 1 << 20), 2);
        assert_eq!(row_groups_in_flight(false, 1 << 30), 2);
        assert_eq!(
            row_groups_in_flight(true, 12 << 20),
            8,
            "13 MB groups: capped at 8"
        );
        assert_eq!(row_groups_in_flight(true, 32 << 20), 4);
        assert_eq!(row_groups_in_flight(true, 64 << 20), 2);
        assert_eq!(row_groups_in_flight(true, 1 << 30), 2, "never fewer than 2");
        assert_eq!(row_groups_in_flight(true, 0), 8);
    }
}
