//! Pod pieces shared by scorer and batch pods: hardened security contexts, the config and
//! model volumes, the Redis URL, the fetch-model init container, GPU placement and the pod
//! template's metadata.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;
use millrace_crds::config::{CONFIG_DIR, CONFIG_FILE, REDIS_URL_ENV};
use millrace_crds::spec::NodePoolSpec;

use super::BuildOptions;
use super::config::FETCHED_MODEL_DIR;
use super::names::{Component, config_name, labels};

/// The metadata of a pod template for `component`: the user's `spec.podMetadata`, then the
/// operator's labels (which win a collision: selectors and ownership depend on them) and
/// `annotations`.
pub fn pod_template_metadata(
    resource: &InferenceDeployment,
    component: Component,
    annotations: BTreeMap<String, String>,
) -> ObjectMeta {
    let extra = resource.spec.pod_metadata.clone().unwrap_or_default();
    let mut all_labels = extra.labels;
    all_labels.extend(labels(resource, component));
    let mut all_annotations = extra.annotations;
    all_annotations.extend(annotations);
    ObjectMeta {
        labels: Some(all_labels),
        annotations: (!all_annotations.is_empty()).then_some(all_annotations),
        ..ObjectMeta::default()
    }
}

/// The unprivileged user scorer and batch containers run as.
pub const RUN_AS_USER: i64 = 65_532;

/// The path of the config file inside pods.
pub fn config_path() -> String {
    format!("{CONFIG_DIR}/{CONFIG_FILE}")
}

/// Pod-level security: non-root, RuntimeDefault seccomp, files owned by the run-as group.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container-level security: read-only root filesystem, no capabilities, no escalation.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The Redis URL for containers: the spec's literal, or a reference to its Secret.
pub fn redis_url_env(resource: &InferenceDeployment) -> EnvVar {
    let redis = &resource.spec.cache.redis;
    EnvVar {
        name: REDIS_URL_ENV.into(),
        value: redis.url.clone(),
        value_from: redis.url_secret_ref.clone().map(|secret| EnvVarSource {
            secret_key_ref: Some(secret),
            ..EnvVarSource::default()
        }),
    }
}

/// `POD_NAME` and `POD_NAMESPACE` from the downward API (scorers label their metrics with
/// them).
pub fn downward_env() -> Vec<EnvVar> {
    [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ]
    .into_iter()
    .map(|(name, path)| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    })
    .collect()
}

/// Whether the model must be fetched into the pod by an init container.
pub fn model_is_fetched(resource: &InferenceDeployment) -> bool {
    !resource.spec.model.uri.starts_with("file://")
}

/// Volumes every Millrace pod has: the config, a writable /tmp, and the model.
pub fn volumes(resource: &InferenceDeployment) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_name(resource),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if model_is_fetched(resource) {
        volumes.push(Volume {
            name: "model".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    } else if let Some(volume) = &resource.spec.model.volume {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: volume.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
    }
    volumes
}

/// Mounts matching [`volumes`].
pub fn volume_mounts(resource: &InferenceDeployment) -> Vec<VolumeMount> {
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("tmp", "/tmp", false),
    ];
    if model_is_fetched(resource) {
        mounts.push(mount("model", FETCHED_MODEL_DIR, true));
    } else if let Some(volume) = &resource.spec.model.volume {
        mounts.push(mount("model", &volume.mount_path, true));
    }
    mounts
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The init container that downloads (and checks) an `https://` or `s3://` model.
pub fn fetch_model_container(resource: &InferenceDeployment, options: &BuildOptions) -> Container {
    let model = &resource.spec.model;
    let mut args = vec![
        "fetch-model".to_string(),
        "--uri".into(),
        model.uri.clone(),
        "--dest".into(),
        format!("{FETCHED_MODEL_DIR}/model.onnx"),
    ];
    if let Some(sha) = &model.sha256 {
        args.extend(["--sha256".into(), sha.clone()]);
    }
    Container {
        name: "fetch-model".into(),
        image: Some(options.scorer_image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(args),
        env_from: model.credentials_secret_ref.as_ref().map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        volume_mounts: Some(vec![
            mount("model", FETCHED_MODEL_DIR, false),
            mount("tmp", "/tmp", false),
        ]),
        security_context: Some(container_security_context()),
        ..Container::default()
    }
}

/// Resources with the node pool's GPUs added to the limits (extended resources are
/// requested through limits; the scheduler reads requests = limits).
pub fn with_gpus(
    resources: Option<ResourceRequirements>,
    node_pool: Option<&NodePoolSpec>,
) -> Option<ResourceRequirements> {
    let Some(gpu) = node_pool.and_then(|pool| pool.gpu.as_ref()) else {
        return resources;
    };
    let mut resources = resources.unwrap_or_default();
    resources
        .limits
        .get_or_insert_with(BTreeMap::new)
        .insert(gpu.resource_name.clone(), Quantity(gpu.count.to_string()));
    Some(resources)
}

/// Places a pod on the node pool: selector, tolerations, affinity, runtime and priority
/// class.
pub fn place_on_node_pool(spec: &mut PodSpec, node_pool: Option<&NodePoolSpec>) {
    let Some(pool) = node_pool else { return };
    if !pool.node_selector.is_empty() {
        spec.node_selector = Some(pool.node_selector.clone());
    }
    if !pool.tolerations.is_empty() {
        spec.tolerations = Some(pool.tolerations.clone());
    }
    spec.affinity = pool.affinity.clone();
    spec.runtime_class_name = pool.runtime_class_name.clone();
    spec.priority_class_name = pool.priority_class_name.clone();
}
