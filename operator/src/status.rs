//! Status: the pure computation of `InferenceDeployment.status` from what was applied (or
//! why nothing was), keeping `lastTransitionTime` for conditions whose status did not change
//! so that an unchanged world produces an identical status and no patch.

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
        if let Some(generation) = &batch.published {
            status.serving_generation = Some(generation.clone());
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
