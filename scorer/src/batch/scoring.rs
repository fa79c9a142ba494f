//! The scoring stage of a batch shard: for each decoded batch (every row of a full run; in
//! an incremental run only the rows the fingerprint index did not find unchanged), settle
//! what is still unknown, run the model on what changed, and hand the writes to Redis
//! pipelines in flight.
//!
//! Rows the index does not know are read back as soon as their batch arrives and compared
//! only [`READ_AHEAD`] batches later, so those reads overlap decoding. A row group's new
//! index is written once the group is decoded and all its prediction writes are
//! acknowledged ([`IndexGate`]).
//!
//! Predictions are written in windows of [`WINDOW_ROWS`], not per decoded batch: a window
//! spans enough rows that most buckets it touches get several fields in one `HSET`.

use std::collections::VecDeque;
use std::sync::Arc;

use millrace_crds::keys::{BatchLayout, CachedPrediction, Keyspace};
use redis::RedisError;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::BatchError;
use super::decode::DecodedBatch;
use super::index::{self, GroupIndex, IndexGate};
use super::writer::{Expect, FieldWrite, PredictionWriter, Previous};
use crate::model::{Model, ModelError};

/// A row group: its file's position in the input listing and its index in the file.
pub type Group = (usize, usize);

/// Where this run's fingerprint indexes live.
#[derive(Debug, Clone)]
pub struct IndexPlace {
    /// The resource's keys.
    pub keyspace: Keyspace,
    /// The generation written (an incremental run's base).
    pub generation: String,
}

/// Decoded batches whose reads may be in flight before the oldest is scored.
pub const READ_AHEAD: usize = 4;

/// Predictions written together. At about 64 entities per bucket, a window of 64Ki rows
/// gives a 1M-entity generation (16Ki buckets) four fields per `HSET`: measured, a third of
/// Redis's CPU per prediction of one `SET … PX` each. A larger generation gets fewer fields
/// per bucket from a window, but still deep pipelines, which the writer sends in parts so a
/// window's memory stays the same.
pub const WINDOW_ROWS: usize = 65_536;

/// Predictions waiting to be written together, with where each came from.
struct Window {
    writes: Vec<FieldWrite>,
    expected: Vec<Expected>,
    /// Per write, its scored batch (an index into `sources`).
    source: Vec<u32>,
    /// The file and row group of each scored batch in the window.
    sources: Vec<(String, Group)>,
}

impl Window {
    /// An empty window with room for [`WINDOW_ROWS`] writes: grown by doubling instead, a
    /// full run's windows were copied a dozen times each on their way there.
    fn new() -> Self {
        Self {
            writes: Vec::with_capacity(WINDOW_ROWS),
            expected: Vec::with_capacity(WINDOW_ROWS),
            source: Vec::with_capacity(WINDOW_ROWS),
            sources: Vec::new(),
        }
    }
}

/// The read of the stored values of rows the index did not know.
type ValuesRead = JoinHandle<Result<Vec<Previous>, RedisError>>;

/// One decoded batch waiting to be scored, with the read of its unknown rows in flight.
struct Prepared {
    batch: DecodedBatch,
    /// The rows whose expectation is unknown, and the read of their values.
    reading: Option<(Vec<usize>, ValuesRead)>,
}

/// What a finished write task did.
#[derive(Default)]
struct WriteDone {
    /// The row group of each scored batch it wrote (none for an index write).
    groups: Vec<Group>,
    /// Predictions written.
    written: u64,
    /// Stored predictions withdrawn.
    withdrawn: u64,
}

/// The shard's scoring and writing state.
pub struct Scoring {
    model: Arc<Model>,
    writer: Arc<PredictionWriter>,
    /// Bounds the pipelines in flight.
    permits: Arc<Semaphore>,
    /// The time every prediction of this run carries.
    computed_at_ms: u64,
    queue: VecDeque<Prepared>,
    window: Window,
    layout: Arc<BatchLayout>,
    /// A full run's first attempt: every field is expected new.
    fresh: bool,
    /// The TTL refresh of the updated generation's buckets, awaited before the first write.
    adopting: Option<JoinHandle<Result<Vec<u32>, RedisError>>>,
    writes: JoinSet<Result<WriteDone, BatchError>>,
    index: IndexPlace,
    gate: IndexGate,
    /// Predictions written so far.
    pub written: u64,
    /// Entities left as they were.
    pub carried: u64,
    /// Rows the fingerprint index decided (unchanged or changed) without reading their
    /// stored value.
    pub settled: u64,
    /// Stored predictions withdrawn (see [`DecodedBatch::withdrawn`]).
    pub withdrawn: u64,
    /// Of the predictions written, those of entities the index found unchanged but whose
    /// bucket was absent (see [`DecodedBatch::repairs`]).
    pub repaired: u64,
}

impl Scoring {
    /// A scoring stage writing into `layout`; `fresh` for a full run's first attempt.
    pub fn new(
        model: Arc<Model>,
        writer: Arc<PredictionWriter>,
        writes_in_flight: usize,
        computed_at_ms: u64,
        index: IndexPlace,
        layout: Arc<BatchLayout>,
        fresh: bool,
    ) -> Self {
        Self {
            model,
            writer,
            permits: Arc::new(Semaphore::new(writes_in_flight.max(1))),
            computed_at_ms,
            queue: VecDeque::new(),
            window: Window::new(),
            layout,
            fresh,
            adopting: None,
            writes: JoinSet::new(),
            index,
            gate: IndexGate::default(),
            written: 0,
            carried: 0,
            settled: 0,
            withdrawn: 0,
            repaired: 0,
        }
    }

    /// Queues a decoded batch (starting the read of rows it cannot settle yet) and scores
    /// the oldest queued batch once more than [`READ_AHEAD`] wait.
    pub async fn push(&mut self, mut batch: DecodedBatch) -> Result<(), BatchError> {
        self.carried += batch.unchanged;
        self.settled += batch.settled;
        if !batch.withdrawn.is_empty() {
            self.withdraw(std::mem::take(&mut batch.withdrawn)).await?;
        }
        if batch.ids.is_empty() {
            return self.reap();
        }
        self.gate.opened(batch.group);
        let unknown: Vec<usize> = (0..batch.expected.len())
            .filter(|&i| batch.expected[i].is_none())
            .collect();
        let reading = (!unknown.is_empty()).then(|| {
            let fields: Vec<(u32, String)> = unknown
                .iter()
                .map(|&i| (batch.buckets[i], batch.ids[i].clone()))
                .collect();
            let writer = Arc::clone(&self.writer);
            let layout = Arc::clone(&self.layout);
            let read = tokio::spawn(async move { writer.read_fields(&layout, &fields).await });
            (unknown, read)
        });
        self.queue.push_back(Prepared { batch, reading });
        if self.queue.len() > READ_AHEAD
            && let Some(oldest) = self.queue.pop_front()
        {
            self.score(oldest).await?;
        }
        self.reap()
    }

    /// Every batch of `group` has been pushed; `index` is its new index, written once the
    /// group's predictions are.
    pub fn group_done(&mut self, group: Group, index: GroupIndex) -> Result<(), BatchError> {
        if let Some(ready) = self.gate.decoded(group, index) {
            self.write_index(ready);
        }
        self.reap()
    }

    /// Scores everything queued and waits for every write (and the indexes they release).
    pub async fn finish(&mut self) -> Result<(), BatchError> {
        while let Some(oldest) = self.queue.pop_front() {
            self.score(oldest).await?;
        }
        self.flush().await?;
        self.adopted().await?;
        while let Some(done) = self.writes.join_next().await {
            self.count(done)?;
        }
        Ok(())
    }

    fn reap(&mut self) -> Result<(), BatchError> {
        while let Some(done) = self.writes.try_join_next() {
            self.count(done)?;
        }
        Ok(())
    }

    /// Adds a finished write's predictions (releasing its group's index when it was the
    /// group's last), or fails with its error.
    fn count(
        &mut self,
        done: Result<Result<WriteDone, BatchError>, tokio::task::JoinError>,
    ) -> Result<(), BatchError> {
        let WriteDone {
            groups,
            written,
            withdrawn,
        } = done.map_err(|e| ModelError::Run(format!("a write task failed: {e}")))??;
        self.written += written;
        self.withdrawn += withdrawn;
        for group in groups {
            if let Some(ready) = self.gate.closed(group) {
                self.write_index(ready);
            }
        }
        Ok(())
    }

    /// Writes the new index of a row group whose predictions are all in Redis.
    fn write_index(&mut self, ((file, row_group), group_index): (Group, GroupIndex)) {
        let key = self
            .index
            .keyspace
            .fingerprint_index(&self.index.generation, file, row_group);
        let writer = Arc::clone(&self.writer);
        self.writes.spawn(async move {
            index::store(&writer, &key, &group_index)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "writing the fingerprint index",
                    source,
                })?;
            Ok(WriteDone::default())
        });
    }

    async fn score(&mut self, prepared: Prepared) -> Result<(), BatchError> {
        let Prepared { batch, reading } = prepared;
        let DecodedBatch {
            features,
            mut ids,
            buckets,
            fingerprints,
            repairs,
            mut expected,
            file,
            group,
            ..
        } = batch;
        // Rows the index did not know: compared with the fingerprint in their stored value.
        let mut unchanged = vec![false; ids.len()];
        if let Some((unknown, read)) = reading {
            let values = joined(read, "reading the published predictions").await?;
            for (i, value) in unknown.into_iter().zip(values) {
                unchanged[i] = value.as_deref().and_then(CachedPrediction::fingerprint)
                    == Some(fingerprints[i]);
                expected[i] = Some(Expected::Value(value));
            }
        }
        let changed: Vec<usize> = (0..ids.len()).filter(|&i| !unchanged[i]).collect();
        self.carried += (ids.len() - changed.len()) as u64;
        self.repaired += changed
            .iter()
            .filter(|&&i| repairs.get(i).copied().unwrap_or(false))
            .count() as u64;
        if changed.is_empty() {
            if let Some(ready) = self.gate.closed(group) {
                self.write_index(ready);
            }
            return Ok(());
        }
        let width = self.model.features();
        let features = if changed.len() == ids.len() {
            features
        } else {
            changed
                .iter()
                .flat_map(|&i| &features[i * width..(i + 1) * width])
                .copied()
                .collect()
        };
        let scoring = Arc::clone(&self.model);
        let predictions = tokio::task::spawn_blocking(move || scoring.predict(&features))
            .await
            .map_err(|e| ModelError::Run(format!("the inference task failed: {e}")))??;
        if predictions.len() != changed.len() {
            return Err(ModelError::Run(format!(
                "{} predictions for {} rows",
                predictions.len(),
                changed.len()
            ))
            .into());
        }
        // A window stays within its capacity: full before this batch would overflow it.
        if self.window.writes.len() + changed.len() > WINDOW_ROWS {
            self.flush().await?;
        }
        let computed_at_ms = self.computed_at_ms;
        let source = self.window.sources.len() as u32;
        self.window.sources.push((file, group));
        for (&i, &value) in changed.iter().zip(&predictions) {
            let encoded = CachedPrediction {
                value,
                computed_at_ms,
            }
            .encode_with_fingerprint(fingerprints[i]);
            let expected = expected[i].take().unwrap_or(Expected::Value(None));
            let expect = match &expected {
                _ if self.fresh => Expect::Absent,
                // The index vouches for what is there (and caught a repeat in the group).
                Expected::Fingerprint(_) => Expect::Present,
                Expected::Value(_) => Expect::Read,
            };
            self.window.writes.push(FieldWrite {
                bucket: buckets[i],
                id: std::mem::take(&mut ids[i]),
                value: encoded,
                expect,
            });
            self.window.expected.push(expected);
            self.window.source.push(source);
        }
        if self.window.writes.len() >= WINDOW_ROWS {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes the first write wait for `refresh`, the TTL refresh of an incremental run's
    /// buckets (so buckets it finds need no transaction), and the run fail if it fails.
    pub fn after_ttl_refresh(&mut self, refresh: JoinHandle<Result<Vec<u32>, RedisError>>) {
        self.adopting = Some(refresh);
    }

    /// Waits for the TTL refresh of an incremental run's buckets, if still under way.
    async fn adopted(&mut self) -> Result<(), BatchError> {
        let Some(adopting) = self.adopting.take() else {
            return Ok(());
        };
        let absent = joined(adopting, "refreshing the TTL of carried predictions").await?;
        if !absent.is_empty() {
            tracing::info!(
                missing = absent.len(),
                buckets = self.layout.buckets(),
                "buckets of the updated generation were absent (empty, evicted or expired)"
            );
        }
        Ok(())
    }

    /// A place among the write tasks in flight (waiting while they are all taken).
    async fn write_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, BatchError> {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ModelError::Run("writer closed".into()).into())
    }

    /// Hands the window to a write task (waiting while too many are in flight).
    async fn flush(&mut self) -> Result<(), BatchError> {
        if self.window.sources.is_empty() {
            return Ok(());
        }
        self.adopted().await?;
        let window = std::mem::replace(&mut self.window, Window::new());
        let permit = self.write_permit().await?;
        let writer = Arc::clone(&self.writer);
        let layout = Arc::clone(&self.layout);
        self.writes.spawn(async move {
            let written = writer
                .write(&layout, &window.writes)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "writing predictions",
                    source,
                })?;
            drop(permit);
            if let Some(error) = duplicate(&window, &written.unexpected, &written.previous) {
                return Err(error);
            }
            Ok(WriteDone {
                groups: window.sources.iter().map(|(_, group)| *group).collect(),
                written: window.writes.len() as u64,
                withdrawn: 0,
            })
        });
        Ok(())
    }

    /// Deletes the stored predictions of `fields` (bucket, entity id) in a write task
    /// (waiting while too many are in flight). Not tied to the row group's index, which
    /// never lists a skipped row: a run that fails before they are gone leaves them to the
    /// next run, which skips the same rows.
    async fn withdraw(&mut self, fields: Vec<(u32, String)>) -> Result<(), BatchError> {
        self.adopted().await?;
        let permit = self.write_permit().await?;
        let writer = Arc::clone(&self.writer);
        let layout = Arc::clone(&self.layout);
        self.writes.spawn(async move {
            let withdrawn = writer
                .delete_fields(&layout, &fields)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "withdrawing the predictions of rows skipped for a missing feature",
                    source,
                })?;
            drop(permit);
            Ok(WriteDone {
                withdrawn,
                ..WriteDone::default()
            })
        });
        Ok(())
    }
}

/// The result of a Redis task spawned `during` something.
async fn joined<T>(
    task: JoinHandle<Result<T, RedisError>>,
    during: &'static str,
) -> Result<T, BatchError> {
    task.await
        .map_err(|e| ModelError::Run(format!("a task {during} failed: {e}")))?
        .map_err(|source| BatchError::Redis { during, source })
}

/// Most entity ids a duplicate error lists.
const LISTED_IDS: usize = 8;

/// The error for a window whose write found another row of this run under one of its
/// fields: named exactly when the values tell (or the id is in the window twice), else the
/// entities of the bucket where it happened.
fn duplicate(window: &Window, unexpected: &[usize], previous: &[Previous]) -> Option<BatchError> {
    let at = |i: usize| {
        let (file, group) = &window.sources[window.source[i] as usize];
        (file.clone(), group.1)
    };
    for (i, write) in window.writes.iter().enumerate() {
        if conflicts(previous[i].as_deref(), &window.expected[i], &write.value) {
            let (file, row_group) = at(i);
            return Some(BatchError::Duplicate {
                id: write.id.clone(),
                file,
                row_group,
            });
        }
    }
    let &first = unexpected.first()?;
    let mut seen = std::collections::HashSet::new();
    if let Some(&twice) = unexpected
        .iter()
        .find(|&&i| !seen.insert(window.writes[i].id.as_str()))
    {
        let (file, row_group) = at(twice);
        return Some(BatchError::Duplicate {
            id: window.writes[twice].id.clone(),
            file,
            row_group,
        });
    }
    let (file, row_group) = at(first);
    let mut ids: Vec<String> = unexpected
        .iter()
        .map(|&i| window.writes[i].id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    let more = ids.len().saturating_sub(LISTED_IDS);
    ids.truncate(LISTED_IDS);
    Some(BatchError::DuplicateAmong {
        ids,
        more,
        file,
        row_group,
    })
}

/// What an in-place write expects to replace.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// The value read before (or nothing: a new key).
    Value(Previous),
    /// A value scored on features with this fingerprint (known from the index, not read).
    Fingerprint(u64),
}

/// Whether a write's previous value `was` shows another row of this run wrote the key:
/// not when it held nothing, what this run expected to replace (an in-place update), or the
/// same prediction (a retried shard).
pub fn conflicts(was: Option<&[u8]>, expected: &Expected, value: &[u8]) -> bool {
    let Some(was) = was else { return false };
    match expected {
        Expected::Value(read) if Some(was) == read.as_deref() => return false,
        Expected::Fingerprint(old) if CachedPrediction::fingerprint(was) == Some(*old) => {
            return false;
        }
        _ => {}
    }
    match (
        CachedPrediction::decode(was),
        CachedPrediction::decode(value),
    ) {
        (Ok(was), Ok(now)) => was.value.to_bits() != now.value.to_bits(),
        // Garbage under our key is overwritten, not a duplicate.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ids: &[&str]) -> Window {
        let written = CachedPrediction {
            value: 0.5,
            computed_at_ms: 1,
        }
        .encode_with_fingerprint(9);
        Window {
            writes: ids
                .iter()
                .map(|id| FieldWrite {
                    bucket: 0,
                    id: id.to_string(),
                    value: written,
                    expect: Expect::Absent,
                })
                .collect(),
            expected: vec![Expected::Value(None); ids.len()],
            source: vec![0; ids.len()],
            sources: vec![("day.parquet".into(), (0, 3))],
        }
    }

    #[test]
    fn a_duplicate_is_named_exactly_when_the_window_tells() {
        let twice = window(&["a", "b", "a"]);
        let error = duplicate(&twice, &[0, 1, 2], &[None, None, None]).map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("entity \"a\"") && e.contains("row group 3")),
            "{error:?}"
        );
        // Taken by a row outside the window: the bucket's entities are the candidates.
        let among = window(&["c", "d"]);
        let error = duplicate(&among, &[0, 1], &[None, None]).map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("[\"c\", \"d\"]")),
            "{error:?}"
        );
        assert!(duplicate(&among, &[], &[None, None]).is_none());
    }

    fn value(v: f32, at: u64) -> Vec<u8> {
        CachedPrediction {
            value: v,
            computed_at_ms: at,
        }
        .encode_with_fingerprint(9)
        .to_vec()
    }

    #[test]
    fn only_a_different_prediction_from_this_run_conflicts() {
        let new = value(0.5, 2);
        let none = Expected::Value(None);
        assert!(!conflicts(None, &none, &new), "a fresh key");
        assert!(
            !conflicts(Some(&value(0.5, 1)), &none, &new),
            "a retry: same prediction, other time"
        );
        assert!(
            conflicts(Some(&value(0.7, 1)), &none, &new),
            "another row of this run"
        );
        let read = value(0.1, 0);
        let replaced = Expected::Value(Some(read.clone()));
        assert!(
            !conflicts(Some(&read), &replaced, &new),
            "the value an in-place update replaces"
        );
        assert!(conflicts(Some(&value(0.7, 1)), &replaced, &new));
        assert!(!conflicts(Some(b"garbage"), &none, &new));
        // Known from the index: the old value carries the old fingerprint (9 here).
        assert!(
            !conflicts(Some(&value(0.1, 0)), &Expected::Fingerprint(9), &new),
            "the value the index described"
        );
        assert!(
            conflicts(Some(&value(0.7, 1)), &Expected::Fingerprint(8), &new),
            "another fingerprint: another row of this run wrote it"
        );
    }
}
