//! The batch precompute: a CronJob of Indexed Jobs running `millrace-scorer batch`, and the
//! one-off Job a run-batch token asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    ResourceRequirements, SecretEnvSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_crds::spec::BatchSpec;
use sha2::{Digest, Sha256};

use super::names::{Component, batch_name, labels};
use super::pod::{
    config_path, container_security_context, fetch_model_container, model_is_fetched,
    place_on_node_pool, pod_security_context, pod_template_metadata, redis_url_env, volume_mounts,
    volumes, with_gpus,
};
use super::{BuildError, BuildOptions, owner_reference};

/// The environment variable batch pods read their generation from: the Job's name, the
/// same for every shard and every retry of one run.
pub const GENERATION_ENV: &str = "MILLRACE_GENERATION";

/// The CronJob `{name}-batch`, or `None` when the spec has no batch.
pub fn cron_job(
    resource: &InferenceDeployment,
    options: &BuildOptions,
) -> Result<Option<CronJob>, BuildError> {
    let Some(batch) = &resource.spec.batch else {
        return Ok(None);
    };
    Ok(Some(CronJob {
        metadata: ObjectMeta {
            name: Some(batch_name(resource)),
            namespace: resource.namespace(),
            labels: Some(labels(resource, Component::Batch)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        spec: CronJobSpec {
            schedule: batch.schedule.clone(),
            time_zone: Some(batch.time_zone.clone()),
            suspend: Some(batch.suspend),
            // A second run while one is going would write a competing generation.
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: batch.starting_deadline_seconds,
            successful_jobs_history_limit: Some(batch.history_limit),
            failed_jobs_history_limit: Some(batch.history_limit),
            job_template: job_template(resource, batch, options),
        },
        status: None,
    }))
}

/// The Job template shared by scheduled and manual runs: `shards` completions of an Indexed
/// Job, all in parallel, each shard retried on its own.
fn job_template(
    resource: &InferenceDeployment,
    batch: &BatchSpec,
    options: &BuildOptions,
) -> JobTemplateSpec {
    let mut env = vec![
        redis_url_env(resource),
        EnvVar {
            name: GENERATION_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels['batch.kubernetes.io/job-name']".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    env.push(EnvVar {
        name: "MILLRACE_SHARDS".into(),
        value: Some(batch.shards.to_string()),
        ..EnvVar::default()
    });
    let offline_secret = resource
        .spec
        .features
        .offline
        .as_ref()
        .and_then(|offline| offline.credentials_secret_ref.as_ref());
    let node_pool = if batch.use_node_pool {
        resource.spec.node_pool.as_ref()
    } else {
        None
    };
    let container = Container {
        name: "batch".into(),
        image: Some(options.scorer_image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(vec!["batch".into(), "--config".into(), config_path()]),
        env: Some(env),
        env_from: offline_secret.map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        resources: with_scratch(
            with_gpus(batch.resources.clone(), node_pool),
            batch.scratch_size.as_deref(),
        ),
        volume_mounts: Some(volume_mounts(resource)),
        security_context: Some(container_security_context()),
        ..Container::default()
    };
    let mut volumes = volumes(resource);
    if let Some(size) = &batch.scratch_size {
        // Spooled row groups go to /tmp: the kubelet holds the volume to the scratch size.
        for volume in volumes.iter_mut().filter(|v| v.name == "tmp") {
            if let Some(empty_dir) = volume.empty_dir.as_mut() {
                empty_dir.size_limit = Some(Quantity(size.clone()));
            }
        }
    }
    let mut pod = PodSpec {
        containers: vec![container],
        init_containers: model_is_fetched(resource)
            .then(|| vec![fetch_model_container(resource, options)]),
        // Indexed Jobs with per-index backoff require Never; the Job controller retries.
        restart_policy: Some("Never".into()),
        volumes: Some(volumes),
        security_context: Some(pod_security_context()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        ..PodSpec::default()
    };
    place_on_node_pool(&mut pod, node_pool);
    JobTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(resource, Component::Batch)),
            ..ObjectMeta::default()
        }),
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(batch.shards),
            parallelism: Some(batch.shards),
            backoff_limit_per_index: Some(batch.backoff_limit_per_index),
            active_deadline_seconds: batch.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(pod_template_metadata(
                    resource,
                    Component::Batch,
                    BTreeMap::new(),
                )),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
    }
}

/// `resources` with `scratch` (a quantity) requested as ephemeral storage, so the pod is
/// scheduled on a node with that much local disk; a request the user set is kept.
fn with_scratch(
    resources: Option<ResourceRequirements>,
    scratch: Option<&str>,
) -> Option<ResourceRequirements> {
    let Some(scratch) = scratch else {
        return resources;
    };
    let mut resources = resources.unwrap_or_default();
    resources
        .requests
        .get_or_insert_with(BTreeMap::new)
        .entry("ephemeral-storage".into())
        .or_insert_with(|| Quantity(scratch.to_string()));
    Some(resources)
}

/// The name of the manual Job for run-batch `token`: derived from the token, so a token
/// creates at most one Job however often reconcile runs.
pub fn manual_job_name(resource: &InferenceDeployment, token: &str) -> String {
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    format!("{}-manual-{}", batch_name(resource), &digest[..8])
}

/// The Job a run-batch token creates: the CronJob's template, owned by the CronJob as
/// `kubectl create job --from=cronjob/...` would make it.
pub fn manual_job(
    resource: &InferenceDeployment,
    cron_job: &CronJob,
    token: &str,
) -> Result<Job, BuildError> {
    let template = &cron_job.spec.job_template;
    let owner = cron_job
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingUid)?;
    let mut metadata = template.metadata.clone().unwrap_or_default();
    metadata.name = Some(manual_job_name(resource, token));
    metadata.namespace = resource.namespace();
    metadata.owner_references = Some(vec![owner]);
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(super::names::RUN_BATCH_ANNOTATION.into(), token.into());
    Ok(Job {
        metadata,
        spec: template.spec.clone(),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_job_names_are_stable_per_token() {
        let resource: InferenceDeployment =
            serde_yaml_ng::from_str(include_str!("../../tests/fixtures/churn.yaml"))
                .expect("fixture");
        let a = manual_job_name(&resource, "2026-11-30T10:00");
        assert_eq!(a, manual_job_name(&resource, "2026-11-30T10:00"));
        assert_ne!(a, manual_job_name(&resource, "2026-11-30T11:00"));
        assert!(a.starts_with("churn-batch-manual-") && a.len() <= 63, "{a}");
    }
}
