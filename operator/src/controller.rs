//! The controller: watches InferenceDeployments and their children, and runs the reconcile
//! pipeline validate → build → apply → status for each change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use millrace_crds::status::condition;
use millrace_crds::{InferenceDeployment, InferenceDeploymentStatus};
use tracing::{debug, info, instrument, warn};

use crate::apply::{apply, clamp_replicas, run_batch_now};
use crate::build::config::key_prefix;
use crate::build::names::{FIELD_MANAGER, OWNER_LABEL, RUN_BATCH_ANNOTATION};
use crate::build::{BuildOptions, build};
use crate::claims::prefix_holder;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::publish::{BatchUpdate, JobOutcome, Published, expires_at, next_to_record, run_status};
use crate::redis_store::RedisStore;
use crate::scaler::Autoscaler;
use crate::status::{
    Outcome, cache_warm_changes_in, condition_status, desired_status, set_cache_warm,
};
use crate::validate::{Invalid, validate};

/// The finalizer that removes a deleted resource's Redis keys.
pub const FINALIZER: &str = "millrace.dev/redis-cleanup";

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
    /// Redis connections for publishing and cleanup.
    pub redis: RedisStore,
    /// How long after deletion an unreachable Redis may block the finalizer.
    pub cleanup_timeout: Duration,
    /// Consecutive failures per object, for the requeue backoff.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<InferenceDeployment>>, u32>>,
    /// The autoscaler's per-resource state.
    pub autoscaler: Autoscaler,
    /// Every resource the operator watches (its cache), for key prefix claims; set when the
    /// controller starts.
    resources: OnceLock<Store<DeserializeGuard<InferenceDeployment>>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: Client,
        options: BuildOptions,
        metrics: Arc<Metrics>,
        identity: &str,
        namespace: Option<String>,
        cleanup_timeout: Duration,
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
            redis: RedisStore::default(),
            cleanup_timeout,
            failures: Mutex::default(),
            autoscaler: Autoscaler::default(),
            resources: OnceLock::new(),
        }
    }

    /// Every resource the operator watches, once its first listing is complete (before that
    /// the cache may miss some); none when the controller is not running.
    async fn watched(&self) -> Vec<Arc<DeserializeGuard<InferenceDeployment>>> {
        let Some(store) = self.resources.get() else {
            return Vec::new();
        };
        if store.wait_until_ready().await.is_err() {
            return Vec::new();
        }
        store.state()
    }
}

/// The well-formed resources among `guards`.
fn well_formed(
    guards: &[Arc<DeserializeGuard<InferenceDeployment>>],
) -> impl Iterator<Item = &InferenceDeployment> {
    guards.iter().filter_map(|guard| guard.0.as_ref().ok())
}

/// A resource refused for a key prefix held by another waits this long between looks, so
/// it starts soon after the holder is deleted.
const PREFIX_RECHECK: Duration = Duration::from_secs(10);

/// Reconciles at once by default: enough to keep a 2-core API server busy in a burst,
/// few enough that the operator's memory does not grow with the burst (see the README's
/// operator figures).
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 8;

/// Runs the controller until a shutdown signal (SIGTERM, Ctrl-C), with at most
/// `max_concurrent_reconciles` reconciles at once (0: no limit).
pub async fn run(ctx: Arc<Context>, max_concurrent_reconciles: u16) {
    let client = ctx.client.clone();
    let ns = ctx.namespace.clone();
    let ns = ns.as_deref();
    let children = watcher::Config::default()
        .labels(OWNER_LABEL)
        .any_semantic();
    // Jobs are owned by the CronJob, not by the resource: map them back through the label.
    let job_owner = |job: PartialObjectMeta<Job>| {
        let name = job.labels().get(OWNER_LABEL)?.clone();
        let namespace = job.namespace()?;
        Some(ObjectRef::new(&name).within(&namespace))
    };
    // The resources' cache keeps whole objects minus managedFields, which reconcile never
    // reads and which are a large share of each object.
    let (reader, writer) = reflector::store();
    let _ = ctx.resources.set(reader.clone());
    // The autoscaler syncs each resource on its own period and asks for a reconcile only
    // when what the status shows should change.
    let (triggers, triggered) = tokio::sync::mpsc::channel(1024);
    let autoscaler = tokio::spawn(crate::scaler::run(
        Arc::clone(&ctx),
        reader.clone(),
        triggers,
    ));
    let triggered = futures::stream::unfold(triggered, |mut rx| async move {
        rx.recv().await.map(|object| (object, rx))
    });
    let resources = reflector(
        writer,
        watcher(
            namespaced_or_all(&client, ns),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .modify(|guard: &mut DeserializeGuard<InferenceDeployment>| {
            guard.meta_mut().managed_fields = None;
        }),
    )
    .applied_objects();
    Controller::for_stream(resources, reader)
        .with_config(controller::Config::default().concurrency(max_concurrent_reconciles))
        .owns_stream(metadata::<Deployment>(&client, ns, &children))
        .owns_stream(metadata::<Service>(&client, ns, &children))
        .owns_stream(metadata::<ConfigMap>(&client, ns, &children))
        .owns_stream(metadata::<PodDisruptionBudget>(&client, ns, &children))
        .owns_stream(metadata::<CronJob>(&client, ns, &children))
        .owns_stream(metadata::<HorizontalPodAutoscaler>(&client, ns, &children))
        .watches_stream(metadata::<Job>(&client, ns, &children), job_owner)
        .reconcile_on(triggered)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(%object, "reconciled"),
                Err(error) => debug!(%error, "reconcile did not complete"),
            }
        })
        .await;
    autoscaler.abort();
}

/// `namespace/name` of a resource: the key of per-resource state.
pub fn resource_key(resource: &InferenceDeployment) -> String {
    format!(
        "{}/{}",
        resource.namespace().unwrap_or_default(),
        resource.name_any()
    )
}

/// An Api over one namespace, or all of them.
fn namespaced_or_all<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A metadata-only watch of the children of kind `K`. Children only trigger reconciles:
/// a status change still arrives as an event, but no spec or status is decoded or kept.
fn metadata<K>(
    client: &Client,
    namespace: Option<&str>,
    config: &watcher::Config,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<PartialObjectMeta<K>> = namespaced_or_all(client, namespace);
    watcher(api, config.clone())
        .default_backoff()
        .touched_objects()
}

#[instrument(skip(guard, ctx), fields(namespace = guard.namespace(), name = guard.name_any()))]
async fn reconcile(
    guard: Arc<DeserializeGuard<InferenceDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let _in_flight = ctx.metrics.reconcile_started();
    let result = match &guard.0 {
        Ok(resource) => {
            let api: Api<InferenceDeployment> = Api::namespaced(
                ctx.client.clone(),
                &resource.namespace().unwrap_or_default(),
            );
            // The finalizer is the sole top-level call: Apply runs the pipeline, Cleanup
            // removes the resource's Redis keys before the finalizer is released.
            finalizer(&api, FINALIZER, Arc::new(resource.clone()), |event| async {
                match event {
                    FinalizerEvent::Apply(resource) => pipeline(&resource, &ctx).await,
                    FinalizerEvent::Cleanup(resource) => cleanup(&resource, &ctx).await,
                }
            })
            .await
            .map_err(|error| Error::Finalizer(Box::new(error)))
        }
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
    // Any write refused because the namespace is being deleted (applying children, a scale,
    // a run-batch Job): the resource's own deletion follows, and retrying cannot succeed
    // before it.
    if error.is_namespace_terminating() {
        debug!(%error, "the namespace is being deleted; waiting for the resource's deletion");
        return Action::await_change();
    }
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
    let problems = validate(resource);
    if !problems.is_empty() {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let status = refuse(
            resource,
            ctx,
            &Outcome::Invalid(&problems),
            "InvalidSpec",
            message,
        )
        .await?;
        // Nothing to retry: the next spec change brings a new reconcile (or the serving
        // generation's expiry, which the status must show whatever the spec).
        return Ok(until_cache_expires(&status));
    }
    let watched = ctx.watched().await;
    if let Some(holder) = prefix_holder(resource, well_formed(&watched)) {
        return refuse_prefix(resource, holder, ctx).await;
    }

    let children = build(resource, &ctx.options)?;
    let applied = match apply(&ctx.client, resource, &children).await {
        Ok(applied) => applied,
        // The namespace is being deleted: its children go, and so will the resource (its
        // deletion brings the cleanup). Not the resource's fault, so not reported Degraded;
        // the error policy waits for the deletion instead of retrying.
        Err(error) if error.is_namespace_terminating() => return Err(error),
        Err(error) => {
            let text = error.to_string();
            update_status(
                resource,
                ctx,
                &Outcome::ApplyFailed(&text),
                None,
                None,
                None,
            )
            .await?;
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
    let (scorer_bounds, compute_bounds) = replica_bounds(resource);
    clamp_replicas(&ctx.client, resource, &applied.deployment, scorer_bounds).await?;
    if let Some(compute) = &applied.compute_deployment {
        clamp_replicas(&ctx.client, resource, compute, compute_bounds).await?;
    }
    // The autoscaler loop's latest view (it triggers a reconcile when that view changes).
    let autoscaled = ctx.autoscaler.shown(&resource_key(resource));

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

    // Batch publishing; a Redis outage must not hold back the rest of the status.
    // Without a batch there is no CronJob, hence no batch Job to record (those of a removed
    // CronJob go with it): skip the list.
    let batch = match &applied.cron_job {
        Some(_) => record_batch(resource, ctx).await,
        None => Ok(None),
    };
    let update = batch.as_ref().ok().and_then(Option::as_ref);
    let status = update_status(
        resource,
        ctx,
        &Outcome::Applied(&applied),
        run_token,
        update,
        autoscaled.as_ref(),
    )
    .await?;
    if applied.cron_job.is_some() {
        ctx.metrics.set_batch(
            &resource.namespace().unwrap_or_default(),
            &resource.name_any(),
            status.last_batch.as_ref(),
            millrace_crds::spec::duration::parse(&resource.spec.cache.max_staleness).ok(),
        );
    }
    if let Some(update) = update {
        let (type_, reason) = match &update.published {
            Some(_) => (EventType::Normal, "BatchPublished"),
            None => (EventType::Warning, "BatchNotPublished"),
        };
        event(
            ctx,
            resource,
            type_,
            reason,
            "PublishBatch",
            update.message.clone(),
        )
        .await;
    }
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
    batch?;
    Ok(until_cache_expires(&status))
}

/// Waits for the next change, or until the serving generation expires if that comes
/// first: `CacheWarm` must turn False then, with nothing else changing.
fn until_cache_expires(status: &InferenceDeploymentStatus) -> Action {
    match cache_warm_changes_in(status, &Time(jiff::Timestamp::now())) {
        Some(left) => Action::requeue(left),
        None => Action::await_change(),
    }
}

/// Records the latest finished batch Job: publishes its generation when every shard
/// succeeded and confirmed in Redis; otherwise says why the previous one keeps serving.
async fn record_batch(
    resource: &InferenceDeployment,
    ctx: &Context,
) -> Result<Option<BatchUpdate>, Error> {
    let namespace = resource.namespace().unwrap_or_default();
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace)
        .list(&kube::api::ListParams::default().labels(&format!(
            // Only batch runs: warm Jobs carry the owner label too.
            "{OWNER_LABEL}={},app.kubernetes.io/component=batch",
            resource.name_any()
        )))
        .await
        .map_err(Error::kube("listing batch Jobs"))?;
    let Some((job, outcome)) = next_to_record(resource, &jobs.items) else {
        return Ok(None);
    };
    let generation = job.name_any();
    let update = match outcome {
        JobOutcome::Failed { reason, message } => BatchUpdate {
            run: run_status(job, false, None),
            published: None,
            message: format!(
                "batch run {generation} failed ({reason}: {message}); the previous generation keeps serving"
            ),
            reason,
        },
        JobOutcome::Succeeded => {
            let url = redis_url(resource, ctx).await?;
            let cluster = resource.spec.cache.redis.cluster;
            let keyspace = millrace_crds::keys::Keyspace::new(
                &key_prefix(resource),
                &resource.spec.model.version,
            );
            let report = ctx
                .redis
                .shard_report(
                    &url,
                    cluster,
                    &keyspace.shards_done(&generation),
                    &keyspace.run_report(&generation),
                )
                .await?;
            let shards = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(1) as usize;
            if report.shards >= shards {
                ctx.redis
                    .publish(&url, cluster, &keyspace.serving_pointer(), &generation)
                    .await?;
                info!(%generation, predictions = report.predictions, "published a batch generation");
                let run = run_status(job, true, Some(&report));
                // The spec passed validation, so its batchTTL parses.
                let expires_at =
                    millrace_crds::spec::duration::parse(&resource.spec.cache.batch_ttl)
                        .ok()
                        .and_then(|ttl| expires_at(&run, ttl, &Time(jiff::Timestamp::now())));
                BatchUpdate {
                    run,
                    published: Some(Published {
                        generation: generation.clone(),
                        model_version: resource.spec.model.version.clone(),
                        expires_at,
                    }),
                    reason: "Published".into(),
                    message: format!(
                        "generation {generation} published: {} predictions from {shards} shards",
                        report.predictions
                    ),
                }
            } else {
                BatchUpdate {
                    run: run_status(job, false, Some(&report)),
                    published: None,
                    reason: "ShardsUnconfirmed".into(),
                    message: format!(
                        "Job {generation} completed but only {} of {shards} shards recorded completion in Redis; not published, the previous generation keeps serving",
                        report.shards
                    ),
                }
            }
        }
    };
    Ok(Some(update))
}

/// The Redis URL of `resource`: the spec's literal, or the value in its Secret.
pub(crate) async fn redis_url(
    resource: &InferenceDeployment,
    ctx: &Context,
) -> Result<String, Error> {
    let redis = &resource.spec.cache.redis;
    if let Some(url) = &redis.url {
        return Ok(url.clone());
    }
    let Some(selector) = &redis.url_secret_ref else {
        return Err(Error::RedisUrl(
            "spec.cache.redis has neither url nor urlSecretRef".into(),
        ));
    };
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(
        ctx.client.clone(),
        &resource.namespace().unwrap_or_default(),
    );
    let secret = secrets
        .get_opt(&selector.name)
        .await
        .map_err(Error::kube(format!("reading Secret {}", selector.name)))?
        .ok_or_else(|| Error::RedisUrl(format!("Secret {} does not exist", selector.name)))?;
    let bytes = secret
        .data
        .and_then(|data| data.get(&selector.key).cloned())
        .ok_or_else(|| {
            Error::RedisUrl(format!(
                "Secret {} has no key {}",
                selector.name, selector.key
            ))
        })?;
    String::from_utf8(bytes.0).map_err(|_| {
        Error::RedisUrl(format!(
            "Secret {} key {} is not UTF-8",
            selector.name, selector.key
        ))
    })
}

/// Refuses `resource`, whose key prefix `holder` holds: nothing is applied (children from
/// before stay as they were, with the configuration they had), the status says why, and
/// the resource is looked at again every [`PREFIX_RECHECK`] until the prefix is free.
async fn refuse_prefix(
    resource: &InferenceDeployment,
    holder: &InferenceDeployment,
    ctx: &Context,
) -> Result<Action, Error> {
    let problem = Invalid {
        field: "spec.cache.keyPrefix".into(),
        message: format!(
            "the key prefix {:?} is already used by InferenceDeployment {}/{}; two resources with one prefix would overwrite each other's predictions, and deleting either would delete both's: give this resource another keyPrefix (once set, it cannot change: recreate the resource) or delete the other",
            key_prefix(resource),
            holder.namespace().unwrap_or_default(),
            holder.name_any()
        ),
    };
    refuse(
        resource,
        ctx,
        &Outcome::KeyPrefixTaken(&problem),
        "KeyPrefixConflict",
        problem.to_string(),
    )
    .await?;
    Ok(Action::requeue(PREFIX_RECHECK))
}

/// Records a reconcile that applied nothing (`outcome`), with a Warning event `reason`
/// saying `message` when the resource has just become Degraded.
async fn refuse(
    resource: &InferenceDeployment,
    ctx: &Context,
    outcome: &Outcome<'_>,
    reason: &str,
    message: String,
) -> Result<InferenceDeploymentStatus, Error> {
    let status = update_status(resource, ctx, outcome, None, None, None).await?;
    if changed_to(resource, &status, condition::DEGRADED, "True") {
        event(
            ctx,
            resource,
            EventType::Warning,
            reason,
            "Validate",
            message,
        )
        .await;
    }
    Ok(status)
}

/// Removes every Redis key of `resource` (all model versions) and nothing else. If Redis
/// stays unreachable past `cleanup_timeout` after deletion began, gives up with a warning so
/// deletion is never blocked forever.
async fn cleanup(resource: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.forget(
        &resource.namespace().unwrap_or_default(),
        &resource.name_any(),
    );
    let pattern = millrace_crds::keys::resource_scan_pattern(&key_prefix(resource));
    let watched = ctx.watched().await;
    // A refused resource's keys are the holder's.
    if let Some(holder) = prefix_holder(resource, well_formed(&watched)) {
        let owner = format!(
            "{}/{}",
            holder.namespace().unwrap_or_default(),
            holder.name_any()
        );
        info!(%pattern, %owner, "leaving the Redis keys to the resource that holds the prefix");
        event(
            ctx,
            resource,
            EventType::Normal,
            "RedisKeysKept",
            "Cleanup",
            format!("keys matching {pattern} were left: InferenceDeployment {owner} holds the key prefix"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let result = match redis_url(resource, ctx).await {
        Ok(url) => ctx
            .redis
            .delete_matching(&url, resource.spec.cache.redis.cluster, &pattern)
            .await
            .map_err(Error::from),
        Err(error) => Err(error),
    };
    match result {
        Ok(removed) => {
            info!(removed, %pattern, "removed the resource's Redis keys");
            event(
                ctx,
                resource,
                EventType::Normal,
                "RedisKeysDeleted",
                "Cleanup",
                format!("deleted {removed} keys matching {pattern}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(error) => {
            let deleting_for = resource
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| jiff::Timestamp::now().duration_since(t.0))
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            if deleting_for < ctx.cleanup_timeout {
                return Err(error);
            }
            warn!(%error, "giving up on Redis cleanup; releasing the finalizer");
            event(
                ctx,
                resource,
                EventType::Warning,
                "RedisCleanupSkipped",
                "Cleanup",
                format!("Redis unreachable for {deleting_for:?} after deletion ({error}); keys matching {pattern} were left to expire with their TTLs"),
            )
            .await;
            Ok(Action::await_change())
        }
    }
}

/// The replica bounds of `{name}-scorer` and of the compute tier: in the split topology the
/// scorer Deployment is the cache tier, bounded by `autoscaling.cacheTier`, and the compute
/// tier takes `autoscaling`'s own bounds (which may start at 0).
pub(crate) fn replica_bounds(resource: &InferenceDeployment) -> ((i32, i32), (i32, i32)) {
    let autoscaling = &resource.spec.autoscaling;
    let own = (autoscaling.min_replicas, autoscaling.max_replicas);
    match resource.spec.serving.topology {
        millrace_crds::spec::Topology::Split => {
            let tier = &autoscaling.cache_tier;
            ((tier.min_replicas, tier.max_replicas), own)
        }
        millrace_crds::spec::Topology::Unified => (own, own),
    }
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
    batch: Option<&BatchUpdate>,
    autoscaling: Option<&millrace_crds::status::AutoscalingStatus>,
) -> Result<InferenceDeploymentStatus, Error> {
    let now = Time(jiff::Timestamp::now());
    let mut status = desired_status(
        resource.metadata.generation,
        resource.status.as_ref(),
        outcome,
        run_token,
        batch,
        autoscaling,
        &now,
    );
    set_cache_warm(
        &mut status,
        resource.metadata.generation,
        resource.spec.batch.is_some(),
        &resource.spec.model.version,
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

pub(crate) async fn event(
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
        // Events are best effort; in a namespace being deleted they are refused, expectedly.
        if crate::error::refused_for_terminating_namespace(&error) {
            debug!(%error, reason, "could not publish an event in a namespace being deleted");
        } else {
            warn!(%error, reason, "could not publish an event");
        }
    }
}
