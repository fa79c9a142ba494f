//! Batch publishing and deletion cleanup against a real Redis and the local control plane:
//! a run is published only when every shard confirmed; a failed or partial run leaves the
//! previous generation serving; deleting a resource removes its keys and nothing else's,
//! an unreachable Redis cannot block deletion forever, and a key prefix another resource
//! holds is refused and its keys survive the refused resource's deletion.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_crds::keys::Keyspace;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{from_json, install_crd, wait_deleted, wait_named, with_temp_ns};
use millrace_operator::build::batch::manual_job_name;
use redis::AsyncCommands;
use serde_json::json;
use support::{OperatorProcess, apply_until_ready, example, user_apply};

async fn redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

fn condition(resource: &InferenceDeployment, type_: &str) -> Option<(String, String)> {
    resource
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Creates the example with `shards` shards, waits until it is Ready, and returns it.
async fn ready_resource(
    api: &Api<InferenceDeployment>,
    server: &RedisServer,
    shards: i32,
) -> InferenceDeployment {
    let resource = example(
        &server.url(),
        json!({"spec": {"batch": {"shards": shards}}}),
    );
    apply_until_ready(api, &resource).await
}

async fn run_batch(api: &Api<InferenceDeployment>, token: &str) {
    let patch = json!({"metadata": {"annotations": {"millrace.dev/run-batch": token}}});
    api.patch("churn", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

#[tokio::test]
async fn a_run_whose_shards_all_confirmed_is_published() {
    with_temp_ns("publish", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = ready_resource(&api, &server, 2).await;
        let before = wait_named(&api, "churn", "CacheWarm", |r: &InferenceDeployment| {
            condition(r, "CacheWarm").is_some()
        })
        .await
        .expect("CacheWarm is reported");
        assert_eq!(
            condition(&before, "CacheWarm"),
            Some(("False".into(), "AwaitingFirstBatch".into())),
            "nothing published yet"
        );

        let keyspace = Keyspace::new(&format!("{ns}/churn"), "3");
        let generation = manual_job_name(&resource, "run-1");
        let mut r = redis(&server).await;
        let _: () = r
            .set(keyspace.serving_pointer(), "older-generation")
            .await
            .expect("set");
        // What the two batch shards record as they finish (the batch issue's job), an
        // incremental run's report beside it.
        let _: () = r
            .hset_multiple(keyspace.shards_done(&generation), &[("0", 600), ("1", 400)])
            .await
            .expect("hset");
        let _: () = r
            .hset_multiple(
                keyspace.run_report(&generation),
                &[
                    ("carried:0", 9_000),
                    ("carried:1", 8_000),
                    ("removed:1", 3),
                    ("repaired:0", 0),
                    ("repaired:1", 65),
                    ("a-newer-count:1", 7),
                ],
            )
            .await
            .expect("hset");

        run_batch(&api, "run-1").await;
        let published = wait_named(
            &api,
            "churn",
            "the run to be published",
            |r: &InferenceDeployment| {
                r.status
                    .as_ref()
                    .and_then(|s| s.serving_generation.as_deref())
                    == Some(generation.as_str())
            },
        )
        .await
        .expect("the operator publishes the generation");
        let status = published.status.clone().expect("status");
        let last = status.last_batch.expect("lastBatch");
        assert!(last.succeeded);
        assert_eq!(last.predictions, Some(1000));
        assert_eq!(
            (last.carried, last.removed, last.repaired),
            (Some(17_000), Some(3), Some(65)),
            "the shards' reports, summed"
        );
        assert_eq!(last.job_name.as_deref(), Some(generation.as_str()));
        assert!(last.completion_time.is_some());
        assert_eq!(
            condition(&published, "BatchSucceeded"),
            Some(("True".into(), "Published".into()))
        );
        assert_eq!(
            condition(&published, "CacheWarm"),
            Some(("True".into(), "BatchServing".into()))
        );
        let started = last
            .start_time
            .expect("the Job controller records the start");
        assert_eq!(
            status.serving_expires_at.map(|t| t.0),
            Some(
                started
                    .0
                    .checked_add(std::time::Duration::from_secs(24 * 3600))
                    .expect("in range")
            ),
            "the example's batchTTL (24h) after the run started"
        );
        assert_eq!(status.serving_model_version.as_deref(), Some("3"));
        let pointer: String = r.get(keyspace.serving_pointer()).await.expect("get");
        assert_eq!(pointer, generation, "scorers now read the new generation");

        // A new model version reads its own keys, where nothing is published yet.
        let bump = json!({"spec": {"model": {"version": "4"}}});
        api.patch("churn", &PatchParams::default(), &Patch::Merge(&bump))
            .await
            .expect("new model version");
        let bumped = wait_named(&api, "churn", "CacheWarm to go False", |r| {
            condition(r, "CacheWarm").is_some_and(|(ok, _)| ok == "False")
        })
        .await
        .expect("the new version has no generation to answer from");
        assert_eq!(
            condition(&bumped, "CacheWarm"),
            Some(("False".into(), "AwaitingFirstBatch".into()))
        );
        assert_eq!(
            bumped.status.and_then(|s| s.serving_generation),
            Some(generation.clone()),
            "the old version's generation stays recorded"
        );
    })
    .await;
}

/// The serving generation outlives its batchTTL with no later run published: `CacheWarm`
/// turns False at the expiry by itself, nothing else changing. batchTTL is at least a
/// minute, so the test gives the status a generation that expires in seconds, as a run
/// published a day ago would have.
#[tokio::test]
async fn cache_warm_turns_false_when_the_serving_generation_expires() {
    with_temp_ns("cache-expiry", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        ready_resource(&api, &server, 1).await;

        let expiry = jiff::Timestamp::now()
            .checked_add(std::time::Duration::from_secs(10))
            .expect("in range");
        let seeded = json!({"status": {
            "servingGeneration": "churn-batch-yesterday",
            "servingExpiresAt": expiry.to_string(),
        }});
        api.patch_status("churn", &PatchParams::default(), &Patch::Merge(&seeded))
            .await
            .expect("status");
        wait_named(
            &api,
            "churn",
            "CacheWarm=True",
            |r: &InferenceDeployment| {
                condition(r, "CacheWarm") == Some(("True".into(), "BatchServing".into()))
            },
        )
        .await
        .expect("a live generation: warm");
        let expired = wait_named(
            &api,
            "churn",
            "CacheWarm=False",
            |r: &InferenceDeployment| {
                condition(r, "CacheWarm") == Some(("False".into(), "BatchExpired".into()))
            },
        )
        .await
        .expect("the operator looks again at the expiry");
        assert!(
            jiff::Timestamp::now() >= expiry,
            "not before the generation expired"
        );
        let message = expired
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "CacheWarm"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(message.contains("churn-batch-yesterday"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_run_with_an_unconfirmed_shard_is_not_published() {
    with_temp_ns("publish-partial", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = ready_resource(&api, &server, 2).await;
        let keyspace = Keyspace::new(&format!("{ns}/churn"), "3");
        let generation = manual_job_name(&resource, "run-partial");
        let mut r = redis(&server).await;
        let _: () = r
            .set(keyspace.serving_pointer(), "older-generation")
            .await
            .expect("set");
        let _: () = r
            .hset(keyspace.shards_done(&generation), "0", 600)
            .await
            .expect("hset");

        run_batch(&api, "run-partial").await;
        let refused = wait_named(
            &api,
            "churn",
            "BatchSucceeded=False",
            |r: &InferenceDeployment| {
                condition(r, "BatchSucceeded").is_some_and(|(status, _)| status == "False")
            },
        )
        .await
        .expect("the operator reports the partial run");
        assert_eq!(
            condition(&refused, "BatchSucceeded")
                .map(|c| c.1)
                .as_deref(),
            Some("ShardsUnconfirmed")
        );
        assert_eq!(
            refused
                .status
                .as_ref()
                .and_then(|s| s.serving_generation.clone()),
            None
        );
        let last = refused
            .status
            .as_ref()
            .and_then(|s| s.last_batch.clone())
            .expect("lastBatch");
        assert_eq!(
            (last.predictions, last.carried, last.repaired),
            (Some(600), None, None),
            "a full run reports no incremental counts"
        );
        let pointer: String = r.get(keyspace.serving_pointer()).await.expect("get");
        assert_eq!(
            pointer, "older-generation",
            "a partial generation is never served"
        );
    })
    .await;
}

#[tokio::test]
async fn a_failed_run_keeps_the_previous_generation_serving() {
    with_temp_ns("publish-failed", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        ready_resource(&api, &server, 1).await;
        let keyspace = Keyspace::new(&format!("{ns}/churn"), "3");
        let mut r = redis(&server).await;
        let _: () = r.set(keyspace.serving_pointer(), "older-generation").await.expect("set");

        // A batch Job of this resource whose shard exits 1 (kwok's pod-fail stage).
        let job: Job = from_json(json!({
            "metadata": {"name": "churn-batch-failing", "labels": {"millrace.dev/inference-deployment": "churn", "app.kubernetes.io/component": "batch"}},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"annotations": {"kwok.millrace.dev/fail": "true"}},
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "batch", "image": "registry.local/millrace-scorer:e2e"}]}
                }
            }
        }));
        Api::<Job>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &job)
            .await
            .expect("create job");
        let failed = wait_named(&api, "churn", "BatchSucceeded=False", |r: &InferenceDeployment| {
            condition(r, "BatchSucceeded").is_some_and(|(status, _)| status == "False")
        })
        .await
        .expect("the operator records the failure");
        assert_eq!(condition(&failed, "BatchSucceeded").map(|c| c.1).as_deref(), Some("BackoffLimitExceeded"));
        let last = failed.status.as_ref().and_then(|s| s.last_batch.clone()).expect("lastBatch");
        assert!(!last.succeeded);
        assert_eq!(last.job_name.as_deref(), Some("churn-batch-failing"));
        let pointer: String = r.get(keyspace.serving_pointer()).await.expect("get");
        assert_eq!(pointer, "older-generation");
        let warnings = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=BatchNotPublished"))
            .await
            .expect("events");
        assert_eq!(warnings.items.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn deleting_a_resource_removes_its_redis_keys_and_nothing_else() {
    with_temp_ns("cleanup", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = ready_resource(&api, &server, 1).await;
        assert!(
            resource
                .finalizers()
                .iter()
                .any(|f| f == "millrace.dev/redis-cleanup")
        );

        let ours_v3 = Keyspace::new(&format!("{ns}/churn"), "3");
        let ours_v2 = Keyspace::new(&format!("{ns}/churn"), "2");
        let neighbour = Keyspace::new(&format!("{ns}/churn-v2"), "3");
        let mut r = redis(&server).await;
        let mut pipe = redis::pipe();
        let layout = ours_v3.batch_layout("g1", 4096);
        for bucket in 0..2500 {
            pipe.hset(layout.bucket_key(bucket), format!("user_{bucket}"), 1)
                .ignore();
        }
        pipe.set(ours_v3.realtime("user_1"), 1)
            .ignore()
            .set(ours_v3.serving_pointer(), "g1")
            .ignore()
            .set(ours_v2.realtime("user_1"), 1)
            .ignore()
            .set(neighbour.realtime("user_1"), 1)
            .ignore()
            .set(neighbour.serving_pointer(), "g9")
            .ignore()
            .set("unrelated:key", 1)
            .ignore();
        let _: () = pipe.query_async(&mut r).await.expect("populate");

        delete_and_wait(&api, "churn").await;

        let remaining: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut r)
            .await
            .expect("keys");
        let mut remaining = remaining;
        remaining.sort();
        let mut expected = vec![
            neighbour.realtime("user_1"),
            neighbour.serving_pointer(),
            "unrelated:key".to_string(),
        ];
        expected.sort();
        assert_eq!(
            remaining, expected,
            "only the deleted resource's keys (every version) are gone"
        );
        let events = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=RedisKeysDeleted"))
            .await
            .expect("events");
        assert!(
            events.items.iter().any(|e| e
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("deleted 2503 keys"))),
            "{:?}",
            events
                .items
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
        );
    })
    .await;
}

/// Deletes `name` and waits until its finalizer has run.
async fn delete_and_wait(api: &Api<InferenceDeployment>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    wait_deleted(api, name, "the finalizer to finish")
        .await
        .expect("deleted");
}

/// Two resources with one key prefix would overwrite each other's predictions, and deleting
/// either would delete both's: the younger is refused with nothing applied, deleting it
/// leaves the holder's keys, and once the holder is gone (its keys with it) the next one
/// starts.
#[tokio::test]
async fn a_key_prefix_another_resource_holds_is_refused_and_its_keys_are_left_alone() {
    with_temp_ns("prefix", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let server = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let shared = json!({"spec": {"cache": {"keyPrefix": "shared/churn"}}});
        apply_until_ready(&api, &example(&server.url(), shared.clone())).await;
        let mut second = example(&server.url(), shared);
        second.metadata.name = Some("churn-b".into());
        let refused = || async {
            user_apply(&api, &second).await;
            let refused = wait_named(&api, "churn-b", "KeyPrefixConflict", |r| {
                condition(r, "Degraded")
                    == Some(("True".to_string(), "KeyPrefixConflict".to_string()))
            })
            .await
            .expect("the second resource is refused");
            let message = refused
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            assert!(
                message.contains("\"shared/churn\"") && message.contains(&format!("{ns}/churn;")),
                "{message}"
            );
            let applied = deployments
                .list(&ListParams::default().labels("millrace.dev/inference-deployment=churn-b"))
                .await
                .expect("deployments");
            assert!(
                applied.items.is_empty(),
                "nothing is applied for a refused resource"
            );
        };
        refused().await;

        let keyspace = Keyspace::new("shared/churn", "3");
        let mut r = redis(&server).await;
        let _: () = r
            .set(keyspace.serving_pointer(), "g1")
            .await
            .expect("populate");
        delete_and_wait(&api, "churn-b").await;
        let kept: Option<String> = r.get(keyspace.serving_pointer()).await.expect("get");
        assert_eq!(
            kept.as_deref(),
            Some("g1"),
            "the holder's keys are left alone"
        );
        let events = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=RedisKeysKept"))
            .await
            .expect("events");
        assert_eq!(events.items.len(), 1);

        // Refused again; the holder goes, with its keys, and the next in line starts.
        refused().await;
        delete_and_wait(&api, "churn").await;
        let gone: Option<String> = r.get(keyspace.serving_pointer()).await.expect("get");
        assert_eq!(gone, None, "the holder's deletion removes its keys");
        millrace_e2e::wait_ready(&api, "churn-b")
            .await
            .expect("the next resource starts once the prefix is free");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_redis_delays_deletion_only_up_to_the_bound() {
    with_temp_ns("cleanup-down", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let mut server = RedisServer::start();
        let _operator =
            OperatorProcess::start_with(&ns, "solo", &["--redis-cleanup-timeout-seconds", "4"]);
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        ready_resource(&api, &server, 1).await;

        server.stop();
        let started = std::time::Instant::now();
        api.delete("churn", &DeleteParams::default())
            .await
            .expect("delete");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            api.get_opt("churn").await.expect("get").is_some(),
            "deletion waits for the cleanup while within the bound"
        );
        wait_deleted(&api, "churn", "the finalizer to be released")
            .await
            .expect("released after the bound");
        // The bound counts from metadata.deletionTimestamp, which has whole seconds.
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let warnings = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().fields("reason=RedisCleanupSkipped"))
            .await
            .expect("events");
        assert_eq!(warnings.items.len(), 1);
        assert!(warnings.items[0].type_.as_deref() == Some("Warning"));
        drop(server);
        let _ = client;
    })
    .await;
}

#[tokio::test]
async fn publishing_and_cleanup_work_on_a_redis_cluster() {
    use millrace_e2e::redis_server::RedisCluster;
    with_temp_ns("cluster", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let cluster = RedisCluster::start(3);
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = example(
            &cluster.url(),
            json!({"spec": {"batch": {"shards": 2}, "cache": {"redis": {"cluster": true}}}}),
        );
        let resource = apply_until_ready(&api, &resource).await;

        let mut r = redis::cluster::ClusterClient::new(vec![cluster.url()])
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the cluster");
        let ours = Keyspace::new(&format!("{ns}/churn"), "3");
        let neighbour = Keyspace::new(&format!("{ns}/other"), "3");
        let generation = manual_job_name(&resource, "cluster-run");
        let _: () = r
            .hset_multiple(ours.shards_done(&generation), &[("0", 10), ("1", 20)])
            .await
            .expect("hset");
        // Keys of many entities land on every master.
        for i in 0..300 {
            let _: () = r
                .set(ours.realtime(&format!("user_{i}")), 1)
                .await
                .expect("set");
        }
        let _: () = r.set(neighbour.realtime("user_1"), 1).await.expect("set");

        run_batch(&api, "cluster-run").await;
        wait_named(
            &api,
            "churn",
            "the run to be published",
            |r: &InferenceDeployment| {
                r.status
                    .as_ref()
                    .and_then(|s| s.serving_generation.as_deref())
                    == Some(generation.as_str())
            },
        )
        .await
        .expect("published through the cluster");
        let pointer: String = r.get(ours.serving_pointer()).await.expect("get");
        assert_eq!(pointer, generation);

        delete_and_wait(&api, "churn").await;
        let mut left = Vec::new();
        for url in cluster.urls() {
            let mut node = redis::Client::open(url)
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("node");
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut node)
                .await
                .expect("keys");
            left.extend(keys);
        }
        assert_eq!(
            left,
            [neighbour.realtime("user_1")],
            "every master was cleaned of this resource's keys only"
        );
    })
    .await;
}
