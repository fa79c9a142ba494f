//! Names and labels of the children of one InferenceDeployment.
//!
//! Every child carries the `app.kubernetes.io/*` labels and the owner's name under
//! [`OWNER_LABEL`], which is how the operator finds its children (and Jobs the CronJob made).

use std::collections::BTreeMap;

use kube::ResourceExt;
use millrace_crds::InferenceDeployment;

/// The label naming the InferenceDeployment a child belongs to.
pub const OWNER_LABEL: &str = "millrace.dev/inference-deployment";

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "millrace-operator";

/// The annotation whose value rolls scorer pods when the rendered config changes.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "millrace.dev/config-checksum";

/// The annotation that asks for a batch run now; each distinct value runs once.
pub const RUN_BATCH_ANNOTATION: &str = "millrace.dev/run-batch";

/// The components an InferenceDeployment is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The real-time scorers (Deployment, Service, PodDisruptionBudget, config).
    Scorer,
    /// The batch precompute (CronJob and its Jobs).
    Batch,
    /// Warm Jobs the autoscaler runs when misses stay high.
    Warm,
    /// The split topology's GPU compute tier (Deployment and Service).
    Compute,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Component::Scorer => "scorer",
            Component::Batch => "batch",
            Component::Warm => "warm",
            Component::Compute => "compute",
        }
    }
}

/// `{name}-scorer`: the Deployment, Service and PodDisruptionBudget.
pub fn scorer_name(resource: &InferenceDeployment) -> String {
    format!("{}-scorer", resource.name_any())
}

/// `{name}-compute`: the split topology's compute tier (Deployment and Service).
pub fn compute_name(resource: &InferenceDeployment) -> String {
    format!("{}-compute", resource.name_any())
}

/// `{name}-warm`: the scheduled warm CronJob.
pub fn warm_name(resource: &InferenceDeployment) -> String {
    format!("{}-warm", resource.name_any())
}

/// `{name}-config`: the ConfigMap holding the scorer config.
pub fn config_name(resource: &InferenceDeployment) -> String {
    format!("{}-config", resource.name_any())
}

/// `{name}-batch`: the CronJob.
pub fn batch_name(resource: &InferenceDeployment) -> String {
    format!("{}-batch", resource.name_any())
}

/// The labels every child of `resource` carries.
pub fn labels(resource: &InferenceDeployment, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(resource, component);
    labels.insert("app.kubernetes.io/name".into(), "millrace".into());
    labels.insert("app.kubernetes.io/instance".into(), resource.name_any());
    labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    labels.insert("app.kubernetes.io/part-of".into(), "millrace".into());
    labels.insert(
        "millrace.dev/model-version".into(),
        label_value(&resource.spec.model.version),
    );
    labels
}

/// The labels that select one component's pods; stable across spec changes, because a
/// Deployment's selector is immutable.
pub fn selector_labels(
    resource: &InferenceDeployment,
    component: Component,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (OWNER_LABEL.to_string(), resource.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            component.as_str().to_string(),
        ),
    ])
}

/// A label value from free text: at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at
/// both ends (the model version already obeys this; the guard keeps the builder total).
fn label_value(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}
