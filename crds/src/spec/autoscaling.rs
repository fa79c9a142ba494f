//! `spec.autoscaling`: replicas driven by the cache-miss rate.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Autoscaling of the scorers on cache misses per second.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("minReplicas must not exceed maxReplicas")
    .field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// `operator`: the operator scales on the miss rate it reads from the scorers.
    /// `hpa`: a HorizontalPodAutoscaler on an external miss-rate metric (needs a metrics
    /// adapter). `disabled`: replicas stay at minReplicas, or are yours to set.
    /// Default: operator.
    #[serde(default)]
    pub mode: AutoscalingMode,

    /// Fewest scorer replicas (0 only with serving.topology: split). Default: 1.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,

    /// Most scorer replicas. Default: 10.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Cache misses per second one replica absorbs. Default: 200.
    #[serde(default = "default_target_misses")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_misses_per_replica: i32,

    /// How often replicas are recomputed. Default: 15s.
    #[serde(default = "default_sync_period")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('10m')").message("syncPeriod must be between 1s and 10m"))]
    pub sync_period: String,

    /// Scale-down waits for the highest recommendation within this window. Default: 5m.
    #[serde(default = "default_stabilization")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1h')").message("scaleDownStabilization must be at most 1h"))]
    pub scale_down_stabilization: String,

    /// Relative change below which replicas stay put, in percent (0-100). Default: 10.
    #[serde(default = "default_tolerance_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub tolerance_percent: i32,

    /// Warm the cache when misses stay high: the operator runs `millrace-scorer warm` as a
    /// Job. Applies in every mode. Off by default.
    #[serde(default)]
    pub warming: WarmingSpec,

    /// With serving.topology: split, the CPU cache tier in front of the GPU compute tier.
    /// The fields above then size the compute tier (on misses, and minReplicas may be 0);
    /// the cache tier scales on requests per second.
    #[serde(default)]
    pub cache_tier: CacheTierSpec,
}

/// The split topology's cache tier: CPU pods that answer hits and forward misses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("cacheTier.minReplicas must not exceed cacheTier.maxReplicas")
    .field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct CacheTierSpec {
    /// Fewest cache-tier replicas (they answer every request: at least 1). Default: 2.
    #[serde(default = "default_cache_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,

    /// Most cache-tier replicas. Default: 20.
    #[serde(default = "default_cache_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Requests per second one cache-tier replica serves. Default: 2000.
    #[serde(default = "default_target_requests")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_requests_per_replica: i32,
}

impl Default for CacheTierSpec {
    fn default() -> Self {
        Self {
            min_replicas: default_cache_min_replicas(),
            max_replicas: default_cache_max_replicas(),
            target_requests_per_replica: default_target_requests(),
        }
    }
}

fn default_cache_min_replicas() -> i32 {
    2
}

fn default_cache_max_replicas() -> i32 {
    20
}

fn default_target_requests() -> i32 {
    2000
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            mode: AutoscalingMode::default(),
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_misses_per_replica: default_target_misses(),
            sync_period: default_sync_period(),
            scale_down_stabilization: default_stabilization(),
            tolerance_percent: default_tolerance_percent(),
            warming: WarmingSpec::default(),
            cache_tier: CacheTierSpec::default(),
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}

fn default_max_replicas() -> i32 {
    10
}

fn default_target_misses() -> i32 {
    200
}

fn default_sync_period() -> String {
    "15s".to_string()
}

fn default_stabilization() -> String {
    "5m".to_string()
}

fn default_tolerance_percent() -> i32 {
    10
}

/// Who sets the scorer's replica count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMode {
    /// The operator, on the cache-miss rate.
    #[default]
    Operator,
    /// A HorizontalPodAutoscaler on an external metric.
    Hpa,
    /// Nobody: replicas are left to the user.
    Disabled,
}

/// When the operator warms the cache of the most active entities.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmingSpec {
    /// Run a warm Job when misses per second, all scorers together, stay at or above this
    /// for `window`. 0 turns warming off. Default: 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub misses_per_second: i32,

    /// How long misses must stay high before a warm Job runs. Default: 2m.
    #[serde(default = "default_warming_window")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1h')").message("warming.window must be at most 1h"))]
    pub window: String,

    /// Entities to warm: the most active ones. Default: 10000.
    #[serde(default = "default_warming_top")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub top: i32,

    /// Least time between two warm Jobs. Default: 30m.
    #[serde(default = "default_warming_cooldown")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('24h')").message("warming.cooldown must be between 1m and 24h"))]
    pub cooldown: String,

    /// Also warm on a schedule, in cron syntax (`30 7 * * 1-5`: before the weekday morning
    /// peak), as the CronJob `{name}-warm` (UTC, one run at a time). Independent of
    /// `missesPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(
            pattern = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"
        )
    )]
    pub schedule: Option<String>,
}

impl Default for WarmingSpec {
    fn default() -> Self {
        Self {
            misses_per_second: 0,
            window: default_warming_window(),
            top: default_warming_top(),
            cooldown: default_warming_cooldown(),
            schedule: None,
        }
    }
}

fn default_warming_window() -> String {
    "2m".to_string()
}

fn default_warming_top() -> i32 {
    10_000
}

fn default_warming_cooldown() -> String {
    "30m".to_string()
}
