//! Renders the scorer config (`millrace_crds::config::ScorerConfig`) and its ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;
use millrace_crds::config::{
    BatchConfig, CONFIG_FILE, CacheConfig, ModelConfig, ResourceRef, ScorerConfig, ServingConfig,
};
use millrace_crds::keys::Keyspace;
use sha2::{Digest, Sha256};

use super::names::{Component, config_name, labels};
use super::{BuildError, owner_reference};

/// Where a fetched model (https://, s3://) is written inside scorer pods.
pub const FETCHED_MODEL_DIR: &str = "/var/lib/millrace/model";

/// The model file's path inside a pod: the URI's path for `file://`, else where the
/// fetch-model init container writes it.
pub fn model_path(uri: &str) -> String {
    match uri.strip_prefix("file://") {
        Some(path) => path.to_string(),
        None => format!("{FETCHED_MODEL_DIR}/model.onnx"),
    }
}

/// The effective Redis key prefix: the spec's, or `{namespace}/{name}`.
pub fn key_prefix(resource: &InferenceDeployment) -> String {
    resource.spec.cache.key_prefix.clone().unwrap_or_else(|| {
        Keyspace::default_prefix(
            &resource.namespace().unwrap_or_default(),
            &resource.name_any(),
        )
    })
}

/// The runtime config scorers and batch pods of `resource` read.
pub fn scorer_config(resource: &InferenceDeployment) -> ScorerConfig {
    let spec = &resource.spec;
    ScorerConfig {
        resource: ResourceRef {
            namespace: resource.namespace().unwrap_or_default(),
            name: resource.name_any(),
        },
        model: ModelConfig {
            uri: spec.model.uri.clone(),
            path: model_path(&spec.model.uri),
            version: spec.model.version.clone(),
            inputs: spec.model.inputs.clone(),
            input_tensor: spec.model.input_tensor.clone(),
            output: spec.model.output.clone(),
            sha256: spec.model.sha256.clone(),
        },
        execution_providers: spec.execution_providers.clone(),
        key_prefix: key_prefix(resource),
        cache: CacheConfig {
            redis_cluster: spec.cache.redis.cluster,
            batch_ttl: spec.cache.batch_ttl.clone(),
            realtime_ttl: spec.cache.realtime_ttl.clone(),
            max_staleness: spec.cache.max_staleness.clone(),
            memory: spec.cache.memory.clone(),
        },
        features: spec.features.clone(),
        serving: ServingConfig {
            port: spec.serving.port,
            topology: spec.serving.topology,
            latency_budget: spec.serving.latency_budget.clone(),
            fallback: spec.serving.fallback.clone(),
            micro_batch: spec.serving.micro_batch.clone(),
        },
        batch: spec.batch.as_ref().map(|batch| BatchConfig {
            shards: batch.shards,
            batch_size: batch.batch_size,
            incremental: batch.incremental,
            rebuild_after: batch.rebuild_after.clone(),
            // The API server checked the pattern; a size too large for 64 bits is no limit.
            scratch_bytes: batch
                .scratch_size
                .as_deref()
                .map(|size| millrace_crds::spec::quantity_bytes(size).unwrap_or(u64::MAX)),
        }),
    }
}

/// The rendered config as the file's text, and the SHA-256 (hex) of what serving pods read
/// of it, for the pod annotation that rolls them when that changes.
///
/// The batch section is left out of the checksum: only batch Jobs read it, and each run
/// starts fresh pods that read the ConfigMap as it is then. Counting it would restart every
/// (GPU) serving pod for a change that cannot affect them, such as `batch.rebuildAfter`.
pub fn render(config: &ScorerConfig) -> Result<(String, String), BuildError> {
    let text = serde_json::to_string_pretty(config).map_err(BuildError::RenderConfig)?;
    let serving_part = ScorerConfig {
        batch: None,
        ..config.clone()
    };
    let serving_text =
        serde_json::to_string_pretty(&serving_part).map_err(BuildError::RenderConfig)?;
    let checksum = hex::encode(Sha256::digest(serving_text.as_bytes()));
    Ok((text, checksum))
}

/// The ConfigMap `{name}-config` holding `scorer.json`.
pub fn config_map(resource: &InferenceDeployment, text: &str) -> Result<ConfigMap, BuildError> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_name(resource)),
            namespace: resource.namespace(),
            labels: Some(labels(resource, Component::Scorer)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            text.to_string(),
        )])),
        ..ConfigMap::default()
    })
}
