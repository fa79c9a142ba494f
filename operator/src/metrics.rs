//! Prometheus metrics of the operator, under the `millrace_operator` prefix.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The bounded label of a failure (see `Error::metric_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why the reconcile failed.
    pub reason: &'static str,
}

/// One InferenceDeployment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The operator's metrics.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    reconciles: Counter,
    failures: Family<ReasonLabel, Counter>,
    duration: Histogram,
    leader: Gauge,
    desired_replicas: Family<ResourceLabel, Gauge>,
    replicas: Family<ResourceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("millrace_operator");
        let reconciles = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        // 5 ms to ~20 s: apply round trips to a slow API server fit in.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.005, 2.0, 12,
        ));
        let leader = Gauge::default();
        let desired_replicas = Family::<ResourceLabel, Gauge>::default();
        let replicas = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "autoscaler_desired_replicas",
            "Scorer replicas the autoscaler asked for, per InferenceDeployment",
            desired_replicas.clone(),
        );
        registry.register(
            "autoscaler_replicas",
            "Scorer replicas running, per InferenceDeployment",
            replicas.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            desired_replicas,
            replicas,
        }
    }
}

impl Metrics {
    /// Counts a finished reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile by reason.
    pub fn failed(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records the autoscaler's desired and the running replicas of one resource.
    pub fn set_replicas(&self, namespace: &str, name: &str, desired: i32, running: i32) {
        let label = ResourceLabel {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.desired_replicas
            .get_or_create(&label)
            .set(i64::from(desired));
        self.replicas.get_or_create(&label).set(i64::from(running));
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}
