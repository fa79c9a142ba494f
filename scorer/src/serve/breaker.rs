//! A circuit breaker for Redis: after a run of failures, stop calling it for a while and
//! answer from the other tiers, then let one probe through to see whether it came back.
//!
//! The state machine is pure (time is passed in) so every transition is unit-tested; the
//! scorer wraps it in a mutex held for nanoseconds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the breaker looks like from outside (also the `circuit_state` gauge's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed = 0,
    /// Calls are refused until the cool-down ends.
    Open = 1,
    /// One probe call is allowed; its outcome closes or re-opens the circuit.
    HalfOpen = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

/// The breaker's rules.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long it stays open before a probe.
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_millis(500),
        }
    }
}

/// A thread-safe circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    state: Mutex<State>,
}

/// What a state change means for the caller (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The circuit just opened.
    Opened,
    /// The circuit just closed again.
    Closed,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update of a Copy value: the value
        // is still a valid state, so keep using it.
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Whether a call may go through at `now`. In half-open, only one probe at a time; a
    /// probe whose caller vanished without reporting is replaced after the cool-down.
    pub fn allow(&self, now: Instant) -> bool {
        let open_for = self.policy.open_for;
        self.with_state(|state| match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { probe_started: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probe_started } if now.duration_since(probe_started) >= open_for => {
                *state = State::HalfOpen { probe_started: now };
                true
            }
            State::HalfOpen { .. } => false,
        })
    }

    /// Reports a successful call.
    pub fn record_success(&self) -> Transition {
        self.with_state(|state| {
            let was_closed = matches!(state, State::Closed { .. });
            *state = State::Closed { failures: 0 };
            if was_closed {
                Transition::None
            } else {
                Transition::Closed
            }
        })
    }

    /// Reports a failed call at `now`.
    pub fn record_failure(&self, now: Instant) -> Transition {
        let policy = self.policy;
        self.with_state(|state| match *state {
            State::Closed { failures } if failures + 1 >= policy.failure_threshold => {
                *state = State::Open {
                    until: now + policy.open_for,
                };
                Transition::Opened
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                Transition::None
            }
            State::HalfOpen { .. } => {
                *state = State::Open {
                    until: now + policy.open_for,
                };
                Transition::Opened
            }
            // A call admitted before the circuit opened failed late: the circuit stays open.
            State::Open { .. } => Transition::None,
        })
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.with_state(|state| match state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerPolicy {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(b.record_failure(t), Transition::None);
        assert_eq!(b.record_failure(t), Transition::None);
        assert_eq!(
            b.record_success(),
            Transition::None,
            "a success resets the run"
        );
        assert_eq!(b.record_failure(t), Transition::None);
        assert_eq!(b.record_failure(t), Transition::None);
        assert!(b.allow(t));
        assert_eq!(b.record_failure(t), Transition::Opened);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t + Duration::from_millis(999)));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record_failure(t);
        }
        let later = t + Duration::from_secs(1);
        assert!(b.allow(later), "the probe");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(!b.allow(later), "only one probe at a time");
        assert_eq!(
            b.record_failure(later),
            Transition::Opened,
            "failed probe re-opens"
        );
        assert!(!b.allow(later + Duration::from_millis(500)));

        let again = later + Duration::from_secs(1);
        assert!(b.allow(again));
        assert_eq!(b.record_success(), Transition::Closed);
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow(again));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_cool_down() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record_failure(t);
        }
        let probe = t + Duration::from_secs(1);
        assert!(b.allow(probe));
        assert!(!b.allow(probe + Duration::from_millis(999)));
        assert!(
            b.allow(probe + Duration::from_secs(1)),
            "the first probe never reported"
        );
    }

    #[test]
    fn late_failures_do_not_extend_an_open_circuit() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record_failure(t);
        }
        assert_eq!(
            b.record_failure(t + Duration::from_millis(900)),
            Transition::None
        );
        assert!(b.allow(t + Duration::from_secs(1)));
    }
}
