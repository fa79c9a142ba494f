//! Build: the pure step that turns a validated InferenceDeployment into the objects it
//! should own. No I/O, so every builder is tested from YAML fixtures without a cluster.

pub mod batch;
pub mod config;
pub mod deployment;
pub mod hpa;
pub mod names;
pub mod pod;
pub mod service;
pub mod warm;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use millrace_crds::InferenceDeployment;
use millrace_crds::config::ScorerConfig;

/// Settings of the operator that shape every child.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The scorer image (serve, batch, warm and fetch-model all run from it).
    pub scorer_image: String,
    /// The pull policy for that image; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
}

/// A child could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The resource has no uid, so children cannot point at it (it never reached the API
    /// server).
    #[error("the resource has no metadata.uid, so children cannot reference it")]
    MissingUid,
    /// The scorer config did not serialize.
    #[error("cannot render the scorer config: {0}")]
    RenderConfig(#[source] serde_json::Error),
}

/// Everything one InferenceDeployment owns, as desired.
#[derive(Debug, Clone)]
pub struct Children {
    /// The runtime config scorers and batch pods read.
    pub scorer_config: ScorerConfig,
    /// `{name}-config`.
    pub config_map: ConfigMap,
    /// `{name}-scorer`.
    pub deployment: Deployment,
    /// `{name}-scorer`.
    pub service: Service,
    /// `{name}-scorer`.
    pub pod_disruption_budget: PodDisruptionBudget,
    /// `{name}-batch`, when the spec has a batch.
    pub cron_job: Option<CronJob>,
    /// `{name}-scorer`, when `autoscaling.mode` is `hpa`.
    pub horizontal_pod_autoscaler: Option<HorizontalPodAutoscaler>,
    /// `{name}-compute`, the GPU compute tier, with `serving.topology: split`.
    pub compute_deployment: Option<Deployment>,
    /// `{name}-compute`, the compute tier's Service, with `serving.topology: split`.
    pub compute_service: Option<Service>,
    /// `{name}-warm`, with `autoscaling.warming.schedule`.
    pub warm_cron_job: Option<CronJob>,
}

/// Builds every child of `resource`.
pub fn build(
    resource: &InferenceDeployment,
    options: &BuildOptions,
) -> Result<Children, BuildError> {
    let scorer_config = config::scorer_config(resource);
    let (config_text, checksum) = config::render(&scorer_config)?;
    let scorer = deployment::deployment(resource, options, &checksum)?;
    let compute = deployment::compute_deployment(resource, options, &checksum)?;
    // Warming needs the model: the compute tier's pod in the split topology.
    let warm_cron_job = warm::warm_cron_job(resource, compute.as_ref().unwrap_or(&scorer))?;
    Ok(Children {
        config_map: config::config_map(resource, &config_text)?,
        deployment: scorer,
        service: service::service(resource)?,
        pod_disruption_budget: service::pod_disruption_budget(resource)?,
        cron_job: batch::cron_job(resource, options)?,
        horizontal_pod_autoscaler: hpa::horizontal_pod_autoscaler(resource)?,
        compute_deployment: compute,
        warm_cron_job,
        compute_service: service::compute_service(resource)?,
        scorer_config,
    })
}

/// The controller owner reference every child carries, so deleting the resource
/// garbage-collects them and their changes wake the controller.
pub fn owner_reference(resource: &InferenceDeployment) -> Result<OwnerReference, BuildError> {
    let mut owner = resource
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingUid)?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}
