//! One malformed stored object must not stop the watch: the operator skips it and keeps
//! reconciling the rest. Alone in its test binary because it loosens the shared CRD for a
//! moment to store an object the real schema would refuse.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use millrace_crds::InferenceDeployment;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{install_crd, with_temp_ns};
use serde_json::json;
use support::{OperatorProcess, apply_until_ready, example};

#[tokio::test]
async fn a_malformed_object_is_skipped_and_the_others_are_reconciled() {
    with_temp_ns("malformed", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut loose = serde_json::to_value(millrace_crds::crd::crd()).expect("crd json");
        loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        crds.patch(
            "inferencedeployments.millrace.dev",
            &PatchParams::apply("millrace-e2e").force(),
            &Patch::Apply(&loose),
        )
        .await
        .expect("loosen the schema");

        let dynamic: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ns,
            &ApiResource::erase::<InferenceDeployment>(&()),
        );
        let garbage: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "millrace.dev/v1alpha1", "kind": "InferenceDeployment",
            "metadata": {"name": "garbage"}, "spec": {"model": "not-an-object"}
        }))
        .expect("object");
        // The API server applies the loosened schema within moments of the update.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(error) = dynamic.create(&PostParams::default(), &garbage).await {
            assert!(
                Instant::now() < deadline,
                "the malformed object was never accepted: {error}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        install_crd(&client).await.expect("restore the real schema");

        let redis = RedisServer::start();
        let _operator = OperatorProcess::start(&ns, "solo");
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        // Ready despite the malformed neighbour: the watch survived it.
        apply_until_ready(&api, &example(&redis.url(), json!({}))).await;
        dynamic
            .delete("garbage", &Default::default())
            .await
            .expect("the malformed object can still be deleted");
    })
    .await;
}
