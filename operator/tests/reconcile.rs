//! The operator against the real local control plane: the children it creates, in-place
//! updates, no-op reconciles, orphan deletion, GPU placement by the real scheduler, status,
//! run-batch tokens, garbage collection and leader failover.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{
    condition, install_crd, wait_deleted, wait_for, wait_named, wait_ready, with_temp_ns,
};
use serde_json::json;
use support::{OperatorProcess, apply_until_ready, user_apply};

const SELECTOR: &str = "millrace.dev/inference-deployment=churn";

fn example(redis: &RedisServer, patch: serde_json::Value) -> InferenceDeployment {
    support::example(&redis.url(), patch)
}

/// The resourceVersion of every child, by kind and name.
async fn child_versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let params = ListParams::default().labels(SELECTOR);
    let mut versions = BTreeMap::new();
    macro_rules! collect {
        ($kind:ty) => {
            for object in Api::<$kind>::namespaced(client.clone(), ns)
                .list(&params)
                .await
                .expect("list")
                .items
            {
                versions.insert(
                    format!("{}/{}", stringify!($kind), object.name_any()),
                    object.resource_version().unwrap_or_default(),
                );
            }
        };
    }
    collect!(Deployment);
    collect!(Service);
    collect!(ConfigMap);
    collect!(PodDisruptionBudget);
    collect!(CronJob);
    versions
}

#[tokio::test]
async fn an_example_becomes_its_children_updates_in_place_and_drops_the_batch() {
    with_temp_ns("reconcile", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        user_apply(&api, &example(&redis, json!({}))).await;
        let ready = wait_ready(&api, "churn")
            .await
            .expect("the operator makes the resource Ready");
        assert_eq!(
            ready
                .status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .map(|a| a.replicas),
            Some(1)
        );

        // Exactly the expected children.
        let versions = child_versions(&client, &ns).await;
        let kinds: Vec<&str> = versions.keys().map(String::as_str).collect();
        assert_eq!(
            kinds,
            [
                "ConfigMap/churn-config",
                "CronJob/churn-batch",
                "Deployment/churn-scorer",
                "PodDisruptionBudget/churn-scorer",
                "Service/churn-scorer",
            ]
        );

        // The real scheduler put the scorer on a GPU node, with the GPU it asked for.
        let pods = Api::<Pod>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels(SELECTOR))
            .await
            .expect("pods");
        assert!(!pods.items.is_empty());
        for pod in &pods.items {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .expect("bound");
            let node = Api::<Node>::all(client.clone())
                .get(&node)
                .await
                .expect("node");
            assert_eq!(node.labels().get("pool").map(String::as_str), Some("gpu"));
            let limits = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers[0].resources.clone())
                .and_then(|r| r.limits)
                .expect("limits");
            assert_eq!(
                limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
                Some("1")
            );
        }

        // Re-applying the same manifest changes nothing at all.
        let before = child_versions(&client, &ns).await;
        let resource_version = api.get("churn").await.expect("get").resource_version();
        user_apply(&api, &example(&redis, json!({}))).await;
        assert_eq!(
            api.get("churn").await.expect("get").resource_version(),
            resource_version
        );

        // A reconcile with nothing to change writes nothing: touch the resource's metadata,
        // which wakes the operator without changing the spec.
        let touched_status = api.get("churn").await.expect("get").status;
        let touch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
        api.patch("churn", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .expect("touch");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            child_versions(&client, &ns).await,
            before,
            "no child was rewritten"
        );
        assert_eq!(
            api.get("churn").await.expect("get").status,
            touched_status,
            "status was not rewritten"
        );

        // A spec change updates children in place.
        let uid_before = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
            .get("churn-scorer")
            .await
            .expect("pdb")
            .uid();
        user_apply(
            &api,
            &example(
                &redis,
                json!({"spec": {"serving": {"maxUnavailable": 2}, "cache": {"realtimeTTL": "2h"}}}),
            ),
        )
        .await;
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
        let pdb = wait_named(
            &pdbs,
            "churn-scorer",
            "the PDB to allow 2 unavailable",
            |p: &PodDisruptionBudget| {
                p.spec.as_ref().and_then(|s| s.max_unavailable.clone())
                    == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
            },
        )
        .await
        .expect("the PDB is updated");
        assert_eq!(pdb.uid(), uid_before, "updated in place, not recreated");
        let config = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get("churn-config")
            .await
            .expect("config");
        assert!(
            config
                .data
                .and_then(|d| d.get("scorer.json").cloned())
                .is_some_and(|t| t.contains("\"realtimeTTL\": \"2h\""))
        );
        wait_ready(&api, "churn")
            .await
            .expect("the operator makes the resource Ready");

        // Removing the batch deletes the CronJob.
        let mut no_batch = example(
            &redis,
            json!({"spec": {"serving": {"maxUnavailable": 2}, "cache": {"realtimeTTL": "2h"}}}),
        );
        no_batch.spec.batch = None;
        no_batch.spec.features.offline = None;
        user_apply(&api, &no_batch).await;
        wait_deleted(
            &Api::<CronJob>::namespaced(client.clone(), &ns),
            "churn-batch",
            "the CronJob to be deleted",
        )
        .await
        .expect("the operator deletes the CronJob it no longer needs");
    })
    .await;
}

#[tokio::test]
async fn deleting_the_resource_garbage_collects_its_children() {
    with_temp_ns("reconcile-gc", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        apply_until_ready(&api, &example(&redis, json!({}))).await;
        api.delete("churn", &DeleteParams::foreground())
            .await
            .expect("delete");
        wait_deleted(&api, "churn", "foreground deletion of the resource")
            .await
            .expect("deleted");
        assert!(
            child_versions(&client, &ns).await.is_empty(),
            "every child was collected"
        );
    })
    .await;
}

#[tokio::test]
async fn a_run_batch_token_creates_exactly_one_job() {
    with_temp_ns("reconcile-run", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        apply_until_ready(&api, &example(&redis, json!({}))).await;

        let annotate =
            |token: &str| json!({"metadata": {"annotations": {"millrace.dev/run-batch": token}}});
        api.patch(
            "churn",
            &PatchParams::default(),
            &Patch::Merge(&annotate("first")),
        )
        .await
        .expect("annotate");
        wait_named(
            &api,
            "churn",
            "the token to be recorded",
            |r: &InferenceDeployment| {
                r.status.as_ref().and_then(|s| s.last_run_token.as_deref()) == Some("first")
            },
        )
        .await
        .expect("the operator records the token");
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
        let listed = jobs
            .list(&ListParams::default().labels(SELECTOR))
            .await
            .expect("jobs");
        assert_eq!(listed.items.len(), 1, "one Job for one token");
        let job = &listed.items[0];
        assert_eq!(
            job.spec.as_ref().and_then(|s| s.completions),
            Some(8),
            "all shards"
        );
        assert_eq!(job.owner_references()[0].kind, "CronJob");

        // Reconciling again, for any reason, does not run the same token twice.
        let touch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
        api.patch("churn", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .expect("touch");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            jobs.list(&ListParams::default().labels(SELECTOR))
                .await
                .expect("jobs")
                .items
                .len(),
            1
        );

        // A new token is a new run.
        api.patch(
            "churn",
            &PatchParams::default(),
            &Patch::Merge(&annotate("second")),
        )
        .await
        .expect("annotate");
        wait_for(
            &jobs,
            watcher::Config::default().labels(SELECTOR),
            "a second Job",
            |j: &Job| j.name_any() != job.name_any(),
        )
        .await
        .expect("a second token runs the batch again");
        let events = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=BatchRunCreated"))
            .await
            .expect("events");
        assert!(!events.items.is_empty(), "the run is announced in an event");
    })
    .await;
}

#[tokio::test]
async fn a_spec_only_the_operator_can_reject_is_reported_degraded() {
    with_temp_ns("reconcile-invalid", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        user_apply(
            &api,
            &example(
                &redis,
                json!({"spec": {"batch": {"timeZone": "Mars/Olympus_Mons"}}}),
            ),
        )
        .await;
        let degraded = wait_named(&api, "churn", "Degraded=True", |r: &InferenceDeployment| {
            condition(r, "Degraded").is_some_and(|c| c.status == "True")
        })
        .await
        .expect("the operator reports the invalid spec");
        let message = degraded
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(message.contains("spec.batch.timeZone"), "{message}");
        assert!(
            child_versions(&client, &ns).await.is_empty(),
            "nothing is applied for an invalid spec"
        );
        let events = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=InvalidSpec"))
            .await
            .expect("events");
        assert_eq!(events.items.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_standby_operator_takes_over_when_the_leader_dies() {
    with_temp_ns("reconcile-ha", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        let holder = |name: &'static str| {
            move |lease: &Lease| {
                lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(name)
            }
        };
        let redis = RedisServer::start();
        let mut first = OperatorProcess::start(&ns, "first");
        wait_named(
            &leases,
            "millrace-operator",
            "first to lead",
            holder("first"),
        )
        .await
        .expect("first leads");
        let _second = OperatorProcess::start(&ns, "second");

        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        apply_until_ready(&api, &example(&redis, json!({}))).await;
        let lease = leases.get("millrace-operator").await.expect("lease");
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity).as_deref(),
            Some("first"),
            "the standby did not take over a live lease"
        );

        first.kill();
        let started = std::time::Instant::now();
        wait_named(
            &leases,
            "millrace-operator",
            "second to take over",
            holder("second"),
        )
        .await
        .expect("second leads");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "takeover within the 4 s lease (+ retry): {took:?}"
        );

        // The new leader reconciles: a new resource becomes Ready.
        let mut other = example(&redis, json!({"metadata": {"name": "fraud"}}));
        other.metadata.name = Some("fraud".into());
        api.create(&PostParams::default(), &other)
            .await
            .expect("create");
        wait_ready(&api, "fraud")
            .await
            .expect("the new leader reconciles");
    })
    .await;
}

#[tokio::test]
async fn hpa_mode_hands_replicas_to_a_horizontal_pod_autoscaler_and_back() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    with_temp_ns("hpa", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
        let hpa_mode = example(
            &redis,
            json!({"spec": {"autoscaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 6}}}),
        );
        apply_until_ready(&api, &hpa_mode).await;
        let hpa = wait_named(&hpas, "churn-scorer", "the HPA", |_| true)
            .await
            .expect("HPA");
        assert_eq!(hpa.spec.max_replicas, 6);
        assert_eq!(
            hpa.spec
                .metrics
                .as_ref()
                .and_then(|m| m[0].external.as_ref())
                .map(|e| e.metric.name.clone()),
            Some("millrace_scorer_cache_misses_per_second".to_string())
        );
        // Back to the operator's own autoscaler: the HPA goes.
        user_apply(&api, &example(&redis, json!({}))).await;
        wait_deleted(&hpas, "churn-scorer", "the HPA")
            .await
            .expect("deleted");
    })
    .await;
}

#[tokio::test]
async fn the_refusal_of_a_write_in_a_namespace_being_deleted_is_recognised() {
    with_temp_ns("terminating", |client, ns| async move {
        // A ConfigMap whose finalizer nobody removes keeps the namespace Terminating.
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let config_map = |name: &str, finalizers: Option<Vec<String>>| ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                finalizers,
                ..Default::default()
            },
            ..ConfigMap::default()
        };
        let hold = Some(vec!["e2e.millrace.dev/hold".to_string()]);
        maps.create(&PostParams::default(), &config_map("held", hold))
            .await
            .expect("create the held ConfigMap");
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        namespaces
            .delete(&ns, &DeleteParams::default())
            .await
            .expect("delete the namespace");
        // The operator's own write, as it applies a child.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let refused = loop {
            let applied = maps
                .patch(
                    "churn-config",
                    &PatchParams::apply("millrace-operator").force(),
                    &Patch::Apply(&config_map("churn-config", None)),
                )
                .await
                .map_err(millrace_operator::error::Error::kube(
                    "applying ConfigMap churn-config",
                ));
            match applied {
                Err(error) => break error,
                Ok(_) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the API server never refused new content"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(refused.is_namespace_terminating(), "{refused}");
        // An event, as the operator publishes them: refused the same way (logged quietly).
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
        let event = k8s_openapi::api::events::v1::Event {
            metadata: kube::api::ObjectMeta {
                name: Some("churn.1".into()),
                ..Default::default()
            },
            event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                jiff::Timestamp::now(),
            )),
            reporting_controller: Some("millrace.dev/operator".into()),
            reporting_instance: Some("e2e".into()),
            action: Some("Apply".into()),
            reason: Some("Applied".into()),
            type_: Some("Normal".into()),
            ..Default::default()
        };
        let error = events
            .create(&PostParams::default(), &event)
            .await
            .expect_err("no new events in a namespace being deleted");
        assert!(
            millrace_operator::error::refused_for_terminating_namespace(&error),
            "{error}"
        );
        // Let the namespace go.
        maps.patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("release the held ConfigMap");
    })
    .await;
}
