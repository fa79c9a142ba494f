//! The autoscaling decision: replicas from the cache-miss rate, with the HPA's semantics.
//! Pure (time and observations are passed in), so every rule is unit-tested on a table.
//!
//! 1. **Signal**: the traffic windows the scorer pods publish to Redis. A window older than
//!    three of its own lengths (or the sync period, if longer) is stale and ignored.
//! 2. **Raw recommendation**: `ceil(misses/s of all pods / targetMissesPerReplica)`.
//! 3. **Tolerance**: when misses per current replica are within `tolerancePercent` of the
//!    target, keep the current count (no churn on noise).
//! 4. **Missing data never scales down**: if fewer pods reported fresh windows than there
//!    are replicas, the recommendation is at least the current count; with no data at all
//!    the count is kept.
//! 5. **Scale-up limit** per sync period: at most double, or four more, whichever is larger
//!    (the HPA's default policy).
//! 6. **Scale-down stabilization**: the highest recommendation within the window, so a
//!    brief dip (or an oscillating input) does not remove replicas.
//! 7. **Bounds**: `minReplicas..=maxReplicas`.

use std::collections::VecDeque;
use std::time::Duration;

use millrace_crds::spec::AutoscalingSpec;
use millrace_crds::spec::duration;
use millrace_crds::traffic::TrafficWindow;

/// The autoscaling rules of one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Misses per second one replica should serve.
    pub target_misses_per_replica: f64,
    /// Relative band around the target that causes no change (0.1 = ±10%).
    pub tolerance: f64,
    /// How often the decision runs.
    pub sync_period: Duration,
    /// How far back scale-down looks for a higher recommendation.
    pub stabilization: Duration,
    /// What one replica absorbs `target_misses_per_replica` of.
    pub signal: Signal,
}

/// The load a tier scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signal {
    /// Cache misses per second: what costs model time (unified scorers, the compute tier).
    #[default]
    Misses,
    /// Requests per second: what the split topology's cache tier answers.
    Requests,
}

impl Policy {
    /// The policy `spec` declares (its durations are validated by the API server; a value
    /// that still fails to parse falls back to the default).
    pub fn from_spec(spec: &AutoscalingSpec) -> Self {
        let parse = |text: &str, default: Duration| duration::parse(text).unwrap_or(default);
        Self {
            min_replicas: spec.min_replicas.max(0),
            max_replicas: spec.max_replicas.max(spec.min_replicas).max(1),
            target_misses_per_replica: f64::from(spec.target_misses_per_replica.max(1)),
            tolerance: f64::from(spec.tolerance_percent.clamp(0, 100)) / 100.0,
            sync_period: parse(&spec.sync_period, Duration::from_secs(15)),
            stabilization: parse(&spec.scale_down_stabilization, Duration::from_secs(300)),
            signal: Signal::Misses,
        }
    }

    /// The split topology's cache tier: the same semantics on requests per second, within
    /// `spec.cacheTier`'s bounds.
    pub fn cache_tier(spec: &AutoscalingSpec) -> Self {
        let tier = &spec.cache_tier;
        Self {
            min_replicas: tier.min_replicas.max(1),
            max_replicas: tier.max_replicas.max(tier.min_replicas).max(1),
            target_misses_per_replica: f64::from(tier.target_requests_per_replica.max(1)),
            signal: Signal::Requests,
            ..Self::from_spec(spec)
        }
    }
}

/// Recent recommendations, for scale-down stabilization (kept in memory by the operator,
/// like the HPA's; a restarted operator starts with an empty window, so it cannot scale
/// down before a full window has passed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recommendations {
    entries: VecDeque<(u64, i32)>,
}

/// Why the decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No pod reported fresh data: replicas kept.
    NoData,
    /// Within the tolerance band: replicas kept.
    WithinTolerance,
    /// Some replicas did not report: no scale-down.
    PartialData,
    /// Scaling up, possibly limited per period.
    ScaleUp,
    /// Scaling down, after stabilization.
    ScaleDown,
    /// A higher recommendation in the stabilization window holds replicas.
    Stabilizing,
    /// The recommendation equals the current count.
    Steady,
}

/// The outcome of one sync.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to run.
    pub desired: i32,
    /// Why.
    pub reason: Reason,
    /// Misses per second over the fresh windows, all pods together.
    pub misses_per_second: Option<f64>,
    /// Share of requests answered from cache over the fresh windows, 0-1.
    pub hit_rate: Option<f64>,
    /// Pods with fresh data.
    pub reporting: usize,
}

/// Decides the replica count at `now_ms` for a Deployment at `current` replicas whose own
/// pods publish the traffic windows.
pub fn decide(
    policy: &Policy,
    current: i32,
    windows: &[TrafficWindow],
    now_ms: u64,
    history: &mut Recommendations,
) -> Decision {
    decide_reported(policy, current, current, windows, now_ms, history)
}

/// [`decide`] when `reporters` pods (not necessarily the scaled ones) publish the windows:
/// the split topology's compute tier is sized on what its cache tier saw. Fewer fresh
/// windows than `reporters` never lets the count fall.
pub fn decide_reported(
    policy: &Policy,
    current: i32,
    reporters: i32,
    windows: &[TrafficWindow],
    now_ms: u64,
    history: &mut Recommendations,
) -> Decision {
    let fresh = fresh_windows(policy, windows, now_ms);
    let clamp = |n: i32| n.clamp(policy.min_replicas, policy.max_replicas);
    if fresh.is_empty() {
        let desired = clamp(current);
        history.push(now_ms, desired, policy.stabilization);
        return Decision {
            desired,
            reason: Reason::NoData,
            misses_per_second: None,
            hit_rate: None,
            reporting: 0,
        };
    }
    let misses: f64 = fresh.iter().map(|w| w.misses_per_second()).sum();
    let requests: f64 = fresh.iter().map(|w| w.requests_per_second()).sum();
    let hit_rate = (requests > 0.0).then(|| 1.0 - misses / requests);
    let reporting = fresh.len();

    let load = match policy.signal {
        Signal::Misses => misses,
        Signal::Requests => requests,
    };
    let per_replica = load / f64::from(current.max(1));
    let ratio = per_replica / policy.target_misses_per_replica;
    let (mut recommendation, mut reason) = if current > 0 && (ratio - 1.0).abs() <= policy.tolerance
    {
        (current, Reason::WithinTolerance)
    } else {
        let raw = (load / policy.target_misses_per_replica).ceil() as i32;
        (raw, Reason::Steady)
    };
    if (reporting as i32) < reporters && recommendation < current {
        recommendation = current;
        reason = Reason::PartialData;
    }
    recommendation = clamp(recommendation);

    let desired = if recommendation > current {
        let limit = (current * 2).max(current + 4);
        reason = Reason::ScaleUp;
        recommendation.min(limit)
    } else if recommendation < current {
        let held = history
            .highest_since(now_ms, policy.stabilization)
            .unwrap_or(current);
        let stabilized = recommendation.max(held.min(current));
        reason = if stabilized < current {
            Reason::ScaleDown
        } else {
            Reason::Stabilizing
        };
        stabilized
    } else {
        recommendation
    };
    history.push(now_ms, recommendation, policy.stabilization);
    Decision {
        desired: clamp(desired),
        reason,
        misses_per_second: Some(misses),
        hit_rate,
        reporting,
    }
}

/// The windows recent enough to act on: younger than three of their own lengths, or the
/// sync period if that is longer.
pub fn fresh_windows<'a>(
    policy: &Policy,
    windows: &'a [TrafficWindow],
    now_ms: u64,
) -> Vec<&'a TrafficWindow> {
    windows
        .iter()
        .filter(|w| {
            let max_age = Duration::from_millis(u64::from(w.window_ms) * 3).max(policy.sync_period);
            !w.is_stale(now_ms, max_age)
        })
        .collect()
}

impl Recommendations {
    /// Records that `replicas` were kept at `now_ms` for lack of data, so that a window of
    /// silence still counts as holding the count when data returns.
    pub fn hold(&mut self, now_ms: u64, replicas: i32, policy: &Policy) {
        self.push(now_ms, replicas, policy.stabilization);
    }

    fn push(&mut self, now_ms: u64, recommendation: i32, keep: Duration) {
        self.entries.push_back((now_ms, recommendation));
        let horizon = now_ms.saturating_sub(keep.as_millis() as u64);
        while self.entries.front().is_some_and(|(at, _)| *at < horizon) {
            self.entries.pop_front();
        }
    }

    fn highest_since(&self, now_ms: u64, window: Duration) -> Option<i32> {
        let horizon = now_ms.saturating_sub(window.as_millis() as u64);
        self.entries
            .iter()
            .filter(|(at, _)| *at >= horizon)
            .map(|(_, r)| *r)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNC: u64 = 15_000;

    fn policy() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 20,
            target_misses_per_replica: 100.0,
            tolerance: 0.1,
            sync_period: Duration::from_millis(SYNC),
            stabilization: Duration::from_secs(60),
            signal: Signal::Misses,
        }
    }

    /// `pods` fresh 5-second windows at `now` sharing `misses_per_second` (and as many hits).
    fn windows(pods: usize, misses_per_second: f64, now: u64) -> Vec<TrafficWindow> {
        (0..pods)
            .map(|_| TrafficWindow {
                end_ms: now,
                window_ms: 5_000,
                hits: (misses_per_second * 5.0 / pods as f64) as u64,
                misses: (misses_per_second * 5.0 / pods as f64) as u64,
            })
            .collect()
    }

    /// Runs one sync per row: (misses/s, pods reporting) → expected replicas after it.
    fn run(rows: &[(f64, usize, i32)], start: i32) {
        let p = policy();
        let mut history = Recommendations::default();
        let mut current = start;
        for (step, &(misses, pods, want)) in rows.iter().enumerate() {
            let now = 1_000_000 + step as u64 * SYNC;
            let d = decide(&p, current, &windows(pods, misses, now), now, &mut history);
            assert_eq!(
                d.desired, want,
                "step {step}: {misses}/s from {pods} pods at {current} -> {d:?}"
            );
            current = d.desired;
        }
    }

    #[test]
    fn steady_load_keeps_replicas() {
        run(&[(300.0, 3, 3), (300.0, 3, 3), (310.0, 3, 3)], 3);
    }

    #[test]
    fn a_spike_scales_up_within_the_per_period_limit() {
        // 2,000 misses/s wants 20; from 2 the limit is max(4, 2+4) = 6, then 12, then 20.
        run(
            &[
                (2_000.0, 2, 6),
                (2_000.0, 6, 12),
                (2_000.0, 12, 20),
                (2_000.0, 20, 20),
            ],
            2,
        );
    }

    #[test]
    fn a_drop_scales_down_only_after_the_stabilization_window() {
        // 60 s window, 15 s syncs: the 800/s recommendation holds replicas for 4 more syncs.
        run(
            &[
                (800.0, 8, 8),
                (100.0, 8, 8),
                (100.0, 8, 8),
                (100.0, 8, 8),
                (100.0, 8, 8),
                (100.0, 8, 1),
            ],
            8,
        );
    }

    #[test]
    fn noise_inside_the_tolerance_changes_nothing() {
        run(
            &[(405.0, 4, 4), (395.0, 4, 4), (438.0, 4, 4), (362.0, 4, 4)],
            4,
        );
    }

    #[test]
    fn oscillating_input_does_not_flap() {
        // Up fast, down never within the window: no replica is added and removed in turn.
        run(
            &[
                (500.0, 2, 5),
                (100.0, 5, 5),
                (500.0, 5, 5),
                (100.0, 5, 5),
                (500.0, 5, 5),
            ],
            2,
        );
    }

    #[test]
    fn missing_or_stale_data_never_scales_down() {
        let p = policy();
        let mut history = Recommendations::default();
        let now = 10_000_000;
        // Two of five pods report a trickle: the silent three may be busy.
        let d = decide(&p, 5, &windows(2, 10.0, now), now, &mut history);
        assert_eq!((d.desired, d.reason), (5, Reason::PartialData));
        // Nobody reports (metrics cut): keep.
        let d = decide(&p, 5, &[], now, &mut history);
        assert_eq!((d.desired, d.reason), (5, Reason::NoData));
        // Only stale windows (a minute old): the same as none.
        let d = decide(&p, 5, &windows(5, 0.0, now - 60_000), now, &mut history);
        assert_eq!((d.desired, d.reason), (5, Reason::NoData));
        // Missing data still allows scaling up.
        let d = decide(&p, 5, &windows(2, 1_000.0, now), now, &mut history);
        assert_eq!((d.desired, d.reason), (10, Reason::ScaleUp));
    }

    #[test]
    fn silence_counts_as_holding_for_the_stabilization_window() {
        let p = policy();
        let mut history = Recommendations::default();
        let t0 = 1_000_000;
        assert_eq!(
            decide(&p, 8, &windows(8, 800.0, t0), t0, &mut history).desired,
            8
        );
        // Metrics cut for two minutes (longer than the 60 s window), the count held.
        for step in 1..=8 {
            history.hold(t0 + step * SYNC, 8, &p);
        }
        // Data returns, low: the recent holds keep the replicas for a window.
        let back = t0 + 9 * SYNC;
        let d = decide(&p, 8, &windows(8, 100.0, back), back, &mut history);
        assert_eq!((d.desired, d.reason), (8, Reason::Stabilizing));
    }

    #[test]
    fn bounds_and_rates_are_reported() {
        let p = Policy {
            min_replicas: 2,
            max_replicas: 3,
            ..policy()
        };
        let mut history = Recommendations::default();
        let now = 5_000_000;
        let d = decide(&p, 2, &windows(2, 5_000.0, now), now, &mut history);
        assert_eq!(d.desired, 3);
        assert_eq!(d.misses_per_second, Some(5_000.0));
        assert_eq!(d.hit_rate, Some(0.5));
        assert_eq!(d.reporting, 2);
        let d = decide(&p, 1, &[], now, &mut history);
        assert_eq!(d.desired, 2, "below the minimum is raised to it");
    }

    #[test]
    fn the_cache_tier_scales_on_requests_and_the_compute_tier_wakes_from_zero() {
        let spec = AutoscalingSpec {
            min_replicas: 0,
            ..AutoscalingSpec::default()
        };
        let now = 9_000_000;
        // 5,000 misses/s of 10,000 requests/s, reported by 2 cache pods.
        let traffic = windows(2, 5_000.0, now);
        let cache = Policy::cache_tier(&spec);
        assert_eq!(cache.signal, Signal::Requests);
        let d = decide(&cache, 2, &traffic, now, &mut Recommendations::default());
        assert_eq!(d.desired, 5, "10,000 requests/s at 2,000 per replica");
        // The compute tier at zero replicas: the first misses wake it (up to the step limit).
        let compute = Policy::from_spec(&spec);
        let d = decide_reported(
            &compute,
            0,
            2,
            &traffic,
            now,
            &mut Recommendations::default(),
        );
        assert_eq!((d.desired, d.reason), (4, Reason::ScaleUp));
        // Busy (150 misses/s: one replica), then the misses stop: it sleeps at zero once a
        // whole stabilization window has passed without a miss.
        let window = |at: u64, misses: u64| TrafficWindow {
            end_ms: at,
            window_ms: 5_000,
            hits: 10_000,
            misses,
        };
        let mut history = Recommendations::default();
        let mut replicas =
            decide_reported(&compute, 1, 1, &[window(now, 750)], now, &mut history).desired;
        assert_eq!(replicas, 1);
        for sync in 1..=24u64 {
            let at = now + sync * SYNC;
            replicas =
                decide_reported(&compute, replicas, 1, &[window(at, 0)], at, &mut history).desired;
            if sync * SYNC < 300_000 {
                assert_eq!(replicas, 1, "held through the stabilization window");
            }
        }
        assert_eq!(
            replicas, 0,
            "asleep once misses stopped for the whole window"
        );
        let later = now + 25 * SYNC;
        let quiet = [TrafficWindow {
            end_ms: later,
            window_ms: 5_000,
            hits: 10_000,
            misses: 0,
        }];
        // A cache pod that did not report never lets the compute tier shrink.
        let mut history = Recommendations::default();
        let d = decide_reported(&compute, 3, 2, &quiet[..1], later, &mut history);
        assert_eq!((d.desired, d.reason), (3, Reason::PartialData));
    }

    #[test]
    fn the_policy_comes_from_the_spec() {
        let p = Policy::from_spec(&AutoscalingSpec::default());
        assert_eq!(p.sync_period, Duration::from_secs(15));
        assert_eq!(p.stabilization, Duration::from_secs(300));
        assert_eq!(p.tolerance, 0.1);
        assert_eq!((p.min_replicas, p.max_replicas), (1, 10));
    }
}
