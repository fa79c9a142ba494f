//! The scorer's runtime config: what the operator renders into a ConfigMap and every scorer
//! mode (`serve`, `batch`, `warm`) parses at start-up.
//!
//! It is the spec resolved for one pod: defaults applied, the model's local path decided,
//! the Redis keyspace fixed. Secrets never appear here: the Redis URL reaches the pod as the
//! `MILLRACE_REDIS_URL` environment variable (from the spec's literal or its Secret).

use serde::{Deserialize, Serialize};

use crate::keys::Keyspace;
use crate::spec::{ExecutionProvider, FeaturesSpec, MemoryCacheSpec, duration};
use crate::spec::{FallbackSpec, MicroBatchSpec, Topology};

/// The environment variable that carries the Redis URL into scorer and batch pods.
pub const REDIS_URL_ENV: &str = "MILLRACE_REDIS_URL";

/// The config file's name inside its ConfigMap and its mount directory.
pub const CONFIG_FILE: &str = "scorer.json";

/// Where scorer pods mount the config.
pub const CONFIG_DIR: &str = "/etc/millrace";

/// The resolved runtime config of one InferenceDeployment's scorers and batch jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScorerConfig {
    /// The resource this config was rendered from.
    pub resource: ResourceRef,
    /// The model and where the pod finds it.
    pub model: ModelConfig,
    /// Execution providers in preference order; CPU is the implicit last resort.
    pub execution_providers: Vec<ExecutionProvider>,
    /// The Redis key prefix (see [`Keyspace`]).
    pub key_prefix: String,
    /// Cache behaviour.
    pub cache: CacheConfig,
    /// Feature sources.
    pub features: FeaturesSpec,
    /// The online path.
    pub serving: ServingConfig,
    /// The batch precompute, when the resource has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchConfig>,
}

/// Which resource a config belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ResourceRef {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

/// The model as a pod sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// The URI from the spec (for logs and the model metadata route).
    pub uri: String,
    /// The local path of the .onnx file inside the pod.
    pub path: String,
    /// The model version, part of every key.
    pub version: String,
    /// Feature names in input order.
    pub inputs: Vec<String>,
    /// The input tensor's name; the model's first input when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tensor: Option<String>,
    /// The output tensor's name; the model's first output when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The expected SHA-256 of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Cache TTLs and tiers. Durations are Go-style strings, as in the spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    /// Redis Cluster mode.
    pub redis_cluster: bool,
    /// TTL of batch predictions.
    #[serde(rename = "batchTTL")]
    pub batch_ttl: String,
    /// TTL of real-time predictions.
    #[serde(rename = "realtimeTTL")]
    pub realtime_ttl: String,
    /// Older batch predictions count as misses.
    pub max_staleness: String,
    /// The in-process tier.
    pub memory: MemoryCacheSpec,
}

/// The online path's settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingConfig {
    /// The HTTP port.
    pub port: i32,
    /// The serving topology.
    pub topology: Topology,
    /// The latency budget.
    pub latency_budget: String,
    /// The fallback answer.
    pub fallback: FallbackSpec,
    /// Micro-batching.
    pub micro_batch: MicroBatchSpec,
}

/// The batch precompute's settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchConfig {
    /// Shards of one run.
    pub shards: i32,
    /// Rows per ONNX run and Redis pipeline.
    pub batch_size: i32,
    /// Only recompute changed entities.
    pub incremental: bool,
    /// How old the published generation may grow under incremental runs before a run is a
    /// full one again (`0s`: never).
    #[serde(default = "crate::spec::default_rebuild_after")]
    pub rebuild_after: String,
    /// The most bytes of local disk a shard may spool row groups to at once (unset: no
    /// limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_bytes: Option<u64>,
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON for this type.
    #[error("the scorer config is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// A duration field is malformed.
    #[error("the scorer config field {field} is not a duration: {source}")]
    Duration {
        /// The field.
        field: &'static str,
        /// The parse error.
        #[source]
        source: duration::DurationError,
    },
}

impl ScorerConfig {
    /// Parses and checks a config file's contents.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text)?;
        for (field, value) in [
            ("cache.batchTTL", &config.cache.batch_ttl),
            ("cache.realtimeTTL", &config.cache.realtime_ttl),
            ("cache.maxStaleness", &config.cache.max_staleness),
            ("cache.memory.ttl", &config.cache.memory.ttl),
            ("serving.latencyBudget", &config.serving.latency_budget),
            (
                "serving.microBatch.maxDelay",
                &config.serving.micro_batch.max_delay,
            ),
        ] {
            duration::parse(value).map_err(|source| ConfigError::Duration { field, source })?;
        }
        Ok(config)
    }

    /// The Redis keyspace of this model version.
    pub fn keyspace(&self) -> Keyspace {
        Keyspace::new(&self.key_prefix, &self.model.version)
    }
}
