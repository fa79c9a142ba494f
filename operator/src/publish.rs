//! Batch publishing: when a batch Job finishes, publish its generation (every shard
//! succeeded and recorded completion in Redis) or report why not. A failed or partial run is
//! never published: the previous generation keeps serving until its TTL.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use millrace_crds::InferenceDeployment;
use millrace_crds::status::BatchRunStatus;

use crate::redis_store::ShardReport;

/// How a finished batch Job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every index succeeded.
    Succeeded,
    /// The Job failed: the condition's reason and message.
    Failed {
        /// The Job controller's reason (BackoffLimitExceeded, DeadlineExceeded, ...).
        reason: String,
        /// Its message.
        message: String,
    },
}

/// What publishing decided for the latest finished run, for the status.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchUpdate {
    /// The run, as `status.lastBatch`.
    pub run: BatchRunStatus,
    /// What now serves, when this run was published.
    pub published: Option<Published>,
    /// Why BatchSucceeded is what it is.
    pub reason: String,
    /// Details for humans.
    pub message: String,
}

/// A generation published, as the status records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The generation (the run's Job name).
    pub generation: String,
    /// The model version it was scored with: its keys are that version's.
    pub model_version: String,
    /// When its predictions start to expire ([`expires_at`]).
    pub expires_at: Option<Time>,
}

/// The outcome of a Job, if it has finished.
pub fn outcome(job: &Job) -> Option<JobOutcome> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    if holds("Complete").is_some() {
        return Some(JobOutcome::Succeeded);
    }
    holds("Failed").map(|c| JobOutcome::Failed {
        reason: c.reason.clone().unwrap_or_else(|| "Failed".into()),
        message: c.message.clone().unwrap_or_default(),
    })
}

/// The most recently created finished Job that the status has not recorded yet.
pub fn next_to_record<'a>(
    resource: &InferenceDeployment,
    jobs: &'a [Job],
) -> Option<(&'a Job, JobOutcome)> {
    let recorded = resource
        .status
        .as_ref()
        .and_then(|s| s.last_batch.as_ref())
        .and_then(|b| b.job_name.as_deref());
    let latest = jobs
        .iter()
        .filter_map(|job| outcome(job).map(|o| (job, o)))
        .max_by_key(|(job, _)| (job.creation_timestamp(), job.name_any()))?;
    (Some(latest.0.name_any().as_str()) != recorded).then_some(latest)
}

/// The `status.lastBatch` entry for `job`, with what its shards reported (if they did).
pub fn run_status(job: &Job, succeeded: bool, report: Option<&ShardReport>) -> BatchRunStatus {
    let status = job.status.clone().unwrap_or_default();
    BatchRunStatus {
        generation: job.name_any(),
        job_name: Some(job.name_any()),
        start_time: status.start_time,
        completion_time: status.completion_time.or_else(|| {
            status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Failed")
                .and_then(|c| c.last_transition_time)
        }),
        predictions: report.map(|r| r.predictions),
        carried: report.and_then(|r| r.carried),
        removed: report.and_then(|r| r.removed),
        repaired: report.and_then(|r| r.repaired),
        succeeded,
    }
}

/// When the generation `run` published starts to expire, its predictions living `ttl`:
/// the run's start plus `ttl`, since a run sets the TTL as it starts (an incremental run,
/// on every bucket) or as it first writes each bucket (a full run), so none expires
/// earlier. A run without a recorded start counts from its completion, then from `now`:
/// later than the truth, but only by the run's length.
pub fn expires_at(run: &BatchRunStatus, ttl: Duration, now: &Time) -> Option<Time> {
    let from = run
        .start_time
        .as_ref()
        .or(run.completion_time.as_ref())
        .unwrap_or(now);
    from.0.checked_add(ttl).ok().map(Time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Time {
        Time(text.parse().expect("timestamp"))
    }

    #[test]
    fn a_generation_expires_its_ttl_after_its_run_started() {
        let now = at("2026-12-02T12:00:00Z");
        let mut run = BatchRunStatus {
            generation: "g".into(),
            start_time: Some(at("2026-12-02T02:00:00Z")),
            completion_time: Some(at("2026-12-02T02:10:00Z")),
            succeeded: true,
            ..BatchRunStatus::default()
        };
        let day = Duration::from_secs(86_400);
        assert_eq!(
            expires_at(&run, day, &now),
            Some(at("2026-12-03T02:00:00Z"))
        );
        run.start_time = None;
        assert_eq!(
            expires_at(&run, day, &now),
            Some(at("2026-12-03T02:10:00Z")),
            "no start recorded: from the completion"
        );
        run.completion_time = None;
        assert_eq!(
            expires_at(&run, day, &now),
            Some(at("2026-12-03T12:00:00Z"))
        );
    }
}
