//! The scoring stage of a batch shard: for each converted record batch, find what needs
//! scoring (everything, or in an incremental run the rows whose fingerprint changed), run
//! the model, and hand the writes to Redis pipelines in flight.
//!
//! An incremental run reads the fingerprint index of each row group ([`super::index`]) as
//! soon as the group's first batch is converted and awaits it only [`READ_AHEAD`] batches
//! later, so Redis reads overlap decoding; rows the index confirms unchanged cost nothing
//! more, the others are read back and compared one by one. Every run writes the index of
//! each row group it scored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use millrace_crds::keys::{CachedPrediction, Keyspace};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::BatchError;
use super::convert::Converted;
use super::decode::DecodedBatch;
use super::index;
use super::writer::{PredictionWriter, Previous};
use crate::model::{Model, ModelError};

/// A row group's fingerprint index, read once and shared by its batches.
type KnownIndex = Shared<BoxFuture<'static, Arc<HashMap<u64, u64>>>>;

/// A row group: its file's position in the input listing and its index in the file.
pub type Group = (usize, usize);

/// Where this run's fingerprint indexes live.
#[derive(Debug, Clone)]
pub struct IndexPlace {
    /// The resource's keys.
    pub keyspace: Keyspace,
    /// The generation written (an incremental run's base).
    pub generation: String,
    /// Their TTL: the batch TTL.
    pub ttl_ms: u64,
}

/// Reads a row group's index in the background; a failed or missing read is an empty index
/// (every row then goes the exact way).
fn read_index(writer: Arc<PredictionWriter>, key: String) -> KnownIndex {
    let read = tokio::spawn(async move {
        match writer.read(std::slice::from_ref(&key)).await {
            Ok(values) => values
                .into_iter()
                .next()
                .flatten()
                .map(|bytes| index::decode(&bytes))
                .unwrap_or_default(),
            Err(_) => HashMap::new(),
        }
    });
    async move { Arc::new(read.await.unwrap_or_default()) }
        .boxed()
        .shared()
}

/// Converted batches whose reads may be in flight before the oldest is scored.
pub const READ_AHEAD: usize = 4;

/// One converted batch waiting to be scored.
pub struct Prepared {
    converted: Converted,
    fingerprints: Vec<u64>,
    id_hashes: Vec<u64>,
    keys: Vec<String>,
    known: Option<KnownIndex>,
    file: String,
    row_group: usize,
}

/// The shard's scoring and writing state.
pub struct Scoring {
    /// The model.
    pub model: Arc<Model>,
    /// Where predictions go.
    pub writer: Arc<PredictionWriter>,
    /// Bounds the pipelines in flight.
    pub permits: Arc<Semaphore>,
    /// Inputs per row.
    pub features_per_row: usize,
    /// The time every prediction of this run carries.
    pub computed_at_ms: u64,
    /// Whether to compare with the published values (an in-place incremental run).
    pub incremental: bool,
    queue: VecDeque<Prepared>,
    writes: JoinSet<Result<u64, BatchError>>,
    index: IndexPlace,
    /// Index reads in flight or done, for the row group being read.
    known: HashMap<Group, KnownIndex>,
    /// The indexes of the row groups being decoded: (entity hash, fingerprint) pairs.
    building: HashMap<Group, Vec<(u64, u64)>>,
    /// Predictions written so far.
    pub written: u64,
    /// Entities left as they were.
    pub carried: u64,
    /// Rows the fingerprint index decided (unchanged or changed) without reading their
    /// stored value.
    pub settled: u64,
}

impl Scoring {
    /// A scoring stage.
    pub fn new(
        model: Arc<Model>,
        writer: Arc<PredictionWriter>,
        writes_in_flight: usize,
        computed_at_ms: u64,
        incremental: bool,
        index: IndexPlace,
    ) -> Self {
        Self {
            features_per_row: model.features(),
            model,
            writer,
            permits: Arc::new(Semaphore::new(writes_in_flight.max(1))),
            computed_at_ms,
            incremental,
            queue: VecDeque::new(),
            writes: JoinSet::new(),
            index,
            known: HashMap::new(),
            building: HashMap::new(),
            written: 0,
            carried: 0,
            settled: 0,
        }
    }

    /// Queues a decoded batch and scores the oldest queued batch once more than
    /// [`READ_AHEAD`] wait.
    pub async fn push(&mut self, batch: DecodedBatch) -> Result<(), BatchError> {
        let DecodedBatch {
            converted,
            keys,
            fingerprints,
            id_hashes,
            file,
            file_ordinal,
            row_group,
            ..
        } = batch;
        let group = (file_ordinal, row_group);
        self.building
            .entry(group)
            .or_default()
            .extend(id_hashes.iter().copied().zip(fingerprints.iter().copied()));
        let known = self.incremental.then(|| {
            let key = self.index_key(&group);
            let writer = Arc::clone(&self.writer);
            self.known
                .entry(group)
                .or_insert_with(|| read_index(writer, key))
                .clone()
        });
        self.queue.push_back(Prepared {
            converted,
            fingerprints,
            id_hashes,
            keys,
            known,
            file,
            row_group,
        });
        if self.queue.len() > READ_AHEAD
            && let Some(oldest) = self.queue.pop_front()
        {
            self.score(oldest).await?;
        }
        self.reap()
    }

    /// Every batch of `group` has been pushed: its index can be written.
    pub async fn group_done(&mut self, group: Group) -> Result<(), BatchError> {
        self.flush_index(group).await
    }

    /// Scores everything queued and waits for every write.
    pub async fn finish(&mut self) -> Result<(), BatchError> {
        while let Some(oldest) = self.queue.pop_front() {
            self.score(oldest).await?;
        }
        let groups: Vec<Group> = self.building.keys().copied().collect();
        for group in groups {
            self.flush_index(group).await?;
        }
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

    /// Adds a finished write's predictions, or fails with its error.
    fn count(
        &mut self,
        done: Result<Result<u64, BatchError>, tokio::task::JoinError>,
    ) -> Result<(), BatchError> {
        self.written +=
            done.map_err(|e| ModelError::Run(format!("a write task failed: {e}")))??;
        Ok(())
    }

    /// The index key of row group `group`.
    fn index_key(&self, (file, row_group): &Group) -> String {
        self.index
            .keyspace
            .fingerprint_index(&self.index.generation, *file, *row_group)
    }

    /// Writes the index of `group`, whose batches have all been pushed. In an incremental
    /// run its old index must have been read first: the read is awaited before the write
    /// is issued (queued batches keep their own handle on it).
    async fn flush_index(&mut self, group: Group) -> Result<(), BatchError> {
        let Some(pairs) = self.building.remove(&group) else {
            return Ok(());
        };
        if let Some(known) = self.known.remove(&group) {
            known.await;
        }
        let key = self.index_key(&group);
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(index::encode(&pairs))
            .arg("PX")
            .arg(self.index.ttl_ms);
        let writer = Arc::clone(&self.writer);
        self.writes.spawn(async move {
            let () = writer
                .command(&key, &set)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "writing the fingerprint index",
                    source,
                })?;
            Ok(0)
        });
        self.reap()
    }

    async fn score(&mut self, prepared: Prepared) -> Result<(), BatchError> {
        let Prepared {
            converted,
            fingerprints,
            id_hashes,
            keys,
            known,
            file,
            row_group,
        } = prepared;
        // In place, only rows whose features changed since they were scored are scored
        // again; the others keep their prediction untouched. The index settles most rows:
        // in it with the same fingerprint, unchanged; with another, changed (its old
        // fingerprint is what the write must find). Rows it does not know are read back and
        // compared with the fingerprint in their value.
        let mut before: Vec<Expected> = vec![Expected::Value(None); keys.len()];
        let changed: Vec<usize> = match known {
            None => (0..keys.len()).collect(),
            Some(known) => {
                let known = known.await;
                let mut changed = Vec::new();
                let mut unknown = Vec::new();
                for i in 0..keys.len() {
                    match known.get(&id_hashes[i]) {
                        Some(&old) if old == fingerprints[i] => self.settled += 1,
                        Some(&old) => {
                            self.settled += 1;
                            before[i] = Expected::Fingerprint(old);
                            changed.push(i);
                        }
                        None => unknown.push(i),
                    }
                }
                if !unknown.is_empty() {
                    let unknown_keys: Vec<String> =
                        unknown.iter().map(|&i| keys[i].clone()).collect();
                    let values = self.writer.read(&unknown_keys).await.map_err(|source| {
                        BatchError::Redis {
                            during: "reading the published predictions",
                            source,
                        }
                    })?;
                    for (&i, value) in unknown.iter().zip(values) {
                        if value.as_deref().and_then(CachedPrediction::fingerprint)
                            != Some(fingerprints[i])
                        {
                            changed.push(i);
                        }
                        before[i] = Expected::Value(value);
                    }
                }
                changed.sort_unstable();
                changed
            }
        };
        self.carried += (keys.len() - changed.len()) as u64;
        if changed.is_empty() {
            return Ok(());
        }
        let width = self.features_per_row;
        let mut features = Vec::with_capacity(changed.len() * width);
        for &i in &changed {
            features.extend_from_slice(&converted.rows[i * width..(i + 1) * width]);
        }
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
        let computed_at_ms = self.computed_at_ms;
        let entries: Vec<(String, Vec<u8>)> = changed
            .iter()
            .zip(&predictions)
            .map(|(&i, &value)| {
                let encoded = CachedPrediction {
                    value,
                    computed_at_ms,
                }
                .encode_with_fingerprint(fingerprints[i]);
                (keys[i].clone(), encoded.to_vec())
            })
            .collect();
        let expected: Vec<Expected> = changed.iter().map(|&i| before[i].clone()).collect();
        let ids: Vec<String> = changed.iter().map(|&i| converted.ids[i].clone()).collect();
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ModelError::Run("writer closed".into()))?;
        let writer = Arc::clone(&self.writer);
        self.writes.spawn(async move {
            let previous = writer
                .write(&entries)
                .await
                .map_err(|source| BatchError::Redis {
                    during: "writing predictions",
                    source,
                })?;
            drop(permit);
            for (((id, (_, value)), was), expected) in
                ids.iter().zip(&entries).zip(previous).zip(expected)
            {
                if conflicts(was.as_deref(), &expected, value) {
                    return Err(BatchError::Duplicate {
                        id: id.clone(),
                        file,
                        row_group,
                    });
                }
            }
            Ok(entries.len() as u64)
        });
        Ok(())
    }
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
