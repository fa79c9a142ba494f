//! `autoscaling.mode: hpa`: a HorizontalPodAutoscaler for clusters with an external-metrics
//! adapter (e.g. prometheus-adapter), scaling the scorer Deployment on the same signal the
//! operator's own autoscaler uses: cache misses per second, per replica.
//!
//! The metric is the external metric [`MISSES_METRIC`], selected by the labels
//! `namespace` and `inference_deployment`; the adapter derives it from the scorers'
//! `millrace_scorer_cache_misses_total` counter (the README has a rule). The HPA then owns
//! `spec.replicas`: the operator neither clamps nor scales them in this mode.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, ExternalMetricSource, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;
use millrace_crds::spec::Topology;
use millrace_crds::spec::{AutoscalingMode, duration};

use super::names::{Component, compute_name, labels, scorer_name};
use super::{BuildError, owner_reference};

/// The external metric the HPA scales on.
pub const MISSES_METRIC: &str = "millrace_scorer_cache_misses_per_second";

/// The HPA of `resource`, when its autoscaling mode is `hpa`.
pub fn horizontal_pod_autoscaler(
    resource: &InferenceDeployment,
) -> Result<Option<HorizontalPodAutoscaler>, BuildError> {
    let spec = &resource.spec.autoscaling;
    if spec.mode != AutoscalingMode::Hpa {
        return Ok(None);
    }
    let name = scorer_name(resource);
    let stabilization = duration::parse(&spec.scale_down_stabilization)
        .map(|d| d.as_secs().min(3_600) as i32)
        .unwrap_or(300);
    let tolerance = Quantity(format!("{}m", spec.tolerance_percent.clamp(0, 100) * 10));
    let rules = |window: Option<i32>| HPAScalingRules {
        stabilization_window_seconds: window,
        // Honoured where the HPAConfigurableTolerance feature is on; dropped elsewhere.
        tolerance: Some(tolerance.clone()),
        ..HPAScalingRules::default()
    };
    Ok(Some(HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: resource.namespace(),
            labels: Some(labels(resource, Component::Scorer)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        spec: HorizontalPodAutoscalerSpec {
            // Misses size the model tier: in the split topology, the compute tier (the cache
            // tier then keeps autoscaling.cacheTier.minReplicas).
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: match resource.spec.serving.topology {
                    Topology::Split => compute_name(resource),
                    Topology::Unified => name,
                },
            },
            // An HPA cannot go below one replica without the HPAScaleToZero feature.
            min_replicas: Some(spec.min_replicas.max(1)),
            max_replicas: spec.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "External".into(),
                external: Some(ExternalMetricSource {
                    metric: MetricIdentifier {
                        name: MISSES_METRIC.into(),
                        selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([
                                (
                                    "namespace".to_string(),
                                    resource.namespace().unwrap_or_default(),
                                ),
                                ("inference_deployment".to_string(), resource.name_any()),
                            ])),
                            ..LabelSelector::default()
                        }),
                    },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(spec.target_misses_per_replica.to_string())),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(rules(Some(stabilization))),
                scale_up: Some(rules(None)),
            }),
        },
        status: None,
    }))
}
