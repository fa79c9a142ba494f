//! Single-flight: concurrent misses on one entity compute once and share the answer.
//!
//! The first caller for a key runs the computation; callers arriving while it runs wait for
//! the same result. If the running caller gives up (its request timed out), a waiting caller
//! takes over, so nobody waits on a computation that no one is driving.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Deduplicates concurrent computations by key.
pub struct SingleFlight<V> {
    calls: Mutex<HashMap<Arc<str>, Arc<OnceCell<V>>>>,
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> SingleFlight<V> {
    /// Runs `compute` for `key` unless a run for it is in flight, and returns the result and
    /// whether it came from another caller's run.
    pub async fn run<F, Fut>(&self, key: &str, compute: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut calls = self
                .calls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            calls.entry(Arc::from(key)).or_default().clone()
        };
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                compute()
            })
            .await
            .clone();
        // The call is over: the next miss on this key computes afresh. Only remove the cell
        // this call used, never a newer one.
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if calls.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            calls.remove(key);
        }
        (value, !ran)
    }

    /// Keys with a computation in flight.
    pub fn in_flight(&self) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_calls_for_one_key_compute_once() {
        let flights = Arc::new(SingleFlight::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let calls = (0..50).map(|_| {
            let flights = flights.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                flights
                    .run("user_1", || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            })
        });
        let results = futures::future::join_all(calls).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let shared = results
            .iter()
            .filter(|r| matches!(r, Ok((7, true))))
            .count();
        assert_eq!(shared, 49);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn different_keys_and_later_calls_compute_again() {
        let flights = SingleFlight::<u32>::default();
        assert_eq!(flights.run("a", || async { 1 }).await, (1, false));
        assert_eq!(flights.run("b", || async { 2 }).await, (2, false));
        assert_eq!(flights.run("a", || async { 3 }).await, (3, false));
    }

    #[tokio::test]
    async fn a_waiter_takes_over_when_the_runner_gives_up() {
        let flights = Arc::new(SingleFlight::<u32>::default());
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(20),
                    flights.run("k", || async {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        1
                    }),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = flights.run("k", || async { 2 }).await;
        assert!(
            first.await.expect("join").is_err(),
            "the first caller timed out"
        );
        assert_eq!(second.0, 2);
    }
}
