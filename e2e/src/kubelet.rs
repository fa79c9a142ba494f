//! A stand-in kubelet: runs the real processes of the pods kwok only simulates.
//!
//! kwok schedules pods onto fake nodes and marks them Running. A pod whose template carries
//! [`HOLD_ANNOTATION`] is left alone by kwok's completion stages (see `e2e/kwok/stages.yaml`)
//! and run here instead, from its own spec, the way a kubelet would:
//! - volumes: a `configMap` or `secret` volume becomes a directory with its keys as files,
//!   an `emptyDir` an empty directory; every mount path is rewritten to that directory in the
//!   container's arguments, environment and mounted config files (there is no mount
//!   namespace), so `/etc/millrace/scorer.json` is read from the pod's own directory;
//! - environment: `value`, `fieldRef` (name, namespace, labels, annotations such as the
//!   Job's completion index, node name, pod IP as loopback), `configMapKeyRef`,
//!   `secretKeyRef`, `envFrom`;
//! - the image's entrypoint is a local binary chosen by the image name ([`Images`]);
//! - the pod network is loopback: a container that declares a port gets a free local port
//!   through `MILLRACE_LISTEN` (the scorer's listen flag), readable from [`Kubelet::endpoints`];
//! - Services are a loopback proxy each (a kube-proxy stand-in): an `http://{service}` in a
//!   container's arguments or environment becomes the proxy's address, which forwards each
//!   connection to a running pod the Service selects, round robin, and refuses it (closes at
//!   once) while there is none, as a Service without endpoints does;
//! - init containers run to completion first; a pod of a Job reports its exit as the pod's
//!   phase (Succeeded or Failed, with the exit code), which is what the Job controller counts;
//! - a deleted pod's process is stopped with SIGTERM, as on a node.
//!
//! Logs go to `$TMPDIR/millrace-kubelet-{namespace}-{pod}.log`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::net::free_port;

/// The pod annotation that hands a pod to this kubelet instead of kwok's completion stages.
pub const HOLD_ANNOTATION: &str = "kwok.millrace.dev/hold";

/// Which local binary runs an image: the first entry whose name the image contains.
#[derive(Clone, Debug, Default)]
pub struct Images {
    binaries: Vec<(String, PathBuf)>,
}

impl Images {
    /// Runs images whose name contains `image` with `binary`.
    pub fn with(mut self, image: &str, binary: impl Into<PathBuf>) -> Self {
        self.binaries.push((image.to_string(), binary.into()));
        self
    }

    fn binary(&self, image: &str) -> Option<&Path> {
        self.binaries
            .iter()
            .find(|(name, _)| image.contains(name.as_str()))
            .map(|(_, path)| path.as_path())
    }
}

/// What went wrong starting a pod's process.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The pod uses a feature this stand-in does not emulate.
    #[error("pod {pod}: {what} is not supported by the e2e kubelet")]
    Unsupported {
        /// The pod.
        pod: String,
        /// The feature.
        what: String,
    },
    /// No binary is registered for the container's image.
    #[error("pod {pod}: no local binary for image {image}")]
    NoBinary {
        /// The pod.
        pod: String,
        /// The image.
        image: String,
    },
    /// A referenced ConfigMap, Secret or key is missing.
    #[error("pod {pod}: {what} not found")]
    Missing {
        /// The pod.
        pod: String,
        /// What is missing.
        what: String,
    },
    /// An API call failed.
    #[error("pod {pod}: {source}")]
    Kube {
        /// The pod.
        pod: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// A file or process operation failed.
    #[error("pod {pod}: {source}")]
    Io {
        /// The pod.
        pod: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// One pod's process on this kubelet.
struct RunningPod {
    /// Loopback port of its first declared container port.
    port: Option<u16>,
    /// The main container's process (None once it exited).
    child: Option<Child>,
    /// Its volumes and files, removed with it.
    _dir: tempfile::TempDir,
    labels: BTreeMap<String, String>,
}

type Pods = Arc<Mutex<HashMap<String, RunningPod>>>;

/// Loopback proxies standing in for Services: Service name → proxy port.
type Proxies = Arc<tokio::sync::Mutex<HashMap<String, u16>>>;

/// Runs held pods of one namespace until dropped.
pub struct Kubelet {
    pods: Pods,
    watch: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts running the held pods of `namespace` with `images`.
    pub fn start(client: Client, namespace: &str, images: Images) -> Self {
        let pods: Pods = Arc::default();
        let watch = tokio::spawn(run(
            client,
            namespace.to_string(),
            images,
            pods.clone(),
            Proxies::default(),
        ));
        Self { pods, watch }
    }

    /// `(pod name, loopback port)` of every running pod with label `key=value`, sorted by
    /// name: the stand-in for a Service's endpoints.
    pub fn endpoints(&self, key: &str, value: &str) -> Vec<(String, u16)> {
        let Ok(pods) = self.pods.lock() else {
            return Vec::new();
        };
        let mut endpoints: Vec<(String, u16)> = pods
            .iter()
            .filter(|(_, pod)| pod.child.is_some())
            .filter(|(_, pod)| pod.labels.get(key).map(String::as_str) == Some(value))
            .filter_map(|(name, pod)| pod.port.map(|port| (name.clone(), port)))
            .collect();
        endpoints.sort();
        endpoints
    }

    /// The log file of pod `name`.
    pub fn log_path(namespace: &str, name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("millrace-kubelet-{namespace}-{name}.log"))
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.watch.abort();
        if let Ok(mut pods) = self.pods.lock() {
            for (_, mut pod) in pods.drain() {
                if let Some(child) = pod.child.as_mut() {
                    let _ = child.start_kill();
                }
            }
        }
    }
}

async fn run(client: Client, namespace: String, images: Images, pods: Pods, proxies: Proxies) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut events = std::pin::pin!(watcher(api.clone(), watcher::Config::default()));
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => pod,
            Ok(Event::Delete(pod)) => {
                stop(&pods, &pod.name_any());
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                eprintln!("kubelet {namespace}: watch error: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            stop(&pods, &name);
            continue;
        }
        let held = pod.annotations().contains_key(HOLD_ANNOTATION);
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let known = pods.lock().map(|p| p.contains_key(&name)).unwrap_or(true);
        if !held || !running || known {
            continue;
        }
        match start_pod(&client, &pod, &images, &pods, &proxies).await {
            Ok(started) => {
                let job_pod =
                    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
                if let Ok(mut all) = pods.lock() {
                    all.insert(name.clone(), started);
                }
                if job_pod {
                    tokio::spawn(report_exit(api.clone(), pods.clone(), name));
                }
            }
            Err(error) => {
                eprintln!("kubelet {namespace}: {error}");
                let _ = set_terminated(&api, &name, 1, &error.to_string()).await;
            }
        }
    }
}

/// Stops the process of a deleted pod (SIGTERM, as the kubelet does).
fn stop(pods: &Pods, name: &str) {
    let removed = pods.lock().ok().and_then(|mut p| p.remove(name));
    if let Some(mut pod) = removed
        && let Some(mut child) = pod.child.take()
    {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        });
    }
}

/// Waits for a Job pod's process and reports its exit as the pod's phase.
async fn report_exit(api: Api<Pod>, pods: Pods, name: String) {
    let child = pods
        .lock()
        .ok()
        .and_then(|mut p| p.get_mut(&name).and_then(|pod| pod.child.take()));
    let Some(mut child) = child else { return };
    let code = match child.wait().await {
        Ok(status) => status.code().unwrap_or(137),
        Err(_) => 1,
    };
    let reason = if code == 0 { "Completed" } else { "Error" };
    if let Err(error) = set_terminated(&api, &name, code, reason).await {
        eprintln!("kubelet: cannot report the exit of {name}: {error}");
    }
}

/// Marks pod `name` Succeeded (exit 0) or Failed, as a kubelet reports a finished container.
async fn set_terminated(
    api: &Api<Pod>,
    name: &str,
    code: i32,
    reason: &str,
) -> Result<(), kube::Error> {
    let Some(pod) = api.get_opt(name).await? else {
        return Ok(());
    };
    let now = jiff::Timestamp::now().to_string();
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let statuses: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "ready": false, "started": false,
                "restartCount": 0, "imageID": "", "containerID": format!("e2e://{name}"),
                "state": {"terminated": {
                    "exitCode": code, "reason": reason, "startedAt": now, "finishedAt": now
                }}
            })
        })
        .collect();
    let patch = json!({"status": {
        "phase": phase,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
        ],
        "containerStatuses": statuses,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    Ok(())
}

/// Materializes the pod's volumes, runs its init containers, and starts its main container.
async fn start_pod(
    client: &Client,
    pod: &Pod,
    images: &Images,
    pods: &Pods,
    proxies: &Proxies,
) -> Result<RunningPod, KubeletError> {
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let io = |source| KubeletError::Io {
        pod: name.clone(),
        source,
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let dir = tempfile::Builder::new()
        .prefix(&format!("kubelet-{name}-"))
        .tempdir()
        .map_err(io)?;

    // Volumes first, without file contents: config files are rewritten once every mount
    // path is known.
    let mut volume_dirs: HashMap<String, PathBuf> = HashMap::new();
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for volume in spec.volumes.iter().flatten() {
        let path = dir.path().join("volumes").join(&volume.name);
        std::fs::create_dir_all(&path).map_err(io)?;
        if let Some(source) = &volume.config_map {
            let data = config_map(client, &namespace, &source.name, &name).await?;
            for (key, value) in data {
                files.push((path.join(key), value.into_bytes()));
            }
        } else if let Some(source) = &volume.secret {
            let secret_name = source.secret_name.clone().unwrap_or_default();
            for (key, value) in secret(client, &namespace, &secret_name, &name).await? {
                files.push((path.join(key), value.0));
            }
        } else if volume.empty_dir.is_none() {
            return Err(KubeletError::Unsupported {
                pod: name,
                what: format!("volume {} (only configMap, secret, emptyDir)", volume.name),
            });
        }
        volume_dirs.insert(volume.name.clone(), path);
    }

    let log_path = Kubelet::log_path(&namespace, &name);
    let log = std::fs::File::create(&log_path).map_err(io)?;
    let mut port = None;
    let init = spec.init_containers.clone().unwrap_or_default();
    let main = spec
        .containers
        .first()
        .cloned()
        .ok_or_else(|| KubeletError::Unsupported {
            pod: name.clone(),
            what: "a pod without containers".into(),
        })?;
    let mut mounts_seen: Vec<(String, PathBuf)> = Vec::new();
    for container in init.iter().chain(std::iter::once(&main)) {
        for mount in container.volume_mounts.iter().flatten() {
            if let Some(local) = volume_dirs.get(&mount.name) {
                mounts_seen.push((mount.mount_path.clone(), local.clone()));
            }
        }
    }
    // Longest first, so /var/lib/millrace/model is rewritten before /var/lib/millrace.
    mounts_seen.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
    mounts_seen.dedup();
    let services = service_addresses(client, &namespace, pods, proxies, &init, &main).await?;
    let rewrite = |text: &str| rewrite_services(&rewrite_paths(text, &mounts_seen), &services);
    for (path, bytes) in files {
        let bytes = match String::from_utf8(bytes) {
            Ok(text) => rewrite(&text).into_bytes(),
            Err(binary) => binary.into_bytes(),
        };
        std::fs::write(&path, bytes).map_err(io)?;
    }

    for container in &init {
        let mut command = command(client, pod, container, images, &rewrite).await?;
        command
            .stdout(Stdio::from(log.try_clone().map_err(io)?))
            .stderr(Stdio::from(log.try_clone().map_err(io)?));
        let status = tokio::time::timeout(Duration::from_secs(120), command.status())
            .await
            .map_err(|_| KubeletError::Unsupported {
                pod: name.clone(),
                what: format!("init container {} running over 120 s", container.name),
            })?
            .map_err(io)?;
        if !status.success() {
            return Err(KubeletError::Missing {
                pod: name.clone(),
                what: format!(
                    "a successful init container {} (it exited {status}; see {})",
                    container.name,
                    log_path.display()
                ),
            });
        }
    }

    let mut command = command(client, pod, &main, images, &rewrite).await?;
    if main.ports.as_ref().is_some_and(|p| !p.is_empty()) {
        let local = free_port();
        port = Some(local);
        command.env("MILLRACE_LISTEN", format!("127.0.0.1:{local}"));
    }
    command
        .stdout(Stdio::from(log.try_clone().map_err(io)?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let child = command.spawn().map_err(io)?;
    Ok(RunningPod {
        port,
        child: Some(child),
        _dir: dir,
        labels: pod.labels().clone(),
    })
}

/// Replaces every mount path in `text` (at a path boundary: `/tmp` or `/tmp/x`, never
/// `/tmpx`) with its local directory, in one pass, so a rewritten path is never rewritten
/// again (the local directories live under `/tmp`, itself a mount path). `mounts` is
/// longest first.
fn rewrite_paths(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for (mount, local) in mounts {
            if let Some(after) = rest.strip_prefix(mount.as_str())
                && !after
                    .starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                out.push_str(&local.to_string_lossy());
                rest = after;
                continue 'scan;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// `http://{service}` → `http://127.0.0.1:{proxy}` for every Service of `namespace` that the
/// containers' arguments or environment name, starting a proxy for each the first time.
async fn service_addresses(
    client: &Client,
    namespace: &str,
    pods: &Pods,
    proxies: &Proxies,
    init: &[Container],
    main: &Container,
) -> Result<Vec<(String, String)>, KubeletError> {
    let mut texts: Vec<&str> = Vec::new();
    for container in init.iter().chain(std::iter::once(main)) {
        texts.extend(container.args.iter().flatten().map(String::as_str));
        texts.extend(
            container
                .env
                .iter()
                .flatten()
                .filter_map(|v| v.value.as_deref()),
        );
    }
    let mut addresses = Vec::new();
    for host in texts.iter().flat_map(|t| http_hosts(t)) {
        // A bare name, or one under `.svc`, is a Service of this namespace (which may not
        // exist yet: the proxy looks its selector up per connection, as DNS would later
        // resolve it).
        let name = host.split(':').next().unwrap_or_default();
        let service = name.split('.').next().unwrap_or_default().to_string();
        let is_service = name != "localhost"
            && name.parse::<std::net::IpAddr>().is_err()
            && (!name.contains('.') || name.contains(".svc"));
        if !is_service {
            continue;
        }
        let port = {
            let mut known = proxies.lock().await;
            match known.get(&service) {
                Some(port) => *port,
                None => {
                    let api = Api::namespaced(client.clone(), namespace);
                    let port = start_proxy(pods.clone(), api, service.clone())
                        .await
                        .map_err(|source| KubeletError::Io {
                            pod: main.name.clone(),
                            source,
                        })?;
                    known.insert(service.clone(), port);
                    port
                }
            }
        };
        addresses.push((format!("http://{host}"), format!("http://127.0.0.1:{port}")));
    }
    // Longest first, so `http://a-b` is replaced before `http://a`.
    addresses.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    addresses.dedup();
    Ok(addresses)
}

/// The hosts (with their `:port`, if any) of the `http://` URLs in `text`.
fn http_hosts(text: &str) -> Vec<String> {
    text.match_indices("http://")
        .map(|(at, scheme)| {
            text[at + scheme.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
                .collect::<String>()
        })
        .filter(|host| !host.is_empty())
        .collect()
}

fn rewrite_services(text: &str, services: &[(String, String)]) -> String {
    let mut text = text.to_string();
    for (from, to) in services {
        text = text.replace(from.as_str(), to);
    }
    text
}

/// A loopback proxy for Service `name`: each connection goes to the next running pod its
/// selector matches, or is closed at once when none does (or the Service does not exist).
async fn start_proxy(
    pods: Pods,
    services: Api<k8s_openapi::api::core::v1::Service>,
    name: String,
) -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let selector: BTreeMap<String, String> = match services.get_opt(&name).await {
                Ok(Some(service)) => service.spec.and_then(|s| s.selector).unwrap_or_default(),
                _ => continue,
            };
            if selector.is_empty() {
                continue; // a Service without a selector has no pods of ours
            }
            let endpoints: Vec<u16> = pods
                .lock()
                .map(|all| {
                    let mut ready: Vec<(&String, u16)> = all
                        .iter()
                        .filter(|(_, pod)| pod.child.is_some())
                        .filter(|(_, pod)| {
                            selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                        })
                        .filter_map(|(name, pod)| pod.port.map(|port| (name, port)))
                        .collect();
                    ready.sort();
                    ready.into_iter().map(|(_, port)| port).collect()
                })
                .unwrap_or_default();
            if endpoints.is_empty() {
                continue; // dropping the connection refuses it
            }
            let target = endpoints[next % endpoints.len()];
            next = next.wrapping_add(1);
            tokio::spawn(async move {
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(port)
}

/// The process of `container`: its image's binary, its arguments and environment.
async fn command(
    client: &Client,
    pod: &Pod,
    container: &Container,
    images: &Images,
    rewrite: &impl Fn(&str) -> String,
) -> Result<Command, KubeletError> {
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let image = container.image.clone().unwrap_or_default();
    let binary = images
        .binary(&image)
        .ok_or_else(|| KubeletError::NoBinary {
            pod: name.clone(),
            image: image.clone(),
        })?;
    let mut command = Command::new(binary);
    // The image's entrypoint is the binary; `command` beyond it becomes leading arguments.
    for arg in container.command.iter().flatten().skip(1) {
        command.arg(rewrite(arg));
    }
    for arg in container.args.iter().flatten() {
        command.arg(rewrite(arg));
    }
    command.env_clear();
    for key in ["PATH", "HOME", "TMPDIR", "ORT_DYLIB_PATH", "RUST_BACKTRACE"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    command.env("RUST_LOG", "info");
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(secret_ref) = &source.secret_ref {
            for (key, value) in secret(client, &namespace, &secret_ref.name, &name).await? {
                command.env(
                    format!("{prefix}{key}"),
                    String::from_utf8_lossy(&value.0).into_owned(),
                );
            }
        }
        if let Some(map_ref) = &source.config_map_ref {
            for (key, value) in config_map(client, &namespace, &map_ref.name, &name).await? {
                command.env(format!("{prefix}{key}"), value);
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = env_value(client, pod, var).await?;
        command.env(&var.name, rewrite(&value));
    }
    Ok(command)
}

/// The value of one `env` entry.
async fn env_value(client: &Client, pod: &Pod, var: &EnvVar) -> Result<String, KubeletError> {
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    if let Some(value) = &var.value {
        return Ok(value.clone());
    }
    let Some(source) = &var.value_from else {
        return Ok(String::new());
    };
    let missing = |what: String| KubeletError::Missing {
        pod: name.clone(),
        what,
    };
    if let Some(field) = &source.field_ref {
        let path = field.field_path.as_str();
        let from_map = |map: &BTreeMap<String, String>, prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix("']"))
                .and_then(|key| map.get(key).cloned())
        };
        let value = match path {
            "metadata.name" => Some(name.clone()),
            "metadata.namespace" => Some(namespace.clone()),
            "metadata.uid" => pod.metadata.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            "status.podIP" | "status.hostIP" => Some("127.0.0.1".into()),
            _ => from_map(pod.labels(), "metadata.labels['")
                .or_else(|| from_map(pod.annotations(), "metadata.annotations['")),
        };
        return value.ok_or_else(|| missing(format!("field {path}")));
    }
    if let Some(key_ref) = &source.config_map_key_ref {
        let data = config_map(client, &namespace, &key_ref.name, &name).await?;
        return data
            .get(&key_ref.key)
            .cloned()
            .ok_or_else(|| missing(format!("ConfigMap {} key {}", key_ref.name, key_ref.key)));
    }
    if let Some(key_ref) = &source.secret_key_ref {
        let data = secret(client, &namespace, &key_ref.name, &name).await?;
        return data
            .get(&key_ref.key)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .ok_or_else(|| missing(format!("Secret {} key {}", key_ref.name, key_ref.key)));
    }
    Err(KubeletError::Unsupported {
        pod: name,
        what: format!("env {} from a resource field", var.name),
    })
}

async fn config_map(
    client: &Client,
    namespace: &str,
    map: &str,
    pod: &str,
) -> Result<BTreeMap<String, String>, KubeletError> {
    let found: ConfigMap = named(client, namespace, map, pod, "ConfigMap").await?;
    Ok(found.data.unwrap_or_default())
}

async fn secret(
    client: &Client,
    namespace: &str,
    secret: &str,
    pod: &str,
) -> Result<BTreeMap<String, ByteString>, KubeletError> {
    let found: Secret = named(client, namespace, secret, pod, "Secret").await?;
    let mut data = found.data.unwrap_or_default();
    for (key, value) in found.string_data.unwrap_or_default() {
        data.insert(key, ByteString(value.into_bytes()));
    }
    Ok(data)
}

/// The `kind` called `name` that pod `pod` refers to; missing is an error naming both.
async fn named<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    pod: &str,
    kind: &str,
) -> Result<K, KubeletError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|source| KubeletError::Kube {
            pod: pod.to_string(),
            source,
        })?
        .ok_or_else(|| KubeletError::Missing {
            pod: pod.to_string(),
            what: format!("{kind} {name}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_rewritten_once_and_only_at_path_boundaries() {
        let mounts = vec![
            (
                "/var/lib/millrace/model".to_string(),
                PathBuf::from("/tmp/k/model"),
            ),
            ("/tmp".to_string(), PathBuf::from("/tmp/k/tmp")),
        ];
        assert_eq!(
            rewrite_paths(
                r#"{"path": "/var/lib/millrace/model/model.onnx", "t": "/tmp"}"#,
                &mounts
            ),
            r#"{"path": "/tmp/k/model/model.onnx", "t": "/tmp/k/tmp"}"#
        );
        assert_eq!(
            rewrite_paths("/tmpfile /tmp/x", &mounts),
            "/tmpfile /tmp/k/tmp/x"
        );
    }

    #[test]
    fn service_urls_are_found_and_replaced() {
        assert_eq!(
            http_hosts("--compute-url http://churn-compute --x http://a.b.svc:8080/path"),
            ["churn-compute", "a.b.svc:8080"]
        );
        let services = vec![(
            "http://churn-compute".to_string(),
            "http://127.0.0.1:4000".to_string(),
        )];
        assert_eq!(
            rewrite_services("http://churn-compute/v1", &services),
            "http://127.0.0.1:4000/v1"
        );
    }

    #[test]
    fn images_pick_the_first_matching_binary() {
        let images = Images::default()
            .with("millrace-scorer", "/bin/scorer")
            .with("millrace", "/bin/other");
        assert_eq!(
            images.binary("registry.local/millrace-scorer:e2e"),
            Some(Path::new("/bin/scorer"))
        );
        assert_eq!(images.binary("busybox"), None);
    }
}
