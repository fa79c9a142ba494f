//! The scoring stage of a batch shard: for each decoded batch (every row of a full run; in
//! an incremental run only the rows the fingerprint index did not find unchanged), settle
//! what is still unknown, run the model on what changed, and hand the writes to Redis
//! pipelines in flight.
//!
//! Rows the index does not know are read back as soon as their batch arrives and compared
//! only [`READ_AHEAD`] batches later, so those reads overlap decoding. A row group's new
//! index is written once the group is decoded and all its prediction writes are
//! acknowledged ([`IndexGate`]).

use std::collections::VecDeque;
use std::sync::Arc;

use millrace_crds::keys::{BatchKeys, CachedPrediction, Keyspace};
use redis::RedisError;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::BatchError;
use super::decode::DecodedBatch;
use super::index::{self, IndexGate};
use super::writer::{PredictionWriter, Previous};
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

/// The read of the stored values of rows the index did not know.
type ValuesRead = JoinHandle<Result<Vec<Previous>, RedisError>>;

/// One decoded batch waiting to be scored, with the read of its unknown rows in flight.
struct Prepared {
    batch: DecodedBatch,
    /// The rows whose expectation is unknown, and the read of their values.
    reading: Option<(Vec<usize>, ValuesRead)>,
}

/// What a finished write task did: the row group its predictions belong to (none for an
/// index write) and how many predictions it wrote.
type WriteDone = (Option<Group>, u64);

/// The shard's scoring and writing state.
pub struct Scoring {
    model: Arc<Model>,
    writer: Arc<PredictionWriter>,
    /// Bounds the pipelines in flight.
    permits: Arc<Semaphore>,
    /// The time every prediction of this run carries.
    computed_at_ms: u64,
    queue: VecDeque<Prepared>,
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
}

impl Scoring {
    /// A scoring stage.
    pub fn new(
        model: Arc<Model>,
        writer: Arc<PredictionWriter>,
        writes_in_flight: usize,
        computed_at_ms: u64,
        index: IndexPlace,
    ) -> Self {
        Self {
            model,
            writer,
            permits: Arc::new(Semaphore::new(writes_in_flight.max(1))),
            computed_at_ms,
            queue: VecDeque::new(),
            writes: JoinSet::new(),
            index,
            gate: IndexGate::default(),
            written: 0,
            carried: 0,
            settled: 0,
        }
    }

    /// Queues a decoded batch (starting the read of rows it cannot settle yet) and scores
    /// the oldest queued batch once more than [`READ_AHEAD`] wait.
    pub async fn push(&mut self, batch: DecodedBatch) -> Result<(), BatchError> {
        self.carried += batch.unchanged;
        self.settled += batch.settled;
        if batch.keys.is_empty() {
            return self.reap();
        }
        self.gate.opened(batch.group);
        let unknown: Vec<usize> = (0..batch.expected.len())
            .filter(|&i| batch.expected[i].is_none())
            .collect();
        let reading = (!unknown.is_empty()).then(|| {
            let keys: Vec<String> = unknown.iter().map(|&i| batch.keys[i].clone()).collect();
            let writer = Arc::clone(&self.writer);
            let read = tokio::spawn(async move { writer.read(&keys).await });
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

    /// Every batch of `group` has been pushed; `pairs` is its new index, written once the
    /// group's predictions are.
    pub fn group_done(&mut self, group: Group, pairs: Vec<(u64, u64)>) -> Result<(), BatchError> {
        if let Some(ready) = self.gate.decoded(group, pairs) {
            self.write_index(ready);
        }
        self.reap()
    }

    /// Scores everything queued and waits for every write (and the indexes they release).
    pub async fn finish(&mut self) -> Result<(), BatchError> {
        while let Some(oldest) = self.queue.pop_front() {
            self.score(oldest).await?;
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

    /// Adds a finished write's predictions (releasing its group's index when it was the
    /// group's last), or fails with its error.
    fn count(
        &mut self,
        done: Result<Result<WriteDone, BatchError>, tokio::task::JoinError>,
    ) -> Result<(), BatchError> {
        let (group, written) =
            done.map_err(|e| ModelError::Run(format!("a write task failed: {e}")))??;
        self.written += written;
        if let Some(ready) = group.and_then(|group| self.gate.closed(group)) {
            self.write_index(ready);
        }
        Ok(())
    }

    /// Writes the new index of a row group whose predictions are all in Redis.
    fn write_index(&mut self, ((file, row_group), pairs): (Group, Vec<(u64, u64)>)) {
        let key = self
            .index
            .keyspace
            .fingerprint_index(&self.index.generation, file, row_group);
        let writer = Arc::clone(&self.writer);
        self.writes.spawn(async move {
            writer
                .set_with_ttl(&key, index::encode(&pairs))
                .await
                .map_err(|source| BatchError::Redis {
                    during: "writing the fingerprint index",
                    source,
                })?;
            Ok((None, 0))
        });
    }

    async fn score(&mut self, prepared: Prepared) -> Result<(), BatchError> {
        let Prepared { batch, reading } = prepared;
        let DecodedBatch {
            features,
            keys,
            fingerprints,
            mut expected,
            file,
            group,
            ..
        } = batch;
        // Rows the index did not know: compared with the fingerprint in their stored value.
        let mut unchanged = vec![false; keys.len()];
        if let Some((unknown, read)) = reading {
            let values = read
                .await
                .map_err(|e| ModelError::Run(format!("a read task failed: {e}")))?
                .map_err(|source| BatchError::Redis {
                    during: "reading the published predictions",
                    source,
                })?;
            for (i, value) in unknown.into_iter().zip(values) {
                unchanged[i] = value.as_deref().and_then(CachedPrediction::fingerprint)
                    == Some(fingerprints[i]);
                expected[i] = Some(Expected::Value(value));
            }
        }
        let changed: Vec<usize> = (0..keys.len()).filter(|&i| !unchanged[i]).collect();
        self.carried += (keys.len() - changed.len()) as u64;
        if changed.is_empty() {
            if let Some(ready) = self.gate.closed(group) {
                self.write_index(ready);
            }
            return Ok(());
        }
        let width = self.model.features();
        let features = if changed.len() == keys.len() {
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
        let expected: Vec<Expected> = changed
            .iter()
            .map(|&i| expected[i].take().unwrap_or(Expected::Value(None)))
            .collect();
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ModelError::Run("writer closed".into()))?;
        let writer = Arc::clone(&self.writer);
        // Keys expected absent (a full run's) need no old value back unless one is there.
        let all_new = expected.iter().all(|e| *e == Expected::Value(None));
        self.writes.spawn(async move {
            let written = if all_new {
                writer.write_new(&entries).await
            } else {
                writer.write(&entries).await
            };
            let previous = written.map_err(|source| BatchError::Redis {
                during: "writing predictions",
                source,
            })?;
            drop(permit);
            for (((key, value), was), expected) in entries.iter().zip(previous).zip(expected) {
                if conflicts(was.as_deref(), &expected, value) {
                    return Err(BatchError::Duplicate {
                        id: BatchKeys::id_of(key).unwrap_or(key).to_string(),
                        file,
                        row_group: group.1,
                    });
                }
            }
            Ok((Some(group), entries.len() as u64))
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
