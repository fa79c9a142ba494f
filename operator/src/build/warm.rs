//! The warm Job: `millrace-scorer warm` for the most active entities, run by the autoscaler
//! when misses stay high (`autoscaling.warming`). It is the scorer pod (same image, config,
//! model, node pool and Redis) with the warm command and no probes, run once. With
//! `warming.schedule`, the same Job runs from the CronJob `{name}-warm` too.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;

use super::names::{Component, labels, warm_name};
use super::pod::{config_path, pod_template_metadata};
use super::{BuildError, owner_reference};

/// Finished warm Jobs are deleted after an hour.
const KEEP_FINISHED: i32 = 3_600;

/// The name of the warm Job for the cooldown period containing `now_ms`: one name per
/// period, so a restarted operator cannot start a second one in the same period.
pub fn warm_job_name(resource: &InferenceDeployment, now_ms: u64, cooldown: Duration) -> String {
    let period = now_ms / (cooldown.as_millis().max(1) as u64);
    format!("{}-warm-{period}", resource.name_any())
}

/// The warm Job called `name`, from the Deployment that holds the model as built (the
/// scorer, or the compute tier in the split topology).
pub fn warm_job(
    resource: &InferenceDeployment,
    scorer: &Deployment,
    name: &str,
) -> Result<Job, BuildError> {
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: resource.namespace(),
            labels: Some(labels(resource, Component::Warm)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        spec: Some(warm_job_spec(resource, scorer)),
        status: None,
    })
}

/// `{name}-warm`: warming on `autoscaling.warming.schedule`, when set.
pub fn warm_cron_job(
    resource: &InferenceDeployment,
    scorer: &Deployment,
) -> Result<Option<CronJob>, BuildError> {
    let Some(schedule) = &resource.spec.autoscaling.warming.schedule else {
        return Ok(None);
    };
    Ok(Some(CronJob {
        metadata: ObjectMeta {
            name: Some(warm_name(resource)),
            namespace: resource.namespace(),
            labels: Some(labels(resource, Component::Warm)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        spec: CronJobSpec {
            schedule: schedule.clone(),
            time_zone: Some("UTC".into()),
            concurrency_policy: Some("Forbid".into()),
            successful_jobs_history_limit: Some(1),
            failed_jobs_history_limit: Some(1),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(resource, Component::Warm)),
                    ..ObjectMeta::default()
                }),
                spec: Some(warm_job_spec(resource, scorer)),
            },
            ..CronJobSpec::default()
        },
        status: None,
    }))
}

/// The scorer pod with the warm command and no probes, run once.
fn warm_job_spec(resource: &InferenceDeployment, scorer: &Deployment) -> JobSpec {
    let mut pod = scorer
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .unwrap_or_default();
    pod.restart_policy = Some("Never".into());
    let top = resource.spec.autoscaling.warming.top.max(1);
    for container in pod.containers.iter_mut() {
        container.name = "warm".into();
        container.args = Some(vec![
            "warm".into(),
            "--config".into(),
            config_path(),
            "--top".into(),
            top.to_string(),
        ]);
        container.ports = None;
        container.readiness_probe = None;
        container.liveness_probe = None;
        container.startup_probe = None;
    }
    JobSpec {
        backoff_limit: Some(1),
        ttl_seconds_after_finished: Some(KEEP_FINISHED),
        template: PodTemplateSpec {
            metadata: Some(pod_template_metadata(
                resource,
                Component::Warm,
                BTreeMap::new(),
            )),
            spec: Some(pod),
        },
        ..JobSpec::default()
    }
}
