//! The InferenceDeployment API as the real API server enforces it: defaults are filled in,
//! and invalid resources are rejected with a message that names the offending field.
//!
//! Needs `e2e/cluster up` (see the README's test command).

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use millrace_crds::InferenceDeployment;
use millrace_e2e::{install_crd, merge_patch, with_temp_ns};
use serde_json::{Value, json};

const EXAMPLE: &str = include_str!("../../examples/churn/inferencedeployment.yaml");

fn example() -> Value {
    serde_yaml_ng::from_str(EXAMPLE).expect("the example is valid YAML")
}

fn resource_api(client: Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<InferenceDeployment>(&()))
}

async fn create(api: &Api<DynamicObject>, object: Value) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(object).expect("an object");
    api.create(&PostParams::default(), &object).await
}

/// (what is wrong, merge patch on spec, field the message must name, words it must contain)
const INVALID: &[(&str, &str, &str, &str)] = &[
    (
        "min above max replicas",
        r#"{"autoscaling": {"minReplicas": 30}}"#,
        "spec.autoscaling.minReplicas",
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "zero replicas in unified topology",
        r#"{"autoscaling": {"minReplicas": 0}}"#,
        "spec.autoscaling.minReplicas",
        "only with serving.topology: split",
    ),
    (
        "a duration in days",
        r#"{"cache": {"batchTTL": "1d"}}"#,
        "spec.cache.batchTTL",
        "should match",
    ),
    (
        "staleness beyond the batch TTL",
        r#"{"cache": {"maxStaleness": "48h"}}"#,
        "spec.cache.maxStaleness",
        "must not exceed batchTTL",
    ),
    (
        "memory outliving Redis",
        r#"{"cache": {"memory": {"ttl": "2h"}}}"#,
        "spec.cache.memory.ttl",
        "must not exceed realtimeTTL",
    ),
    (
        "both a Redis URL and a Secret",
        r#"{"cache": {"redis": {"urlSecretRef": {"name": "redis", "key": "url"}}}}"#,
        "spec.cache.redis",
        "exactly one of redis.url and redis.urlSecretRef",
    ),
    (
        "neither a Redis URL nor a Secret",
        r#"{"cache": {"redis": {"url": null}}}"#,
        "spec.cache.redis",
        "exactly one of redis.url and redis.urlSecretRef",
    ),
    (
        "a Redis URL of another scheme",
        r#"{"cache": {"redis": {"url": "http://redis:6379"}}}"#,
        "spec.cache.redis.url",
        "should match",
    ),
    (
        "a warming schedule that is not cron",
        r#"{"autoscaling": {"warming": {"schedule": "every morning"}}}"#,
        "spec.autoscaling.warming.schedule",
        "should match",
    ),
    (
        "a cache tier of zero replicas",
        r#"{"autoscaling": {"cacheTier": {"minReplicas": 0}}}"#,
        "spec.autoscaling.cacheTier.minReplicas",
        "should be greater than or equal to 1",
    ),
    (
        "a cache tier min above its max",
        r#"{"autoscaling": {"cacheTier": {"minReplicas": 5, "maxReplicas": 2}}}"#,
        "spec.autoscaling.cacheTier.minReplicas",
        "cacheTier.minReplicas must not exceed cacheTier.maxReplicas",
    ),
    (
        "too many pod labels",
        r#"{"podMetadata": {"labels": {"a0":"x","a1":"x","a2":"x","a3":"x","a4":"x","a5":"x","a6":"x","a7":"x","a8":"x","a9":"x","b0":"x","b1":"x","b2":"x","b3":"x","b4":"x","b5":"x","b6":"x","b7":"x","b8":"x","b9":"x","c0":"x","c1":"x","c2":"x","c3":"x","c4":"x","c5":"x","c6":"x","c7":"x","c8":"x","c9":"x","d0":"x","d1":"x","d2":"x","d3":"x","d4":"x","d5":"x","d6":"x","d7":"x","d8":"x","d9":"x","e0":"x","e1":"x","e2":"x","e3":"x","e4":"x","e5":"x","e6":"x","e7":"x","e8":"x","e9":"x","f0":"x","f1":"x","f2":"x","f3":"x","f4":"x","f5":"x","f6":"x","f7":"x","f8":"x","f9":"x","g0":"x","g1":"x","g2":"x","g3":"x","g4":"x"}}}"#,
        "spec.podMetadata.labels",
        "must have at most 64 items",
    ),
    (
        "zero shards",
        r#"{"batch": {"shards": 0}}"#,
        "spec.batch.shards",
        "greater than or equal to 1",
    ),
    (
        "an oversized batch",
        r#"{"batch": {"batchSize": 2000000}}"#,
        "spec.batch.batchSize",
        "less than or equal to 1048576",
    ),
    (
        "a rebuild age in days (not a Go duration)",
        r#"{"batch": {"rebuildAfter": "7d"}}"#,
        "spec.batch.rebuildAfter",
        "should match",
    ),
    (
        "a scratch size with a unit Kubernetes does not write",
        r#"{"batch": {"scratchSize": "4GB"}}"#,
        "spec.batch.scratchSize",
        "should match",
    ),
    (
        "a schedule that is not cron",
        r#"{"batch": {"schedule": "every night"}}"#,
        "spec.batch.schedule",
        "should match",
    ),
    (
        "a batch without an offline table",
        r#"{"features": {"offline": null}}"#,
        "spec.features.offline",
        "batch needs features.offline",
    ),
    (
        "a model on FTP",
        r#"{"model": {"uri": "ftp://models/churn.onnx"}}"#,
        "spec.model.uri",
        "should match",
    ),
    (
        "a repeated input feature",
        r#"{"model": {"inputs": ["tenure", "monthly_spend", "tenure"]}}"#,
        "spec.model.inputs[2]",
        "Duplicate value",
    ),
    (
        "a version with a space",
        r#"{"model": {"version": "v 3"}}"#,
        "spec.model.version",
        "should match",
    ),
    (
        "an unknown execution provider",
        r#"{"executionProviders": ["rocm", "cpu"]}"#,
        "spec.executionProviders[0]",
        "Unsupported value",
    ),
    (
        "GPUs with only the CPU provider",
        r#"{"executionProviders": ["cpu"]}"#,
        "spec.executionProviders",
        "lists only cpu",
    ),
    (
        "zero GPUs per pod",
        r#"{"nodePool": {"gpu": {"count": 0}}}"#,
        "spec.nodePool.gpu.count",
        "greater than or equal to 1",
    ),
    (
        "a latency budget of minutes",
        r#"{"serving": {"latencyBudget": "2m"}}"#,
        "spec.serving.latencyBudget",
        "between 1ms and 60s",
    ),
    (
        "a micro-batch delay of seconds",
        r#"{"serving": {"microBatch": {"maxDelay": "5s"}}}"#,
        "spec.serving.microBatch.maxDelay",
        "at most 1s",
    ),
    (
        "no model at all",
        r#"{"model": null}"#,
        "spec.model",
        "Required value",
    ),
];

#[tokio::test]
async fn invalid_resources_are_rejected_with_the_field_named() {
    with_temp_ns("api-invalid", |client, ns| async move {
        install_crd(&client).await.expect("install the CRD");
        let api = resource_api(client, &ns);
        let mut failures = Vec::new();
        for (index, (what, patch, field, words)) in INVALID.iter().enumerate() {
            let mut object = example();
            object["metadata"]["name"] = json!(format!("invalid-{index}"));
            let patch: Value = serde_json::from_str(patch).expect("patch is JSON");
            merge_patch(&mut object["spec"], &patch);
            match create(&api, object).await {
                Err(kube::Error::Api(status)) => {
                    let message = &status.message;
                    if status.code != 422 || !message.contains(field) || !message.contains(words) {
                        failures.push(format!(
                            "{what}: got {} {message:?}, want {field} and {words:?}",
                            status.code
                        ));
                    }
                }
                Err(other) => failures.push(format!("{what}: unexpected error {other}")),
                Ok(_) => failures.push(format!("{what}: was accepted")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases wrong:\n{}",
            failures.len(),
            INVALID.len(),
            failures.join("\n")
        );
    })
    .await;
}

#[tokio::test]
async fn the_example_is_accepted_and_defaults_are_filled_in() {
    with_temp_ns("api-valid", |client, ns| async move {
        install_crd(&client).await.expect("install the CRD");
        let api = resource_api(client.clone(), &ns);
        create(&api, example()).await.expect("the example is valid");

        let typed: Api<InferenceDeployment> = Api::namespaced(client, &ns);
        let stored = typed
            .get("churn")
            .await
            .expect("read back as the typed resource");
        let spec = &stored.spec;
        assert_eq!(
            spec.batch.as_ref().map(|b| b.time_zone.as_str()),
            Some("UTC")
        );
        assert_eq!(
            spec.batch.as_ref().map(|b| b.backoff_limit_per_index),
            Some(2)
        );
        assert_eq!(
            spec.batch.as_ref().map(|b| b.rebuild_after.as_str()),
            Some("168h")
        );
        assert_eq!(spec.serving.port, 8080);
        assert_eq!(spec.autoscaling.sync_period, "15s");
        assert_eq!(spec.features.time_zone, "UTC");
        assert_eq!(spec.cache.memory.ttl, "30s");
    })
    .await;
}

#[tokio::test]
async fn every_example_variant_is_accepted_by_the_api_server() {
    with_temp_ns("api-examples", |client, ns| async move {
        install_crd(&client).await.expect("install the CRD");
        let api = resource_api(client, &ns);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/churn");
        let mut accepted = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples/churn") {
            let path = entry.expect("an entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let mut object: Value =
                serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("readable"))
                    .expect("YAML");
            // One namespace for all: give each its own name.
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("x")
                .to_string();
            object["metadata"]["name"] = json!(format!("churn-{stem}"));
            create(&api, object)
                .await
                .unwrap_or_else(|e| panic!("{} is refused: {e}", path.display()));
            accepted.push(stem);
        }
        accepted.sort();
        assert_eq!(accepted, ["gpu-pool", "inferencedeployment", "split"]);
    })
    .await;
}

#[tokio::test]
async fn zero_replicas_are_allowed_for_the_split_topology() {
    with_temp_ns("api-split", |client, ns| async move {
        install_crd(&client).await.expect("install the CRD");
        let api = resource_api(client, &ns);
        let mut object = example();
        merge_patch(
            &mut object["spec"],
            &json!({"serving": {"topology": "split"}, "autoscaling": {"minReplicas": 0}}),
        );
        create(&api, object)
            .await
            .expect("split topology may scale to zero");
    })
    .await;
}

#[tokio::test]
async fn the_key_prefix_cannot_change_once_set() {
    with_temp_ns("api-immutable", |client, ns| async move {
        install_crd(&client).await.expect("install the CRD");
        let api = resource_api(client, &ns);
        let mut object = example();
        merge_patch(
            &mut object["spec"],
            &json!({"cache": {"keyPrefix": "ml/churn"}}),
        );
        create(&api, object).await.expect("create");

        let patch = json!({"spec": {"cache": {"keyPrefix": "ml/churn-v2"}}});
        match api
            .patch("churn", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422);
                assert!(
                    status.message.contains("spec.cache.keyPrefix"),
                    "{}",
                    status.message
                );
                assert!(status.message.contains("immutable"), "{}", status.message);
            }
            other => panic!("changing keyPrefix must be refused, got {other:?}"),
        }
        // Other fields stay editable.
        let patch = json!({"spec": {"autoscaling": {"maxReplicas": 30}}});
        api.patch("churn", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("a mutable field can change");
    })
    .await;
}
