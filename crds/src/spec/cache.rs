//! `spec.cache`: Redis, the TTLs of batch and real-time predictions, and the memory tier.

use k8s_openapi::api::core::v1::SecretKeySelector;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The prediction cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("duration(self.maxStaleness) <= duration(self.batchTTL)")
        .message("maxStaleness must not exceed batchTTL: a batch prediction is gone from Redis once its TTL ends")
        .field_path(".maxStaleness"),
    validation = Rule::new("duration(self.memory.ttl) <= duration(self.realtimeTTL)")
        .message("memory.ttl must not exceed realtimeTTL: the memory tier must not outlive what Redis holds")
        .field_path(".memory.ttl"),
    validation = Rule::new("!has(oldSelf.keyPrefix) || (has(self.keyPrefix) && self.keyPrefix == oldSelf.keyPrefix)")
        .message("keyPrefix is immutable: changing it would orphan every cached prediction")
        .field_path(".keyPrefix"),
)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// The Redis server or cluster holding predictions.
    pub redis: RedisSpec,

    /// Prefix of every Redis key of this resource: letters, digits and `. _ / -`. Default:
    /// `{namespace}/{name}`. Immutable once set. Unique: while another resource uses the
    /// same prefix (its default included), the younger one is refused (`Degraded`, reason
    /// `KeyPrefixConflict`), since the two would overwrite, and on deletion delete, each
    /// other's predictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    )]
    pub key_prefix: Option<String>,

    /// How long a batch prediction lives in Redis. Default: 24h.
    #[serde(rename = "batchTTL", default = "default_batch_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("batchTTL must be at least 1m"))]
    pub batch_ttl: String,

    /// How long a real-time prediction lives in Redis. Default: 1h.
    #[serde(rename = "realtimeTTL", default = "default_realtime_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("realtimeTTL must be at least 1s"))]
    pub realtime_ttl: String,

    /// A batch prediction older than this counts as a miss and is recomputed; if that fails
    /// it may still be served, marked stale. Its age counts from when it was computed or, if
    /// later, from the start of the published run that carried it unchanged (an incremental
    /// run checks every carried prediction against the features). Default: 12h.
    #[serde(default = "default_max_staleness")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub max_staleness: String,

    /// The scorer's in-process tier in front of Redis.
    #[serde(default)]
    pub memory: MemoryCacheSpec,
}

fn default_batch_ttl() -> String {
    "24h".to_string()
}

fn default_realtime_ttl() -> String {
    "1h".to_string()
}

fn default_max_staleness() -> String {
    "12h".to_string()
}

/// How to reach Redis: exactly one of `url` and `urlSecretRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)").message("set exactly one of redis.url and redis.urlSecretRef"))]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS. Prefer urlSecretRef
    /// when the URL carries a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^rediss?://.+"))]
    pub url: Option<String>,

    /// A Secret key holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeySelector>,

    /// Redis Cluster: keys are spread across slots and writes grouped by node.
    /// Default: false.
    #[serde(default)]
    pub cluster: bool,
}

/// The in-process memory tier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryCacheSpec {
    /// Most entries kept per scorer pod; 0 disables the tier. Default: 100000.
    #[serde(default = "default_memory_entries")]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub max_entries: i64,

    /// How long an entry is served from memory. Default: 30s.
    #[serde(default = "default_memory_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub ttl: String,
}

impl Default for MemoryCacheSpec {
    fn default() -> Self {
        Self {
            max_entries: default_memory_entries(),
            ttl: default_memory_ttl(),
        }
    }
}

fn default_memory_entries() -> i64 {
    100_000
}

fn default_memory_ttl() -> String {
    "30s".to_string()
}
