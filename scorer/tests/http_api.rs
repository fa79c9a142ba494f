//! The scorer's HTTP contract on a real process: the Open Inference Protocol v2 routes per
//! the spec (health, metadata, raw-tensor inference equal to the model's output), and the
//! input limits: every malformed request is a 4xx with a reason, never a 5xx or a crash.

mod support;

use millrace_crds::spec::ExecutionProvider;
use millrace_e2e::redis_server::RedisServer;
use millrace_scorer::model::Model;
use serde_json::json;
use support::{Scorer, config, make_model, raw_request};

const INPUTS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

async fn start() -> (tempfile::TempDir, RedisServer, Scorer, Vec<f32>, Vec<f32>) {
    let dir = tempfile::tempdir().expect("tmp");
    let (rows, expected) = make_model(dir.path(), INPUTS.len(), 16);
    let server = RedisServer::start();
    let scorer = Scorer::start(
        &config(&dir.path().join("model.onnx"), &INPUTS),
        &server.url(),
        &[
            "--max-ids-per-batch",
            "10",
            "--max-infer-rows",
            "32",
            "--max-body-bytes",
            "65536",
        ],
    )
    .await;
    (dir, server, scorer, rows, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_inference_protocol_v2() {
    let (dir, _redis, scorer, rows, expected) = start().await;

    assert_eq!(scorer.get("/v2/health/live").await.0, 200);
    assert_eq!(scorer.get("/v2/health/ready").await.0, 200);
    let (status, meta) = scorer.get("/v2").await;
    assert_eq!(
        (status, meta["name"].as_str()),
        (200, Some("millrace-scorer"))
    );
    assert!(meta["extensions"].is_array());

    let (status, meta) = scorer.get("/v2/models/churn").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["name"], "churn");
    assert_eq!(meta["versions"], json!(["3"]));
    assert_eq!(meta["platform"], "onnxruntime_onnx");
    assert_eq!(
        meta["inputs"],
        json!([{"name": "x", "datatype": "FP32", "shape": [-1, 8]}])
    );
    assert_eq!(
        meta["outputs"],
        json!([{"name": "y", "datatype": "FP32", "shape": [-1, 1]}])
    );
    assert_eq!(meta["parameters"]["execution_provider"], "cpu");
    assert_eq!(scorer.get("/v2/models/churn/versions/3").await.0, 200);
    assert_eq!(scorer.get("/v2/models/churn/ready").await.0, 200);
    assert_eq!(scorer.get("/v2/models/churn/versions/3/ready").await.0, 200);
    let (status, body) = scorer.get("/v2/models/fraud").await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().expect("error").contains("fraud"),
        "{body}"
    );
    assert_eq!(scorer.get("/v2/models/churn/versions/4").await.0, 404);
    assert_eq!(scorer.get("/v2/models/fraud/ready").await.0, 404);

    // Flat, row-major data: the model's outputs, row for row, as [N, 1].
    let n = expected.len();
    let request = json!({
        "id": "req-1",
        "parameters": {"binary_data_output": false},
        "inputs": [{"name": "x", "shape": [n, 8], "datatype": "FP32", "data": rows}],
        "outputs": [{"name": "y"}]
    });
    let (status, body) = scorer.post("/v2/models/churn/infer", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_name"], "churn");
    assert_eq!(body["model_version"], "3");
    assert_eq!(body["id"], "req-1");
    assert_eq!(body["outputs"][0]["name"], "y");
    assert_eq!(body["outputs"][0]["datatype"], "FP32");
    assert_eq!(body["outputs"][0]["shape"], json!([n, 1]));
    let data = body["outputs"][0]["data"].as_array().expect("data");
    for (i, (got, want)) in data.iter().zip(&expected).enumerate() {
        let got = got.as_f64().expect("number") as f32;
        assert!(
            (got - want).abs() < 1e-6,
            "row {i}: {got} != {want} (onnxruntime Python)"
        );
    }
    // Nested data and the versioned route give the same answer as the local model.
    let model = Model::load(
        &dir.path().join("model.onnx"),
        8,
        None,
        None,
        &[ExecutionProvider::Cpu],
    )
    .expect("model");
    let nested: Vec<Vec<f32>> = rows.chunks(8).take(2).map(<[f32]>::to_vec).collect();
    let request =
        json!({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": nested}]});
    let (status, body) = scorer
        .post("/v2/models/churn/versions/3/infer", &request)
        .await;
    assert_eq!(status, 200, "{body}");
    let want = model.predict(&rows[..16]).expect("predict");
    let got: Vec<f32> = body["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("n") as f32)
        .collect();
    assert_eq!(got, want);
    assert!(body.get("id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inference_requests_are_4xx_with_a_reason() {
    let (_dir, _redis, scorer, _, _) = start().await;
    let row = vec![0.5f32; 8];
    let tensor = |name: &str, shape: serde_json::Value, datatype: &str, data: serde_json::Value| json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]});
    let cases = [
        (tensor("z", json!([1, 8]), "FP32", json!(row)), "\"z\""),
        (tensor("x", json!([1, 8]), "INT64", json!(row)), "INT64"),
        (tensor("x", json!([1, 9]), "FP32", json!(row)), "[N, 8]"),
        (tensor("x", json!([8]), "FP32", json!(row)), "[N, 8]"),
        (tensor("x", json!([2, 8]), "FP32", json!(row)), "needs 16"),
        (
            tensor(
                "x",
                json!([1, 8]),
                "FP32",
                json!(["a", 1, 2, 3, 4, 5, 6, 7]),
            ),
            "a string",
        ),
        (
            tensor("x", json!([1, 8]), "FP32", json!([[[1.0]]])),
            "nested deeper",
        ),
        (
            tensor(
                "x",
                json!([1, 8]),
                "FP32",
                json!([1e39, 0, 0, 0, 0, 0, 0, 0]),
            ),
            "finite",
        ),
        (
            tensor("x", json!([33, 8]), "FP32", json!(vec![0.0; 33 * 8])),
            "between 1 and 32",
        ),
        (
            tensor("x", json!([0, 8]), "FP32", json!([])),
            "between 1 and 32",
        ),
        (json!({"inputs": []}), "exactly one input"),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": row}], "outputs": [{"name": "p"}]}),
            "\"p\"",
        ),
        (json!({"inputs": "x"}), "inputs"),
        (json!({}), "inputs"),
    ];
    for (request, reason) in cases {
        let (status, body) = scorer.post("/v2/models/churn/infer", &request).await;
        assert!((400..500).contains(&status), "{request} -> {status} {body}");
        let text = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        assert!(
            text.contains(reason),
            "{request}: {text:?} should mention {reason}"
        );
    }
    let (status, _) = raw_request(
        scorer.port,
        "POST",
        "/v2/models/churn/infer",
        Some(("text/plain", "{}")),
    )
    .await
    .expect("answer");
    assert_eq!(status, 415, "a body that is not JSON by content type");
    let (status, _) = raw_request(
        scorer.port,
        "POST",
        "/v2/models/churn/infer",
        Some(("application/json", "{\"inputs\": [")),
    )
    .await
    .expect("answer");
    assert_eq!(status, 400, "truncated JSON");
    assert!(
        scorer
            .metric("millrace_scorer_rejected_requests_total")
            .await
            >= 16.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prediction_input_limits() {
    let (_dir, _redis, scorer, _, _) = start().await;
    let long = "x".repeat(257);
    for (path, reason) in [
        ("/v1/predictions/a%7Bb%7D".to_string(), "'{'"),
        ("/v1/predictions/a%20b".to_string(), "' '"),
        (format!("/v1/predictions/{long}"), "257 bytes"),
        ("/v1/predictions/%FF".to_string(), ""),
    ] {
        let (status, body) = scorer.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.to_string().contains(reason), "{path}: {body}");
    }
    assert_eq!(scorer.get("/v1/predictions/").await.0, 404);
    assert_eq!(scorer.get("/v1/nothing").await.0, 404);

    let ids: Vec<String> = (0..11).map(|i| format!("u{i}")).collect();
    let cases = [
        (json!({"ids": ids}), "at most 10"),
        (json!({"ids": []}), "at least one"),
        (json!({"ids": ["ok", "b{ad}"]}), "ids[1]"),
        (
            json!({"ids": ["ok"], "features": {"other": {"a": 1}}}),
            "features.other",
        ),
        (
            json!({"ids": ["ok"], "features": {"ok": {"zz": 1}}}),
            "features.ok.zz",
        ),
        (
            json!({"ids": ["ok"], "features": {"ok": {"a": "one"}}}),
            "features",
        ),
        (json!({"ids": "ok"}), "ids"),
        (json!({"ids": ["ok"], "extra": 1}), "extra"),
    ];
    for (request, reason) in cases {
        let (status, body) = scorer.post("/v1/predictions:batchGet", &request).await;
        assert!((400..500).contains(&status), "{request} -> {status} {body}");
        assert!(
            body.to_string().contains(reason),
            "{request}: {body} should mention {reason}"
        );
    }
    let huge = json!({"ids": ["a"], "features": {"a": {"a": 1}}, "pad": "x".repeat(70_000)});
    let (status, _) = scorer.post("/v1/predictions:batchGet", &huge).await;
    assert_eq!(status, 413, "a body over --max-body-bytes");

    // Garbage of every shape: never a 5xx, and the scorer keeps answering.
    let garbage = [
        "",
        "null",
        "[]",
        "{\"ids\": [null]}",
        "{\"ids\": [1,2]}",
        "\u{0}\u{1}",
        "{\"ids\": [\"a\"], \"features\": []}",
    ];
    for body in garbage {
        let (status, _) = raw_request(
            scorer.port,
            "POST",
            "/v1/predictions:batchGet",
            Some(("application/json", body)),
        )
        .await
        .expect("answer");
        assert!((400..500).contains(&status), "{body:?} -> {status}");
    }
    for path in [
        "/v2/models//infer",
        "/v2/models/churn/versions//ready",
        "/v1/predictions:batchGet/x",
        "/%00",
    ] {
        let (status, _) = raw_request(scorer.port, "GET", path, None)
            .await
            .expect("answer");
        assert!((400..500).contains(&status), "{path} -> {status}");
    }
    let (status, body) = scorer.get("/v1/predictions/ok").await;
    assert_eq!(status, 200, "{body}");
}
