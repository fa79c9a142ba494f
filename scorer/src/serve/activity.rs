//! The activity sample `warm` reads: which entities are requested most, kept cheaply.
//!
//! One request in `every` is counted in a small in-process map (bounded: once it holds
//! `max_ids` entities, only those already in it are counted until the next flush). Each
//! traffic window the map is flushed into the hour's sorted set in Redis
//! ([`millrace_crds::keys::Keyspace::activity`]) with `ZINCRBY`, which expires after a few
//! hours: recent hours summed give the most active entities, and old activity fades out
//! without any rewrite.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Samples requested entity ids.
pub struct ActivitySampler {
    every: u64,
    max_ids: usize,
    seen: AtomicU64,
    counts: Mutex<HashMap<String, u32>>,
}

impl ActivitySampler {
    /// Counts one request in `every` (0 turns sampling off), at most `max_ids` distinct ids
    /// per flush.
    pub fn new(every: u64, max_ids: usize) -> Self {
        Self {
            every,
            max_ids,
            seen: AtomicU64::new(0),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Notes a request for `id`.
    pub fn record(&self, id: &str) {
        if self.every == 0
            || !self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
        {
            return;
        }
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = counts.len() < self.max_ids;
        match counts.get_mut(id) {
            Some(count) => *count += 1,
            None if room => {
                counts.insert(id.to_string(), 1);
            }
            None => {}
        }
    }

    /// Takes the counts gathered since the last call.
    pub fn drain(&self) -> Vec<(String, u32)> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *counts).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_every_is_counted_and_the_map_is_bounded() {
        let sampler = ActivitySampler::new(2, 2);
        for id in ["a", "a", "a", "a", "b", "b", "c", "c"] {
            sampler.record(id);
        }
        let mut counts = sampler.drain();
        counts.sort();
        assert_eq!(
            counts,
            vec![("a".into(), 2), ("b".into(), 1)],
            "c found the map full"
        );
        assert!(sampler.drain().is_empty());
        let off = ActivitySampler::new(0, 10);
        off.record("a");
        assert!(off.drain().is_empty());
    }
}
