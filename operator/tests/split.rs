//! The split topology end to end on the local control plane, with real processes: the
//! operator renders a CPU cache tier and a GPU compute tier, the e2e kubelet runs both from
//! their pod specs (the compute tier reached through its Service), and the autoscaler puts
//! the compute tier to sleep at zero when misses stop and wakes it on the first misses,
//! while every request is answered.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use millrace_crds::InferenceDeployment;
use millrace_e2e::kubelet::{Images, Kubelet};
use millrace_e2e::story::{ExampleData, Narrator, example, predict, wait_component};
use millrace_e2e::{install_crd, wait_ready, with_temp_ns};
use serde_json::json;
use support::OperatorProcess;

fn replicas(deployment: &Deployment) -> i32 {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compute_sleeps_at_zero_and_wakes_on_the_first_misses_without_a_failed_request() {
    let scorer = support::scorer_binary();
    with_temp_ns("split", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let _operator = OperatorProcess::start(&ns, "split");
        let data = ExampleData::prepare(&client, &ns, 500, Narrator::Quiet)
            .await
            .expect("the example's data");
        let kubelet = Kubelet::start(
            client.clone(),
            &ns,
            Images::default().with("millrace-scorer", &scorer),
        );
        let resource = example(
            &data.redis.url(),
            json!({"spec": {
                "batch": null,
                "serving": {"topology": "split"},
                "autoscaling": {
                    "minReplicas": 0, "maxReplicas": 2, "targetMissesPerReplica": 20,
                    "syncPeriod": "1s", "scaleDownStabilization": "6s",
                    "cacheTier": {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerReplica": 1000}
                }
            }}),
        );
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        api.patch(
            "churn",
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(&resource),
        )
        .await
        .expect("apply");
        wait_ready(&api, "churn").await.expect("Ready");
        let cache = wait_component(&kubelet, "scorer", 1, "the cache tier")
            .await
            .expect("a cache pod");
        let port = cache[0].1;
        wait_component(&kubelet, "compute", 1, "the compute tier")
            .await
            .expect("a compute pod");
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let mut answered = 0usize;
        let mut sources = std::collections::BTreeMap::<String, usize>::new();
        let ask = |id: String| async move { predict(port, &id).await };

        // Misses are computed by the compute tier.
        let mut computed = 0;
        for i in 0..20 {
            let answer = ask(format!("user-{i:06}")).await.expect("every request is answered");
            answered += 1;
            *sources.entry(answer.source.clone()).or_default() += 1;
            if answer.source == "realtime" && answer.degraded.is_empty() {
                computed += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(computed >= 15, "misses computed by the compute tier: {sources:?}");

        // Only hits from now on: the compute tier sleeps at zero, but not before the
        // stabilization window has passed since the last miss; its process is stopped.
        let last_miss = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        loop {
            let answer = ask(format!("user-{:06}", i % 20)).await.expect("every hit is answered");
            answered += 1;
            assert_eq!(answer.source, "memory", "{answer:?}");
            i += 1;
            let compute = deployments.get("churn-compute").await.expect("the compute tier");
            if replicas(&compute) == 0 {
                assert!(
                    last_miss.elapsed() >= Duration::from_secs(6),
                    "scaled to zero {:?} after the last miss, inside the 6 s window",
                    last_miss.elapsed()
                );
                break;
            }
            assert!(Instant::now() < deadline, "the compute tier never went to zero");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !kubelet.endpoints("app.kubernetes.io/component", "compute").is_empty() {
            assert!(Instant::now() < deadline, "the compute pod was never stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // New users arrive: the first misses are answered (the default, marked) and wake
        // the compute tier; once it is up, misses are computed again.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut degraded = 0;
        let mut n = 100;
        let woke = loop {
            let answer = ask(format!("user-{n:06}")).await.expect("every miss is answered");
            answered += 1;
            n += 1;
            if answer.source == "realtime" && answer.degraded.is_empty() {
                break answer;
            }
            // The first miss finds the tier asleep (no endpoints) and says so; once it is
            // waking, a call to a pod still starting may instead run out of the latency
            // budget on a loaded machine, which is marked as such: degraded either way.
            let marks: &[&str] = match degraded {
                0 => &["compute_unavailable"],
                _ => &["compute_unavailable", "latency_budget"],
            };
            assert!(
                answer.degraded.iter().any(|d| marks.contains(&d.as_str())),
                "a miss while compute sleeps or wakes is marked: {answer:?}"
            );
            degraded += 1;
            assert!(Instant::now() < deadline, "the compute tier never woke up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let compute = deployments.get("churn-compute").await.expect("the compute tier");
        assert!(replicas(&compute) >= 1);
        assert!(degraded >= 1, "the first misses arrive while compute sleeps");
        assert!((0.0..=1.0).contains(&woke.prediction));

        // Cut the metrics (Redis, where the traffic windows live, goes away) with compute up
        // and no misses: for longer than the stabilization window, nothing is scaled down.
        let mut data = data;
        let before = replicas(&deployments.get("churn-compute").await.expect("compute"));
        data.redis.stop();
        let cut = Instant::now();
        while cut.elapsed() < Duration::from_secs(10) {
            // Answered from memory, or computed once its entry expires: never a failure.
            ask(format!("user-{:06}", i % 20)).await.expect("answered without Redis");
            answered += 1;
            i += 1;
            let now = replicas(&deployments.get("churn-compute").await.expect("compute"));
            assert!(now >= before, "scaled down from {before} to {now} with the metrics cut");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "{answered} requests, none failed; {degraded} answered degraded while compute slept"
        );
    })
    .await;
}
