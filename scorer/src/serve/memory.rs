//! The in-process tier: predictions this pod answered recently, bounded in entries and time.
//!
//! Backed by `moka` (TinyLFU admission with LRU eviction, so a scan of one-off ids does not
//! flush the hot set) with a time-to-live. Disabled when `cache.memory.maxEntries` is 0.

use std::sync::Arc;
use std::time::Duration;

use millrace_crds::keys::CachedPrediction;
use moka::sync::Cache;

/// Where a remembered prediction first came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A batch generation.
    Batch,
    /// A real-time computation.
    Realtime,
}

/// One remembered prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remembered {
    /// The prediction and when it was computed.
    pub prediction: CachedPrediction,
    /// Where it came from.
    pub origin: Origin,
}

/// The memory tier.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Option<Cache<Arc<str>, Remembered>>,
}

impl MemoryTier {
    /// A tier of at most `entries` entries kept for `ttl`; `entries == 0` disables it.
    pub fn new(entries: u64, ttl: Duration) -> Self {
        let cache = (entries > 0 && !ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(entries)
                .time_to_live(ttl)
                .build()
        });
        Self { cache }
    }

    /// The remembered prediction of `id`, if any and not expired.
    pub fn get(&self, id: &str) -> Option<Remembered> {
        self.cache.as_ref()?.get(id)
    }

    /// Remembers `id`'s prediction.
    pub fn insert(&self, id: &str, remembered: Remembered) {
        if let Some(cache) = &self.cache {
            cache.insert(Arc::from(id), remembered);
        }
    }

    /// Whether the tier is on.
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: f32) -> Remembered {
        Remembered {
            prediction: CachedPrediction::now(value),
            origin: Origin::Batch,
        }
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let tier = MemoryTier::new(100, Duration::from_millis(50));
        tier.insert("a", entry(0.5));
        assert_eq!(tier.get("a").map(|r| r.prediction.value), Some(0.5));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(tier.get("a"), None);
    }

    #[test]
    fn the_tier_is_bounded_and_can_be_off() {
        let tier = MemoryTier::new(10, Duration::from_secs(60));
        for i in 0..1_000 {
            tier.insert(&format!("id{i}"), entry(i as f32));
        }
        if let Some(cache) = &tier.cache {
            cache.run_pending_tasks();
            assert!(cache.entry_count() <= 10, "{} entries", cache.entry_count());
        }
        let off = MemoryTier::new(0, Duration::from_secs(60));
        off.insert("a", entry(1.0));
        assert!(!off.enabled());
        assert_eq!(off.get("a"), None);
    }
}
