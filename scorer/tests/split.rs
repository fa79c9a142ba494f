//! The split topology with real processes: a cache-tier scorer (`--role cache`, no model)
//! in front of a compute-tier scorer (`--role compute`), a real Redis and a real model.
//! Misses are computed by the compute tier, equal to the model's output, remembered by the
//! cache tier and counted in its traffic windows (the compute tier publishes none); with the
//! compute tier gone (scaled to zero) every request is still answered, marked
//! `compute_unavailable`; when it is back, misses are computed again.

mod support;

use std::time::{Duration, Instant};

use millrace_crds::keys::Keyspace;
use millrace_crds::traffic::TrafficWindow;
use millrace_e2e::redis_server::RedisServer;
use redis::AsyncCommands;
use serde_json::json;
use support::{Scorer, config, free_port, make_model};

const INPUTS: [&str; 4] = ["a", "b", "c", "d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_tier_forwards_misses_and_degrades_while_compute_sleeps() {
    let dir = tempfile::tempdir().expect("tmp");
    let (rows, expected) = make_model(dir.path(), INPUTS.len(), 8);
    let server = RedisServer::start();
    let mut conn = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // Online features for u0..u7: the model's sample rows.
    for (i, row) in rows.chunks(INPUTS.len()).enumerate() {
        let fields: Vec<(&str, f32)> = INPUTS.iter().copied().zip(row.iter().copied()).collect();
        let _: () = conn
            .hset_multiple(format!("features:u{i}"), &fields)
            .await
            .expect("hset");
    }
    let config = config(&dir.path().join("model.onnx"), &INPUTS);
    let compute_port = free_port();
    let compute_url = format!("http://127.0.0.1:{compute_port}");
    let mut compute =
        Scorer::spawn_on(&config, &server.url(), &["--role", "compute"], compute_port);
    compute.wait_ready().await;
    let cache = Scorer::start(
        &config,
        &server.url(),
        &[
            "--role",
            "cache",
            "--compute-url",
            &compute_url,
            "--traffic-window",
            "1s",
        ],
    )
    .await;

    // A miss: computed by the compute tier, the model's output for u3's features.
    let (status, body) = cache.get("/v1/predictions/u3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "realtime", "{body}");
    let value = body["prediction"].as_f64().expect("a prediction");
    assert!(
        (value - f64::from(expected[3])).abs() < 1e-6,
        "{body} vs {}",
        expected[3]
    );
    // Remembered by the cache tier.
    let (_, again) = cache.get("/v1/predictions/u3").await;
    assert_eq!(again["source"], "memory", "{again}");
    // The cache tier has no model: raw tensors belong to the compute tier.
    let (status, body) = cache
        .post(
            "/v2/models/churn/infer",
            &json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("compute tier")),
        "{body}"
    );

    // The compute tier goes to sleep (scaled to zero): answers keep coming, marked.
    compute.terminate();
    compute.wait_exit(Duration::from_secs(30));
    for i in 4..6 {
        let started = Instant::now();
        let (status, body) = cache.get(&format!("/v1/predictions/u{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["source"], "default", "{body}");
        assert!(
            body["degraded"]
                .as_array()
                .is_some_and(|d| d.iter().any(|r| r == "compute_unavailable")),
            "{body}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "a cold tier must fail fast"
        );
    }

    // The misses the cache tier saw are in its traffic window; the compute tier published
    // none of its own (its requests are those same misses).
    let keyspace = Keyspace::new("ml/churn", "3");
    let deadline = Instant::now() + Duration::from_secs(10);
    let windows = loop {
        let records: std::collections::HashMap<String, Vec<u8>> =
            conn.hgetall(keyspace.traffic()).await.expect("traffic");
        let misses: u64 = records
            .values()
            .filter_map(|bytes| TrafficWindow::decode(bytes).ok())
            .map(|w| w.misses)
            .sum();
        if misses >= 1 || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        windows.keys().cloned().collect::<Vec<_>>(),
        vec![cache.pod.clone()],
        "only the cache tier publishes traffic"
    );

    // Woken up: misses are computed again.
    let compute = Scorer::spawn_on(&config, &server.url(), &["--role", "compute"], compute_port);
    compute.wait_ready().await;
    let (status, body) = cache.get("/v1/predictions/u6").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "realtime", "{body}");
    let value = body["prediction"].as_f64().expect("a prediction");
    assert!((value - f64::from(expected[6])).abs() < 1e-6, "{body}");
    // The compute tier wrote it back to Redis: another cache pod would hit. The write-back
    // runs in the background (the answer does not wait for it), so it may land just after.
    let deadline = Instant::now() + Duration::from_secs(5);
    let cached = loop {
        let cached: Option<Vec<u8>> = conn.get(keyspace.realtime("u6")).await.expect("get");
        if cached.is_some() || Instant::now() > deadline {
            break cached;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        cached.is_some(),
        "the compute tier writes real-time predictions back"
    );
}
