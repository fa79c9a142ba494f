//! The pure build, validate and status steps, from YAML fixtures and without a cluster.

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use millrace_crds::InferenceDeployment;
use millrace_crds::config::ScorerConfig;
use millrace_crds::status::condition;
use millrace_operator::build::names::{CONFIG_CHECKSUM_ANNOTATION, OWNER_LABEL};
use millrace_operator::build::{BuildOptions, Children, build};
use millrace_operator::status::{Outcome, desired_status};
use millrace_operator::validate::validate;

fn fixture() -> InferenceDeployment {
    serde_yaml_ng::from_str(include_str!("fixtures/churn.yaml")).expect("fixture parses")
}

fn options() -> BuildOptions {
    BuildOptions {
        scorer_image: "registry.local/millrace-scorer:test".into(),
        image_pull_policy: None,
    }
}

fn children(resource: &InferenceDeployment) -> Children {
    build(resource, &options()).expect("the fixture builds")
}

fn scorer_pod(children: &Children) -> PodSpec {
    children
        .deployment
        .spec
        .clone()
        .and_then(|s| s.template.spec)
        .expect("pod spec")
}

fn with(resource: &InferenceDeployment, patch: serde_json::Value) -> InferenceDeployment {
    let mut value = serde_json::to_value(resource).expect("json");
    millrace_e2e::merge_patch(&mut value, &patch);
    serde_json::from_value(value).expect("still a resource")
}

#[test]
fn every_child_is_owned_by_the_resource_and_labelled() {
    let resource = fixture();
    let c = children(&resource);
    let cron_job = c.cron_job.clone().expect("the fixture has a batch");
    let metas = [
        &c.config_map.metadata,
        &c.deployment.metadata,
        &c.service.metadata,
        &c.pod_disruption_budget.metadata,
        &cron_job.metadata,
    ];
    for meta in metas {
        let owners = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, "0b5c6b3e-8f1e-4a55-9b1c-2f3d4e5a6b7c");
        assert_eq!(owners[0].kind, "InferenceDeployment");
        assert_eq!(owners[0].controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels.get(OWNER_LABEL).map(String::as_str), Some("churn"));
        assert_eq!(
            labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("millrace-operator")
        );
        assert_eq!(meta.namespace.as_deref(), Some("ml"));
    }
}

#[test]
fn the_scorer_runs_hardened_on_the_gpu_pool_and_leaves_replicas_to_the_autoscaler() {
    let c = children(&fixture());
    let spec = c.deployment.spec.clone().expect("spec");
    assert_eq!(
        spec.replicas, None,
        "replicas belong to the scale subresource"
    );
    let pod = scorer_pod(&c);
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("pool"))
            .map(String::as_str),
        Some("gpu")
    );
    let tolerations = pod.tolerations.clone().expect("tolerations");
    assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
    let security = pod.security_context.clone().expect("pod security");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(
        security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );

    let scorer = &pod.containers[0];
    let limits = scorer
        .resources
        .clone()
        .and_then(|r| r.limits)
        .expect("limits");
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );
    let hardened = scorer.security_context.clone().expect("container security");
    assert_eq!(hardened.read_only_root_filesystem, Some(true));
    assert_eq!(hardened.allow_privilege_escalation, Some(false));
    assert_eq!(
        hardened.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_string()])
    );
    let path = |probe: Option<k8s_openapi::api::core::v1::Probe>| {
        probe.and_then(|p| p.http_get).and_then(|h| h.path)
    };
    assert_eq!(
        path(scorer.liveness_probe.clone()).as_deref(),
        Some("/livez")
    );
    assert_eq!(
        path(scorer.readiness_probe.clone()).as_deref(),
        Some("/readyz")
    );
    assert_eq!(scorer.args.clone().expect("args")[0], "serve");
    assert_eq!(
        scorer.image.as_deref(),
        Some("registry.local/millrace-scorer:test")
    );
}

#[test]
fn an_s3_model_is_fetched_by_an_init_container_and_a_file_model_is_mounted() {
    let c = children(&fixture());
    let pod = scorer_pod(&c);
    let init = pod
        .init_containers
        .clone()
        .expect("fetch-model init container");
    assert_eq!(
        init[0].args.clone().expect("args")[..3],
        ["fetch-model", "--uri", "s3://models/churn/3/model.onnx"]
    );
    assert_eq!(
        c.scorer_config.model.path,
        "/var/lib/millrace/model/model.onnx"
    );

    let on_pvc = with(
        &fixture(),
        serde_json::json!({"spec": {"model": {
            "uri": "file:///models/churn/3/model.onnx",
            "volume": {"claimName": "models", "mountPath": "/models"}
        }}}),
    );
    let c = children(&on_pvc);
    let pod = scorer_pod(&c);
    assert!(pod.init_containers.is_none(), "nothing to fetch");
    let volume = pod
        .volumes
        .clone()
        .expect("volumes")
        .into_iter()
        .find(|v| v.name == "model")
        .expect("model volume");
    let claim = volume.persistent_volume_claim.expect("a PVC");
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("models", Some(true))
    );
    assert_eq!(c.scorer_config.model.path, "/models/churn/3/model.onnx");
}

#[test]
fn a_config_change_rolls_the_pods_and_an_unrelated_or_batch_only_change_does_not() {
    let checksum = |resource: &InferenceDeployment| {
        children(resource)
            .deployment
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get(CONFIG_CHECKSUM_ANNOTATION).cloned())
            .expect("checksum annotation")
    };
    let base = fixture();
    let new_ttl = with(
        &base,
        serde_json::json!({"spec": {"cache": {"realtimeTTL": "2h"}}}),
    );
    let more_replicas = with(
        &base,
        serde_json::json!({"spec": {"autoscaling": {"maxReplicas": 40}}}),
    );
    // Only batch Jobs read the batch section: changing it must not restart serving pods.
    let batch_only = with(
        &base,
        serde_json::json!({"spec": {"batch": {"rebuildAfter": "24h", "shards": 8}}}),
    );
    assert_ne!(checksum(&base), checksum(&new_ttl));
    assert_eq!(checksum(&base), checksum(&more_replicas));
    assert_eq!(checksum(&base), checksum(&batch_only));
    assert_ne!(
        children(&base).config_map.data,
        children(&batch_only).config_map.data,
        "the batch change still reaches the ConfigMap the Jobs read"
    );
}

#[test]
fn the_batch_is_an_indexed_job_of_shards_that_never_overlaps() {
    let c = children(&fixture());
    let cron_job = c.cron_job.expect("cron job");
    assert_eq!(cron_job.spec.schedule, "0 2 * * *");
    assert_eq!(cron_job.spec.concurrency_policy.as_deref(), Some("Forbid"));
    assert_eq!(cron_job.spec.time_zone.as_deref(), Some("UTC"));
    let job = cron_job.spec.job_template.spec.expect("job spec");
    assert_eq!(job.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!((job.completions, job.parallelism), (Some(8), Some(8)));
    assert_eq!(job.backoff_limit_per_index, Some(2));
    let pod = job.template.spec.expect("pod");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert!(
        pod.node_selector.is_none(),
        "the batch runs on ordinary nodes by default"
    );
    assert_eq!(pod.containers[0].args.clone().expect("args")[0], "batch");

    let on_pool = with(
        &fixture(),
        serde_json::json!({"spec": {"batch": {"useNodePool": true}}}),
    );
    let pod = children(&on_pool)
        .cron_job
        .and_then(|c| c.spec.job_template.spec)
        .and_then(|j| j.template.spec)
        .expect("pod");
    assert!(pod.node_selector.is_some());
    let limits = pod.containers[0]
        .resources
        .clone()
        .and_then(|r| r.limits)
        .expect("limits");
    assert!(limits.contains_key("nvidia.com/gpu"));
}

#[test]
fn a_scratch_size_limits_the_batch_pods_tmp_and_requests_the_disk() {
    let batch_pod = |resource: &InferenceDeployment| {
        children(resource)
            .cron_job
            .and_then(|c| c.spec.job_template.spec)
            .and_then(|j| j.template.spec)
            .expect("pod")
    };
    let tmp_limit = |pod: &PodSpec| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tmp")
            .and_then(|v| v.empty_dir.clone())
            .expect("a /tmp volume")
            .size_limit
    };
    let ephemeral = |pod: &PodSpec| {
        pod.containers[0]
            .resources
            .clone()
            .and_then(|r| r.requests)
            .and_then(|r| r.get("ephemeral-storage").cloned())
    };
    let unset = batch_pod(&fixture());
    assert_eq!((tmp_limit(&unset), ephemeral(&unset)), (None, None));
    assert_eq!(
        children(&fixture())
            .scorer_config
            .batch
            .and_then(|b| b.scratch_bytes),
        None
    );

    let sized = with(
        &fixture(),
        serde_json::json!({"spec": {"batch": {"scratchSize": "4Gi"}}}),
    );
    let pod = batch_pod(&sized);
    assert_eq!(tmp_limit(&pod).map(|q| q.0).as_deref(), Some("4Gi"));
    assert_eq!(ephemeral(&pod).map(|q| q.0).as_deref(), Some("4Gi"));
    assert_eq!(
        children(&sized)
            .scorer_config
            .batch
            .and_then(|b| b.scratch_bytes),
        Some(4 << 30),
        "the shard spools no more than that at once"
    );
    let serving = children(&sized)
        .deployment
        .spec
        .and_then(|s| s.template.spec);
    assert_eq!(
        serving.as_ref().map(&tmp_limit),
        Some(None),
        "serving pods spool nothing"
    );

    // A request the user set stays.
    let requested = with(
        &sized,
        serde_json::json!({"spec": {"batch": {"resources": {"requests": {"ephemeral-storage": "10Gi"}}}}}),
    );
    let pod = batch_pod(&requested);
    assert_eq!(ephemeral(&pod).map(|q| q.0).as_deref(), Some("10Gi"));
}

#[test]
fn no_batch_means_no_cron_job() {
    let realtime_only = with(&fixture(), serde_json::json!({"spec": {"batch": null}}));
    assert!(children(&realtime_only).cron_job.is_none());
    assert!(children(&realtime_only).scorer_config.batch.is_none());
}

#[test]
fn the_rendered_config_is_what_the_scorer_parses() {
    let c = children(&fixture());
    let text = c
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get("scorer.json"))
        .expect("scorer.json");
    let parsed = ScorerConfig::from_json(text).expect("the scorer accepts the rendered config");
    assert_eq!(parsed, c.scorer_config);
    assert_eq!(
        parsed.key_prefix, "ml/churn",
        "default prefix is namespace/name"
    );
    assert_eq!(parsed.keyspace().serving_pointer(), "mr:ml/churn:3:serving");
}

#[test]
fn validation_catches_what_cel_cannot() {
    assert!(
        validate(&fixture()).is_empty(),
        "{:?}",
        validate(&fixture())
    );
    let bad_zone = with(
        &fixture(),
        serde_json::json!({"spec": {"batch": {"timeZone": "Mars/Olympus"}}}),
    );
    let problems = validate(&bad_zone);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "spec.batch.timeZone");

    let unused = with(
        &fixture(),
        serde_json::json!({"spec": {"model": {"inputs": ["tenure", "hourOfDay"]}}}),
    );
    let fields: Vec<_> = validate(&unused).into_iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        ["spec.features.requestTime", "spec.features.requestTime"],
        "dayOfWeek and isWeekend unused"
    );

    let long = with(
        &fixture(),
        serde_json::json!({"metadata": {"name": "a-resource-name-that-is-far-too-long-to-use"}}),
    );
    assert!(validate(&long).iter().any(|p| p.field == "metadata.name"));
}

#[test]
fn status_keeps_transition_times_and_reports_invalid_specs() {
    let resource = fixture();
    let t0 = Time(jiff::Timestamp::from_second(1_800_000_000).expect("t0"));
    let t1 = Time(jiff::Timestamp::from_second(1_800_000_600).expect("t1"));
    let problems = validate(&with(
        &resource,
        serde_json::json!({"spec": {"features": {"timeZone": "Nowhere"}}}),
    ));
    let first = desired_status(
        Some(2),
        None,
        &Outcome::Invalid(&problems),
        None,
        None,
        None,
        &t0,
    );
    let degraded = |s: &millrace_crds::InferenceDeploymentStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::DEGRADED)
            .cloned()
            .expect("Degraded")
    };
    assert_eq!(first.observed_generation, Some(2));
    assert_eq!(degraded(&first).status, "True");
    assert!(degraded(&first).message.contains("spec.features.timeZone"));

    // The same outcome later changes nothing: same status, same times, so no patch.
    let again = desired_status(
        Some(2),
        Some(&first),
        &Outcome::Invalid(&problems),
        None,
        None,
        None,
        &t1,
    );
    assert_eq!(again, first);

    // A failed apply flips Degraded's reason but keeps its transition time (still True).
    let failed = desired_status(
        Some(3),
        Some(&first),
        &Outcome::ApplyFailed("boom"),
        None,
        None,
        None,
        &t1,
    );
    assert_eq!(degraded(&failed).reason, "ApplyFailed");
    assert_eq!(degraded(&failed).last_transition_time, t0);
    assert_eq!(failed.observed_generation, Some(3));
}

/// Every child of the fixture, as YAML documents, compared with the reviewed golden file.
/// `UPDATE_GOLDEN=1 cargo test -p millrace-operator --test builders` rewrites it after an
/// intended change; the diff then shows exactly what users' clusters will receive.
#[test]
fn the_rendered_children_match_the_golden_file() {
    let c = children(&fixture());
    let mut documents = vec![
        serde_yaml_ng::to_string(&c.config_map),
        serde_yaml_ng::to_string(&c.deployment),
        serde_yaml_ng::to_string(&c.service),
        serde_yaml_ng::to_string(&c.pod_disruption_budget),
    ];
    if let Some(cron_job) = &c.cron_job {
        documents.push(serde_yaml_ng::to_string(cron_job));
    }
    let rendered: String = documents
        .into_iter()
        .map(|d| format!("---\n{}", d.expect("yaml")))
        .collect();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/churn-children.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &rendered).expect("write golden");
    }
    let golden = std::fs::read_to_string(&path)
        .expect("the golden file exists (UPDATE_GOLDEN=1 creates it)");
    assert!(
        golden == rendered,
        "children differ from {}; rerun with UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

#[test]
fn hpa_mode_renders_an_hpa_on_the_external_miss_rate() {
    let resource = fixture();
    assert!(
        children(&resource).horizontal_pod_autoscaler.is_none(),
        "operator mode: no HPA"
    );
    let hpa_mode = with(
        &resource,
        serde_json::json!({"spec": {"autoscaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 9,
            "targetMissesPerReplica": 150, "scaleDownStabilization": "2m", "tolerancePercent": 5}}}),
    );
    let hpa = children(&hpa_mode)
        .horizontal_pod_autoscaler
        .expect("an HPA");
    assert_eq!(hpa.metadata.name.as_deref(), Some("churn-scorer"));
    assert!(hpa.metadata.owner_references.is_some());
    let spec = hpa.spec;
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!(spec.scale_target_ref.name, "churn-scorer");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 9));
    let metric = &spec.metrics.expect("metrics")[0];
    assert_eq!(metric.type_, "External");
    let external = metric.external.as_ref().expect("external");
    assert_eq!(
        external.metric.name,
        "millrace_scorer_cache_misses_per_second"
    );
    let selector = external
        .metric
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .expect("selector");
    assert_eq!(
        selector.get("inference_deployment").map(String::as_str),
        Some("churn")
    );
    assert_eq!(external.target.type_, "AverageValue");
    assert_eq!(
        external.target.average_value.as_ref().map(|q| q.0.as_str()),
        Some("150")
    );
    let behavior = spec.behavior.expect("behavior");
    let down = behavior.scale_down.expect("scale down");
    assert_eq!(down.stabilization_window_seconds, Some(120));
    assert_eq!(down.tolerance.map(|q| q.0), Some("50m".to_string()));
}

#[test]
fn pod_metadata_reaches_every_pod_but_never_overrides_the_operators_labels() {
    let resource = with(
        &fixture(),
        serde_json::json!({"spec": {"podMetadata": {
            "labels": {"team": "ml", "app.kubernetes.io/component": "hijacked"},
            "annotations": {"sidecar.istio.io/inject": "false"}
        }}}),
    );
    let c = children(&resource);
    let scorer = c
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .expect("scorer pod metadata");
    let batch = c
        .cron_job
        .as_ref()
        .and_then(|j| j.spec.job_template.spec.as_ref())
        .and_then(|s| s.template.metadata.clone())
        .expect("batch pod metadata");
    for (component, meta) in [("scorer", &scorer), ("batch", &batch)] {
        let labels = meta.labels.as_ref().expect("labels");
        let annotations = meta.annotations.as_ref().expect("annotations");
        assert_eq!(labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(
            labels
                .get("app.kubernetes.io/component")
                .map(String::as_str),
            Some(component),
            "the operator's label must win"
        );
        assert_eq!(
            annotations
                .get("sidecar.istio.io/inject")
                .map(String::as_str),
            Some("false")
        );
    }
    let checksum = scorer.annotations.as_ref().expect("annotations");
    assert!(checksum.contains_key(CONFIG_CHECKSUM_ANNOTATION));
    // The selector is untouched: a user label never changes which pods a Deployment owns.
    let selector = c
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .expect("selector");
    assert!(!selector.contains_key("team"));
}

#[test]
fn split_topology_renders_a_cpu_cache_tier_in_front_of_a_gpu_compute_tier() {
    let unified = children(&fixture());
    assert!(unified.compute_deployment.is_none() && unified.compute_service.is_none());

    let resource = with(
        &fixture(),
        serde_json::json!({"spec": {"serving": {"topology": "split"},
                                    "autoscaling": {"minReplicas": 0}}}),
    );
    let c = children(&resource);
    let gpu = |pod: &PodSpec| {
        pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("nvidia.com/gpu"))
    };
    let args = |pod: &PodSpec| pod.containers[0].args.clone().unwrap_or_default().join(" ");

    // The cache tier keeps the scorer's name and Service (what clients call), holds no
    // model and no GPU, runs off the GPU pool, and forwards misses to the compute Service.
    let cache = scorer_pod(&c);
    assert_eq!(
        args(&cache),
        "serve --config /etc/millrace/scorer.json --role cache --compute-url http://churn-compute"
    );
    assert!(!gpu(&cache), "the cache tier must not hold a GPU");
    assert!(cache.node_selector.is_none() && cache.tolerations.is_none());
    assert!(cache.init_containers.is_none(), "no model to fetch");

    let compute = c.compute_deployment.as_ref().expect("a compute tier");
    assert_eq!(compute.metadata.name.as_deref(), Some("churn-compute"));
    let compute_pod = compute
        .spec
        .clone()
        .and_then(|s| s.template.spec)
        .expect("compute pod");
    assert_eq!(
        args(&compute_pod),
        "serve --config /etc/millrace/scorer.json --role compute"
    );
    assert!(gpu(&compute_pod), "the compute tier runs the model on GPUs");
    assert!(compute_pod.node_selector.is_some());
    assert!(compute_pod.init_containers.is_some(), "fetches the model");
    assert!(compute.spec.as_ref().and_then(|s| s.replicas).is_none());
    let selector = compute
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .expect("selector");
    assert_eq!(
        selector
            .get("app.kubernetes.io/component")
            .map(String::as_str),
        Some("compute")
    );
    let service = c.compute_service.as_ref().expect("a compute Service");
    assert_eq!(service.metadata.name.as_deref(), Some("churn-compute"));
    assert_eq!(
        service.spec.as_ref().and_then(|s| s.selector.clone()),
        Some(selector)
    );
}

#[test]
fn a_warming_schedule_renders_a_warm_cron_job_from_the_pod_that_holds_the_model() {
    assert!(children(&fixture()).warm_cron_job.is_none());
    for (topology, gpu_expected) in [("unified", true), ("split", true)] {
        let resource = with(
            &fixture(),
            serde_json::json!({"spec": {
                "serving": {"topology": topology},
                "autoscaling": {"warming": {"schedule": "30 7 * * 1-5", "top": 2500}}
            }}),
        );
        let c = children(&resource);
        let cron_job = c.warm_cron_job.expect("a warm CronJob");
        assert_eq!(cron_job.metadata.name.as_deref(), Some("churn-warm"));
        assert_eq!(cron_job.spec.schedule, "30 7 * * 1-5");
        assert_eq!(cron_job.spec.concurrency_policy.as_deref(), Some("Forbid"));
        let pod = cron_job
            .spec
            .job_template
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert_eq!(args[0], "warm");
        assert!(args.windows(2).any(|w| w == ["--top", "2500"]), "{args:?}");
        assert!(!args.contains(&"cache".to_string()), "{topology}: {args:?}");
        let gpu = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("nvidia.com/gpu"));
        assert_eq!(gpu, gpu_expected, "{topology}: warming runs the model");
    }
}
