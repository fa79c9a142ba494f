//! Status: the pure computation of `InferenceDeployment.status` from what was applied (or
//! why nothing was), keeping `lastTransitionTime` for conditions whose status did not change
//! so that an unchanged world produces an identical status and no patch.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use millrace_crds::status::{AutoscalingStatus, InferenceDeploymentStatus, condition};

use crate::apply::Applied;
use crate::publish::BatchUpdate;
use crate::validate::Invalid;

/// What one reconcile found, as input to the status.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The spec failed validation; nothing was applied.
    Invalid(&'a [Invalid]),
    /// Another resource holds the key prefix ([`crate::claims`]); nothing was applied.
    KeyPrefixTaken(&'a Invalid),
    /// Applying the children failed.
    ApplyFailed(&'a str),
    /// Every child was applied.
    Applied(&'a Applied),
}

/// The status for `outcome`, given the current one; `now` stamps new transitions.
pub fn desired_status(
    generation: Option<i64>,
    current: Option<&InferenceDeploymentStatus>,
    outcome: &Outcome<'_>,
    run_token: Option<&str>,
    batch: Option<&BatchUpdate>,
    autoscaling: Option<&AutoscalingStatus>,
    now: &Time,
) -> InferenceDeploymentStatus {
    let mut status = current.cloned().unwrap_or_default();
    status.observed_generation = generation;
    if let Some(token) = run_token {
        status.last_run_token = Some(token.to_string());
    }
    let set = |status: &mut InferenceDeploymentStatus,
               type_: &str,
               ok: bool,
               reason: &str,
               message: String| {
        set_condition(
            &mut status.conditions,
            generation,
            now,
            type_,
            ok,
            reason,
            message,
        );
    };
    if let Some(batch) = batch {
        status.last_batch = Some(batch.run.clone());
        if let Some(published) = &batch.published {
            status.serving_generation = Some(published.generation.clone());
            status.serving_expires_at = published.expires_at.clone();
            status.serving_model_version = Some(published.model_version.clone());
        }
        set(
            &mut status,
            condition::BATCH_SUCCEEDED,
            batch.published.is_some(),
            &batch.reason,
            batch.message.clone(),
        );
    }
    // Nothing applied: Degraded, not Ready, not progressing until the spec changes.
    let refused = |status: &mut InferenceDeploymentStatus, reason: &str, message: String| {
        set(status, condition::DEGRADED, true, reason, message.clone());
        set(status, condition::READY, false, reason, message);
        set(
            status,
            condition::PROGRESSING,
            false,
            reason,
            "fix the spec to continue".into(),
        );
    };
    match outcome {
        Outcome::Invalid(problems) => {
            let message = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            refused(&mut status, "InvalidSpec", message);
        }
        Outcome::KeyPrefixTaken(problem) => {
            refused(&mut status, "KeyPrefixConflict", problem.to_string());
        }
        Outcome::ApplyFailed(error) => {
            // Ready stays as it was: the scorers already running keep serving.
            set(
                &mut status,
                condition::DEGRADED,
                true,
                "ApplyFailed",
                (*error).to_string(),
            );
        }
        Outcome::Applied(applied) => {
            let rollout = Rollout::of(&applied.deployment);
            set(
                &mut status,
                condition::DEGRADED,
                false,
                "AsExpected",
                "all children applied".into(),
            );
            set(
                &mut status,
                condition::PROGRESSING,
                !rollout.complete,
                rollout.progress_reason(),
                rollout.describe(),
            );
            set(
                &mut status,
                condition::READY,
                rollout.ready(),
                rollout.ready_reason(),
                rollout.describe(),
            );
            let autoscaling = status
                .autoscaling
                .get_or_insert_with(AutoscalingStatus::default);
            autoscaling.replicas = rollout.current;
            autoscaling.desired_replicas = rollout.desired;
        }
    }
    // The autoscaler's view, when it ran: its decision is the desired count (the
    // Deployment read before it scaled still shows the old one).
    if let Some(decided) = autoscaling {
        let shown = status
            .autoscaling
            .get_or_insert_with(AutoscalingStatus::default);
        shown.desired_replicas = decided.desired_replicas;
        shown.hit_rate = decided.hit_rate.clone();
        shown.misses_per_second = decided.misses_per_second;
        if decided.last_scale_time.is_some() {
            shown.last_scale_time = decided.last_scale_time.clone();
        }
    }
    status
}

/// Sets `CacheWarm`: whether the scorers have a published batch generation to answer from
/// (see [`condition::CACHE_WARM`]), for a resource with `spec.batch` or without
/// (`batch_configured`) whose scorers run `model_version`.
pub fn set_cache_warm(
    status: &mut InferenceDeploymentStatus,
    generation: Option<i64>,
    batch_configured: bool,
    model_version: &str,
    now: &Time,
) {
    let (ok, reason, message) = cache_warm(status, batch_configured, model_version, now);
    set_condition(
        &mut status.conditions,
        generation,
        now,
        condition::CACHE_WARM,
        ok,
        reason,
        message,
    );
}

/// `CacheWarm`'s status, reason and message.
fn cache_warm(
    status: &InferenceDeploymentStatus,
    batch_configured: bool,
    model_version: &str,
    now: &Time,
) -> (bool, &'static str, String) {
    if !batch_configured {
        return (
            false,
            "NoBatch",
            "no spec.batch: every prediction is computed on request, then cached for realtimeTTL"
                .into(),
        );
    }
    let Some(serving) = &status.serving_generation else {
        return (
            false,
            "AwaitingFirstBatch",
            "no batch run has published yet: requests are computed in real time until one does"
                .into(),
        );
    };
    // Keys are per model version: scorers of another version do not read this generation
    // (they would again if the spec went back to its version, while it lives).
    if let Some(scored) = status.serving_model_version.as_deref()
        && scored != model_version
    {
        return (
            false,
            "AwaitingFirstBatch",
            format!(
                "model version {model_version} has no published generation yet ({serving} was scored with version {scored}): requests are computed in real time until a run publishes one"
            ),
        );
    }
    match &status.serving_expires_at {
        Some(expiry) if expiry.0 <= now.0 => (
            false,
            "BatchExpired",
            format!(
                "generation {serving} expired at {} (batchTTL after its run started) and no later run has published: requests are computed in real time",
                expiry.0
            ),
        ),
        Some(expiry) => (
            true,
            "BatchServing",
            format!("generation {serving} serving until {}", expiry.0),
        ),
        // Published by a release that did not record the expiry: the next run will.
        None => (
            true,
            "BatchServing",
            format!("generation {serving} serving"),
        ),
    }
}

/// How long until `CacheWarm` turns False by itself (the serving generation expiring), so
/// the resource is looked at again then; `None` when nothing is due. (kube-runtime clamps a
/// wait past its timer's horizon, about two years, so a batchTTL of decades is safe.)
pub fn cache_warm_changes_in(status: &InferenceDeploymentStatus, now: &Time) -> Option<Duration> {
    let warm = condition_status(Some(status), condition::CACHE_WARM) == Some("True");
    let expiry = status.serving_expires_at.as_ref()?;
    let left = now.0.duration_until(expiry.0);
    // A second past the expiry, so the reconcile then finds it passed.
    (warm && left.is_positive()).then(|| left.unsigned_abs() + Duration::from_secs(1))
}

/// Where the scorer Deployment's rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rollout {
    desired: i32,
    current: i32,
    updated: i32,
    available: i32,
    complete: bool,
}

impl Rollout {
    fn of(deployment: &Deployment) -> Self {
        let desired = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        let current = status.replicas.unwrap_or(0);
        let updated = status.updated_replicas.unwrap_or(0);
        let available = status.available_replicas.unwrap_or(0);
        let observed = status.observed_generation >= deployment.metadata.generation;
        let complete = observed && updated >= desired && current == updated && available >= desired;
        Self {
            desired,
            current,
            updated,
            available,
            complete,
        }
    }

    fn ready(&self) -> bool {
        self.complete
    }

    fn ready_reason(&self) -> &'static str {
        match (self.complete, self.desired) {
            (true, 0) => "ScaledToZero",
            (true, _) => "ScorersAvailable",
            (false, _) if self.available > 0 => "RollingOut",
            (false, _) => "ScorersUnavailable",
        }
    }

    fn progress_reason(&self) -> &'static str {
        if self.complete {
            "RolloutComplete"
        } else {
            "RollingOut"
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}/{} scorers available, {} on the current spec",
            self.available, self.desired, self.updated
        )
    }
}

/// Sets condition `type_`, keeping its `lastTransitionTime` when its status is unchanged.
fn set_condition(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    now: &Time,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) {
    let status = if ok { "True" } else { "False" }.to_string();
    let last_transition_time = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let updated = Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = updated,
        None => conditions.push(updated),
    }
}

/// The status of condition `type_`, if present.
pub fn condition_status<'a>(
    status: Option<&'a InferenceDeploymentStatus>,
    type_: &str,
) -> Option<&'a str> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Time {
        Time(text.parse().expect("timestamp"))
    }

    fn warm(status: &InferenceDeploymentStatus) -> (String, String, String) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::CACHE_WARM)
            .expect("CacheWarm is set");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn cache_warm_follows_the_serving_generation_until_it_expires() {
        let noon = at("2026-12-02T12:00:00Z");
        let mut status = InferenceDeploymentStatus::default();

        set_cache_warm(&mut status, Some(1), false, "3", &noon);
        assert_eq!(warm(&status).1, "NoBatch");
        set_cache_warm(&mut status, Some(1), true, "3", &noon);
        assert_eq!(
            (warm(&status).0.as_str(), warm(&status).1.as_str()),
            ("False", "AwaitingFirstBatch")
        );
        assert_eq!(cache_warm_changes_in(&status, &noon), None);

        status.serving_generation = Some("churn-batch-1".into());
        status.serving_expires_at = Some(at("2026-12-03T02:00:00Z"));
        status.serving_model_version = Some("3".into());
        set_cache_warm(&mut status, Some(1), true, "3", &noon);
        let (ok, reason, message) = warm(&status);
        assert_eq!((ok.as_str(), reason.as_str()), ("True", "BatchServing"));
        assert!(message.contains("churn-batch-1"), "{message}");
        assert!(message.contains("2026-12-03T02:00:00Z"), "{message}");
        assert_eq!(
            cache_warm_changes_in(&status, &noon),
            Some(Duration::from_secs(14 * 3600 + 1)),
            "looked at again a second after the expiry"
        );

        let later = at("2026-12-03T02:00:00Z");
        set_cache_warm(&mut status, Some(1), true, "3", &later);
        let (ok, reason, _) = warm(&status);
        assert_eq!((ok.as_str(), reason.as_str()), ("False", "BatchExpired"));
        assert_eq!(cache_warm_changes_in(&status, &later), None, "nothing due");
    }

    #[test]
    fn a_generation_of_another_model_version_does_not_warm_this_one() {
        let now = at("2026-12-02T12:00:00Z");
        let mut status = InferenceDeploymentStatus {
            serving_generation: Some("g".into()),
            serving_expires_at: Some(at("2026-12-03T02:00:00Z")),
            serving_model_version: Some("3".into()),
            ..InferenceDeploymentStatus::default()
        };
        set_cache_warm(&mut status, Some(2), true, "4", &now);
        let (ok, reason, message) = warm(&status);
        assert_eq!(
            (ok.as_str(), reason.as_str()),
            ("False", "AwaitingFirstBatch")
        );
        assert!(message.contains("model version 4"), "{message}");
        assert_eq!(cache_warm_changes_in(&status, &now), None, "nothing due");
        // Back to version 3: its generation is still published under its keys.
        set_cache_warm(&mut status, Some(3), true, "3", &now);
        assert_eq!(warm(&status).1, "BatchServing");
    }

    #[test]
    fn a_generation_published_without_an_expiry_counts_as_serving() {
        let now = at("2026-12-02T12:00:00Z");
        let mut status = InferenceDeploymentStatus {
            serving_generation: Some("g".into()),
            ..InferenceDeploymentStatus::default()
        };
        set_cache_warm(&mut status, Some(1), true, "3", &now);
        assert_eq!(warm(&status).1, "BatchServing");
        assert_eq!(cache_warm_changes_in(&status, &now), None);
    }

    #[test]
    fn publishing_records_the_generation_and_its_expiry() {
        let now = at("2026-12-02T12:00:00Z");
        let batch = BatchUpdate {
            run: millrace_crds::status::BatchRunStatus {
                generation: "g2".into(),
                succeeded: true,
                ..Default::default()
            },
            published: Some(crate::publish::Published {
                generation: "g2".into(),
                model_version: "3".into(),
                expires_at: Some(at("2026-12-03T12:00:00Z")),
            }),
            reason: "Published".into(),
            message: String::new(),
        };
        let status = desired_status(
            Some(1),
            None,
            &Outcome::ApplyFailed("x"),
            None,
            Some(&batch),
            None,
            &now,
        );
        assert_eq!(status.serving_generation.as_deref(), Some("g2"));
        assert_eq!(status.serving_expires_at, Some(at("2026-12-03T12:00:00Z")));
        assert_eq!(status.serving_model_version.as_deref(), Some("3"));

        // A run that did not publish leaves the serving generation and its expiry alone.
        let failed = BatchUpdate {
            published: None,
            ..batch
        };
        let after = desired_status(
            Some(1),
            Some(&status),
            &Outcome::ApplyFailed("x"),
            None,
            Some(&failed),
            None,
            &now,
        );
        assert_eq!(
            (&after.serving_generation, &after.serving_expires_at),
            (&status.serving_generation, &status.serving_expires_at)
        );
    }
}
