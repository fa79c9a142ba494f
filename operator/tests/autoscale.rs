//! The autoscaler on the real local control plane with a real Redis: scorer traffic windows
//! (written here as the scorer pods write them) drive the scorer Deployment's replicas.
//! More misses scale up within a couple of sync periods, and the new pods land on GPU
//! nodes; cut metrics never scale down; fewer misses scale down only after the
//! stabilization window; the status and an event say what happened.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::ListParams;
use millrace_crds::InferenceDeployment;
use millrace_crds::keys::{Keyspace, now_ms};
use millrace_crds::traffic::TrafficWindow;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{install_crd, with_temp_ns};
use serde_json::json;
use support::{OperatorProcess, apply_until_ready};

/// What the simulated scorer pods report: (pods, misses/s of all of them); `None` = silent.
type Load = Arc<Mutex<Option<(usize, u64)>>>;

/// Publishes one-second windows for the simulated pods every 250 ms, like real scorers.
fn report(redis_url: String, key: String, load: Load) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn = redis::Client::open(redis_url)
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        loop {
            let current = *load.lock().expect("load");
            if let Some((pods, misses)) = current {
                let _: () = redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("del");
                for pod in 0..pods {
                    let window = TrafficWindow {
                        end_ms: now_ms(),
                        window_ms: 1_000,
                        hits: 3 * misses / pods as u64,
                        misses: misses / pods as u64,
                    };
                    let _: () = redis::cmd("HSET")
                        .arg(&key)
                        .arg(format!("churn-scorer-{pod}"))
                        .arg(&window.encode()[..])
                        .query_async(&mut conn)
                        .await
                        .expect("hset");
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

async fn replicas(api: &Api<Deployment>) -> i32 {
    api.get("churn-scorer")
        .await
        .ok()
        .and_then(|d| d.spec?.replicas)
        .unwrap_or(0)
}

async fn wait_replicas(api: &Api<Deployment>, want: i32, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if replicas(api).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "replicas {} after {within:?}, wanted {want}",
            replicas(api).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn misses_drive_replicas_with_hpa_semantics() {
    with_temp_ns("autoscale", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = support::example(
            &redis.url(),
            json!({"spec": {"autoscaling": {
                "minReplicas": 1, "maxReplicas": 8, "targetMissesPerReplica": 100,
                "syncPeriod": "1s", "scaleDownStabilization": "5s", "tolerancePercent": 10
            }}}),
        );
        apply_until_ready(&api, &resource).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        assert_eq!(replicas(&deployments).await, 1);

        let key = Keyspace::new(&format!("{ns}/churn"), "3").traffic();
        let load: Load = Arc::new(Mutex::new(None));
        let reporter = report(redis.url(), key, Arc::clone(&load));

        // 450 misses/s against 100 per replica: 5 replicas, within a couple of syncs.
        *load.lock().expect("load") = Some((1, 450));
        let took = wait_replicas(&deployments, 5, Duration::from_secs(10)).await;
        eprintln!("scaled 1 -> 5 in {took:?}");
        // The new pods are scheduled onto the GPU pool and run.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let started = Instant::now();
        loop {
            let list = pods
                .list(&ListParams::default().labels(
                    "millrace.dev/inference-deployment=churn,app.kubernetes.io/component=scorer",
                ))
                .await
                .expect("pods");
            let running: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .collect();
            if running.len() == 5 {
                assert!(running.iter().all(|n| n.starts_with("gpu-")), "{running:?}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{running:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let status =
            millrace_e2e::wait_named(&api, "churn", "the autoscaler's view in the status", |r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.autoscaling.as_ref())
                    .is_some_and(|a| {
                        a.desired_replicas == 5
                            && a.misses_per_second.is_some()
                            && a.last_scale_time.is_some()
                    })
            })
            .await
            .expect("status");
        let view = status
            .status
            .and_then(|s| s.autoscaling)
            .expect("autoscaling");
        let misses = view.misses_per_second.expect("misses");
        assert!((400.0..=500.0).contains(&misses), "{misses}");
        assert_eq!(view.hit_rate.as_deref(), Some("75.0%"));
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let scaled = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Scaled"))
            .filter_map(|e| e.message)
            .collect::<Vec<_>>();
        assert!(scaled.iter().any(|m| m.contains("1 -> 5")), "{scaled:?}");

        // Cut the metrics: the windows go stale, and stale data never scales down.
        *load.lock().expect("load") = None;
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            replicas(&deployments).await,
            5,
            "no data is no reason to scale down"
        );

        // Little load from all five pods: held through the 5 s stabilization window, then down.
        *load.lock().expect("load") = Some((5, 50));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            replicas(&deployments).await,
            5,
            "still inside the stabilization window"
        );
        let took = wait_replicas(&deployments, 1, Duration::from_secs(15)).await;
        eprintln!("scaled 5 -> 1 after {:?} more", took);
        reporter.abort();
    })
    .await;
}

#[tokio::test]
async fn misses_that_stay_high_start_one_warm_job_per_cooldown() {
    use k8s_openapi::api::batch::v1::Job;
    with_temp_ns("warming", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = support::example(
            &redis.url(),
            json!({"spec": {"autoscaling": {
                "minReplicas": 1, "maxReplicas": 8, "targetMissesPerReplica": 1000, "syncPeriod": "1s",
                "warming": {"missesPerSecond": 100, "window": "2s", "top": 500, "cooldown": "1h"}
            }}}),
        );
        apply_until_ready(&api, &resource).await;
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
        let warm_jobs = || async {
            jobs.list(&ListParams::default().labels("app.kubernetes.io/component=warm"))
                .await
                .expect("jobs")
                .items
        };
        let key = Keyspace::new(&format!("{ns}/churn"), "3").traffic();
        let load: Load = Arc::new(Mutex::new(Some((1, 50))));
        let reporter = report(redis.url(), key, Arc::clone(&load));
        // Below the threshold: nothing, however long.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(warm_jobs().await.is_empty(), "50 misses/s is below the 100/s threshold");

        // Above it for the 2 s window: one warm Job, the scorer pod running `warm --top 500`.
        *load.lock().expect("load") = Some((1, 300));
        let started = Instant::now();
        let job = loop {
            if let Some(job) = warm_jobs().await.into_iter().next() {
                break job;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "no warm Job");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(started.elapsed() >= Duration::from_secs(2), "not before the window");
        let pod = job.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert_eq!(args[0], "warm");
        assert!(args.windows(2).any(|w| w == ["--top", "500"]), "{args:?}");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(pod.containers[0].readiness_probe.is_none());
        // Still high, but within the 1 h cooldown: no second Job.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(warm_jobs().await.len(), 1, "one warm Job per cooldown");
        // The warm Job has finished (kwok completes it): it is not a batch run, so nothing
        // was recorded as one.
        let warm = warm_jobs().await;
        assert!(
            warm[0].status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) >= 1,
            "the warm Job completed"
        );
        let resource = api.get("churn").await.expect("the resource");
        let status = resource.status.unwrap_or_default();
        assert!(status.last_batch.is_none(), "{:?}", status.last_batch);
        assert!(
            !status.conditions.iter().any(|c| c.type_ == "BatchSucceeded"),
            "{:?}",
            status.conditions
        );
        reporter.abort();
    })
    .await;
}
