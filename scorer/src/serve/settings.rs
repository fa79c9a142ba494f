//! The online path's settings: the operator-rendered [`ScorerConfig`] resolved into typed
//! values once at start-up, so no request parses a duration.

use std::time::Duration;

use millrace_crds::config::ScorerConfig;
use millrace_crds::keys::Keyspace;
use millrace_crds::spec::duration;

use super::features::{FeatureError, FeaturePlan};

/// Limits on what one request may ask for, beyond the config (command-line flags).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Most ids in one `batchGet`.
    pub max_ids_per_batch: usize,
    /// Most rows in one Open Inference Protocol `infer` tensor.
    pub max_infer_rows: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_ids_per_batch: 1_000,
            max_infer_rows: 4_096,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Everything the online path needs to know, typed.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The model's name on the v2 protocol: the resource's name.
    pub model_name: String,
    /// The model version (part of every key and every answer).
    pub model_version: String,
    /// The Redis keys of this model version.
    pub keyspace: Keyspace,
    /// Whether Redis is a cluster.
    pub redis_cluster: bool,
    /// TTL of real-time predictions written back.
    pub realtime_ttl: Duration,
    /// Older batch predictions count as misses.
    pub max_staleness: Duration,
    /// Entries of the in-process tier (0 disables it).
    pub memory_entries: u64,
    /// How long the in-process tier keeps an entry.
    pub memory_ttl: Duration,
    /// The time a request may take before it falls down the chain.
    pub latency_budget: Duration,
    /// The answer of last resort, if any.
    pub fallback: Option<f32>,
    /// Most rows in one ONNX run of the micro-batcher.
    pub max_batch_rows: usize,
    /// How long the micro-batcher holds the first row waiting for more.
    pub max_batch_delay: Duration,
    /// Where each model input comes from.
    pub features: FeaturePlan,
    /// The HTTP port.
    pub port: u16,
}

/// A config the online path cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A duration field is malformed (the config parser already checks; kept for direct use).
    #[error("{field}: {source}")]
    Duration {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: duration::DurationError,
    },
    /// A number is out of range.
    #[error("{field} is {value}, which is out of range")]
    Range {
        /// The field.
        field: &'static str,
        /// The value.
        value: i64,
    },
    /// The feature sources are unusable.
    #[error(transparent)]
    Features(#[from] FeatureError),
}

impl ServeSettings {
    /// Resolves `config`.
    pub fn from_config(config: &ScorerConfig) -> Result<Self, SettingsError> {
        let parse = |field: &'static str, value: &str| {
            duration::parse(value).map_err(|source| SettingsError::Duration { field, source })
        };
        let range = |field: &'static str, value: i64, min: i64, max: i64| {
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(SettingsError::Range { field, value })
            }
        };
        let fallback = config.serving.fallback.default.map(|v| v as f32);
        Ok(Self {
            model_name: config.resource.name.clone(),
            model_version: config.model.version.clone(),
            keyspace: config.keyspace(),
            redis_cluster: config.cache.redis_cluster,
            realtime_ttl: parse("cache.realtimeTTL", &config.cache.realtime_ttl)?,
            max_staleness: parse("cache.maxStaleness", &config.cache.max_staleness)?,
            memory_entries: range(
                "cache.memory.maxEntries",
                config.cache.memory.max_entries,
                0,
                i64::MAX,
            )? as u64,
            memory_ttl: parse("cache.memory.ttl", &config.cache.memory.ttl)?,
            latency_budget: parse("serving.latencyBudget", &config.serving.latency_budget)?,
            fallback,
            max_batch_rows: range(
                "serving.microBatch.maxBatchSize",
                i64::from(config.serving.micro_batch.max_batch_size),
                1,
                1 << 20,
            )? as usize,
            max_batch_delay: parse(
                "serving.microBatch.maxDelay",
                &config.serving.micro_batch.max_delay,
            )?,
            features: FeaturePlan::new(&config.model.inputs, &config.features)?,
            port: range(
                "serving.port",
                i64::from(config.serving.port),
                1,
                i64::from(u16::MAX),
            )? as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(port: i32) -> ScorerConfig {
        let text = serde_json::json!({
            "resource": {"namespace": "ml", "name": "churn"},
            "model": {"uri": "file:///m.onnx", "path": "/m.onnx", "version": "3", "inputs": ["a", "hourOfDay"]},
            "executionProviders": ["cpu"],
            "keyPrefix": "ml/churn",
            "cache": {"redisCluster": true, "batchTTL": "24h", "realtimeTTL": "1h", "maxStaleness": "12h",
                      "memory": {"maxEntries": 5, "ttl": "30s"}},
            "features": {"requestTime": ["hourOfDay"]},
            "serving": {"port": port, "topology": "unified", "latencyBudget": "50ms",
                        "fallback": {"default": 0.25}, "microBatch": {"maxBatchSize": 32, "maxDelay": "1500us"}}
        });
        ScorerConfig::from_json(&text.to_string()).expect("config")
    }

    #[test]
    fn the_config_resolves_to_typed_settings() {
        let s = ServeSettings::from_config(&config(8080)).expect("settings");
        assert_eq!(s.model_name, "churn");
        assert_eq!(s.keyspace.realtime("u"), "mr:ml/churn:3:rt:{u}");
        assert!(s.redis_cluster);
        assert_eq!(s.realtime_ttl, Duration::from_secs(3600));
        assert_eq!(s.max_staleness, Duration::from_secs(12 * 3600));
        assert_eq!(
            (s.memory_entries, s.memory_ttl),
            (5, Duration::from_secs(30))
        );
        assert_eq!(s.latency_budget, Duration::from_millis(50));
        assert_eq!(s.fallback, Some(0.25));
        assert_eq!(
            (s.max_batch_rows, s.max_batch_delay),
            (32, Duration::from_micros(1500))
        );
        assert_eq!(s.features.online_fields(), ["a"]);
        assert_eq!(s.port, 8080);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let err = ServeSettings::from_config(&config(70_000)).expect_err("port");
        assert!(err.to_string().contains("serving.port"), "{err}");
    }
}
