//! Prometheus metrics of the operator, under the `millrace_operator` prefix.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use millrace_crds::status::BatchRunStatus;

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
    in_flight: Gauge,
    leader: Gauge,
    desired_replicas: Family<ResourceLabel, Gauge>,
    replicas: Family<ResourceLabel, Gauge>,
    batch_succeeded: Family<ResourceLabel, Gauge>,
    batch_last_success: Family<ResourceLabel, Gauge>,
    batch_max_staleness: Family<ResourceLabel, Gauge>,
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
        let in_flight = Gauge::default();
        let leader = Gauge::default();
        let desired_replicas = Family::<ResourceLabel, Gauge>::default();
        let replicas = Family::<ResourceLabel, Gauge>::default();
        let batch_succeeded = Family::<ResourceLabel, Gauge>::default();
        let batch_last_success = Family::<ResourceLabel, Gauge>::default();
        let batch_max_staleness = Family::<ResourceLabel, Gauge>::default();
        // The chart's MillraceBatchFailed and MillraceBatchLate alerts read these three.
        registry.register(
            "batch_last_run_succeeded",
            "1 when the last finished batch run was published, 0 when it was not",
            batch_succeeded.clone(),
        );
        registry.register(
            "batch_last_success_timestamp_seconds",
            "When the serving generation's batch run completed (Unix seconds)",
            batch_last_success.clone(),
        );
        registry.register(
            "batch_max_staleness_seconds",
            "spec.cache.maxStaleness: how old the serving generation may grow",
            batch_max_staleness.clone(),
        );
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
            "reconciles_in_flight",
            "Reconciles running now (at most --max-concurrent-reconciles)",
            in_flight.clone(),
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
            in_flight,
            leader,
            desired_replicas,
            replicas,
            batch_succeeded,
            batch_last_success,
            batch_max_staleness,
        }
    }
}

/// A reconcile counted in `reconciles_in_flight` until this is dropped, however the
/// reconcile ends.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counts a reconcile as running until the returned guard is dropped.
    pub fn reconcile_started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

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

    /// Records one resource's batch state from its status: whether the last run was
    /// published, when the last published one completed, and how stale it may grow.
    pub fn set_batch(
        &self,
        namespace: &str,
        name: &str,
        last_batch: Option<&BatchRunStatus>,
        max_staleness: Option<Duration>,
    ) {
        let label = ResourceLabel {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        if let Some(max_staleness) = max_staleness {
            self.batch_max_staleness
                .get_or_create(&label)
                .set(i64::try_from(max_staleness.as_secs()).unwrap_or(i64::MAX));
        }
        let Some(run) = last_batch else {
            return;
        };
        self.batch_succeeded
            .get_or_create(&label)
            .set(i64::from(run.succeeded));
        if run.succeeded
            && let Some(completed) = &run.completion_time
        {
            self.batch_last_success
                .get_or_create(&label)
                .set(completed.0.as_second());
        }
    }

    /// Drops every series of a deleted resource, so its alerts stop with it.
    pub fn forget(&self, namespace: &str, name: &str) {
        let label = ResourceLabel {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        for family in [
            &self.desired_replicas,
            &self.replicas,
            &self.batch_succeeded,
            &self.batch_last_success,
            &self.batch_max_staleness,
        ] {
            family.remove(&label);
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_e2e::metric_names::{missing, referenced};

    #[test]
    fn the_charts_alerts_and_dashboard_read_only_exported_operator_metrics() {
        // A family appears in the exposition once it has a series: record one of each.
        let metrics = Metrics::default();
        metrics.reconciled(Duration::from_millis(5));
        metrics.failed("apply");
        metrics.set_replicas("ml", "churn", 3, 2);
        metrics.set_leader(true);
        let published = BatchRunStatus {
            succeeded: true,
            completion_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            )),
            ..BatchRunStatus::default()
        };
        metrics.set_batch(
            "ml",
            "churn",
            Some(&published),
            Some(Duration::from_secs(60)),
        );
        let mut exposition = String::new();
        prometheus_client::encoding::text::encode(&mut exposition, &metrics.registry)
            .expect("encode");
        let chart = [
            include_str!("../../charts/millrace/templates/prometheusrule.yaml"),
            include_str!("../../charts/millrace/files/dashboards/millrace.json"),
        ]
        .concat();
        let names = referenced(&chart, "millrace_operator_");
        assert!(names.len() >= 4, "{names:?}");
        assert_eq!(missing(&names, &exposition), Vec::<String>::new());
    }

    fn exposition(metrics: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
        text
    }

    #[test]
    fn a_reconcile_is_in_flight_until_its_guard_is_dropped() {
        let metrics = Metrics::default();
        let gauge = |metrics: &Metrics| {
            exposition(metrics)
                .lines()
                .find_map(|l| l.strip_prefix("millrace_operator_reconciles_in_flight "))
                .map(str::to_string)
        };
        let first = metrics.reconcile_started();
        let second = metrics.reconcile_started();
        assert_eq!(gauge(&metrics).as_deref(), Some("2"));
        drop(first);
        assert_eq!(gauge(&metrics).as_deref(), Some("1"));
        drop(second);
        assert_eq!(gauge(&metrics).as_deref(), Some("0"));
    }

    #[test]
    fn a_failed_run_keeps_the_last_success_and_deletion_forgets_the_resource() {
        let metrics = Metrics::default();
        let at = |second| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(second).expect("a timestamp"),
            ))
        };
        let run = |succeeded, second| BatchRunStatus {
            succeeded,
            completion_time: at(second),
            ..BatchRunStatus::default()
        };
        let series = r#"{namespace="ml",name="churn"}"#;
        metrics.set_batch(
            "ml",
            "churn",
            Some(&run(true, 1_000)),
            Some(Duration::from_secs(43_200)),
        );
        metrics.set_batch("ml", "churn", Some(&run(false, 2_000)), None);
        let text = exposition(&metrics);
        assert!(
            text.contains(&format!(
                "millrace_operator_batch_last_run_succeeded{series} 0"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "millrace_operator_batch_last_success_timestamp_seconds{series} 1000"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "millrace_operator_batch_max_staleness_seconds{series} 43200"
            )),
            "{text}"
        );
        metrics.forget("ml", "churn");
        assert!(!exposition(&metrics).contains("churn"));
    }
}
