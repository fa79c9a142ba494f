//! Support for tests that run against the local control plane started by `e2e/cluster up`.
//!
//! Every test gets its own namespace ([`with_temp_ns`]) and waits on watches with a timeout
//! ([`wait_for`]) instead of sleeping, so tests run in parallel and fail with a message that
//! says what never happened.

pub mod azure;
pub mod gcs;
pub mod kubelet;
pub mod metric_names;
pub mod net;
pub mod procfs;
pub mod redis_server;
pub mod s3;
pub mod story;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource};
use serde_json::Value;

/// How long a test waits for the cluster to reach a state before it fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Label put on every namespace a test creates, so leftovers are easy to find and delete.
pub const TEST_NAMESPACE_LABEL: &str = "millrace.dev/e2e";

/// What can go wrong while talking to the local control plane.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// KUBECONFIG is unset: refuse to guess, a test must never touch a real cluster.
    #[error(
        "KUBECONFIG is not set; start the local control plane with `e2e/cluster up` and \
         `eval \"$(e2e/cluster env)\"`, or run `make test`"
    )]
    NoKubeconfig,
    /// The kubeconfig could not be read or used.
    #[error("cannot use the kubeconfig at {path}: {source}")]
    Kubeconfig {
        /// The path from KUBECONFIG.
        path: String,
        /// What the loader said.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig points somewhere other than loopback.
    #[error(
        "refusing to run tests against {server}: the e2e suite only talks to a loopback API server"
    )]
    NotLocal {
        /// The API server URL found in the kubeconfig.
        server: String,
    },
    /// An API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// A watch failed.
    #[error("watch failed: {0}")]
    Watch(#[from] watcher::Error),
    /// The awaited state never came.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// A description of the awaited state.
        what: String,
        /// How long the test waited.
        timeout: Duration,
    },
    /// A watch ended before the awaited state came.
    #[error("the watch ended before {what}")]
    WatchEnded {
        /// A description of the awaited state.
        what: String,
    },
}

/// Reads the kubeconfig named by KUBECONFIG, checking it points at a loopback API server.
pub async fn local_config() -> Result<Config, E2eError> {
    let path = std::env::var("KUBECONFIG").map_err(|_| E2eError::NoKubeconfig)?;
    let kubeconfig = Kubeconfig::read_from(&path).map_err(|source| E2eError::Kubeconfig {
        path: path.clone(),
        source,
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| E2eError::Kubeconfig { path, source })?;
    let host = config.cluster_url.host().unwrap_or_default();
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(E2eError::NotLocal {
            server: config.cluster_url.to_string(),
        });
    }
    Ok(config)
}

/// A client for the local control plane, as the cluster administrator.
pub async fn client() -> Result<Client, E2eError> {
    Ok(Client::try_from(local_config().await?)?)
}

/// Runs `test` in a fresh namespace named `PREFIX-xxxxx`, then deletes the namespace, also
/// when the test panics (the panic is then resumed so the test still fails).
pub async fn with_temp_ns<F, Fut>(prefix: &str, test: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let client = client()
        .await
        .expect("a client for the local control plane");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let created = namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the test namespace");
    let name = created
        .metadata
        .name
        .expect("the API server names the namespace");

    // Pods are refused until the namespace's default ServiceAccount exists.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_named(&accounts, "default", "the default ServiceAccount", |_| true)
        .await
        .expect("the controller manager creates the default ServiceAccount");

    let outcome = AssertUnwindSafe(test(client.clone(), name.clone()))
        .catch_unwind()
        .await;
    // The test's operator is gone by now: release its finalizers, or the namespace would
    // stay Terminating for ever.
    release_finalizers(&client, &name).await;
    if let Err(error) = namespaces.delete(&name, &DeleteParams::background()).await {
        eprintln!("could not delete test namespace {name}: {error}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Removes the finalizers of every InferenceDeployment in `namespace` (test teardown only).
pub async fn release_finalizers(client: &Client, namespace: &str) {
    use kube::api::{ListParams, Patch, PatchParams};
    let api: Api<millrace_crds::InferenceDeployment> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = api.list_metadata(&ListParams::default()).await else {
        return;
    };
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    for item in list.items {
        let name = item.metadata.name.unwrap_or_default();
        if let Err(error) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            eprintln!("could not release the finalizers of {namespace}/{name}: {error}");
        }
    }
}

/// Waits until an object selected by `config` satisfies `condition`, and returns it.
pub async fn wait_for<K>(
    api: &Api<K>,
    config: watcher::Config,
    what: &str,
    condition: impl Fn(&K) -> bool,
) -> Result<K, E2eError>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut matching = std::pin::pin!(
        watcher(api.clone(), config)
            .applied_objects()
            .try_filter(|object| futures::future::ready(condition(object)))
    );
    match tokio::time::timeout(DEFAULT_TIMEOUT, matching.next()).await {
        Err(_) => Err(E2eError::Timeout {
            what: what.to_string(),
            timeout: DEFAULT_TIMEOUT,
        }),
        Ok(None) => Err(E2eError::WatchEnded {
            what: what.to_string(),
        }),
        Ok(Some(result)) => Ok(result?),
    }
}

/// Waits until the object called `name` satisfies `condition`, and returns it.
pub async fn wait_named<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    condition: impl Fn(&K) -> bool,
) -> Result<K, E2eError>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    wait_for(api, config, what, condition).await
}

/// Waits until no object called `name` exists.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, what: &str) -> Result<(), E2eError>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let gone = kube::runtime::wait::await_condition(api.clone(), name, |object: Option<&K>| {
        object.is_none()
    });
    match tokio::time::timeout(DEFAULT_TIMEOUT, gone).await {
        Err(_) => Err(E2eError::Timeout {
            what: what.to_string(),
            timeout: DEFAULT_TIMEOUT,
        }),
        Ok(Err(kube::runtime::wait::Error::ProbeFailed(error))) => Err(E2eError::Watch(error)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Builds a typed object from JSON, as manifests in tests read best that way.
pub fn from_json<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("test manifests are valid objects")
}

/// Installs (server-side apply) the InferenceDeployment CRD generated from `millrace-crds`
/// and waits until the API server serves it. Safe to call from tests running in parallel.
pub async fn install_crd(client: &Client) -> Result<(), E2eError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = millrace_crds::crd::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("millrace-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait_named(&crds, &name, "the CRD to be established", |crd| {
        crd.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    })
    .await?;
    Ok(())
}

/// RFC 7386 JSON merge patch: objects merge, `null` deletes, anything else replaces. Tests
/// derive variants of a manifest with it.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// The condition `type_` of an InferenceDeployment's status, if present.
pub fn condition<'a>(
    resource: &'a millrace_crds::InferenceDeployment,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    resource
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until the InferenceDeployment `name` is Ready for its current generation.
pub async fn wait_ready(
    api: &Api<millrace_crds::InferenceDeployment>,
    name: &str,
) -> Result<millrace_crds::InferenceDeployment, E2eError> {
    wait_named(api, name, "Ready=True for the current generation", |r| {
        condition(r, "Ready").is_some_and(|c| c.status == "True")
            && r.status.as_ref().and_then(|s| s.observed_generation) == r.metadata.generation
    })
    .await
}
