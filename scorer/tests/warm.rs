//! `warm` on real processes: the serving scorer samples which entities are requested into
//! Redis, and `millrace-scorer warm` caches real-time predictions for the most active ones
//! (the model's output on their online features), leaving already-cached ones alone.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use millrace_crds::keys::{CachedPrediction, Keyspace, now_ms};
use millrace_crds::spec::ExecutionProvider;
use millrace_e2e::redis_server::RedisServer;
use millrace_scorer::model::Model;
use redis::AsyncCommands;
use support::{Scorer, config, make_model};

const INPUTS: [&str; 4] = ["tenure", "spend", "calls", "region"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_active_entities_are_warmed() {
    let dir = tempfile::tempdir().expect("tmp");
    make_model(dir.path(), INPUTS.len(), 1);
    let model_path = dir.path().join("model.onnx");
    let model =
        Model::load(&model_path, 4, None, Some("y"), &[ExecutionProvider::Cpu]).expect("model");
    let server = RedisServer::start();
    let mut conn = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let ks = Keyspace::new("ml/churn", "3");
    let cfg = config(&model_path, &INPUTS);

    // Serve traffic: hot1 x6, hot2 x4, hot3 x3, cold x1, every request sampled.
    let scorer = Scorer::start(
        &cfg,
        &server.url(),
        &["--activity-sample-every", "1", "--traffic-window", "200ms"],
    )
    .await;
    for (id, times) in [("hot1", 6), ("hot2", 4), ("hot3", 3), ("cold", 1)] {
        for _ in 0..times {
            assert_eq!(scorer.get(&format!("/v1/predictions/{id}")).await.0, 200);
        }
    }
    let hour = now_ms() / 3_600_000;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let score: Option<f64> = conn
            .zscore(ks.activity(hour), "hot1")
            .await
            .expect("zscore");
        if score == Some(6.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "activity never recorded: {score:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(scorer);

    // Start from an empty cache: the requests above wrote back their (filled) predictions.
    for id in ["hot1", "hot2", "hot3", "cold"] {
        let _: () = conn.del(ks.realtime(id)).await.expect("del");
    }
    for (id, values) in [
        ("hot1", ["1", "2", "3", "4"]),
        ("hot2", ["5", "6", "7", "8"]),
        ("hot3", ["9", "9", "9", "9"]),
    ] {
        let fields: Vec<(&str, &str)> = INPUTS.iter().copied().zip(values).collect();
        let _: () = conn
            .hset_multiple(format!("features:{id}"), &fields)
            .await
            .expect("features");
    }
    // hot3 already has a fresh real-time prediction: warm leaves it alone.
    let kept = CachedPrediction::now(0.123);
    let _: () = conn
        .set(ks.realtime("hot3"), &kept.encode()[..])
        .await
        .expect("set");

    let config_path = dir.path().join("warm.json");
    std::fs::write(&config_path, serde_json::to_string(&cfg).expect("json")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"))
        .args(["warm", "--config"])
        .arg(&config_path)
        .args(["--redis-url", &server.url(), "--top", "3"])
        .env("RUST_LOG", "info")
        .output()
        .expect("warm");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("candidates=3 computed=2 cached=1 skipped=0"),
        "{log}"
    );

    for (id, row) in [
        ("hot1", [1.0, 2.0, 3.0, 4.0]),
        ("hot2", [5.0, 6.0, 7.0, 8.0]),
    ] {
        let raw: Vec<u8> = conn.get(ks.realtime(id)).await.expect("warmed");
        let warmed = CachedPrediction::decode(&raw).expect("decodes");
        assert_eq!(
            warmed.value,
            model.predict(&row).expect("predict")[0],
            "{id}"
        );
        let ttl: i64 = conn.pttl(ks.realtime(id)).await.expect("pttl");
        assert!(ttl > 3_500_000, "realtimeTTL: {ttl}");
    }
    let hot3: Vec<u8> = conn.get(ks.realtime("hot3")).await.expect("kept");
    assert_eq!(CachedPrediction::decode(&hot3).expect("decodes"), kept);
    let cold: Option<Vec<u8>> = conn.get(ks.realtime("cold")).await.expect("get");
    assert_eq!(cold, None, "only the top 3 are warmed");
}
