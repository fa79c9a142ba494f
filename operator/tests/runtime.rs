//! The operator as a process: its admin endpoints and metrics, the bound on reconciles at
//! once, graceful shutdown that hands the lease over at once, and the printer columns
//! `kubectl get` shows.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_e2e::net::free_port;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{install_crd, wait_named, with_temp_ns};
use serde_json::json;
use support::{OperatorProcess, apply_until_ready, example, http_get};

async fn create_and_wait_ready(
    client: &Client,
    ns: &str,
    redis: &RedisServer,
) -> InferenceDeployment {
    let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), ns);
    apply_until_ready(&api, &example(&redis.url(), json!({}))).await
}

/// The value of a sample line `name value` in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Starts an operator in `ns` with `extra` flags and its admin server on a free port, and
/// waits until `/readyz` answers 200; returns it and the port.
async fn start_ready(ns: &str, extra: &[&str]) -> (OperatorProcess, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args: Vec<&str> = ["--admin-addr", addr.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let operator = OperatorProcess::start_with(ns, "solo", &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").map(|(code, _)| code) != Some(200) {
        assert!(Instant::now() < deadline, "/readyz never became 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (operator, port)
}

#[tokio::test]
async fn the_admin_endpoints_report_health_and_reconcile_metrics() {
    with_temp_ns("admin", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let (_operator, port) = start_ready(&ns, &[]).await;
        assert_eq!(http_get(port, "/livez").map(|(code, _)| code), Some(200));

        create_and_wait_ready(&client, &ns, &redis).await;
        let (code, metrics) = http_get(port, "/metrics").expect("metrics");
        assert_eq!(code, 200);
        assert!(
            sample(&metrics, "millrace_operator_reconciles_total").is_some_and(|n| n >= 1.0),
            "{metrics}"
        );
        assert!(
            sample(
                &metrics,
                "millrace_operator_reconcile_duration_seconds_count"
            )
            .is_some_and(|n| n >= 1.0)
        );
        assert_eq!(sample(&metrics, "millrace_operator_leader"), Some(1.0));

        // A spec the schema lets through but the API server refuses when applied (a CPU
        // quantity of "lots") fails the reconcile: Degraded, and a failure by bounded reason.
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let mut broken = example(
            &redis.url(),
            json!({"spec": {"serving": {"resources": {"limits": {"cpu": "lots"}}}}}),
        );
        broken.metadata.name = Some("broken".into());
        api.patch(
            "broken",
            &PatchParams::apply("e2e-user"),
            &Patch::Apply(&broken),
        )
        .await
        .expect("apply");
        let degraded = wait_named(
            &api,
            "broken",
            "Degraded=True",
            |r: &InferenceDeployment| {
                r.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Degraded" && c.status == "True")
                })
            },
        )
        .await
        .expect("the apply failure is reported");
        let reason = degraded
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
            .map(|c| c.reason);
        assert_eq!(reason.as_deref(), Some("ApplyFailed"));
        // error_policy counts the failure just after the status is written: poll briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, metrics) = http_get(port, "/metrics").expect("metrics");
            let failures = sample(
                &metrics,
                r#"millrace_operator_reconcile_failures_total{reason="kube_api"}"#,
            );
            if failures.is_some_and(|n| n >= 1.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no kube_api failure counted: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_resources_runs_no_more_reconciles_at_once_than_allowed() {
    with_temp_ns("burst", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let limit = 2.0;
        let (_operator, port) = start_ready(&ns, &["--max-concurrent-reconciles", "2"]).await;
        // Sample the in-flight gauge as fast as the admin server answers, for the whole burst.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut most: f64 = 0.0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some((_, metrics)) = http_get(port, "/metrics")
                        && let Some(n) = sample(&metrics, "millrace_operator_reconciles_in_flight")
                    {
                        most = most.max(n);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                most
            })
        };
        // Twelve resources at once, as a GitOps sync applies them.
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let names: Vec<String> = (0..12).map(|i| format!("burst-{i}")).collect();
        let applies = names.iter().map(|name| {
            let mut resource = example(&redis.url(), json!({}));
            resource.metadata.name = Some(name.clone());
            let api = api.clone();
            async move { support::user_apply(&api, &resource).await }
        });
        futures::future::join_all(applies).await;
        for name in &names {
            millrace_e2e::wait_ready(&api, name)
                .await
                .expect("every resource of the burst becomes Ready");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let most = sampler.join().expect("sampler");
        assert!(
            most <= limit,
            "{most} reconciles ran at once with --max-concurrent-reconciles 2"
        );
        assert_eq!(
            most, limit,
            "the burst never kept two reconciles busy: the sampling proves nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn sigterm_hands_the_lease_to_the_standby_at_once() {
    with_temp_ns("shutdown", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        // A long lease: only a release, not an expiry, can explain a quick takeover.
        let long = ["--lease-seconds", "30"];
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
        let mut first = OperatorProcess::start_with(&ns, "first", &long);
        wait_named(
            &leases,
            "millrace-operator",
            "first to lead",
            holder("first"),
        )
        .await
        .expect("first leads");
        let _second = OperatorProcess::start_with(&ns, "second", &long);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let started = Instant::now();
        let exit = first.terminate();
        assert!(exit.success(), "a graceful shutdown exits 0: {exit:?}");
        wait_named(
            &leases,
            "millrace-operator",
            "second to take over",
            holder("second"),
        )
        .await
        .expect("the standby takes the released lease");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "well before the 30 s lease would expire: {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    with_temp_ns("columns", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let resource = create_and_wait_ready(&client, &ns, &redis).await;

        // What kubectl asks for: the server-side Table rendering.
        let request = http::Request::get(format!(
            "/apis/millrace.dev/v1alpha1/namespaces/{ns}/inferencedeployments/{}",
            resource.name_any()
        ))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .expect("request");
        let table: serde_json::Value = client.request(request).await.expect("table");
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        // The API server renders the columns the CRD declares (their list is pinned by the
        // crds crate's own test), after the name.
        let declared: Vec<String> = millrace_crds::crd::crd().spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(columns[0], "Name");
        assert_eq!(columns[1..], declared);
        assert_eq!(columns[4], "Cache warm");
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "True");
        assert_eq!(cells[2], 1);
        assert_eq!(cells[4], "False", "no batch published yet");
    })
    .await;
}
