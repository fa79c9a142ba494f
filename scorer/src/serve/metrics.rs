//! Prometheus metrics of the scorer, under the `millrace_scorer` prefix.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label with one bounded value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// memory, batch, realtime or default (or none, for a request nothing answered).
    pub source: &'static str,
}

/// Hits and misses of one tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    /// memory or redis.
    pub tier: &'static str,
    /// hit or miss.
    pub result: &'static str,
}

/// A bounded reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// A Redis operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// lookup, features, write_back, generation, traffic.
    pub operation: &'static str,
}

/// A model input (bounded by the model's inputs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabel {
    /// The input's name.
    pub feature: String,
}

/// The model in use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// The model version.
    pub version: String,
    /// The execution provider that loaded it.
    pub provider: String,
}

/// The scorer's metrics.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    requests: Family<SourceLabel, Counter>,
    misses: Counter,
    latency: Family<SourceLabel, Histogram>,
    lookups: Family<LookupLabel, Counter>,
    batch_rows: Histogram,
    inference_failures: Family<ReasonLabel, Counter>,
    redis_errors: Family<OperationLabel, Counter>,
    circuit_state: Gauge,
    defaults: Family<ReasonLabel, Counter>,
    stale: Counter,
    missing_features: Family<FeatureLabel, Counter>,
    corrupt_values: Counter,
    rejected: Family<ReasonLabel, Counter>,
    model: Family<ModelLabel, Gauge>,
    latency_budget: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("millrace_scorer");
        let requests = Family::<SourceLabel, Counter>::default();
        let misses = Counter::default();
        registry.register(
            "cache_misses",
            "Requests no cache tier answered (the autoscaling signal)",
            misses.clone(),
        );
        // 50 µs to ~1.6 s: memory hits sit at the bottom, budget-bound misses near the top.
        let latency = Family::<SourceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        let lookups = Family::<LookupLabel, Counter>::default();
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        let inference_failures = Family::<ReasonLabel, Counter>::default();
        let redis_errors = Family::<OperationLabel, Counter>::default();
        let circuit_state = Gauge::default();
        let defaults = Family::<ReasonLabel, Counter>::default();
        let stale = Counter::default();
        let missing_features = Family::<FeatureLabel, Counter>::default();
        let corrupt_values = Counter::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let model = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "requests",
            "Predictions answered, by the tier that answered",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer one prediction, by the tier that answered",
            latency.clone(),
        );
        registry.register(
            "cache_lookups",
            "Cache lookups by tier and result",
            lookups.clone(),
        );
        registry.register(
            "microbatch_rows",
            "Rows per real-time ONNX run",
            batch_rows.clone(),
        );
        registry.register(
            "realtime_failures",
            "Real-time inferences that produced nothing, by reason",
            inference_failures.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis calls that failed or timed out, by operation",
            redis_errors.clone(),
        );
        registry.register(
            "redis_circuit_state",
            "The Redis circuit breaker: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        registry.register(
            "defaults_served",
            "Answers that were the configured default, by reason",
            defaults.clone(),
        );
        registry.register(
            "stale_served",
            "Batch predictions served past maxStaleness because recomputing failed",
            stale.clone(),
        );
        registry.register(
            "missing_features",
            "Real-time rows with an input no source supplied, by input",
            missing_features.clone(),
        );
        registry.register(
            "corrupt_values",
            "Cached values that could not be decoded (treated as misses)",
            corrupt_values.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused with a 4xx, by reason",
            rejected.clone(),
        );
        registry.register(
            "model_info",
            "1 for the loaded model version and the execution provider in use",
            model.clone(),
        );
        // The chart's MillraceLatencyOverBudget alert compares the p99 with this, so one rule
        // serves every resource with its own budget.
        let latency_budget = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "latency_budget_seconds",
            "spec.serving.latencyBudget of this scorer's InferenceDeployment",
            latency_budget.clone(),
        );
        Self {
            registry,
            requests,
            misses,
            latency,
            lookups,
            batch_rows,
            inference_failures,
            redis_errors,
            circuit_state,
            defaults,
            stale,
            missing_features,
            corrupt_values,
            rejected,
            model,
            latency_budget,
        }
    }
}

impl Metrics {
    /// One prediction answered by `source` in `elapsed`.
    pub fn answered(&self, source: &'static str, elapsed: Duration) {
        let label = SourceLabel { source };
        self.requests.get_or_create(&label).inc();
        self.latency
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    /// A request no cache tier answered.
    pub fn cache_miss(&self) {
        self.misses.inc();
    }

    /// A lookup in `tier` that hit or missed.
    pub fn lookup(&self, tier: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.lookups
            .get_or_create(&LookupLabel { tier, result })
            .inc();
    }

    /// One micro-batch of `rows` rows.
    pub fn observe_batch(&self, rows: usize) {
        self.batch_rows.observe(rows as f64);
    }

    /// A real-time inference that failed for `reason`.
    pub fn inference_failed(&self, reason: &'static str) {
        self.inference_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A Redis call that failed.
    pub fn redis_error(&self, operation: &'static str) {
        self.redis_errors
            .get_or_create(&OperationLabel { operation })
            .inc();
    }

    /// The breaker's state.
    pub fn circuit(&self, state: super::breaker::CircuitState) {
        self.circuit_state.set(state as i64);
    }

    /// A default answer.
    pub fn default_served(&self, reason: &'static str) {
        self.defaults.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A stale batch prediction served.
    pub fn stale_served(&self) {
        self.stale.inc();
    }

    /// The counters of inputs filled for lack of a value, one per input in `inputs`' order,
    /// for the scorer to keep: a miss with every feature absent counts one per input, and
    /// looking each series up by name per count (a string allocated, a lock taken) was 2.5%
    /// of the scorer's CPU under such misses. Created now, so every input's series is
    /// exported from zero.
    pub fn missing_feature_counters(&self, inputs: &[String]) -> Vec<Counter> {
        inputs
            .iter()
            .map(|feature| {
                self.missing_features
                    .get_or_create(&FeatureLabel {
                        feature: feature.clone(),
                    })
                    .clone()
            })
            .collect()
    }

    /// An undecodable cached value.
    pub fn corrupt_value(&self) {
        self.corrupt_values.inc();
    }

    /// A request refused with a 4xx.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records the model in use.
    pub fn model_loaded(&self, version: &str, provider: &str) {
        self.model
            .get_or_create(&ModelLabel {
                version: version.to_string(),
                provider: provider.to_string(),
            })
            .set(1);
    }

    /// Records the latency budget the scorer answers within.
    pub fn set_latency_budget(&self, budget: Duration) {
        self.latency_budget.set(budget.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_e2e::metric_names::{missing, referenced};

    #[test]
    fn the_charts_alerts_and_dashboard_read_only_exported_scorer_metrics() {
        // A family appears in the exposition once it has a series: record one of each.
        let metrics = Metrics::default();
        metrics.answered("batch", Duration::from_millis(1));
        metrics.cache_miss();
        metrics.lookup("redis", true);
        metrics.observe_batch(4);
        metrics.inference_failed("model");
        metrics.redis_error("lookup");
        metrics.default_served("latency_budget");
        metrics.stale_served();
        metrics.missing_feature_counters(&["tenure".into()])[0].inc();
        metrics.corrupt_value();
        metrics.rejected("bad_id");
        metrics.model_loaded("3", "cpu");
        metrics.set_latency_budget(Duration::from_millis(100));
        let exposition = metrics.encode().expect("encode");
        let chart = [
            include_str!("../../../charts/millrace/templates/prometheusrule.yaml"),
            include_str!("../../../charts/millrace/files/dashboards/millrace.json"),
        ]
        .concat();
        let names = referenced(&chart, "millrace_scorer_");
        assert!(names.len() >= 8, "{names:?}");
        assert_eq!(
            missing(&names, &exposition),
            Vec::<String>::new(),
            "{exposition}"
        );
    }
}
