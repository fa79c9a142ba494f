//! `spec.serving`: how scorer pods answer requests.

use k8s_openapi::api::core::v1::{ResourceRequirements, TopologySpreadConstraint};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The online path.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// `unified`: one scorer Deployment answers hits and computes misses. `split`: a CPU
    /// cache tier answers hits and forwards misses to a GPU compute tier that can scale to
    /// zero. Default: unified.
    #[serde(default)]
    pub topology: Topology,

    /// A request that cannot be answered within this falls back down the chain (stale,
    /// then default) and says so. Default: 100ms.
    #[serde(default = "default_latency_budget")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1ms') && duration(self) <= duration('60s')").message("latencyBudget must be between 1ms and 60s"))]
    pub latency_budget: String,

    /// The answer of last resort.
    #[serde(default)]
    pub fallback: FallbackSpec,

    /// Real-time inferences from concurrent requests share ONNX runs.
    #[serde(default)]
    pub micro_batch: MicroBatchSpec,

    /// Resources of each scorer container (GPUs come from nodePool.gpu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// How scorer pods spread over zones and nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,

    /// The HTTP port scorers listen on (1024-65535). Default: 8080.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Scorer pods that may be down at once during voluntary disruptions. Default: 1.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 0))]
    pub max_unavailable: i32,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            topology: Topology::default(),
            latency_budget: default_latency_budget(),
            fallback: FallbackSpec::default(),
            micro_batch: MicroBatchSpec::default(),
            resources: None,
            topology_spread_constraints: Vec::new(),
            port: default_port(),
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_latency_budget() -> String {
    "100ms".to_string()
}

fn default_port() -> i32 {
    8080
}

fn default_max_unavailable() -> i32 {
    1
}

/// The serving topology.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Topology {
    /// One Deployment does everything.
    #[default]
    Unified,
    /// A CPU cache tier in front of a GPU compute tier.
    Split,
}

/// The fallback answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct FallbackSpec {
    /// The prediction served, marked `source: default`, when no tier can answer in time.
    /// Omit to answer 503 instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<f64>,
}

/// Micro-batching of real-time inferences.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroBatchSpec {
    /// Most rows in one ONNX run (1-4096); 1 disables batching. Default: 64.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch_size: i32,

    /// Longest a request waits for others to share its run. It waits only while other
    /// misses are on their way to the model (fetching their features), so a lone miss runs
    /// at once. Default: 2ms.
    #[serde(default = "default_max_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1s')").message("maxDelay must be at most 1s"))]
    pub max_delay: String,
}

impl Default for MicroBatchSpec {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            max_delay: default_max_delay(),
        }
    }
}

fn default_max_batch_size() -> i32 {
    64
}

fn default_max_delay() -> String {
    "2ms".to_string()
}
