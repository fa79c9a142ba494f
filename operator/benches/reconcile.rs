//! Operator benchmark (not a test): apply-to-children latency over 100 resources, memory at
//! 1,000 resources, and CPU while idle. Runs the release binary against the local control
//! plane: `make bench` (which brings the cluster up and down).
//!
//! Latency is measured from the user's apply call to the moment the last child (the
//! CronJob, applied last) is seen by a watch, so it includes the operator's watch delay,
//! its five server-side applies and the watch back. The machine is noisy: read medians.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::CronJob;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_e2e::install_crd;
use millrace_e2e::redis_server::RedisServer;

#[path = "../tests/support/mod.rs"]
mod support;

const LATENCY_RESOURCES: usize = 100;
const MEMORY_RESOURCES: usize = 1000;

fn resource(name: &str, redis_url: &str) -> InferenceDeployment {
    // CPU-only scorers: the local GPU pool has room for 16 GPU pods, not 1,000.
    let mut r = support::example(
        redis_url,
        serde_json::json!({"spec": {"nodePool": null, "executionProviders": ["cpu"]}}),
    );
    r.metadata.name = Some(name.to_string());
    r
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The operator's reconcile counter, from its /metrics.
fn reconciles(port: u16) -> f64 {
    support::http_get(port, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with("millrace_operator_reconciles_total "))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() {
    let client = millrace_e2e::client()
        .await
        .expect("the local control plane (make bench starts it)");
    install_crd(&client).await.expect("CRD");
    let ns = format!("bench-{}", std::process::id());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("ns");
    namespaces
        .create(&Default::default(), &namespace)
        .await
        .expect("namespace");
    let redis = RedisServer::start();
    // The lease lives outside the namespace the benchmark deletes at the end.
    let port = millrace_e2e::net::free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut operator = support::OperatorProcess::start_with(
        &ns,
        &format!("bench-{}", std::process::id()),
        &["--lease-namespace", "default", "--admin-addr", &admin],
    );
    let pid = operator.pid();

    // Watch CronJobs: the last child applied for each resource.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch_seen = seen.clone();
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), &ns);
    let watch = tokio::spawn(async move {
        let mut stream = watcher(cron_jobs, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(cron_job)) = stream.next().await {
            let owner = cron_job.name_any().trim_end_matches("-batch").to_string();
            watch_seen
                .lock()
                .expect("lock")
                .entry(owner)
                .or_insert_with(Instant::now);
        }
    });
    let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
    let apply = |name: String| {
        let api = api.clone();
        let url = redis.url();
        async move {
            api.patch(
                &name,
                &PatchParams::apply("bench"),
                &Patch::Apply(&resource(&name, &url)),
            )
            .await
            .expect("apply");
        }
    };
    let wait_children = |count: usize| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            while seen.lock().expect("lock").len() < count {
                assert!(Instant::now() < deadline, "children did not appear");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // 1. Latency: one resource at a time, 100 of them.
    let mut latencies = Vec::new();
    for i in 0..LATENCY_RESOURCES {
        let name = format!("r{i:04}");
        let started = Instant::now();
        apply(name.clone()).await;
        wait_children(i + 1).await;
        let at = seen.lock().expect("lock")[&name];
        latencies.push(at.duration_since(started));
    }
    latencies.sort();
    println!("apply-to-children latency over {LATENCY_RESOURCES} resources:");
    println!(
        "  p50 {:.0} ms   p95 {:.0} ms   max {:.0} ms   (target: p95 < 1000 ms)",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.95).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    // 2. Memory: grow to 1,000 resources, 8 applies in flight.
    let started = Instant::now();
    futures::stream::iter(LATENCY_RESOURCES..MEMORY_RESOURCES)
        .map(|i| apply(format!("r{i:04}")))
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    wait_children(MEMORY_RESOURCES).await;
    let burst = started.elapsed();
    println!(
        "{} more resources reconciled to children in {:.1} s ({:.0}/s)",
        MEMORY_RESOURCES - LATENCY_RESOURCES,
        burst.as_secs_f64(),
        (MEMORY_RESOURCES - LATENCY_RESOURCES) as f64 / burst.as_secs_f64()
    );
    // Let the status updates that follow the children settle: no reconcile for 10 s.
    let settling = Instant::now();
    let mut last = (reconciles(port), Instant::now());
    while last.1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = reconciles(port);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    println!(
        "  settled after {:.0} s more: {:.0} reconciles in all",
        settling.elapsed().as_secs_f64() - 10.0,
        last.0
    );
    println!(
        "operator memory at {MEMORY_RESOURCES} resources: {:.1} MiB RSS (target: < 150 MiB)",
        rss_mib(pid)
    );

    // 3. Idle CPU: nothing changes for 20 s.
    let before = millrace_e2e::procfs::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let used = millrace_e2e::procfs::cpu_seconds(pid) - before;
    println!(
        "operator CPU while idle: {:.2} s over 20 s ({:.1}% of one core)",
        used,
        used / 20.0 * 100.0
    );

    watch.abort();
    // Deleting the namespace needs the operator to release its finalizers.
    namespaces
        .delete(&ns, &Default::default())
        .await
        .expect("delete namespace");
    let deadline = Instant::now() + Duration::from_secs(300);
    while namespaces.get_opt(&ns).await.ok().flatten().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    operator.kill();
    drop(client);
}
