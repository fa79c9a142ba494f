//! The autoscaler loop: every `autoscaling.syncPeriod`, per InferenceDeployment whose
//! `autoscaling.mode` is `operator`, read the scorers' traffic windows from Redis, decide
//! (pure, [`crate::autoscale`]), and scale the scorer Deployment through its scale
//! subresource.
//!
//! It runs beside the reconciler rather than inside it, so a sync costs one scale read, one
//! Redis read and, only when the count changes, one scale write: never a re-apply of every
//! child. The status stays single-writer: the loop keeps its latest view here and asks the
//! reconciler to run only when what the status shows should change (replicas, or the miss
//! rate or hit rate moving noticeably). A resource whose scorers report nothing costs one
//! Redis read per period and no API call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::DeserializeGuard;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_crds::keys::{Keyspace, now_ms};
use millrace_crds::spec::{AutoscalingMode, Topology};
use millrace_crds::status::AutoscalingStatus;
use millrace_crds::traffic::TrafficWindow;
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

use crate::apply::scale;
use crate::autoscale::{Decision, Policy, Recommendations, Signal, decide_reported, fresh_windows};
use crate::build::config::key_prefix;
use crate::build::names::{compute_name, scorer_name};
use crate::controller::{Context, event, redis_url, resource_key};

/// How often the loop looks for resources whose sync is due.
const TICK: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Tracked {
    history: Recommendations,
    /// The split topology's cache tier (`history` is then the compute tier's).
    cache_history: Recommendations,
    cache_last_replicas: Option<i32>,
    next_sync: Option<Instant>,
    shown: Option<AutoscalingStatus>,
    /// The replica count of the last sync with data.
    last_replicas: Option<i32>,
    /// Since when misses have been at or above the warming threshold.
    high_since: Option<u64>,
    /// When this operator last started a warm Job.
    last_warm: Option<u64>,
    last_scale_time: Option<Time>,
}

/// Per-resource autoscaler state, shared with the reconciler.
#[derive(Default)]
pub struct Autoscaler {
    tracked: Mutex<HashMap<String, Tracked>>,
}

impl Autoscaler {
    /// What the status should show for `key`, if the autoscaler has synced it.
    pub fn shown(&self, key: &str) -> Option<AutoscalingStatus> {
        self.lock().get(key).and_then(|t| t.shown.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs until aborted.
pub async fn run(
    ctx: Arc<Context>,
    store: Store<DeserializeGuard<InferenceDeployment>>,
    triggers: Sender<ObjectRef<DeserializeGuard<InferenceDeployment>>>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut live = Vec::new();
        for guard in store.state() {
            let Ok(resource) = &guard.0 else { continue };
            let key = resource_key(resource);
            live.push(key.clone());
            if resource.spec.autoscaling.mode != AutoscalingMode::Operator
                || resource.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let due = ctx
                .autoscaler
                .lock()
                .get(&key)
                .and_then(|t| t.next_sync)
                .is_none_or(|at| at <= now);
            if !due {
                continue;
            }
            let policy = Policy::from_spec(&resource.spec.autoscaling);
            if let Err(error) = sync(&ctx, resource, &key, &policy, &triggers).await {
                warn!(resource = %key, %error, "autoscaler sync failed; retrying next period");
            }
            if let Some(tracked) = ctx.autoscaler.lock().get_mut(&key) {
                tracked.next_sync = Some(now + policy.sync_period);
            }
        }
        // Forget deleted resources.
        ctx.autoscaler.lock().retain(|key, _| live.contains(key));
    }
}

async fn sync(
    ctx: &Context,
    resource: &InferenceDeployment,
    key: &str,
    policy: &Policy,
    triggers: &Sender<ObjectRef<DeserializeGuard<InferenceDeployment>>>,
) -> Result<(), crate::error::Error> {
    let namespace = resource.namespace().unwrap_or_default();
    let name = scorer_name(resource);
    let keyspace = Keyspace::new(&key_prefix(resource), &resource.spec.model.version);
    let windows = match redis_url(resource, ctx).await {
        Ok(url) => ctx
            .redis
            .traffic(&url, resource.spec.cache.redis.cluster, &keyspace.traffic())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let windows: Vec<_> = match windows {
        Ok(windows) => windows.into_iter().map(|(_, w)| w).collect(),
        Err(error) => {
            warn!(resource = %key, %error, "cannot read the scorers' traffic");
            Vec::new()
        }
    };
    // No fresh data means no decision to make (the count is kept, never lowered): skip the
    // API server entirely, so idle resources cost one Redis read per period.
    let now = now_ms();
    if fresh_windows(policy, &windows, now).is_empty() {
        // Silence holds the count: the stabilization window must see it when data returns.
        let mut tracked = ctx.autoscaler.lock();
        let entry = tracked.entry(key.to_string()).or_default();
        if let Some(replicas) = entry.last_replicas {
            entry.history.hold(now, replicas, policy);
        }
        if let Some(replicas) = entry.cache_last_replicas {
            entry.cache_history.hold(now, replicas, policy);
        }
        return Ok(());
    }
    let split = resource.spec.serving.topology == Topology::Split;
    // In the split topology the cache tier (`{name}-scorer`) scales on requests and its pods
    // publish the windows; the compute tier then scales on their misses.
    let mut reporters = None;
    if split {
        let cache_policy = Policy::cache_tier(&resource.spec.autoscaling);
        match scale_tier(
            ctx,
            resource,
            key,
            &name,
            &cache_policy,
            None,
            &windows,
            now,
        )
        .await?
        {
            Some(tier) => reporters = Some(tier.current),
            None => return Ok(()),
        }
    }
    let target = if split { compute_name(resource) } else { name };
    let Some(tier) = scale_tier(
        ctx, resource, key, &target, policy, reporters, &windows, now,
    )
    .await?
    else {
        return Ok(());
    };
    let (decision, running) = (tier.decision, tier.running);
    ctx.metrics
        .set_replicas(&namespace, &resource.name_any(), decision.desired, running);
    if let Err(error) = maybe_warm(ctx, resource, key, decision.misses_per_second, now).await {
        warn!(resource = %key, %error, "cannot start a warm Job");
    }

    let view = {
        let tracked = ctx.autoscaler.lock();
        let last_scale_time = tracked.get(key).and_then(|t| t.last_scale_time.clone());
        AutoscalingStatus {
            replicas: running,
            desired_replicas: decision.desired,
            hit_rate: decision.hit_rate.map(|h| format!("{:.1}%", h * 100.0)),
            misses_per_second: decision
                .misses_per_second
                .map(|m| (m * 10.0).round() / 10.0),
            last_scale_time,
        }
    };
    let show = {
        let mut tracked = ctx.autoscaler.lock();
        let entry = tracked.entry(key.to_string()).or_default();
        let worth = worth_showing(entry.shown.as_ref(), &view);
        if worth {
            entry.shown = Some(view);
        }
        worth
    };
    if show {
        let object = ObjectRef::new(&resource.name_any()).within(&namespace);
        // A full channel means a reconcile is already coming; dropping is harmless.
        let _ = triggers.try_send(object);
    }
    Ok(())
}

/// One tier's outcome of a sync.
struct TierSync {
    decision: Decision,
    /// Replicas requested before the decision.
    current: i32,
    /// Replicas that exist.
    running: i32,
}

/// Decides and scales one Deployment: `{name}-scorer`, or in the split topology the cache
/// tier (`reporters` None and a requests policy) or the compute tier (`reporters`: the cache
/// pods that publish the windows). None when the Deployment does not exist yet.
#[allow(clippy::too_many_arguments)]
async fn scale_tier(
    ctx: &Context,
    resource: &InferenceDeployment,
    key: &str,
    deployment: &str,
    policy: &Policy,
    reporters: Option<i32>,
    windows: &[TrafficWindow],
    now: u64,
) -> Result<Option<TierSync>, crate::error::Error> {
    let namespace = resource.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(current_scale) = deployments
        .get_scale(deployment)
        .await
        .map(Some)
        .or_else(|e| match e {
            kube::Error::Api(status) if status.code == 404 => Ok(None),
            other => Err(other),
        })
        .map_err(crate::error::Error::kube(format!(
            "reading the scale of Deployment {deployment}"
        )))?
    else {
        // Not created yet: the reconciler will.
        return Ok(None);
    };
    let current = current_scale
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(policy.min_replicas);
    let running = current_scale.status.as_ref().map_or(0, |s| s.replicas);
    let cache_tier = policy.signal == Signal::Requests;
    let decision = {
        let mut tracked = ctx.autoscaler.lock();
        let entry = tracked.entry(key.to_string()).or_default();
        let (history, last) = if cache_tier {
            (&mut entry.cache_history, &mut entry.cache_last_replicas)
        } else {
            (&mut entry.history, &mut entry.last_replicas)
        };
        let decision = decide_reported(
            policy,
            current,
            reporters.unwrap_or(current),
            windows,
            now,
            history,
        );
        *last = Some(decision.desired);
        decision
    };
    if decision.desired != current {
        scale(&ctx.client, resource, deployment, decision.desired).await?;
        scaled_event(ctx, resource, deployment, current, &decision, policy).await;
        if !cache_tier && let Some(t) = ctx.autoscaler.lock().get_mut(key) {
            t.last_scale_time = Some(Time(jiff::Timestamp::now()));
        }
    }
    Ok(Some(TierSync {
        decision,
        current,
        running,
    }))
}

/// Starts a warm Job when misses have stayed at or above `warming.missesPerSecond` for
/// `warming.window` and none ran within `warming.cooldown`.
async fn maybe_warm(
    ctx: &Context,
    resource: &InferenceDeployment,
    key: &str,
    misses_per_second: Option<f64>,
    now: u64,
) -> Result<(), crate::error::Error> {
    use millrace_crds::spec::duration;
    let warming = &resource.spec.autoscaling.warming;
    if warming.misses_per_second <= 0 {
        return Ok(());
    }
    let window = duration::parse(&warming.window).unwrap_or(Duration::from_secs(120));
    let cooldown = duration::parse(&warming.cooldown).unwrap_or(Duration::from_secs(1_800));
    let due = {
        let mut tracked = ctx.autoscaler.lock();
        let entry = tracked.entry(key.to_string()).or_default();
        let high = misses_per_second.is_some_and(|m| m >= f64::from(warming.misses_per_second));
        entry.high_since = if high {
            entry.high_since.or(Some(now))
        } else {
            None
        };
        let held = entry
            .high_since
            .is_some_and(|since| now.saturating_sub(since) >= window.as_millis() as u64);
        let cooled = entry
            .last_warm
            .is_none_or(|at| now.saturating_sub(at) >= cooldown.as_millis() as u64);
        held && cooled
    };
    if !due {
        return Ok(());
    }
    let children = crate::build::build(resource, &ctx.options)?;
    let name = crate::build::warm::warm_job_name(resource, now, cooldown);
    // Warming needs the model: the compute tier's pod in the split topology.
    let model_pod = children
        .compute_deployment
        .as_ref()
        .unwrap_or(&children.deployment);
    let job = crate::build::warm::warm_job(resource, model_pod, &name)?;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(
        ctx.client.clone(),
        &resource.namespace().unwrap_or_default(),
    );
    let created = match jobs.create(&Default::default(), &job).await {
        Ok(_) => true,
        // This cooldown period's Job exists already (a restarted operator): not again.
        Err(kube::Error::Api(status)) if status.code == 409 => false,
        Err(e) => return Err(crate::error::Error::kube("creating the warm Job")(e)),
    };
    if let Some(entry) = ctx.autoscaler.lock().get_mut(key) {
        entry.last_warm = Some(now);
    }
    if created {
        event(
            ctx,
            resource,
            EventType::Normal,
            "WarmStarted",
            "Warm",
            format!(
                "misses stayed at or above {}/s for {}: warming the {} most active entities (Job {name})",
                warming.misses_per_second, warming.window, warming.top
            ),
        )
        .await;
        info!(job = %name, "started a warm Job");
    }
    Ok(())
}

/// Whether `next` differs from what the status shows enough to write it.
fn worth_showing(shown: Option<&AutoscalingStatus>, next: &AutoscalingStatus) -> bool {
    let Some(shown) = shown else { return true };
    let rate = |s: &AutoscalingStatus| {
        s.hit_rate
            .as_deref()
            .and_then(|r| r.trim_end_matches('%').parse::<f64>().ok())
    };
    let misses_moved = match (shown.misses_per_second, next.misses_per_second) {
        (Some(a), Some(b)) => (a - b).abs() > 0.1 * a.abs().max(1.0),
        (a, b) => a.is_some() != b.is_some(),
    };
    let hits_moved = match (rate(shown), rate(next)) {
        (Some(a), Some(b)) => (a - b).abs() >= 1.0,
        (a, b) => a.is_some() != b.is_some(),
    };
    shown.replicas != next.replicas
        || shown.desired_replicas != next.desired_replicas
        || shown.last_scale_time != next.last_scale_time
        || misses_moved
        || hits_moved
}

async fn scaled_event(
    ctx: &Context,
    resource: &InferenceDeployment,
    deployment: &str,
    current: i32,
    decision: &Decision,
    policy: &Policy,
) {
    let misses = decision.misses_per_second.unwrap_or(0.0);
    let load = match policy.signal {
        Signal::Misses => format!("{misses:.0} misses/s"),
        Signal::Requests => {
            let hit_rate = decision.hit_rate.unwrap_or(1.0);
            let requests = if hit_rate < 1.0 {
                misses / (1.0 - hit_rate)
            } else {
                0.0
            };
            format!("{requests:.0} requests/s")
        }
    };
    event(
        ctx,
        resource,
        EventType::Normal,
        "Scaled",
        "Autoscale",
        format!(
            "{deployment} {current} -> {}: {load} from {} pods, target {}/replica ({:?})",
            decision.desired, decision.reporting, policy.target_misses_per_replica, decision.reason
        ),
    )
    .await;
    info!(%deployment, from = current, to = decision.desired, misses, reason = ?decision.reason, "scaled");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(desired: i32, misses: Option<f64>, hit: Option<&str>) -> AutoscalingStatus {
        AutoscalingStatus {
            replicas: desired,
            desired_replicas: desired,
            hit_rate: hit.map(String::from),
            misses_per_second: misses,
            last_scale_time: None,
        }
    }

    #[test]
    fn only_noticeable_changes_are_shown() {
        let shown = view(3, Some(300.0), Some("90.0%"));
        assert!(!worth_showing(
            Some(&shown),
            &view(3, Some(320.0), Some("90.4%"))
        ));
        assert!(worth_showing(
            Some(&shown),
            &view(3, Some(340.0), Some("90.0%"))
        ));
        assert!(worth_showing(
            Some(&shown),
            &view(3, Some(300.0), Some("91.0%"))
        ));
        assert!(worth_showing(
            Some(&shown),
            &view(4, Some(300.0), Some("90.0%"))
        ));
        assert!(worth_showing(Some(&shown), &view(3, None, None)));
        assert!(worth_showing(None, &shown));
    }
}
