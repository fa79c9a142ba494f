//! `spec.model`: the ONNX file, its version and its input/output contract.

use k8s_openapi::api::core::v1::LocalObjectReference;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The ONNX model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the .onnx file is. `file:///path` is a path inside the pod (see `volume`);
    /// `https://`, `s3://bucket/key`, `gs://bucket/key` and `az://container/path` are
    /// fetched by an init container before the scorer starts.
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^(file|https|s3|gs|az)://.+")
    )]
    pub uri: String,

    /// The model version. It is part of every cache key, so predictions of one version are
    /// never served for another: changing it starts from a cold cache.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub version: String,

    /// Feature names in the order the model's input tensor expects them.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.all(f, size(f) > 0 && size(f) <= 128)").message("every input name must be 1-128 characters"))]
    // A set: the API server rejects a repeated entry as "Duplicate value", naming its index.
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub inputs: Vec<String>,

    /// Name of the model's input tensor. Default: the model's first input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub input_tensor: Option<String>,

    /// Name of the output tensor holding the prediction. Default: the model's first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub output: Option<String>,

    /// The file's SHA-256 (64 hex digits). When set, a fetched or mounted file that does not
    /// match is refused and the scorer stays unready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: Option<String>,

    /// For `file://` URIs: the PersistentVolumeClaim holding the model, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<ModelVolume>,

    /// For `s3://` URIs: a Secret whose keys become the fetch-model container's environment
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and AWS_ENDPOINT for an
    /// S3-compatible store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectReference>,
}

/// A PersistentVolumeClaim that holds the model file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVolume {
    /// The claim's name, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Where the claim is mounted in scorer pods; `uri` paths live under it.
    /// Default: /models.
    #[serde(default = "default_mount_path")]
    #[schemars(regex(pattern = r"^/[^:]*$"))]
    pub mount_path: String,
}

fn default_mount_path() -> String {
    "/models".to_string()
}
