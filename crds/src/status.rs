//! `InferenceDeployment.status`: what the operator observed and did.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition types the operator maintains.
pub mod condition {
    /// Scorers are available and serving the current spec.
    pub const READY: &str = "Ready";
    /// Children are being created or rolled to a new spec.
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong that the operator cannot fix by itself (invalid spec, failed apply).
    pub const DEGRADED: &str = "Degraded";
    /// The last batch run published its predictions (False: it failed; the previous
    /// generation keeps serving).
    pub const BATCH_SUCCEEDED: &str = "BatchSucceeded";
    /// A published batch generation is there to answer from: its predictions have not
    /// outlived `batchTTL` (False before the first run publishes, once the serving
    /// generation has expired, and without `spec.batch`: then every prediction is computed
    /// on request).
    pub const CACHE_WARM: &str = "CacheWarm";
}

/// The observed state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Progressing, Degraded, BatchSucceeded, CacheWarm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The batch generation scorers read (the published pointer in Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_generation: Option<String>,

    /// When the serving generation's predictions start to expire: the start of the run
    /// that published it plus `batchTTL` (a run sets the TTL as it starts, or as it first
    /// writes each bucket, so none expires earlier). Past it, until a later run publishes,
    /// requests are computed in real time and `CacheWarm` is False.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_expires_at: Option<Time>,

    /// The model version the serving generation was scored with. Keys are per version, so
    /// a new `spec.model.version` has no serving generation until a run publishes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_model_version: Option<String>,

    /// The most recent batch run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_batch: Option<BatchRunStatus>,

    /// The last run-batch token that was turned into a Job, so each token runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_token: Option<String>,

    /// What the autoscaler sees and decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// One batch run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchRunStatus {
    /// The generation the run wrote.
    pub generation: String,
    /// The Job that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Predictions written, when the shards reported it (an incremental run: those it
    /// computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<i64>,
    /// Predictions an incremental run kept, their entities' features unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<i64>,
    /// Predictions an incremental run removed, their entities gone from the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<i64>,
    /// Predictions an incremental run wrote again, their buckets evicted or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<i64>,
    /// Whether every shard succeeded and the generation was published.
    pub succeeded: bool,
}

/// The autoscaler's view.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Current scorer replicas.
    pub replicas: i32,
    /// Replicas the autoscaler asked for.
    pub desired_replicas: i32,
    /// Share of requests answered from cache over the last window, as a percentage
    /// ("93.5%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_rate: Option<String>,
    /// Cache misses per second over the last window, all replicas together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misses_per_second: Option<f64>,
    /// When replicas last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}
