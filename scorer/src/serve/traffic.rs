//! Windowed hit/miss counts: counted per request, published to Redis once per window as a
//! compact record ([`TrafficWindow`]) the operator's autoscaler reads directly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use millrace_crds::keys::now_ms;
use millrace_crds::traffic::TrafficWindow;

/// Hits and misses since the last window closed.
#[derive(Debug, Default)]
pub struct TrafficCounter {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl TrafficCounter {
    /// One request answered from a cache tier.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// One request that needed a real-time computation.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Closes the window that lasted `window`, returning its counts and starting the next.
    pub fn close_window(&self, window: Duration) -> TrafficWindow {
        TrafficWindow {
            end_ms: now_ms(),
            window_ms: u32::try_from(window.as_millis()).unwrap_or(u32::MAX),
            hits: self.hits.swap(0, Ordering::Relaxed),
            misses: self.misses.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_takes_the_counts_and_starts_from_zero() {
        let counter = TrafficCounter::default();
        for _ in 0..7 {
            counter.hit();
        }
        counter.miss();
        let w = counter.close_window(Duration::from_secs(5));
        assert_eq!((w.hits, w.misses, w.window_ms), (7, 1, 5_000));
        let next = counter.close_window(Duration::from_secs(5));
        assert_eq!((next.hits, next.misses), (0, 0));
    }
}
