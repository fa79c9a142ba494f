//! The controller: watches InferenceDeployments and their children, and runs the reconcile
//! pipeline validate → build → apply → status for each change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use millrace_crds::status::condition;
use millrace_crds::{InferenceDeployment, InferenceDeploymentStatus};
use tracing::{debug, info, instrument, warn};

use crate::apply::{apply, clamp_replicas, run_batch_now};
use crate::build::names::{FIELD_MANAGER, OWNER_LABEL, RUN_BATCH_ANNOTATION};
use crate::build::{BuildOptions, build};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::status::{Outcome, condition_status, desired_status};
use crate::validate::validate;

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Settings that shape children.
    pub options: BuildOptions,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes events on the resources.
    pub recorder: Recorder,
    /// Watch only this namespace (a namespace-scoped install); all namespaces when `None`.
    pub namespace: Option<String>,
    /// Consecutive failures per object, for the requeue backoff.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<InferenceDeployment>>, u32>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: Client,
        options: BuildOptions,
        metrics: Arc<Metrics>,
        identity: &str,
        namespace: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.into()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            options,
            metrics,
            namespace,
            failures: Mutex::default(),
        }
    }
}

/// Runs the controller until a shutdown signal (SIGTERM, Ctrl-C).
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let namespace = ctx.namespace.clone();
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let children = watcher::Config::default()
        .labels(OWNER_LABEL)
        .any_semantic();
    // Jobs are owned by the CronJob, not by the resource: map them back through the label.
    let job_owner = |job: Job| {
        let name = job.labels().get(OWNER_LABEL)?.clone();
        let namespace = job.namespace()?;
        Some(ObjectRef::new(&name).within(&namespace))
    };
    let resources: Api<DeserializeGuard<InferenceDeployment>> = match ns {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    Controller::new(resources, watcher::Config::default().any_semantic())
        .owns(api::<Deployment>(&client, ns), children.clone())
        .owns(api::<Service>(&client, ns), children.clone())
        .owns(api::<ConfigMap>(&client, ns), children.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), children.clone())
        .owns(api::<CronJob>(&client, ns), children.clone())
        .watches(api::<Job>(&client, ns), children, job_owner)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(%object, "reconciled"),
                Err(error) => debug!(%error, "reconcile did not complete"),
            }
        })
        .await;
}

#[instrument(skip(guard, ctx), fields(namespace = guard.namespace(), name = guard.name_any()))]
async fn reconcile(
    guard: Arc<DeserializeGuard<InferenceDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(resource) => pipeline(resource, &ctx).await,
        Err(invalid) => {
            // One malformed object is logged and skipped; it must not stop the watch.
            warn!(error = %invalid.error, "skipping a malformed InferenceDeployment");
            Err(Error::Malformed(invalid.error.clone()))
        }
    };
    ctx.metrics.reconciled(started.elapsed());
    if let Ok(mut failures) = ctx.failures.lock() {
        match &result {
            Ok(_) => failures.remove(&ObjectRef::from_obj(guard.as_ref())),
            Err(_) => None,
        };
    }
    result
}

fn error_policy(
    guard: Arc<DeserializeGuard<InferenceDeployment>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failed(error.metric_label());
    if matches!(error, Error::Malformed(_)) {
        return Action::await_change();
    }
    let attempt = ctx.failures.lock().map_or(1, |mut failures| {
        let count = failures
            .entry(ObjectRef::from_obj(guard.as_ref()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    });
    // 1 s, 2 s, 4 s ... capped at 5 minutes.
    let delay =
        Duration::from_secs(1u64 << attempt.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    warn!(%error, attempt, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// validate → build → apply → status.
async fn pipeline(resource: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    if resource.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the children. Applying them again
        // now would recreate what it just deleted and stall a foreground deletion.
        return Ok(Action::await_change());
    }
    let problems = validate(resource);
    if !problems.is_empty() {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let status = update_status(resource, ctx, &Outcome::Invalid(&problems), None).await?;
        if changed_to(resource, &status, condition::DEGRADED, "True") {
            event(
                ctx,
                resource,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                message,
            )
            .await;
        }
        // Nothing to retry: the next spec change brings a new reconcile.
        return Ok(Action::await_change());
    }

    let children = build(resource, &ctx.options)?;
    let applied = match apply(&ctx.client, resource, &children).await {
        Ok(applied) => applied,
        Err(error) => {
            let text = error.to_string();
            update_status(resource, ctx, &Outcome::ApplyFailed(&text), None).await?;
            event(
                ctx,
                resource,
                EventType::Warning,
                "ApplyFailed",
                "Apply",
                text,
            )
            .await;
            return Err(error);
        }
    };
    clamp_replicas(&ctx.client, resource, &applied.deployment).await?;

    let run_token = pending_run_token(resource);
    if let (Some(token), Some(cron_job)) = (run_token, &applied.cron_job) {
        let job = run_batch_now(&ctx.client, resource, cron_job, token).await?;
        event(
            ctx,
            resource,
            EventType::Normal,
            "BatchRunCreated",
            "RunBatch",
            format!("created Job {job} for run-batch token {token:?}"),
        )
        .await;
    }

    let status = update_status(resource, ctx, &Outcome::Applied(&applied), run_token).await?;
    if changed_to(resource, &status, condition::READY, "True") {
        event(
            ctx,
            resource,
            EventType::Normal,
            "Ready",
            "Reconcile",
            "scorers are available".into(),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// The run-batch token on the resource, if it has not been turned into a Job yet.
fn pending_run_token(resource: &InferenceDeployment) -> Option<&str> {
    let token = resource.annotations().get(RUN_BATCH_ANNOTATION)?.as_str();
    let done = resource
        .status
        .as_ref()
        .and_then(|s| s.last_run_token.as_deref());
    (!token.is_empty() && done != Some(token)).then_some(token)
}

/// Whether condition `type_` became `status` in `new` (it was something else before).
fn changed_to(
    resource: &InferenceDeployment,
    new: &InferenceDeploymentStatus,
    type_: &str,
    status: &str,
) -> bool {
    condition_status(Some(new), type_) == Some(status)
        && condition_status(resource.status.as_ref(), type_) != Some(status)
}

/// Computes the status for `outcome` and writes it, unless nothing changed.
async fn update_status(
    resource: &InferenceDeployment,
    ctx: &Context,
    outcome: &Outcome<'_>,
    run_token: Option<&str>,
) -> Result<InferenceDeploymentStatus, Error> {
    let now = Time(jiff::Timestamp::now());
    let status = desired_status(
        resource.metadata.generation,
        resource.status.as_ref(),
        outcome,
        run_token,
        &now,
    );
    if resource.status.as_ref() == Some(&status) {
        return Ok(status);
    }
    let api: Api<InferenceDeployment> = Api::namespaced(
        ctx.client.clone(),
        &resource.namespace().unwrap_or_default(),
    );
    let patch = serde_json::json!({
        "apiVersion": InferenceDeployment::api_version(&()),
        "kind": InferenceDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &resource.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("writing status"))?;
    info!(generation = resource.metadata.generation, "status updated");
    Ok(status)
}

async fn event(
    ctx: &Context,
    resource: &InferenceDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &resource.object_ref(&()))
        .await
    {
        warn!(%error, reason, "could not publish an event");
    }
}
