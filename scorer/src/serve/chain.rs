//! The lookup chain: memory → Redis (batch generation + cached real-time, one round trip) →
//! real-time inference → the configured default, inside the latency budget.
//!
//! Rules, in the order they apply:
//! - A memory entry younger than `cache.memory.ttl` answers at once (`source: memory`).
//! - Redis: of the serving generation's batch prediction (ignored when older than
//!   `maxStaleness`, but remembered) and the cached real-time one, the newer answers.
//!   Redis gets at most [`REDIS_SHARE`] of the budget, so a slow Redis leaves time to compute.
//! - A miss is computed once per entity however many requests wait for it (single-flight),
//!   through the micro-batcher, from the row [`super::features`] assembles. The result is
//!   remembered and written back with `realtimeTTL`, unless it was scored on filled-in
//!   features because the online store could not be read: a degraded prediction is served,
//!   marked, but never cached.
//! - When computing fails (budget spent, queue full, model error, features missing under the
//!   `fallback` policy), a stale batch prediction is served marked `stale`, else the default,
//!   else there is no answer (HTTP 503). Every answer lists what degraded it.
//! - In the split topology's cache role, a miss is computed by the compute tier
//!   ([`super::remote`]) instead of a local model; a cold or unreachable compute tier
//!   degrades to the stale batch prediction or the default, marked `compute_unavailable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_crds::keys::{CachedPrediction, now_ms};
use millrace_crds::spec::MissingFeaturePolicy;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::activity::ActivitySampler;
use super::batcher::{Coming, InferError, MicroBatcher};
use super::memory::{MemoryTier, Origin, Remembered};
use super::metrics::Metrics;
use super::remote::{RemoteCompute, RemoteError};
use super::settings::ServeSettings;
use super::singleflight::SingleFlight;
use super::store::RedisTier;
use super::traffic::TrafficCounter;

/// The share of the latency budget one Redis call may use.
pub const REDIS_SHARE: f64 = 0.4;

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This pod's memory.
    Memory,
    /// A batch prediction from Redis.
    Batch,
    /// A real-time prediction, cached in Redis or computed for this request.
    Realtime,
    /// The configured default.
    Default,
}

impl Source {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Batch => "batch",
            Source::Realtime => "realtime",
            Source::Default => "default",
        }
    }
}

/// Why an answer is not the best the chain can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Degradation {
    /// Redis failed, timed out, or its circuit is open.
    RedisUnavailable,
    /// The latency budget ran out before real-time inference answered.
    LatencyBudget,
    /// The inference queue was full.
    Overloaded,
    /// The model failed.
    ModelError,
    /// Some input had no value (filled, or the cause of a fallback).
    MissingFeatures,
    /// The split topology's compute tier is cold (scaled to zero), unreachable or slow.
    ComputeUnavailable,
}

impl Degradation {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Degradation::RedisUnavailable => "redis_unavailable",
            Degradation::LatencyBudget => "latency_budget",
            Degradation::Overloaded => "overloaded",
            Degradation::ModelError => "model_error",
            Degradation::MissingFeatures => "missing_features",
            Degradation::ComputeUnavailable => "compute_unavailable",
        }
    }
}

/// One prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The value.
    pub value: f32,
    /// The tier that answered.
    pub source: Source,
    /// When the value was computed (none for the default).
    pub computed_at_ms: Option<u64>,
    /// A batch prediction past `maxStaleness`, served because recomputing failed.
    pub stale: bool,
    /// What degraded the answer, if anything.
    pub degraded: Vec<Degradation>,
    /// Whether a cache tier answered (a hit) rather than a computation or the default.
    pub hit: bool,
}

/// No tier could answer and no default is configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Unanswered {
    /// What went wrong on the way.
    pub degraded: Vec<Degradation>,
}

#[derive(Debug, Clone, Copy)]
struct Computed {
    prediction: CachedPrediction,
    /// Scored with fill values because the online store could not be read: do not cache.
    degraded_features: bool,
    /// Some input was filled (store readable, value absent): the defined fill policy.
    filled: bool,
}

/// What computes a miss.
pub enum Engine {
    /// The model in this pod, through the micro-batcher (unified and compute roles).
    Local(MicroBatcher),
    /// The split topology's compute tier, over HTTP (the cache role).
    Remote(RemoteCompute),
}

/// The online path's core, shared by every request.
pub struct Scorer {
    settings: ServeSettings,
    memory: MemoryTier,
    redis: Arc<RedisTier>,
    engine: Engine,
    flights: SingleFlight<Result<Computed, Degradation>>,
    metrics: Arc<Metrics>,
    /// Per model input, in order: how often it was filled for lack of a value.
    missing_by_input: Vec<Counter>,
    traffic: Arc<TrafficCounter>,
    activity: Arc<ActivitySampler>,
}

impl Scorer {
    /// Assembles the chain.
    pub fn new(
        settings: ServeSettings,
        redis: Arc<RedisTier>,
        engine: Engine,
        metrics: Arc<Metrics>,
        traffic: Arc<TrafficCounter>,
        activity: Arc<ActivitySampler>,
    ) -> Self {
        let memory = MemoryTier::new(settings.memory_entries, settings.memory_ttl);
        let missing_by_input = metrics.missing_feature_counters(settings.features.inputs());
        Self {
            settings,
            memory,
            redis,
            engine,
            flights: SingleFlight::default(),
            metrics,
            missing_by_input,
            traffic,
            activity,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ServeSettings {
        &self.settings
    }

    /// The micro-batcher (the v2 protocol's raw tensors go straight to it); none in the
    /// cache role, which has no model.
    pub fn batcher(&self) -> Option<&MicroBatcher> {
        match &self.engine {
            Engine::Local(batcher) => Some(batcher),
            Engine::Remote(_) => None,
        }
    }

    /// Answers one entity (`id` already validated). `supplied` feature values are used if
    /// the entity is scored in real time.
    pub async fn predict(
        &self,
        id: &str,
        supplied: &HashMap<String, f32>,
    ) -> Result<Answer, Unanswered> {
        self.predict_announced(id, supplied, None).await
    }

    /// Announces a prediction that may need the model, before its lookups: a batch request
    /// announces all its ids at once, so the micro-batcher waits for each of them (or for
    /// its lookup to answer it) instead of running the first misses alone. `None` where
    /// the model is remote.
    pub fn announce(&self) -> Option<Coming> {
        match &self.engine {
            Engine::Local(batcher) => Some(batcher.expect()),
            Engine::Remote(_) => None,
        }
    }

    /// [`Scorer::predict`] for a prediction announced as `coming` ([`Scorer::announce`]).
    pub async fn predict_announced(
        &self,
        id: &str,
        supplied: &HashMap<String, f32>,
        coming: Option<Coming>,
    ) -> Result<Answer, Unanswered> {
        let started = Instant::now();
        let deadline = started + self.settings.latency_budget;
        self.activity.record(id);
        let result = self.chain(id, supplied, deadline, coming).await;
        let source = match &result {
            Ok(answer) => answer.source.as_str(),
            Err(_) => "none",
        };
        self.metrics.answered(source, started.elapsed());
        match &result {
            Ok(answer) if answer.hit => self.traffic.hit(),
            _ => {
                self.traffic.miss();
                self.metrics.cache_miss();
            }
        }
        result
    }

    async fn chain(
        &self,
        id: &str,
        supplied: &HashMap<String, f32>,
        deadline: Instant,
        coming: Option<Coming>,
    ) -> Result<Answer, Unanswered> {
        if let Some(remembered) = self.memory.get(id) {
            self.metrics.lookup("memory", true);
            return Ok(Answer {
                value: remembered.prediction.value,
                source: Source::Memory,
                computed_at_ms: Some(remembered.prediction.computed_at_ms),
                stale: false,
                degraded: Vec::new(),
                hit: true,
            });
        }
        if self.memory.enabled() {
            self.metrics.lookup("memory", false);
        }

        let mut degraded = Vec::new();
        let mut stale_batch = None;
        match self.redis.lookup(id, self.redis_timeout(deadline)).await {
            Ok(found) => {
                let now = now_ms();
                let stale = found
                    .batch_age(now)
                    .is_some_and(|age| age > self.settings.max_staleness);
                let fresh_batch = match found.batch {
                    Some(b) if stale => {
                        stale_batch = Some(b);
                        None
                    }
                    other => other,
                };
                let best = match (fresh_batch, found.realtime) {
                    (Some(b), Some(r)) if r.computed_at_ms > b.computed_at_ms => {
                        Some((r, Origin::Realtime))
                    }
                    (Some(b), _) => Some((b, Origin::Batch)),
                    (None, Some(r)) => Some((r, Origin::Realtime)),
                    (None, None) => None,
                };
                self.metrics.lookup("redis", best.is_some());
                if let Some((prediction, origin)) = best {
                    self.memory.insert(id, Remembered { prediction, origin });
                    return Ok(Answer {
                        value: prediction.value,
                        source: match origin {
                            Origin::Batch => Source::Batch,
                            Origin::Realtime => Source::Realtime,
                        },
                        computed_at_ms: Some(prediction.computed_at_ms),
                        stale: false,
                        degraded,
                        hit: true,
                    });
                }
            }
            Err(_) => degraded.push(Degradation::RedisUnavailable),
        }

        let computed = if supplied.is_empty() {
            self.flights
                .run(id, move || async move {
                    // A flight for this entity may have finished between this request's
                    // memory miss and now: take its answer rather than compute again.
                    match self.memory.get(id) {
                        Some(remembered) => Ok(Computed {
                            prediction: remembered.prediction,
                            degraded_features: false,
                            filled: false,
                        }),
                        None => self.compute(id, supplied, deadline, coming).await,
                    }
                })
                .await
                .0
        } else {
            // Caller-supplied values make this computation the caller's own: not shared.
            self.compute(id, supplied, deadline, coming).await
        };
        match computed {
            Ok(computed) => {
                if computed.degraded_features {
                    push_once(&mut degraded, Degradation::RedisUnavailable);
                }
                if computed.degraded_features || computed.filled {
                    push_once(&mut degraded, Degradation::MissingFeatures);
                }
                Ok(Answer {
                    value: computed.prediction.value,
                    source: Source::Realtime,
                    computed_at_ms: Some(computed.prediction.computed_at_ms),
                    stale: false,
                    degraded,
                    hit: false,
                })
            }
            Err(reason) => {
                self.metrics.inference_failed(reason.as_str());
                push_once(&mut degraded, reason);
                if let Some(batch) = stale_batch {
                    self.metrics.stale_served();
                    return Ok(Answer {
                        value: batch.value,
                        source: Source::Batch,
                        computed_at_ms: Some(batch.computed_at_ms),
                        stale: true,
                        degraded,
                        hit: false,
                    });
                }
                match self.settings.fallback {
                    Some(value) => {
                        self.metrics.default_served(reason.as_str());
                        Ok(Answer {
                            value,
                            source: Source::Default,
                            computed_at_ms: None,
                            stale: false,
                            degraded,
                            hit: false,
                        })
                    }
                    None => Err(Unanswered { degraded }),
                }
            }
        }
    }

    /// Scores `id` in real time.
    async fn compute(
        &self,
        id: &str,
        supplied: &HashMap<String, f32>,
        deadline: Instant,
        coming: Option<Coming>,
    ) -> Result<Computed, Degradation> {
        let batcher = match &self.engine {
            Engine::Local(batcher) => batcher,
            Engine::Remote(remote) => {
                return self.compute_remotely(remote, id, supplied, deadline).await;
            }
        };
        let coming = coming.unwrap_or_else(|| batcher.expect());
        let plan = &self.settings.features;
        let mut store_failed = false;
        let online = match plan.online_key(id) {
            Some(key) if !plan.fully_supplied(supplied) => {
                if Instant::now() >= deadline {
                    return Err(Degradation::LatencyBudget);
                }
                match self
                    .redis
                    .online_features(&key, plan.online_fields(), self.redis_timeout(deadline))
                    .await
                {
                    Ok(values) => values,
                    Err(_) => {
                        store_failed = true;
                        Vec::new()
                    }
                }
            }
            _ => Vec::new(),
        };
        let assembled = plan.assemble(supplied, &online, jiff::Timestamp::now());
        for &index in &assembled.missing {
            if let Some(counter) = self.missing_by_input.get(index) {
                counter.inc();
            }
        }
        if !assembled.missing.is_empty() && plan.policy() == MissingFeaturePolicy::Fallback {
            return Err(Degradation::MissingFeatures);
        }
        if Instant::now() >= deadline {
            return Err(Degradation::LatencyBudget);
        }
        let values = batcher
            .infer_expected(coming, assembled.row, deadline)
            .await
            .map_err(|e| match e {
                InferError::Overloaded => Degradation::Overloaded,
                InferError::Timeout => Degradation::LatencyBudget,
                InferError::Model(_) | InferError::Stopped => Degradation::ModelError,
            })?;
        let value = values.first().copied().ok_or(Degradation::ModelError)?;
        let computed = Computed {
            prediction: CachedPrediction::now(value),
            degraded_features: store_failed && !assembled.missing.is_empty(),
            filled: !assembled.missing.is_empty(),
        };
        // Remembered before the single flight ends, so a request arriving just after it
        // finds the answer instead of computing it again.
        if !computed.degraded_features {
            self.memory.insert(
                id,
                Remembered {
                    prediction: computed.prediction,
                    origin: Origin::Realtime,
                },
            );
            self.redis
                .write_back(id, computed.prediction, self.settings.realtime_ttl);
        }
        Ok(computed)
    }

    /// Has the compute tier score `id`. It writes the prediction back to Redis itself; this
    /// pod only remembers it.
    async fn compute_remotely(
        &self,
        remote: &RemoteCompute,
        id: &str,
        supplied: &HashMap<String, f32>,
        deadline: Instant,
    ) -> Result<Computed, Degradation> {
        let answer = remote
            .score(id, supplied, deadline)
            .await
            .map_err(|e| match e {
                RemoteError::Timeout => Degradation::LatencyBudget,
                RemoteError::Overloaded => Degradation::Overloaded,
                RemoteError::Unavailable(_) | RemoteError::NotComputed(_) => {
                    Degradation::ComputeUnavailable
                }
            })?;
        let computed = Computed {
            prediction: CachedPrediction {
                value: answer.value,
                computed_at_ms: answer.computed_at_ms,
            },
            degraded_features: false,
            filled: answer.degraded,
        };
        if !answer.degraded {
            self.memory.insert(
                id,
                Remembered {
                    prediction: computed.prediction,
                    origin: Origin::Realtime,
                },
            );
        }
        Ok(computed)
    }

    /// How long the next Redis call may take: its share of the budget, within what is left.
    fn redis_timeout(&self, deadline: Instant) -> Duration {
        let share = self.settings.latency_budget.mul_f64(REDIS_SHARE);
        deadline
            .saturating_duration_since(Instant::now())
            .min(share)
    }
}

fn push_once(degraded: &mut Vec<Degradation>, reason: Degradation) {
    if !degraded.contains(&reason) {
        degraded.push(reason);
    }
}
