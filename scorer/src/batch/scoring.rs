//! The scoring stage of a batch shard: for each converted record batch, find what needs
//! scoring (everything, or in an incremental run the rows whose fingerprint changed), run
//! the model, and hand the writes to Redis pipelines in flight.
//!
//! Reading the published values for an incremental run is started as soon as a batch is
//! converted and awaited only [`READ_AHEAD`] batches later, so Redis reads overlap decoding
//! instead of alternating with it.

use std::collections::VecDeque;
use std::sync::Arc;

use millrace_crds::keys::{CachedPrediction, features_fingerprint};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::BatchError;
use super::convert::Converted;
use super::writer::{PredictionWriter, Previous};
use crate::model::{Model, ModelError};

/// Converted batches whose reads may be in flight before the oldest is scored.
pub const READ_AHEAD: usize = 4;

/// One converted batch waiting to be scored.
pub struct Prepared {
    converted: Converted,
    fingerprints: Vec<u64>,
    keys: Vec<String>,
    before: Option<JoinHandle<Result<Vec<Previous>, redis::RedisError>>>,
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
    /// Predictions written so far.
    pub written: u64,
    /// Entities left as they were.
    pub carried: u64,
}

impl Scoring {
    /// A scoring stage.
    pub fn new(
        model: Arc<Model>,
        writer: Arc<PredictionWriter>,
        writes_in_flight: usize,
        computed_at_ms: u64,
        incremental: bool,
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
            written: 0,
            carried: 0,
        }
    }

    /// Queues `converted` (keys already chosen) and scores the oldest queued batch once
    /// more than [`READ_AHEAD`] wait.
    pub async fn push(
        &mut self,
        converted: Converted,
        keys: Vec<String>,
        file: String,
        row_group: usize,
    ) -> Result<(), BatchError> {
        let fingerprints = converted
            .rows
            .chunks(self.features_per_row)
            .map(features_fingerprint)
            .collect();
        let before = self.incremental.then(|| {
            let writer = Arc::clone(&self.writer);
            let keys = keys.clone();
            tokio::spawn(async move { writer.read(&keys).await })
        });
        self.queue.push_back(Prepared {
            converted,
            fingerprints,
            keys,
            before,
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

    /// Scores everything queued and waits for every write.
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

    /// Adds a finished write's predictions, or fails with its error.
    fn count(
        &mut self,
        done: Result<Result<u64, BatchError>, tokio::task::JoinError>,
    ) -> Result<(), BatchError> {
        self.written +=
            done.map_err(|e| ModelError::Run(format!("a write task failed: {e}")))??;
        Ok(())
    }

    async fn score(&mut self, prepared: Prepared) -> Result<(), BatchError> {
        let Prepared {
            converted,
            fingerprints,
            keys,
            before,
            file,
            row_group,
        } = prepared;
        let before: Vec<Previous> = match before {
            Some(read) => read
                .await
                .map_err(|e| ModelError::Run(format!("a read task failed: {e}")))?
                .map_err(|source| BatchError::Redis {
                    during: "reading the published predictions",
                    source,
                })?,
            None => vec![None; keys.len()],
        };
        // In place, only rows whose features changed since they were scored are scored
        // again; the others keep their prediction untouched.
        let changed: Vec<usize> = (0..keys.len())
            .filter(|&i| {
                !self.incremental
                    || before[i].as_deref().and_then(CachedPrediction::fingerprint)
                        != Some(fingerprints[i])
            })
            .collect();
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
        let expected: Vec<Previous> = changed.iter().map(|&i| before[i].clone()).collect();
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
                if conflicts(was.as_deref(), expected.as_deref(), value) {
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

/// Whether a write's previous value `was` shows another row of this run wrote the key:
/// not when it held nothing, what this run read before (an in-place update), or the same
/// prediction (a retried shard).
pub fn conflicts(was: Option<&[u8]>, expected: Option<&[u8]>, value: &[u8]) -> bool {
    let Some(was) = was else { return false };
    if Some(was) == expected {
        return false;
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
        assert!(!conflicts(None, None, &new), "a fresh key");
        assert!(
            !conflicts(Some(&value(0.5, 1)), None, &new),
            "a retry: same prediction, other time"
        );
        assert!(
            conflicts(Some(&value(0.7, 1)), None, &new),
            "another row of this run"
        );
        let read = value(0.1, 0);
        assert!(
            !conflicts(Some(&read), Some(&read), &new),
            "the value an in-place update replaces"
        );
        assert!(conflicts(Some(&value(0.7, 1)), Some(&read), &new));
        assert!(!conflicts(Some(b"garbage"), None, &new));
    }
}
