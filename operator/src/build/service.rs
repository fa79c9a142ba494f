//! The scorer Service and PodDisruptionBudget.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;

use millrace_crds::spec::Topology;

use super::names::{Component, compute_name, labels, scorer_name, selector_labels};
use super::{BuildError, owner_reference};

fn metadata(resource: &InferenceDeployment) -> Result<ObjectMeta, BuildError> {
    metadata_for(resource, Component::Scorer, scorer_name(resource))
}

fn metadata_for(
    resource: &InferenceDeployment,
    component: Component,
    name: String,
) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: resource.namespace(),
        labels: Some(labels(resource, component)),
        owner_references: Some(vec![owner_reference(resource)?]),
        ..ObjectMeta::default()
    })
}

/// `{name}-scorer`: a ClusterIP Service on port 80 in front of the scorers' HTTP port (in
/// the split topology, the cache tier: what clients call either way).
pub fn service(resource: &InferenceDeployment) -> Result<Service, BuildError> {
    http_service(resource, Component::Scorer, scorer_name(resource))
}

/// `{name}-compute`: the compute tier's Service, which the cache tier calls; only in the
/// split topology.
pub fn compute_service(resource: &InferenceDeployment) -> Result<Option<Service>, BuildError> {
    if resource.spec.serving.topology != Topology::Split {
        return Ok(None);
    }
    http_service(resource, Component::Compute, compute_name(resource)).map(Some)
}

fn http_service(
    resource: &InferenceDeployment,
    component: Component,
    name: String,
) -> Result<Service, BuildError> {
    Ok(Service {
        metadata: metadata_for(resource, component, name)?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(resource, component)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// `{name}-scorer`: at most `serving.maxUnavailable` scorers down for voluntary disruptions.
pub fn pod_disruption_budget(
    resource: &InferenceDeployment,
) -> Result<PodDisruptionBudget, BuildError> {
    Ok(PodDisruptionBudget {
        metadata: metadata(resource)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(resource.spec.serving.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(resource, Component::Scorer)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}
