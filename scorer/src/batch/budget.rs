//! A byte budget the decoders of a shard share, waited on rather than exceeded. Two are
//! kept:
//!
//! - **The spool disk** ([`super::decode::Spool`]), within `batch.scratchBytes` (the pod's
//!   `/tmp` limit, `spec.batch.scratchSize`): a decoder reserves a row group's bytes before
//!   it spools the group. A shard checks at start that each of its groups fits on its own
//!   ([`Budget::fits`]), and fails naming the group if one does not, since the pod would
//!   otherwise be evicted for its disk.
//! - **Decoding memory** (`--decode-memory`): a decoder reserves what decoding a row group
//!   is estimated to hold ([`super::input::Input::decode_bytes`]) before it reads the group.
//!   A group wider than the whole budget takes all of it and is decoded alone, so a table of
//!   hundreds of features is decoded one group at a time instead of running out of memory.
//!
//! Either way a reservation is freed once its group is decoded, and the peak reserved (bytes
//! and groups) is reported, which is what to size the budget by.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations count in KiB: a semaphore holds at most `usize::MAX >> 3` permits and one
/// reservation takes at most `u32::MAX`, so bytes would not do beyond 4 GiB.
const UNIT: u64 = 1024;

/// Bytes the decoders of a shard share.
#[derive(Debug)]
pub struct Budget {
    limit: Option<u64>,
    units: Option<Arc<Semaphore>>,
    in_use: AtomicU64,
    peak: AtomicU64,
    holders: AtomicU64,
    peak_holders: AtomicU64,
}

/// Bytes reserved until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
    _units: Option<OwnedSemaphorePermit>,
}

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl Budget {
    /// At most `limit` bytes at once (`None`: no limit, only counted).
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        let units = limit.map(|limit| {
            let total = usize::try_from(units(limit)).unwrap_or(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(total.clamp(1, Semaphore::MAX_PERMITS)))
        });
        Arc::new(Self {
            limit,
            units,
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            holders: AtomicU64::new(0),
            peak_holders: AtomicU64::new(0),
        })
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether `bytes` fit in the budget at all.
    pub fn fits(&self, bytes: u64) -> bool {
        self.limit.is_none_or(|limit| bytes <= limit)
    }

    /// Reserves `bytes`, waiting while others hold the rest. More than the whole budget
    /// takes all of it (waiting until nobody else holds any), since it would otherwise wait
    /// forever.
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
        let holders = self.holders.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_holders.fetch_max(holders, Ordering::SeqCst);
        Reservation {
            budget: Arc::clone(self),
            bytes,
            _units: permit,
        }
    }

    /// The most bytes reserved at once so far (as asked for, even where one reservation
    /// asked for more than the limit).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// The most reservations held at once so far.
    pub fn peak_holders(&self) -> u64 {
        self.peak_holders.load(Ordering::SeqCst)
    }
}

/// The units of `bytes`, never more than the limit's (at least one).
fn units_within(bytes: u64, limit: Option<u64>) -> u32 {
    units(limit.map_or(bytes, |limit| bytes.min(limit))).max(1)
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
        self.budget.holders.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reservation of `bytes` on a task of its own, to see whether it waits.
    fn reserve_later(budget: &Arc<Budget>, bytes: u64) -> tokio::task::JoinHandle<Reservation> {
        let budget = Arc::clone(budget);
        tokio::spawn(async move { budget.reserve(bytes).await })
    }

    /// Whether `reservation` is still waiting once the others have had 20 ms to let it in.
    async fn still_waiting(reservation: &tokio::task::JoinHandle<Reservation>) -> bool {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        !reservation.is_finished()
    }

    #[tokio::test]
    async fn reservations_wait_for_room_and_the_peak_is_kept() {
        let budget = Budget::new(Some(10_000));
        assert!(budget.fits(10_000) && !budget.fits(10_001));
        let first = budget.reserve(6_000).await;
        let waiting = reserve_later(&budget, 6_000);
        assert!(still_waiting(&waiting).await, "12,000 bytes would not fit");
        drop(first);
        let second = waiting.await.expect("reserved once the first is freed");
        assert_eq!(budget.peak(), 6_000);
        drop(second);

        let unlimited = Budget::new(None);
        let (_a, _b) = (
            unlimited.reserve(6_000).await,
            unlimited.reserve(6_000).await,
        );
        assert_eq!(unlimited.peak(), 12_000);
        assert!(unlimited.fits(u64::MAX));
    }

    #[tokio::test]
    async fn more_than_the_budget_waits_for_all_of_it_and_holders_are_counted() {
        let budget = Budget::new(Some(10_000));
        let small = budget.reserve(1_000).await;
        let wide = reserve_later(&budget, 50_000);
        assert!(
            still_waiting(&wide).await,
            "a group wider than the budget waits until nobody else holds any"
        );
        drop(small);
        let wide = wide.await.expect("reserved alone");
        let after = reserve_later(&budget, 1_000);
        assert!(
            still_waiting(&after).await,
            "and nobody else starts while it holds it"
        );
        drop(wide);
        drop(after.await.expect("reserved once the wide one is freed"));
        assert_eq!(budget.peak_holders(), 1, "never two at once");

        let unlimited = Budget::new(None);
        let (_a, _b) = (
            unlimited.reserve(50_000).await,
            unlimited.reserve(50_000).await,
        );
        assert_eq!(unlimited.peak_holders(), 2);
    }
}
