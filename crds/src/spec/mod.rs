//! `InferenceDeployment.spec`: what the user declares.
//!
//! Every field's `///` doc becomes its description in the CRD (`kubectl explain`), so the docs
//! here are user documentation: they say what the field does and its default. Rules the API
//! server can check are CEL (`x_kube(validation = ...)`) or schema bounds on the field itself,
//! so `kubectl apply` of a bad object fails with a message naming the field; what CEL cannot
//! express is checked by the operator's validate step.

mod autoscaling;
mod batch;
mod cache;
pub mod duration;
mod features;
mod model;
mod serving;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use autoscaling::*;
pub use batch::*;
pub use cache::*;
pub use features::*;
pub use model::*;
pub use serving::*;

use crate::status::InferenceDeploymentStatus;

/// An ONNX model served as one hybrid system: batch predictions precomputed into Redis on a
/// schedule, and real-time scorers on a GPU node pool for the entities the cache cannot answer.
// Each printcolumn repeats `type_`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "millrace.dev",
    version = "v1alpha1",
    kind = "InferenceDeployment",
    plural = "inferencedeployments",
    shortname = "infd",
    category = "millrace",
    namespaced,
    status = "InferenceDeploymentStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.autoscaling.replicas"
    ),
    printcolumn(
        name = "Hit rate",
        type_ = "string",
        json_path = ".status.autoscaling.hitRate"
    ),
    printcolumn(
        name = "Cache warm",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="CacheWarm")].status"#
    ),
    printcolumn(
        name = "Last batch",
        type_ = "date",
        json_path = ".status.lastBatch.completionTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.autoscaling.minReplicas > 0 || self.serving.topology == 'split'")
        .message("autoscaling.minReplicas may be 0 only with serving.topology: split (a unified scorer must keep one replica to answer cache hits)")
        .field_path(".autoscaling.minReplicas"),
    validation = Rule::new("!has(self.batch) || has(self.features.offline)")
        .message("batch needs features.offline: the batch precompute scores the offline feature table")
        .field_path(".features.offline"),
    validation = Rule::new("!has(self.nodePool) || !has(self.nodePool.gpu) || self.executionProviders.exists(p, p != 'cpu')")
        .message("nodePool.gpu requests GPUs but executionProviders lists only cpu: add cuda or tensorrt, or drop nodePool.gpu")
        .field_path(".executionProviders"),
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentSpec {
    /// The ONNX model that both the batch precompute and the real-time scorers run.
    pub model: ModelSpec,

    /// Where feature values come from: the offline table the batch scores, the online store
    /// real-time inference reads, and features computed at request time.
    #[serde(default)]
    pub features: FeaturesSpec,

    /// Where the scorer pods run: usually a GPU node pool. Omit to run anywhere, without GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_pool: Option<NodePoolSpec>,

    /// ONNX Runtime execution providers in order of preference. The first that loads wins and
    /// the scorer reports which; CPU is always tried last even when not listed.
    /// Default: [cuda, cpu].
    #[serde(default = "default_execution_providers")]
    #[schemars(length(min = 1, max = 3))]
    // A set: the API server rejects a repeated entry as "Duplicate value", naming its index.
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub execution_providers: Vec<ExecutionProvider>,

    /// The scheduled batch precompute. Omit for a real-time-only deployment; removing it
    /// deletes the CronJob (predictions already in Redis expire with their TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,

    /// The prediction cache: Redis, its TTLs, and the scorer's in-process memory tier.
    pub cache: CacheSpec,

    /// How the scorers answer requests: latency budget, fallback, micro-batching, resources.
    #[serde(default)]
    pub serving: ServingSpec,

    /// Replica bounds and the cache-miss target that drives scaling.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,

    /// Labels and annotations added to every pod the operator renders (scorers, batch
    /// shards, warm Jobs), e.g. for a service mesh, cost attribution or a log pipeline. The
    /// operator's own labels win where a key collides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
}

/// Extra metadata for the pods the operator renders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Labels added to every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,

    /// Annotations added to every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: BTreeMap<String, String>,
}

fn default_execution_providers() -> Vec<ExecutionProvider> {
    vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu]
}

/// An ONNX Runtime execution provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ExecutionProvider {
    /// NVIDIA TensorRT: fastest on NVIDIA GPUs, slow first load while it builds engines.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU provider, always available.
    Cpu,
}

/// Where the scorer pods run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolSpec {
    /// Node labels a scorer node must have, e.g. {pool: gpu}.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations for the pool's taints, e.g. nvidia.com/gpu:NoSchedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// Node and pod affinity for scorer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// GPUs each scorer pod requests. Omit for CPU-only scorers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,

    /// RuntimeClass for scorer pods, e.g. nvidia.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,

    /// PriorityClass for scorer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// The GPUs one scorer pod requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// The extended resource name the device plugin advertises. Default: nvidia.com/gpu.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.contains('/')").message("resourceName must be a qualified extended resource such as nvidia.com/gpu"))]
    pub resource_name: String,

    /// GPUs per pod (1-16). Default: 1.
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 16))]
    pub count: i32,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_string()
}

fn default_gpu_count() -> i32 {
    1
}
