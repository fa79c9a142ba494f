//! Proves the local control plane is real: the scheduler honours GPU capacity, taints and
//! selectors; the controller manager runs Jobs and garbage-collects dependents; the API
//! server signs service-account tokens and enforces RBAC.
//!
//! Needs `e2e/cluster up` (see the README's test command).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Event, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use millrace_e2e::{from_json, local_config, wait_deleted, wait_for, wait_named, with_temp_ns};
use serde_json::json;

const GPU: &str = "nvidia.com/gpu";

fn gpu_toleration() -> serde_json::Value {
    json!({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
}

/// A Deployment of `replicas` pods; `pod_spec_extra` is merged into the pod spec and
/// `resources` becomes the container's resources.
fn deployment(
    name: &str,
    replicas: i32,
    resources: serde_json::Value,
    pod_spec_extra: serde_json::Value,
) -> Deployment {
    let mut pod_spec = json!({
        "containers": [{"name": "main", "image": "millrace.dev/placeholder:test", "resources": resources}]
    });
    if let (Some(spec), Some(extra)) = (pod_spec.as_object_mut(), pod_spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    from_json(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}
        }
    }))
}

fn pod(name: &str, resources: serde_json::Value, pod_spec_extra: serde_json::Value) -> Pod {
    let mut spec = json!({
        "containers": [{"name": "main", "image": "millrace.dev/placeholder:test", "resources": resources}]
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), pod_spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    from_json(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}))
}

fn is_running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    running && ready
}

async fn node_pool(client: &Client, node_name: &str) -> String {
    let node = Api::<Node>::all(client.clone())
        .get(node_name)
        .await
        .expect("the pod's node exists");
    node.labels().get("pool").cloned().unwrap_or_default()
}

/// Waits for a FailedScheduling event on `pod_name` whose message contains `needle`.
async fn wait_for_scheduling_failure(
    client: &Client,
    ns: &str,
    pod_name: &str,
    needle: &str,
) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!(
        "involvedObject.name={pod_name},reason=FailedScheduling"
    ));
    let event = wait_for(
        &events,
        config,
        "a FailedScheduling event",
        |event: &Event| event.message.as_deref().is_some_and(|m| m.contains(needle)),
    )
    .await
    .expect("the scheduler records why the pod cannot be placed");
    event.message.unwrap_or_default()
}

#[tokio::test]
async fn the_cluster_has_a_cpu_pool_and_a_tainted_gpu_pool_all_ready() {
    let client = millrace_e2e::client().await.expect("local control plane");
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    assert_eq!(nodes.items.len(), 5, "three CPU and two GPU nodes");
    for node in &nodes.items {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "node {} is Ready", node.name_any());
        let gpus = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(GPU))
            .map(|q| q.0.clone());
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == GPU && t.effect == "NoSchedule"));
        match node.labels().get("pool").map(String::as_str) {
            Some("gpu") => {
                assert_eq!(
                    gpus.as_deref(),
                    Some("8"),
                    "{} advertises 8 GPUs",
                    node.name_any()
                );
                assert!(
                    tainted,
                    "{} is tainted for GPU workloads only",
                    node.name_any()
                );
            }
            Some("cpu") => {
                assert_eq!(gpus, None, "{} has no GPUs", node.name_any());
                assert!(!tainted, "{} is not tainted", node.name_any());
            }
            other => panic!("node {} has unexpected pool {other:?}", node.name_any()),
        }
    }
    let gpu_nodes = nodes
        .items
        .iter()
        .filter(|n| n.labels().get("pool").map(String::as_str) == Some("gpu"));
    assert_eq!(gpu_nodes.count(), 2);
}

#[tokio::test]
async fn a_gpu_deployment_is_bound_to_a_gpu_node_and_runs() {
    with_temp_ns("gpu-bind", |client, ns| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let spec = deployment(
            "scorer",
            1,
            json!({"limits": {GPU: "1"}}),
            json!({"nodeSelector": {"pool": "gpu"}, "tolerations": [gpu_toleration()]}),
        );
        deployments
            .create(&PostParams::default(), &spec)
            .await
            .expect("create deployment");

        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let running = wait_for(
            &pods,
            watcher::Config::default().labels("app=scorer"),
            "the GPU pod to run",
            is_running_and_ready,
        )
        .await
        .expect("the scheduler binds the pod and kwok starts it");
        let node = running
            .spec
            .and_then(|s| s.node_name)
            .expect("a bound pod names its node");
        assert_eq!(node_pool(&client, &node).await, "gpu", "bound to {node}");
        assert!(
            running.status.and_then(|s| s.pod_ip).is_some(),
            "kwok gives a running pod an IP"
        );

        let available = wait_named(
            &deployments,
            "scorer",
            "the deployment to be available",
            |d| d.status.as_ref().and_then(|s| s.available_replicas) == Some(1),
        )
        .await;
        assert!(
            available.is_ok(),
            "the deployment controller sees its pod available"
        );
    })
    .await;
}

#[tokio::test]
async fn pods_without_the_gpu_toleration_never_land_on_gpu_nodes() {
    with_temp_ns("no-toleration", |client, ns| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let spec = deployment("web", 6, json!({"requests": {"cpu": "100m"}}), json!({}));
        deployments
            .create(&PostParams::default(), &spec)
            .await
            .expect("create deployment");
        wait_named(&deployments, "web", "six ready replicas", |d| {
            d.status.as_ref().and_then(|s| s.ready_replicas) == Some(6)
        })
        .await
        .expect("all six pods run");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        for pod in pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .expect("list")
            .items
        {
            let node = pod.spec.and_then(|s| s.node_name).expect("bound");
            assert_eq!(node_pool(&client, &node).await, "cpu", "pod on {node}");
        }

        // Asking for the GPU pool without tolerating its taint can never be satisfied.
        let stranded = pod(
            "stranded",
            json!({}),
            json!({"nodeSelector": {"pool": "gpu"}}),
        );
        pods.create(&PostParams::default(), &stranded)
            .await
            .expect("create pod");
        let message =
            wait_for_scheduling_failure(&client, &ns, "stranded", "untolerated taint").await;
        // Both GPU nodes refuse it for the taint, the three CPU nodes for the selector.
        assert!(
            message.contains("2 node(s) had untolerated taint"),
            "{message}"
        );
        assert!(message.contains("3 node(s) didn't match"), "{message}");
        let pod = pods.get("stranded").await.expect("get pod");
        assert_eq!(pod.spec.and_then(|s| s.node_name), None, "never bound");
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    })
    .await;
}

#[tokio::test]
async fn a_gpu_request_beyond_the_pools_capacity_stays_pending_with_the_reason() {
    with_temp_ns("gpu-capacity", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // Each GPU node advertises 8; no single node can hold 9.
        let greedy = pod(
            "greedy",
            json!({"limits": {GPU: "9"}}),
            json!({"nodeSelector": {"pool": "gpu"}, "tolerations": [gpu_toleration()]}),
        );
        pods.create(&PostParams::default(), &greedy)
            .await
            .expect("create pod");
        let message =
            wait_for_scheduling_failure(&client, &ns, "greedy", "Insufficient nvidia.com/gpu")
                .await;
        assert!(message.contains("0/5 nodes are available"), "{message}");
        let pod = pods.get("greedy").await.expect("get pod");
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    })
    .await;
}

#[tokio::test]
async fn a_job_from_a_cronjob_template_runs_its_pods_and_is_garbage_collected_with_its_owner() {
    with_temp_ns("cronjob", |client, ns| async move {
        let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), &ns);
        let cronjob: CronJob = from_json(json!({
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "nightly"},
            "spec": {
                "schedule": "0 2 * * *",
                "suspend": true,
                "concurrencyPolicy": "Forbid",
                "jobTemplate": {"spec": {
                    "completions": 3,
                    "parallelism": 3,
                    "completionMode": "Indexed",
                    "template": {"spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "batch", "image": "millrace.dev/placeholder:test"}]
                    }}
                }}
            }
        }));
        let cronjob = cronjobs
            .create(&PostParams::default(), &cronjob)
            .await
            .expect("create cronjob");

        // What `kubectl create job --from=cronjob/nightly` does: the template, owned by the CronJob.
        let template = cronjob.spec.job_template.clone();
        let owner = OwnerReference {
            controller: Some(true),
            block_owner_deletion: Some(true),
            ..cronjob
                .controller_owner_ref(&())
                .expect("a created object has a uid")
        };
        let job = Job {
            metadata: kube::api::ObjectMeta {
                name: Some("nightly-manual".into()),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            spec: template.spec,
            status: None,
        };
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
        jobs.create(&PostParams::default(), &job)
            .await
            .expect("create job");
        let done = wait_named(
            &jobs,
            "nightly-manual",
            "the job to complete",
            |job: &Job| {
                job.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Complete" && c.status == "True")
                    })
            },
        )
        .await
        .expect("the job controller creates the pods and kwok completes them");
        assert_eq!(done.status.and_then(|s| s.succeeded), Some(3));

        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let job_pods = pods
            .list(&ListParams::default().labels("job-name=nightly-manual"))
            .await
            .expect("list job pods");
        let mut indexes: Vec<String> = job_pods
            .items
            .iter()
            .filter_map(|p| {
                p.annotations()
                    .get("batch.kubernetes.io/job-completion-index")
                    .cloned()
            })
            .collect();
        indexes.sort();
        assert_eq!(indexes, ["0", "1", "2"], "one pod per completion index");

        // Deleting the owner lets the garbage collector remove the Job, and the Job's pods.
        cronjobs
            .delete("nightly", &DeleteParams::background())
            .await
            .expect("delete cronjob");
        wait_deleted(
            &jobs,
            "nightly-manual",
            "the garbage collector to delete the job",
        )
        .await
        .expect("the owned job is collected");
        for pod in job_pods.items {
            wait_deleted(&pods, &pod.name_any(), "the job's pods to be deleted")
                .await
                .expect("the job's pods are collected");
        }
    })
    .await;
}

#[tokio::test]
async fn deleting_a_deployment_garbage_collects_its_replica_sets_and_pods() {
    with_temp_ns("gc", |client, ns| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let spec = deployment("doomed", 2, json!({}), json!({}));
        deployments
            .create(&PostParams::default(), &spec)
            .await
            .expect("create");
        wait_named(&deployments, "doomed", "two ready replicas", |d| {
            d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
        })
        .await
        .expect("replicas run");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let before = pods
            .list(&ListParams::default().labels("app=doomed"))
            .await
            .expect("list");
        assert_eq!(before.items.len(), 2);

        deployments
            .delete("doomed", &DeleteParams::foreground())
            .await
            .expect("delete");
        wait_deleted(
            &deployments,
            "doomed",
            "foreground deletion of the deployment",
        )
        .await
        .expect("foreground deletion completes once dependents are gone");
        for pod in before.items {
            wait_deleted(
                &pods,
                &pod.name_any(),
                "the deployment's pods to be deleted",
            )
            .await
            .expect("pods are collected");
        }
    })
    .await;
}

#[tokio::test]
async fn service_account_tokens_are_signed_and_rbac_is_enforced() {
    with_temp_ns("token", |client, ns| async move {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        let account: ServiceAccount = from_json(json!({"metadata": {"name": "reader"}}));
        accounts.create(&PostParams::default(), &account).await.expect("create sa");
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec!["https://kubernetes.default.svc.cluster.local".into()]),
                expiration_seconds: Some(600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = accounts
            .create_token_request("reader", &PostParams::default(), &request)
            .await
            .expect("TokenRequest is served")
            .status
            .and_then(|s| s.token)
            .expect("a token");

        // A client that authenticates only with the token.
        let mut config = local_config().await.expect("config");
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.into()),
            ..Default::default()
        };
        let as_reader = Client::try_from(config).expect("token client");
        let review = Api::<SelfSubjectReview>::all(as_reader.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .expect("the API server authenticates the token");
        let username = review.status.and_then(|s| s.user_info).and_then(|u| u.username);
        assert_eq!(username, Some(format!("system:serviceaccount:{ns}:reader")));

        // RBAC: nothing is granted yet, so listing pods is forbidden...
        let reader_pods: Api<Pod> = Api::namespaced(as_reader.clone(), &ns);
        match reader_pods.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("expected 403 Forbidden, got {other:?}"),
        }
        // ...until a Role and RoleBinding grant it.
        let role: Role = from_json(json!({
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        }));
        Api::<Role>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("create role");
        let binding: RoleBinding = from_json(json!({
            "metadata": {"name": "pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
        }));
        Api::<RoleBinding>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("create binding");
        // The RBAC authorizer reads bindings through an informer: allow it a moment.
        let deadline = tokio::time::Instant::now() + millrace_e2e::DEFAULT_TIMEOUT;
        loop {
            match reader_pods.list(&ListParams::default()).await {
                Ok(_) => break,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(error) => panic!("the granted list is still refused: {error}"),
            }
        }
        // The grant is exactly what the Role says: secrets stay forbidden.
        let reader_secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(as_reader, &ns);
        assert!(reader_secrets.list(&ListParams::default()).await.is_err());
    })
    .await;
}
