//! The scorer Deployment: `millrace-scorer serve` on the node pool.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use millrace_crds::InferenceDeployment;
use millrace_crds::spec::Topology;

use super::names::{
    CONFIG_CHECKSUM_ANNOTATION, Component, compute_name, labels, scorer_name, selector_labels,
};
use super::pod::{
    config_path, container_security_context, downward_env, fetch_model_container, model_is_fetched,
    place_on_node_pool, pod_security_context, pod_template_metadata, redis_url_env, volume_mounts,
    volumes, with_gpus,
};
use super::{BuildError, BuildOptions, owner_reference};

/// What a scorer Deployment is in its topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// `serving.topology: unified`: cache and model in one pod, on the node pool.
    Unified,
    /// The split topology's cache tier: no model, no GPU, anywhere; misses go to compute.
    Cache,
    /// The split topology's compute tier: the model on the node pool.
    Compute,
}

/// The scorer Deployment `{name}-scorer` (in the split topology, the cache tier).
/// `spec.replicas` is deliberately absent: replicas belong to the autoscaler (the scale
/// subresource), and a server-side apply that named them would take them back on every
/// reconcile.
pub fn deployment(
    resource: &InferenceDeployment,
    options: &BuildOptions,
    config_checksum: &str,
) -> Result<Deployment, BuildError> {
    let tier = match resource.spec.serving.topology {
        Topology::Unified => Tier::Unified,
        Topology::Split => Tier::Cache,
    };
    scorer_deployment(resource, options, config_checksum, tier)
}

/// The split topology's compute tier `{name}-compute`; none in the unified topology.
pub fn compute_deployment(
    resource: &InferenceDeployment,
    options: &BuildOptions,
    config_checksum: &str,
) -> Result<Option<Deployment>, BuildError> {
    if resource.spec.serving.topology != Topology::Split {
        return Ok(None);
    }
    scorer_deployment(resource, options, config_checksum, Tier::Compute).map(Some)
}

fn scorer_deployment(
    resource: &InferenceDeployment,
    options: &BuildOptions,
    config_checksum: &str,
    tier: Tier,
) -> Result<Deployment, BuildError> {
    let spec = &resource.spec;
    let port = spec.serving.port;
    let mut env = vec![redis_url_env(resource)];
    env.extend(downward_env());
    let (name, component) = match tier {
        Tier::Compute => (compute_name(resource), Component::Compute),
        Tier::Unified | Tier::Cache => (scorer_name(resource), Component::Scorer),
    };
    let mut args = vec!["serve".into(), "--config".into(), config_path()];
    match tier {
        Tier::Unified => {}
        Tier::Cache => args.extend([
            "--role".into(),
            "cache".into(),
            "--compute-url".into(),
            format!("http://{}", compute_name(resource)),
        ]),
        Tier::Compute => args.extend(["--role".into(), "compute".into()]),
    }
    let has_model = tier != Tier::Cache;
    // The cache tier holds no model and no GPU: it runs on ordinary nodes.
    let node_pool = if has_model {
        spec.node_pool.as_ref()
    } else {
        None
    };

    let scorer = Container {
        name: "scorer".into(),
        image: Some(options.scorer_image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: Some(env),
        resources: with_gpus(spec.serving.resources.clone(), node_pool),
        volume_mounts: Some(volume_mounts(resource)),
        // Ready means the model is loaded and warmed up; a slow first load (TensorRT engine
        // builds) is covered by the startup probe, not by a long liveness delay.
        startup_probe: Some(http_probe("/readyz", 5, 120)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/livez", 10, 3)),
        security_context: Some(container_security_context()),
        ..Container::default()
    };

    let mut pod = PodSpec {
        containers: vec![scorer],
        init_containers: (has_model && model_is_fetched(resource))
            .then(|| vec![fetch_model_container(resource, options)]),
        volumes: Some(volumes(resource)),
        security_context: Some(pod_security_context()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        topology_spread_constraints: (!spec.serving.topology_spread_constraints.is_empty())
            .then(|| spec.serving.topology_spread_constraints.clone()),
        ..PodSpec::default()
    };
    place_on_node_pool(&mut pod, node_pool);

    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: resource.namespace(),
            labels: Some(labels(resource, component)),
            owner_references: Some(vec![owner_reference(resource)?]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(resource, component)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                // Never drop below the serving capacity during a roll: surge instead.
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::String("25%".into())),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(pod_template_metadata(
                    resource,
                    component,
                    BTreeMap::from([(
                        CONFIG_CHECKSUM_ANNOTATION.to_string(),
                        config_checksum.to_string(),
                    )]),
                )),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}
