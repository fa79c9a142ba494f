//! `millrace-scorer serve` as a real process, against a real `redis-server` and a real
//! `.onnx` model on ONNX Runtime: every tier of the chain, every fallback, Redis killed and
//! restarted mid-test, single-flight, micro-batching, staleness (counted from the run that
//! last confirmed a carried prediction), generations, traffic
//! windows and graceful shutdown.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use millrace_crds::keys::{CachedPrediction, Keyspace, RunPlan, now_ms};
use millrace_crds::spec::{ExecutionProvider, MissingFeaturePolicy};
use millrace_crds::traffic::TrafficWindow;
use millrace_e2e::redis_server::RedisServer;
use millrace_scorer::model::Model;
use redis::AsyncCommands;
use serde_json::json;
use support::{Scorer, config, make_model, make_slow_model};

const INPUTS: [&str; 4] = ["tenure", "spend", "calls", "region"];

fn keyspace() -> Keyspace {
    Keyspace::new("ml/churn", "3")
}

async fn redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn put(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: f32, age: Duration) {
    let p = CachedPrediction {
        value,
        computed_at_ms: now_ms() - age.as_millis() as u64,
    };
    let _: () = conn.set(key, &p.encode()[..]).await.expect("set");
}

/// Buckets of every generation these tests write by hand.
const TEST_BUCKETS: u32 = 8;

/// Writes `id`'s batch prediction of `generation`, `age` old, laid out as a batch run
/// lays it out (the bucket count recorded, the value a field of the entity's bucket).
async fn put_batch(
    conn: &mut redis::aio::MultiplexedConnection,
    ks: &Keyspace,
    generation: &str,
    id: &str,
    value: f32,
    age: Duration,
) {
    let _: Option<String> = redis::cmd("SET")
        .arg(ks.bucket_count_key(generation))
        .arg(TEST_BUCKETS)
        .arg("NX")
        .query_async(conn)
        .await
        .expect("bucket count");
    let p = CachedPrediction {
        value,
        computed_at_ms: now_ms() - age.as_millis() as u64,
    };
    let key = ks.batch_layout(generation, TEST_BUCKETS).key_of(id);
    let _: () = conn.hset(key, id, &p.encode()[..]).await.expect("hset");
}

/// The test model in a temporary directory, and its path (keep the directory alive as long
/// as a scorer may read the model).
fn model_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    make_model(dir.path(), INPUTS.len(), 1);
    let path = dir.path().join("model.onnx");
    (dir, path)
}

fn local_model(path: &Path) -> Model {
    Model::load(
        path,
        INPUTS.len(),
        None,
        Some("y"),
        &[ExecutionProvider::Cpu],
    )
    .expect("model")
}

fn close(a: f64, b: f32) -> bool {
    (a - f64::from(b)).abs() < 1e-6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tier_answers_in_order_and_says_so() {
    let (_dir, model_path) = model_file();
    let model = local_model(&model_path);
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
    put_batch(
        &mut conn,
        &ks,
        "G1",
        "u_batch",
        0.25,
        Duration::from_secs(60),
    )
    .await;
    put(
        &mut conn,
        &ks.realtime("u_rt"),
        0.75,
        Duration::from_secs(5),
    )
    .await;
    // An older batch prediction and a newer real-time one: the newer answers.
    put_batch(
        &mut conn,
        &ks,
        "G1",
        "u_both",
        0.1,
        Duration::from_secs(600),
    )
    .await;
    put(
        &mut conn,
        &ks.realtime("u_both"),
        0.9,
        Duration::from_secs(1),
    )
    .await;
    // A batch prediction past maxStaleness (12h) is a miss: recomputed.
    put_batch(
        &mut conn,
        &ks,
        "G1",
        "u_old",
        0.3,
        Duration::from_secs(13 * 3600),
    )
    .await;
    let _: () = conn
        .hset_multiple(
            "features:u_old",
            &[
                ("tenure", "1"),
                ("spend", "2"),
                ("calls", "3"),
                ("region", "4"),
            ],
        )
        .await
        .expect("features");
    // A corrupt value is never served.
    let _: () = conn
        .set(ks.realtime("u_corrupt"), "{\"prediction\": 1}")
        .await
        .expect("set");
    let _: () = conn
        .hset_multiple(
            "features:u_new",
            &[
                ("tenure", "12"),
                ("spend", "40.5"),
                ("calls", "0"),
                ("region", "2"),
            ],
        )
        .await
        .expect("features");

    let scorer = Scorer::start(&config(&model_path, &INPUTS), &server.url(), &[]).await;

    let (status, body) = scorer.get("/v1/predictions/u_batch").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "batch");
    assert_eq!(body["prediction"], 0.25);
    assert_eq!(body["modelVersion"], "3");
    assert!(body["ageMs"].as_u64().expect("age") >= 60_000, "{body}");
    assert_eq!(body["stale"], false);

    let (_, body) = scorer.get("/v1/predictions/u_batch").await;
    assert_eq!(
        body["source"], "memory",
        "the second read comes from memory: {body}"
    );
    assert_eq!(body["prediction"], 0.25);

    let (_, body) = scorer.get("/v1/predictions/u_rt").await;
    assert_eq!(
        (body["source"].as_str(), body["prediction"].as_f64()),
        (Some("realtime"), Some(0.75))
    );

    let (_, body) = scorer.get("/v1/predictions/u_both").await;
    assert_eq!(body["prediction"], 0.9, "the newer prediction wins: {body}");

    let (_, body) = scorer.get("/v1/predictions/u_new").await;
    let want = model.predict(&[12.0, 40.5, 0.0, 2.0]).expect("predict")[0];
    assert_eq!(body["source"], "realtime", "{body}");
    assert!(
        close(body["prediction"].as_f64().expect("value"), want),
        "{body} vs {want}"
    );
    assert!(body["ageMs"].as_u64().expect("age") < 1_000);
    assert!(body.get("degraded").is_none(), "{body}");
    // Written back with the real-time TTL, in the shared encoding.
    let mut written: Option<Vec<u8>> = None;
    for _ in 0..50 {
        written = conn.get(ks.realtime("u_new")).await.expect("get");
        if written.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = CachedPrediction::decode(&written.expect("written back")).expect("decodes");
    assert_eq!(written.value, want);
    let ttl: i64 = conn.pttl(ks.realtime("u_new")).await.expect("pttl");
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "realtimeTTL 1h, got {ttl} ms"
    );

    let (_, body) = scorer.get("/v1/predictions/u_old").await;
    let want = model.predict(&[1.0, 2.0, 3.0, 4.0]).expect("predict")[0];
    assert_eq!(
        body["source"], "realtime",
        "a stale batch prediction is a miss: {body}"
    );
    assert!(close(body["prediction"].as_f64().expect("value"), want));

    let (_, body) = scorer.get("/v1/predictions/u_corrupt").await;
    assert_eq!(body["source"], "realtime", "{body}");
    assert_eq!(
        scorer.metric("millrace_scorer_corrupt_values_total").await,
        1.0
    );

    // No features anywhere: filled with 0 (the fill policy), computed, and marked.
    let (_, body) = scorer.get("/v1/predictions/u_unknown").await;
    let want = model.predict(&[0.0; 4]).expect("predict")[0];
    assert_eq!(body["source"], "realtime");
    assert!(close(body["prediction"].as_f64().expect("value"), want));
    assert_eq!(body["degraded"], json!(["missing_features"]));
    // u_corrupt had no features either: two rows were filled.
    assert_eq!(
        scorer
            .metric("millrace_scorer_missing_features_total{feature=\"tenure\"}")
            .await,
        2.0
    );

    // Request-supplied values beat the store.
    let (status, body) = scorer
        .post(
            "/v1/predictions:batchGet",
            &json!({"ids": ["u_sup", "u_batch"], "features": {"u_sup": {"tenure": 5, "spend": 6, "calls": 7, "region": 8}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let want = model.predict(&[5.0, 6.0, 7.0, 8.0]).expect("predict")[0];
    assert!(
        close(
            body["predictions"][0]["prediction"].as_f64().expect("v"),
            want
        ),
        "{body}"
    );
    assert_eq!(body["predictions"][1]["source"], "memory");

    assert_eq!(
        scorer
            .metric("millrace_scorer_requests_total{source=\"batch\"}")
            .await,
        1.0
    );
    assert!(
        scorer
            .metric("millrace_scorer_model_info{version=\"3\",provider=\"cpu\"}")
            .await
            == 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_stale_default_and_no_answer() {
    let (_dir, model_path) = model_file();
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
    put_batch(
        &mut conn,
        &ks,
        "G1",
        "u_old",
        0.3,
        Duration::from_secs(13 * 3600),
    )
    .await;

    // Under the fallback policy an entity without features is not scored.
    let mut cfg = config(&model_path, &INPUTS);
    cfg.features.missing.policy = MissingFeaturePolicy::Fallback;
    cfg.cache.memory.max_entries = 0;
    let scorer = Scorer::start(&cfg, &server.url(), &[]).await;
    let (_, body) = scorer.get("/v1/predictions/u_old").await;
    assert_eq!(
        (
            body["source"].as_str(),
            body["prediction"].as_f64(),
            body["stale"].as_bool()
        ),
        (Some("batch"), Some(0.3), Some(true)),
        "recomputing failed, so the stale batch prediction is served, marked: {body}"
    );
    assert_eq!(body["degraded"], json!(["missing_features"]));
    let (_, body) = scorer.get("/v1/predictions/u_none").await;
    assert_eq!(
        (body["source"].as_str(), body["prediction"].as_f64()),
        (Some("default"), Some(0.5)),
        "{body}"
    );
    assert!(body.get("ageMs").is_none());
    assert_eq!(
        scorer.metric("millrace_scorer_stale_served_total").await,
        1.0
    );
    assert_eq!(
        scorer
            .metric("millrace_scorer_defaults_served_total{reason=\"missing_features\"}")
            .await,
        1.0
    );
    drop(scorer);

    // Without a default, nothing to answer is a 503 that says why.
    cfg.serving.fallback.default = None;
    let scorer = Scorer::start(&cfg, &server.url(), &[]).await;
    let (status, body) = scorer.get("/v1/predictions/u_none").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["degraded"], json!(["missing_features"]));
    assert!(
        body["error"].as_str().expect("error").contains("fallback"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_an_incremental_run_carried_is_as_fresh_as_that_run() {
    let (_dir, model_path) = model_file();
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    // G1's full run computed u 13 hours ago (maxStaleness is 12h); the published run, an
    // incremental one, updated G1 in place and carried u.
    put_batch(
        &mut conn,
        &ks,
        "G1",
        "u",
        0.3,
        Duration::from_secs(13 * 3600),
    )
    .await;
    let _: () = conn.set(ks.alias("G1-inc"), "G1").await.expect("alias");
    let _: () = conn
        .set(ks.serving_pointer(), "G1-inc")
        .await
        .expect("pointer");
    // No features for u: were its prediction stale, recomputing would fail and say so.
    let mut cfg = config(&model_path, &INPUTS);
    cfg.features.missing.policy = MissingFeaturePolicy::Fallback;
    cfg.cache.memory.max_entries = 0;
    let scorer = Scorer::start(&cfg, &server.url(), &["--generation-refresh", "100ms"]).await;
    let answer = |body: &serde_json::Value| {
        (
            body["source"].as_str().map(String::from),
            body["stale"].as_bool(),
        )
    };
    let (_, body) = scorer.get("/v1/predictions/u").await;
    assert_eq!(
        answer(&body),
        (Some("batch".into()), Some(true)),
        "a run that recorded no plan confirms nothing: {body}"
    );

    // The run recorded its plan: it started an hour ago, so u was checked an hour ago.
    let plan = RunPlan::Update {
        started_ms: now_ms() - 3_600_000,
        base: "G1".into(),
    };
    let _: () = conn
        .set(ks.run_plan("G1-inc"), plan.encode())
        .await
        .expect("plan");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, body) = scorer.get("/v1/predictions/u").await;
    assert_eq!(answer(&body), (Some("batch".into()), Some(false)), "{body}");
    assert_eq!(body["prediction"], 0.3);
    assert!(
        body["ageMs"].as_u64().expect("age") >= 13 * 3_600_000,
        "the age still says when it was computed: {body}"
    );
    assert!(
        body.get("degraded").is_none_or(|d| d == &json!([])),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_generation_is_picked_up() {
    let (_dir, model_path) = model_file();
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
    put_batch(&mut conn, &ks, "G1", "u", 0.1, Duration::ZERO).await;
    put_batch(&mut conn, &ks, "G2", "u", 0.2, Duration::ZERO).await;
    let mut cfg = config(&model_path, &INPUTS);
    cfg.cache.memory.max_entries = 0;
    let scorer = Scorer::start(&cfg, &server.url(), &["--generation-refresh", "100ms"]).await;
    assert_eq!(scorer.get("/v1/predictions/u").await.1["prediction"], 0.1);
    // G2 is written beside G1 and is invisible until the pointer flips.
    let _: () = conn.set(ks.serving_pointer(), "G2").await.expect("flip");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, body) = scorer.get("/v1/predictions/u").await;
    assert_eq!(
        (body["source"].as_str(), body["prediction"].as_f64()),
        (Some("batch"), Some(0.2)),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_test_degrades_then_recovers() {
    let (_dir, model_path) = model_file();
    let model = local_model(&model_path);
    let mut server = RedisServer::start();
    let ks = keyspace();
    {
        let mut conn = redis(&server).await;
        let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
        put_batch(&mut conn, &ks, "G1", "warm", 0.4, Duration::ZERO).await;
    }
    let scorer = Scorer::start(
        &config(&model_path, &INPUTS),
        &server.url(),
        &[
            "--breaker-failures",
            "2",
            "--breaker-open-for",
            "200ms",
            "--generation-refresh",
            "100ms",
        ],
    )
    .await;
    assert_eq!(
        scorer.get("/v1/predictions/warm").await.1["source"],
        "batch"
    );

    server.stop();
    // Memory still answers; a miss is computed (features supplied) or defaulted, within the
    // budget (200ms), and the pod stays ready.
    let started = Instant::now();
    let (status, body) = scorer.get("/v1/predictions/warm").await;
    assert_eq!(
        (status, body["source"].as_str()),
        (200, Some("memory")),
        "{body}"
    );
    for i in 0..5 {
        let t = Instant::now();
        let (status, body) = scorer.get(&format!("/v1/predictions/cold{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "answered in {:?}",
            t.elapsed()
        );
        let degraded = body["degraded"].as_array().expect("degraded").clone();
        assert!(degraded.contains(&json!("redis_unavailable")), "{body}");
        // The online store is unreadable: scored on fill values, served, marked, not cached.
        assert_eq!(body["source"], "realtime", "{body}");
        assert!(degraded.contains(&json!("missing_features")), "{body}");
    }
    let (status, body) = scorer
        .post(
            "/v1/predictions:batchGet",
            &json!({"ids": ["sup"], "features": {"sup": {"tenure": 1, "spend": 1, "calls": 1, "region": 1}}}),
        )
        .await;
    assert_eq!(status, 200);
    let want = model.predict(&[1.0; 4]).expect("predict")[0];
    assert_eq!(body["predictions"][0]["source"], "realtime", "{body}");
    assert!(close(
        body["predictions"][0]["prediction"].as_f64().expect("v"),
        want
    ));
    assert_eq!(
        scorer.get("/readyz").await.0,
        200,
        "Redis down is degraded, not unready"
    );
    assert_eq!(
        scorer.metric("millrace_scorer_redis_circuit_state").await,
        1.0,
        "circuit open"
    );
    assert!(scorer.metric("millrace_scorer_redis_errors_total").await >= 2.0);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Redis returns (empty: no persistence); the scorer finds it on its own.
    server.restart();
    {
        let mut conn = redis(&server).await;
        let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
        for i in 0..200 {
            put_batch(
                &mut conn,
                &ks,
                "G1",
                &format!("after{i}"),
                0.6,
                Duration::ZERO,
            )
            .await;
        }
    }
    // Each try asks for an entity not asked before: one requested before the scorer has
    // re-read the pointer (Redis came back empty) is rightly computed in real time.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let (_, body) = scorer.get(&format!("/v1/predictions/after{i}")).await;
        if body["source"] == "batch" {
            assert_eq!(body["prediction"], 0.6);
            break;
        }
        assert!(
            Instant::now() < deadline && i < 199,
            "never recovered: {body}\n{}",
            scorer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        scorer.metric("millrace_scorer_redis_circuit_state").await,
        0.0,
        "circuit closed"
    );
    // The degraded answers were not cached: cold0 is computed afresh (fill, no store entry).
    let (_, body) = scorer.get("/v1/predictions/cold0").await;
    assert_eq!(body["degraded"], json!(["missing_features"]), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scorer_started_while_redis_is_down_serves_and_recovers() {
    let (_dir, model_path) = model_file();
    let mut server = RedisServer::start();
    server.stop();
    let scorer = Scorer::start(
        &config(&model_path, &INPUTS),
        &server.url(),
        &["--generation-refresh", "100ms"],
    )
    .await;
    let (status, body) = scorer.get("/v1/predictions/x").await;
    assert_eq!(status, 200, "{body}");
    server.restart();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G9").await.expect("pointer");
    for i in 0..200 {
        put_batch(&mut conn, &ks, "G9", &format!("y{i}"), 0.7, Duration::ZERO).await;
    }
    // Each try asks for an entity not asked before: one requested before the scorer has
    // read the pointer is rightly computed in real time (and then cached as such).
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let (_, body) = scorer.get(&format!("/v1/predictions/y{i}")).await;
        if body["source"] == "batch" {
            assert_eq!(body["prediction"], 0.7);
            break;
        }
        assert!(
            Instant::now() < deadline && i < 199,
            "never connected: {body}\n{}",
            scorer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_compute_once_and_micro_batches_equal_single_rows() {
    let (_dir, model_path) = model_file();
    let model = local_model(&model_path);
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let _: () = conn
        .hset_multiple(
            "features:hot",
            &[
                ("tenure", "3"),
                ("spend", "1"),
                ("calls", "4"),
                ("region", "1"),
            ],
        )
        .await
        .expect("features");
    let mut cfg = config(&model_path, &INPUTS);
    cfg.serving.micro_batch.max_delay = "5ms".into();
    let scorer = Scorer::start(&cfg, &server.url(), &[]).await;

    // 64 concurrent requests for one entity nobody has scored: one row is computed.
    let answers =
        futures::future::join_all((0..64).map(|_| scorer.get("/v1/predictions/hot"))).await;
    let want = model.predict(&[3.0, 1.0, 4.0, 1.0]).expect("predict")[0];
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        assert!(
            close(body["prediction"].as_f64().expect("v"), want),
            "{body}"
        );
    }
    assert_eq!(
        scorer.metric("millrace_scorer_microbatch_rows_sum").await,
        1.0,
        "single-flight"
    );

    // 256 distinct misses with their own features: they share ONNX runs, and every answer
    // equals the model's single-row output.
    let rows: Vec<[f32; 4]> = (0..256)
        .map(|i| {
            let x = i as f32;
            [x / 7.0, (x * 0.37).sin(), x.sqrt(), (x % 5.0) - 2.0]
        })
        .collect();
    let ids: Vec<String> = (0..256).map(|i| format!("m{i}")).collect();
    let features: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .zip(&rows)
        .map(|(id, r)| {
            (
                id.clone(),
                json!({"tenure": r[0], "spend": r[1], "calls": r[2], "region": r[3]}),
            )
        })
        .collect();
    let (status, body) = scorer
        .post(
            "/v1/predictions:batchGet",
            &json!({"ids": ids, "features": features}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let predictions = body["predictions"].as_array().expect("predictions");
    assert_eq!(predictions.len(), 256);
    for (i, (p, row)) in predictions.iter().zip(&rows).enumerate() {
        let single = model.predict(row).expect("single row")[0];
        assert_eq!(p["id"], ids[i]);
        assert_eq!(p["source"], "realtime");
        assert_eq!(
            p["prediction"].as_f64().expect("v") as f32,
            single,
            "row {i}"
        );
    }
    let batches = scorer.metric("millrace_scorer_microbatch_rows_count").await - 1.0;
    let batched_rows = scorer.metric("millrace_scorer_microbatch_rows_sum").await - 1.0;
    assert_eq!(batched_rows, 256.0);
    assert!(
        batches <= 64.0,
        "256 rows in {batches} ONNX runs: they were not batched"
    );
    assert!(
        batches >= 4.0,
        "maxBatchSize 64 caps a run at 64 rows, got {batches} runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_windows_reach_redis_and_leave_with_the_pod() {
    let (_dir, model_path) = model_file();
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
    for id in ["h1", "h2", "h3"] {
        put_batch(&mut conn, &ks, "G1", id, 0.5, Duration::ZERO).await;
    }
    let mut scorer = Scorer::start(
        &config(&model_path, &INPUTS),
        &server.url(),
        &["--traffic-window", "300ms"],
    )
    .await;
    for id in ["h1", "h2", "h3", "h1", "m1", "m2"] {
        assert_eq!(scorer.get(&format!("/v1/predictions/{id}")).await.0, 200);
    }
    // Sum every distinct window published until the counts arrive.
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let raw: Option<Vec<u8>> = conn.hget(ks.traffic(), &scorer.pod).await.expect("hget");
        if let Some(raw) = raw {
            let w = TrafficWindow::decode(&raw).expect("decodes");
            assert_eq!(w.window_ms, 300);
            seen.insert(w.end_ms, (w.hits, w.misses));
        }
        let (hits, misses) = seen.values().fold((0, 0), |(h, m), (a, b)| (h + a, m + b));
        if (hits, misses) == (4, 2) {
            break;
        }
        assert!(Instant::now() < deadline, "windows seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ttl: i64 = conn.pttl(ks.traffic()).await.expect("pttl");
    assert!(
        ttl > 0 && ttl <= 1_800,
        "the record expires (6 windows), got {ttl}"
    );

    scorer.terminate();
    assert!(scorer.wait_exit(Duration::from_secs(10)).success());
    let gone: Option<Vec<u8>> = conn.hget(ks.traffic(), &scorer.pod).await.expect("hget");
    assert_eq!(gone, None, "a pod that is gone reports no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let (_dir, model_path) = model_file();
    let server = RedisServer::start();
    let mut conn = redis(&server).await;
    let ks = keyspace();
    let _: () = conn.set(ks.serving_pointer(), "G1").await.expect("pointer");
    put_batch(&mut conn, &ks, "G1", "slow", 0.5, Duration::ZERO).await;
    let mut cfg = config(&model_path, &INPUTS);
    cfg.serving.latency_budget = "5s".into();
    let mut scorer = Scorer::start(&cfg, &server.url(), &[]).await;
    // Redis holds every command for 0.7 s: the request is in flight when SIGTERM arrives.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(700)
        .query_async(&mut conn)
        .await
        .expect("pause");
    let port = scorer.port;
    let in_flight = tokio::spawn(async move {
        support::request_json(port, "GET", "/v1/predictions/slow", None).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    scorer.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        support::try_request(port, "GET", "/livez", None)
            .await
            .is_none(),
        "no new connections once draining"
    );
    let (status, body) = in_flight.await.expect("join");
    assert_eq!(
        (status, body["source"].as_str()),
        (200, Some("batch")),
        "{body}"
    );
    assert!(
        scorer.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        scorer.log()
    );
    assert!(scorer.log().contains("draining"), "{}", scorer.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_or_bad_config_fails_start_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut scorer = Scorer::spawn(
        &config(&dir.path().join("absent.onnx"), &INPUTS),
        "redis://127.0.0.1:1/0",
        &[],
    );
    assert!(!scorer.wait_exit(Duration::from_secs(20)).success());
    assert!(scorer.log().contains("absent.onnx"), "{}", scorer.log());

    make_model(dir.path(), INPUTS.len(), 1);
    let mut cfg = config(&dir.path().join("model.onnx"), &INPUTS);
    cfg.features.time_zone = "Mars/Olympus".into();
    let mut scorer = Scorer::spawn(&cfg, "redis://127.0.0.1:1/0", &[]);
    assert!(!scorer.wait_exit(Duration::from_secs(20)).success());
    assert!(scorer.log().contains("Mars/Olympus"), "{}", scorer.log());
    // Five inputs for a four-feature model: the contract is checked at load.
    let cfg = config(&dir.path().join("model.onnx"), &["a", "b", "c", "d", "e"]);
    let mut scorer = Scorer::spawn(&cfg, "redis://127.0.0.1:1/0", &[]);
    assert!(!scorer.wait_exit(Duration::from_secs(20)).success());
    assert!(scorer.log().contains("[N, 5]"), "{}", scorer.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_waits_for_company_only_while_company_is_on_its_way() {
    let (_dir, model_path) = model_file();
    let model = local_model(&model_path);
    let server = RedisServer::start();
    let mut cfg = config(&model_path, &INPUTS);
    // The longest wait allowed, and a budget that outlasts it.
    cfg.serving.micro_batch.max_delay = "1s".into();
    cfg.serving.latency_budget = "3s".into();
    let scorer = Scorer::start(&cfg, &server.url(), &[]).await;
    let runs_before = scorer.metric("millrace_scorer_microbatch_rows_count").await;

    // A lone miss: no other request is fetching features, so it runs at once.
    let started = Instant::now();
    let (status, body) = scorer.get("/v1/predictions/alone").await;
    let elapsed = started.elapsed();
    assert_eq!(
        (status, body["source"].as_str()),
        (200, Some("realtime")),
        "{body}"
    );
    let want = model.predict(&[0.0; 4]).expect("predict")[0];
    assert!(
        close(body["prediction"].as_f64().expect("value"), want),
        "{body}"
    );
    assert!(
        elapsed < Duration::from_millis(500),
        "a lone miss took {elapsed:?}: it waited for company that was not coming"
    );

    // 32 distinct misses at once: each waits for the others on their way, so they share
    // runs, and none waits out the second.
    let started = Instant::now();
    let client = &scorer;
    let answers = futures::future::join_all(
        (0..32).map(|i| async move { client.get(&format!("/v1/predictions/crowd{i}")).await }),
    )
    .await;
    let elapsed = started.elapsed();
    for (status, body) in &answers {
        assert_eq!(
            (*status, body["source"].as_str()),
            (200, Some("realtime")),
            "{body}"
        );
    }
    assert!(
        elapsed < Duration::from_millis(800),
        "32 concurrent misses took {elapsed:?}"
    );
    let runs = scorer.metric("millrace_scorer_microbatch_rows_count").await - runs_before - 1.0;
    assert!(
        runs < 32.0,
        "32 misses in {runs} ONNX runs: they did not share any"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_latency_budget_falls_to_the_default_and_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    // One inference takes about 180 ms on the development machine; the budget is 20 ms.
    make_slow_model(dir.path(), INPUTS.len());
    let server = RedisServer::start();
    let mut cfg = config(&dir.path().join("model.onnx"), &INPUTS);
    cfg.serving.latency_budget = "20ms".into();
    let scorer = Scorer::start(&cfg, &server.url(), &[]).await;
    let started = Instant::now();
    let (status, body) = scorer.get("/v1/predictions/late").await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["source"].as_str(), body["prediction"].as_f64()),
        (Some("default"), Some(0.5)),
        "{body}"
    );
    assert!(
        body["degraded"]
            .as_array()
            .expect("degraded")
            .contains(&json!("latency_budget")),
        "{body}"
    );
    assert!(
        elapsed < Duration::from_millis(120),
        "answered in {elapsed:?}, not once the inference ended"
    );
    assert_eq!(
        scorer
            .metric("millrace_scorer_defaults_served_total{reason=\"latency_budget\"}")
            .await,
        1.0
    );
}
