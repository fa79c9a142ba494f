//! The local disk a shard spools row groups to ([`super::decode::Spool`]), within
//! `batch.scratchBytes` (the pod's `/tmp` limit, `spec.batch.scratchSize`): a decoder
//! reserves a row group's bytes before it spools the group and frees them once the group is
//! decoded, waiting while the others hold too much, so the pod is never evicted for its
//! disk. A shard checks at start that each of its groups fits on its own
//! ([`Scratch::fits`]); a reservation could otherwise wait forever. The peak reserved is
//! reported either way, which is what to size `scratchSize` by.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations count in KiB: a semaphore holds at most `usize::MAX >> 3` permits and one
/// reservation takes at most `u32::MAX`, so bytes would not do beyond 4 GiB.
const UNIT: u64 = 1024;

/// The shard's spool space.
#[derive(Debug)]
pub struct Scratch {
    limit: Option<u64>,
    units: Option<Arc<Semaphore>>,
    in_use: AtomicU64,
    peak: AtomicU64,
}

/// Bytes reserved until dropped.
#[derive(Debug)]
pub struct Reservation {
    scratch: Arc<Scratch>,
    bytes: u64,
    _units: Option<OwnedSemaphorePermit>,
}

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl Scratch {
    /// Space for at most `limit` bytes at once (`None`: no limit).
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        let units = limit.map(|limit| {
            let total = usize::try_from(units(limit)).unwrap_or(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS)))
        });
        Arc::new(Self {
            limit,
            units,
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether a group of `bytes` can be spooled at all.
    pub fn fits(&self, bytes: u64) -> bool {
        self.limit.is_none_or(|limit| bytes <= limit)
    }

    /// Reserves `bytes` (which must [`Scratch::fits`]), waiting while others hold the rest.
    pub async fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        let permit = match &self.units {
            // Never closed, so acquiring only waits.
            Some(units) => Arc::clone(units)
                .acquire_many_owned(units_within(bytes, self.limit))
                .await
                .ok(),
            None => None,
        };
        let now = self.in_use.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Reservation {
            scratch: Arc::clone(self),
            bytes,
            _units: permit,
        }
    }

    /// The most bytes reserved at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// The units of `bytes`, never more than the limit's (a group that does not fit would wait
/// forever; the shard refuses it at start).
fn units_within(bytes: u64, limit: Option<u64>) -> u32 {
    units(limit.map_or(bytes, |limit| bytes.min(limit)))
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.scratch.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_the_peak_is_kept() {
        let scratch = Scratch::new(Some(10_000));
        assert!(scratch.fits(10_000) && !scratch.fits(10_001));
        let first = scratch.reserve(6_000).await;
        let waiting = {
            let scratch = Arc::clone(&scratch);
            tokio::spawn(async move { scratch.reserve(6_000).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "12,000 bytes would not fit");
        drop(first);
        let second = waiting.await.expect("reserved once the first is freed");
        assert_eq!(scratch.peak(), 6_000);
        drop(second);

        let unlimited = Scratch::new(None);
        let (_a, _b) = (
            unlimited.reserve(6_000).await,
            unlimited.reserve(6_000).await,
        );
        assert_eq!(unlimited.peak(), 12_000);
        assert!(unlimited.fits(u64::MAX));
    }
}
