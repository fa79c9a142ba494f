//! Apply: server-side apply of the built children with one field manager, deletion of the
//! children the spec no longer asks for, and the run-batch Job. Returns [`Applied`], the
//! objects as the API server stored them: status is computed from these only.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use millrace_crds::InferenceDeployment;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use crate::build::names::{FIELD_MANAGER, batch_name, compute_name, scorer_name, warm_name};
use crate::build::{Children, batch};
use crate::error::Error;

/// The field manager that owns `spec.replicas` of the scorer Deployment.
pub const AUTOSCALER_FIELD_MANAGER: &str = "millrace-autoscaler";

/// The children as stored by the API server after apply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The scorer config ConfigMap.
    pub config_map: ConfigMap,
    /// The scorer Deployment.
    pub deployment: Deployment,
    /// The scorer Service.
    pub service: Service,
    /// The scorer PodDisruptionBudget.
    pub pod_disruption_budget: PodDisruptionBudget,
    /// The batch CronJob, if the spec has a batch.
    pub cron_job: Option<CronJob>,
    /// The compute tier as applied (split topology only).
    pub compute_deployment: Option<Deployment>,
}

/// Applies every child of `resource`, and deletes the CronJob when the batch was removed and
/// the HorizontalPodAutoscaler when the autoscaling mode is no longer `hpa`.
pub async fn apply(
    client: &Client,
    resource: &InferenceDeployment,
    children: &Children,
) -> Result<Applied, Error> {
    let namespace = resource.namespace().unwrap_or_default();
    let config_map = ssa(client, &namespace, &children.config_map).await?;
    let deployment = ssa(client, &namespace, &children.deployment).await?;
    let service = ssa(client, &namespace, &children.service).await?;
    let pod_disruption_budget = ssa(client, &namespace, &children.pod_disruption_budget).await?;
    let cron_job = match &children.cron_job {
        Some(cron_job) => Some(ssa(client, &namespace, cron_job).await?),
        None => {
            delete_if_owned::<CronJob>(client, &namespace, &batch_name(resource), resource).await?;
            None
        }
    };
    match &children.horizontal_pod_autoscaler {
        Some(hpa) => {
            ssa(client, &namespace, hpa).await?;
        }
        None => {
            delete_if_owned::<HorizontalPodAutoscaler>(
                client,
                &namespace,
                &scorer_name(resource),
                resource,
            )
            .await?;
        }
    }
    match &children.warm_cron_job {
        Some(cron_job) => {
            ssa(client, &namespace, cron_job).await?;
        }
        None => {
            delete_if_owned::<CronJob>(client, &namespace, &warm_name(resource), resource).await?;
        }
    }
    // The split topology's compute tier; removed when the topology goes back to unified.
    let compute_deployment = match &children.compute_deployment {
        Some(compute) => Some(ssa(client, &namespace, compute).await?),
        None => {
            delete_if_owned::<Deployment>(client, &namespace, &compute_name(resource), resource)
                .await?;
            None
        }
    };
    match &children.compute_service {
        Some(service) => {
            ssa(client, &namespace, service).await?;
        }
        None => {
            delete_if_owned::<Service>(client, &namespace, &compute_name(resource), resource)
                .await?;
        }
    }
    Ok(Applied {
        config_map,
        deployment,
        compute_deployment,
        service,
        pod_disruption_budget,
        cron_job,
    })
}

/// Server-side apply with the operator's field manager; conflicts are forced because the
/// operator is the declared owner of these fields.
async fn ssa<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(Error::kube(format!(
        "applying {} {name}",
        K::kind(&K::DynamicType::default())
    )))
}

/// Deletes `name` if it exists and `owner` controls it: never something a user made.
async fn delete_if_owned<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    owner: &InferenceDeployment,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading {kind} {name}")))?
    else {
        return Ok(());
    };
    let owned = existing
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == owner.uid().as_ref());
    if owned {
        info!(%kind, %name, "deleting a child the spec no longer asks for");
        api.delete(name, &DeleteParams::background())
            .await
            .map_err(Error::kube(format!("deleting {kind} {name}")))?;
    }
    Ok(())
}

/// Keeps the scorer's replicas within [minReplicas, maxReplicas] through the scale
/// subresource, under the autoscaler's field manager so the Deployment apply never owns
/// (and never resets) `spec.replicas`. Returns the replicas now requested.
pub async fn clamp_replicas(
    client: &Client,
    resource: &InferenceDeployment,
    deployment: &Deployment,
    (min_replicas, max_replicas): (i32, i32),
) -> Result<Option<i32>, Error> {
    use millrace_crds::spec::AutoscalingMode;
    let autoscaling = &resource.spec.autoscaling;
    let current = deployment.spec.as_ref().and_then(|s| s.replicas);
    // Disabled: replicas are the user's. Hpa: the HorizontalPodAutoscaler's.
    if autoscaling.mode != AutoscalingMode::Operator {
        return Ok(current);
    }
    let replicas = current.unwrap_or(1);
    let wanted = replicas.clamp(min_replicas, max_replicas);
    if wanted == replicas && current.is_some() {
        return Ok(current);
    }
    scale(client, resource, &deployment.name_any(), wanted).await?;
    Ok(Some(wanted))
}

/// Sets the scorer Deployment's replicas through its scale subresource, as the autoscaler's
/// field manager: the reconcile's server-side apply never names `spec.replicas`, so the two
/// never fight over it.
pub async fn scale(
    client: &Client,
    resource: &InferenceDeployment,
    deployment: &str,
    replicas: i32,
) -> Result<(), Error> {
    let namespace = resource.namespace().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let params = PatchParams {
        field_manager: Some(AUTOSCALER_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = serde_json::json!({"spec": {"replicas": replicas}});
    api.patch_scale(deployment, &params, &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!(
            "scaling Deployment {deployment} to {replicas}"
        )))?;
    Ok(())
}

/// Creates the Job for run-batch `token` unless it exists. The Job's name derives from the
/// token, so a token runs exactly once even if this is called again.
pub async fn run_batch_now(
    client: &Client,
    resource: &InferenceDeployment,
    cron_job: &CronJob,
    token: &str,
) -> Result<String, Error> {
    let job = batch::manual_job(resource, cron_job, token)?;
    let name = job.name_any();
    let api: Api<Job> = Api::namespaced(client.clone(), &resource.namespace().unwrap_or_default());
    match api.create(&PostParams::default(), &job).await {
        Ok(_) => info!(job = %name, "created a batch run for a run-batch token"),
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(Error::kube(format!("creating Job {name}"))(error)),
    }
    Ok(name)
}
