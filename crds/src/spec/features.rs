//! `spec.features`: where the model's input values come from.

use k8s_openapi::api::core::v1::LocalObjectReference;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The sources of feature values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeaturesSpec {
    /// The offline feature table that the batch precompute scores, one row per entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineFeatures>,

    /// The online store that real-time inference reads: one Redis hash per entity, in the
    /// cache's Redis, field name = feature name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<OnlineFeatures>,

    /// Features computed from the clock when a request arrives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    // A set: the API server rejects a repeated entry as "Duplicate value", naming its index.
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub request_time: Vec<RequestTimeFeature>,

    /// IANA time zone for request-time features. Default: UTC.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,

    /// What a feature that no source supplies becomes in a real-time request.
    #[serde(default)]
    pub missing: MissingFeatures,
}

impl Default for FeaturesSpec {
    fn default() -> Self {
        Self {
            offline: None,
            online: None,
            request_time: Vec::new(),
            time_zone: default_time_zone(),
            missing: MissingFeatures::default(),
        }
    }
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

/// A Parquet table of features keyed by entity id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OfflineFeatures {
    /// A Parquet file or a directory of them: `s3://`, `gs://`, `az://` or `file://`.
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^(s3|gs|az|file)://.+"))]
    pub uri: String,

    /// The file format. Default: parquet (the only one supported).
    #[serde(default)]
    pub format: FeatureFormat,

    /// The column holding the entity id. Default: entity_id.
    #[serde(default = "default_id_column")]
    #[schemars(length(min = 1, max = 128))]
    pub id_column: String,

    /// A Secret whose keys become the object-store credentials of batch pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectReference>,
}

fn default_id_column() -> String {
    "entity_id".to_string()
}

/// The offline table's file format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum FeatureFormat {
    /// Apache Parquet.
    #[default]
    Parquet,
}

/// The online feature store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnlineFeatures {
    /// Prefix of each entity's hash key: the hash for entity `42` is `{hashPrefix}42`.
    /// Default: "features:".
    #[serde(default = "default_hash_prefix")]
    #[schemars(length(min = 1, max = 128))]
    pub hash_prefix: String,
}

fn default_hash_prefix() -> String {
    "features:".to_string()
}

/// A feature derived from the request's arrival time (in `timeZone`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RequestTimeFeature {
    /// 0-23.
    HourOfDay,
    /// 0 (Monday) to 6 (Sunday).
    DayOfWeek,
    /// 1 on Saturday and Sunday, else 0.
    IsWeekend,
}

/// What a feature missing from every source becomes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MissingFeatures {
    /// `fill` scores with `fillValue` in place of the missing feature and counts it in a
    /// metric; `fallback` skips real-time inference and answers with serving.fallback.
    /// Default: fill.
    #[serde(default)]
    pub policy: MissingFeaturePolicy,

    /// The value a missing feature takes under the fill policy. Default: 0.
    #[serde(default)]
    pub fill_value: f32,
}

impl Default for MissingFeatures {
    fn default() -> Self {
        Self {
            policy: MissingFeaturePolicy::Fill,
            fill_value: 0.0,
        }
    }
}

/// The missing-feature policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum MissingFeaturePolicy {
    /// Score with the fill value.
    #[default]
    Fill,
    /// Answer with the fallback instead of scoring.
    Fallback,
}
