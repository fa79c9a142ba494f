//! A trace-driven simulation of scaling strategies, built on the autoscaler's own decision
//! function ([`crate::autoscale::decide`]) and a simple capacity model, to compare GPU
//! replica-hours and minutes over the latency budget. `millrace-simulate` prints the table.
//!
//! The model, per 15-second step of a compressed day:
//! - **Load**: requests/s follow a diurnal curve (night trough at 20% of the peak) with a
//!   spike (3x for 20 minutes in the afternoon); the cache answers `hit_ratio` of them (90%),
//!   less during the spike (new entities: 60%). Misses are what needs a GPU.
//! - **Capacity**: a GPU replica computes `gpu_misses_per_second` misses within the budget
//!   and answers `requests_per_replica` cache hits; a CPU cache replica answers
//!   `requests_per_replica` requests. A minute is **over budget** when, in any of its steps,
//!   the load on the ready replicas exceeds their capacity.
//! - **Start-up**: a new GPU replica is ready `gpu_startup` after the scale-up (model load on
//!   a fresh node); a CPU replica after `cpu_startup`.
//! - **Strategies**: static peak provisioning; request-rate scaling (unified GPU pods, HPA
//!   on requests/s); miss-rate scaling of unified GPU pods; split topology (a CPU cache tier
//!   on requests/s, a GPU compute tier on misses that may sleep at zero: while it is cold the
//!   cache tier answers stale or default, marked, within the budget, and the first misses
//!   wake it).

use std::collections::VecDeque;
use std::time::Duration;

use millrace_crds::traffic::TrafficWindow;

use crate::autoscale::{Policy, Recommendations, decide};

/// Step of the simulation (the default sync period).
pub const STEP: Duration = Duration::from_secs(15);

/// The scenario's knobs.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Peak requests/s of the diurnal curve.
    pub peak_requests: f64,
    /// Share of requests the cache answers outside the spike.
    pub hit_ratio: f64,
    /// Share during the spike.
    pub spike_hit_ratio: f64,
    /// Misses/s one GPU replica computes within the budget.
    pub gpu_misses_per_second: f64,
    /// Requests/s one replica (GPU or CPU) answers from cache within the budget.
    pub requests_per_replica: f64,
    /// Time for a new GPU replica to become ready.
    pub gpu_startup: Duration,
    /// Time for a new CPU replica to become ready.
    pub cpu_startup: Duration,
    /// Hours simulated.
    pub hours: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            peak_requests: 20_000.0,
            hit_ratio: 0.9,
            spike_hit_ratio: 0.6,
            gpu_misses_per_second: 250.0,
            requests_per_replica: 5_000.0,
            gpu_startup: Duration::from_secs(90),
            cpu_startup: Duration::from_secs(20),
            hours: 24,
        }
    }
}

/// Load at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Requests/s.
    pub requests: f64,
    /// Misses/s.
    pub misses: f64,
}

impl Scenario {
    /// The trace: one [`Load`] per step.
    pub fn trace(&self) -> Vec<Load> {
        let steps = self.hours * 3600 / STEP.as_secs();
        (0..steps)
            .map(|i| {
                let hour = i as f64 * STEP.as_secs_f64() / 3600.0;
                // Trough at 04:00, peak at 16:00.
                let phase = (hour - 4.0) / 24.0 * std::f64::consts::TAU;
                let diurnal = 0.6 - 0.4 * phase.cos();
                let spike = (15.0..15.0 + 20.0 / 60.0).contains(&(hour % 24.0));
                let requests = self.peak_requests * diurnal * if spike { 3.0 } else { 1.0 };
                let hits = if spike {
                    self.spike_hit_ratio
                } else {
                    self.hit_ratio
                };
                Load {
                    requests,
                    misses: requests * (1.0 - hits),
                }
            })
            .collect()
    }
}

/// A strategy's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The strategy.
    pub name: &'static str,
    /// GPU replica-hours.
    pub gpu_hours: f64,
    /// CPU replica-hours (the split topology's cache tier).
    pub cpu_hours: f64,
    /// Minutes with load over the ready capacity.
    pub minutes_over_budget: u64,
    /// Minutes simulated.
    pub minutes: u64,
    /// Minutes in which some misses were answered stale or default (compute tier cold).
    pub minutes_degraded: u64,
}

impl Outcome {
    /// Share of minutes over budget, 0-1.
    pub fn over_budget_share(&self) -> f64 {
        self.minutes_over_budget as f64 / self.minutes.max(1) as f64
    }
}

/// Replicas that exist and the times at which pending ones become ready.
struct Pool {
    ready: i32,
    pending: VecDeque<(u64, i32)>,
    startup_steps: u64,
}

impl Pool {
    fn new(replicas: i32, startup: Duration) -> Self {
        Self {
            ready: replicas,
            pending: VecDeque::new(),
            startup_steps: startup.as_secs().div_ceil(STEP.as_secs()),
        }
    }

    fn total(&self) -> i32 {
        self.ready + self.pending.iter().map(|(_, n)| n).sum::<i32>()
    }

    /// Scales to `desired` at `step`: new replicas start, removed ones go at once
    /// (pending first).
    fn scale(&mut self, step: u64, desired: i32) {
        let mut excess = self.total() - desired;
        while excess > 0 {
            match self.pending.back_mut() {
                Some((_, n)) => {
                    let take = (*n).min(excess);
                    *n -= take;
                    excess -= take;
                    if *n == 0 {
                        self.pending.pop_back();
                    }
                }
                None => {
                    self.ready -= excess;
                    excess = 0;
                }
            }
        }
        if excess < 0 {
            self.pending.push_back((step + self.startup_steps, -excess));
        }
    }

    fn tick(&mut self, step: u64) {
        while self.pending.front().is_some_and(|(at, _)| *at <= step) {
            if let Some((_, n)) = self.pending.pop_front() {
                self.ready += n;
            }
        }
    }
}

/// An autoscaler driven by one signal through [`decide`].
struct Scaler {
    policy: Policy,
    history: Recommendations,
}

impl Scaler {
    fn new(min: i32, max: i32, target: f64) -> Self {
        Self {
            policy: Policy {
                min_replicas: min,
                max_replicas: max,
                target_misses_per_replica: target,
                tolerance: 0.1,
                sync_period: STEP,
                stabilization: Duration::from_secs(300),
                signal: crate::autoscale::Signal::Misses,
            },
            history: Recommendations::default(),
        }
    }

    /// The decision for `signal` per second reported by `ready` pods (at least one, so a
    /// tier at zero still hears its first misses: the cache tier forwards them).
    fn desired(&mut self, step: u64, current: i32, ready: i32, signal: f64) -> i32 {
        let now_ms = step * STEP.as_millis() as u64 + 1_000_000;
        let pods = ready.max(1) as u64;
        let per_pod = (signal * STEP.as_secs_f64() / pods as f64).round() as u64;
        let windows: Vec<TrafficWindow> = (0..pods)
            .map(|_| TrafficWindow {
                end_ms: now_ms,
                window_ms: STEP.as_millis() as u32,
                hits: 0,
                misses: per_pod,
            })
            .collect();
        decide(&self.policy, current, &windows, now_ms, &mut self.history).desired
    }
}

fn minutes(trace: &[Load]) -> u64 {
    (trace.len() as u64 * STEP.as_secs()).div_ceil(60)
}

fn step_hours() -> f64 {
    STEP.as_secs_f64() / 3600.0
}

/// Static provisioning for the peak: enough GPU replicas for the highest misses and requests.
pub fn static_peak(s: &Scenario, trace: &[Load]) -> Outcome {
    let need = trace.iter().map(|l| gpu_need(s, l)).max().unwrap_or(1);
    Outcome {
        name: "static peak",
        gpu_hours: f64::from(need) * trace.len() as f64 * step_hours(),
        cpu_hours: 0.0,
        minutes_over_budget: 0,
        minutes: minutes(trace),
        minutes_degraded: 0,
    }
}

/// GPU replicas a step needs in the unified topology (misses and hits both land on them).
fn gpu_need(s: &Scenario, l: &Load) -> i32 {
    let for_misses = (l.misses / s.gpu_misses_per_second).ceil();
    let for_requests = (l.requests / s.requests_per_replica).ceil();
    for_misses.max(for_requests).max(1.0) as i32
}

/// Unified GPU pods scaled on `signal(load)` against `target` per replica.
fn unified(
    s: &Scenario,
    trace: &[Load],
    name: &'static str,
    target: f64,
    signal: impl Fn(&Load) -> f64,
) -> Outcome {
    let mut pool = Pool::new(gpu_need(s, &trace[0]), s.gpu_startup);
    let mut scaler = Scaler::new(1, 1_000, target);
    let mut over = std::collections::BTreeSet::new();
    let mut gpu_hours = 0.0;
    for (step, load) in trace.iter().enumerate() {
        let step = step as u64;
        pool.tick(step);
        let desired = scaler.desired(step, pool.total(), pool.ready, signal(load));
        pool.scale(step, desired);
        let ready = f64::from(pool.ready.max(0));
        if load.misses > ready * s.gpu_misses_per_second
            || load.requests > ready * s.requests_per_replica
        {
            over.insert(step * STEP.as_secs() / 60);
        }
        gpu_hours += f64::from(pool.total()) * step_hours();
    }
    Outcome {
        name,
        gpu_hours,
        cpu_hours: 0.0,
        minutes_over_budget: over.len() as u64,
        minutes: minutes(trace),
        minutes_degraded: 0,
    }
}

/// Request-rate scaling: the HPA on requests/s, as a serving system without a miss signal.
pub fn request_rate(s: &Scenario, trace: &[Load]) -> Outcome {
    // The target that, at the cache's usual hit ratio, keeps misses within GPU capacity.
    let target =
        (s.gpu_misses_per_second * 0.8 / (1.0 - s.hit_ratio)).min(s.requests_per_replica * 0.8);
    unified(s, trace, "request-rate (unified)", target, |l| l.requests)
}

/// Miss-rate scaling of unified pods (hits still need some pods).
pub fn miss_rate_unified(s: &Scenario, trace: &[Load]) -> Outcome {
    let ratio = s.requests_per_replica / s.gpu_misses_per_second;
    // The signal is misses, or hits expressed in miss-equivalents when they need more pods.
    unified(
        s,
        trace,
        "miss-rate (unified)",
        s.gpu_misses_per_second * 0.8,
        move |l| l.misses.max(l.requests / ratio),
    )
}

/// Split topology: a CPU cache tier on requests, a GPU compute tier on misses (min 0).
pub fn split(s: &Scenario, trace: &[Load]) -> Outcome {
    let mut cache = Pool::new(
        (trace[0].requests / s.requests_per_replica).ceil().max(1.0) as i32,
        s.cpu_startup,
    );
    let mut compute = Pool::new(
        (trace[0].misses / s.gpu_misses_per_second).ceil() as i32,
        s.gpu_startup,
    );
    let mut cache_scaler = Scaler::new(1, 1_000, s.requests_per_replica * 0.8);
    let mut compute_scaler = Scaler::new(0, 1_000, s.gpu_misses_per_second * 0.8);
    let mut over = std::collections::BTreeSet::new();
    let mut degraded = std::collections::BTreeSet::new();
    let (mut gpu_hours, mut cpu_hours) = (0.0, 0.0);
    for (step, load) in trace.iter().enumerate() {
        let step = step as u64;
        cache.tick(step);
        compute.tick(step);
        let d = cache_scaler.desired(step, cache.total(), cache.ready, load.requests);
        cache.scale(step, d);
        let d = compute_scaler.desired(step, compute.total(), compute.ready, load.misses);
        compute.scale(step, d);
        let minute = step * STEP.as_secs() / 60;
        if load.requests > f64::from(cache.ready.max(0)) * s.requests_per_replica {
            over.insert(minute);
        }
        if compute.ready == 0 {
            // Cold: misses are answered stale or default by the cache tier, within budget.
            if load.misses > 0.0 {
                degraded.insert(minute);
            }
        } else if load.misses > f64::from(compute.ready) * s.gpu_misses_per_second {
            over.insert(minute);
        }
        gpu_hours += f64::from(compute.total()) * step_hours();
        cpu_hours += f64::from(cache.total()) * step_hours();
    }
    Outcome {
        name: "miss-rate (split)",
        gpu_hours,
        cpu_hours,
        minutes_over_budget: over.len() as u64,
        minutes: minutes(trace),
        minutes_degraded: degraded.len() as u64,
    }
}

/// Every strategy on `scenario`.
pub fn compare(scenario: &Scenario) -> Vec<Outcome> {
    let trace = scenario.trace();
    vec![
        static_peak(scenario, &trace),
        request_rate(scenario, &trace),
        miss_rate_unified(scenario, &trace),
        split(scenario, &trace),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_has_a_trough_a_peak_and_a_spike() {
        let trace = Scenario::default().trace();
        assert_eq!(trace.len(), 24 * 240);
        let max = trace.iter().map(|l| l.requests).fold(0.0, f64::max);
        let min = trace.iter().map(|l| l.requests).fold(f64::MAX, f64::min);
        assert!((min - 4_000.0).abs() < 50.0, "trough {min}");
        assert!(max > 50_000.0, "the spike tops the 20k peak: {max}");
    }

    #[test]
    fn static_peak_is_never_over_budget_and_scaling_costs_less() {
        let outcomes = compare(&Scenario::default());
        let static_peak = &outcomes[0];
        assert_eq!(static_peak.minutes_over_budget, 0);
        for o in &outcomes[1..] {
            assert!(o.gpu_hours < static_peak.gpu_hours, "{o:?}");
        }
    }

    #[test]
    fn pools_start_late_and_stop_at_once() {
        let mut pool = Pool::new(1, Duration::from_secs(30));
        pool.scale(0, 3);
        assert_eq!((pool.ready, pool.total()), (1, 3));
        pool.tick(1);
        assert_eq!(pool.ready, 1);
        pool.tick(2);
        assert_eq!(pool.ready, 3);
        pool.scale(3, 1);
        assert_eq!((pool.ready, pool.total()), (1, 1));
    }
}
