//! The whole Millrace story on the local control plane, with real parts only: the example's
//! model and users in an S3 server, a Redis, the operator reconciling the example, the
//! scorer and the batch shards running as real processes from the pod specs the operator
//! rendered ([`crate::kubelet`]), and traffic against them.
//!
//! `make demo` runs it narrated ([`Narrator::Print`]); `operator/tests/story.rs` runs it
//! quietly and asserts every step, so the demo and the test cannot drift apart. A step that
//! does not see what it expects returns a [`StoryError`] that says what it waited for.
//!
//! The caller brings the control plane, a namespace and an operator watching it (the demo
//! runs it with the chart's ServiceAccount token; the test starts it scoped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use millrace_crds::InferenceDeployment;
use serde_json::{Value, json};

use crate::kubelet::{HOLD_ANNOTATION, Images, Kubelet};
use crate::redis_server::RedisServer;
use crate::s3::{S3Server, workspace_root};
use crate::{condition, from_json, merge_patch};

/// The name of the example resource.
pub const NAME: &str = "churn";

/// How the story reports its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrator {
    /// Headings and commentary on stdout (the demo).
    Print,
    /// Nothing (the test).
    Quiet,
}

impl Narrator {
    fn step(self, title: &str) {
        if self == Self::Print {
            println!("\n\x1b[1m== {title}\x1b[0m");
        }
    }

    fn say(self, text: &str) {
        if self == Self::Print {
            println!("{text}");
        }
    }
}

/// Where the story runs.
pub struct StoryOptions {
    /// The namespace (it exists; an operator watches it).
    pub namespace: String,
    /// The `millrace-scorer` binary the kubelet runs for the scorer image.
    pub scorer_binary: PathBuf,
    /// Users the example's generator makes.
    pub users: usize,
    /// How the story reports its progress.
    pub narrator: Narrator,
}

/// What a step did not see.
#[derive(Debug, thiserror::Error)]
pub enum StoryError {
    /// A step's expectation failed.
    #[error("{step}: {message}")]
    Step {
        /// The step.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
    /// An API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// Waiting on the cluster failed.
    #[error(transparent)]
    E2e(#[from] crate::E2eError),
}

fn fail(step: &'static str, message: impl Into<String>) -> StoryError {
    StoryError::Step {
        step,
        message: message.into(),
    }
}

/// One answer of the scorer.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The entity.
    pub id: String,
    /// The prediction.
    pub prediction: f64,
    /// memory, batch, realtime, stale or default.
    pub source: String,
    /// What degraded on the way, if anything.
    pub degraded: Vec<String>,
}

/// What the story measured, for the test to assert and the demo to show.
#[derive(Debug, Default)]
pub struct StoryReport {
    /// The execution provider the scorers report (cuda falls back to cpu without a GPU).
    pub provider: String,
    /// An answer before any batch ran: computed in real time.
    pub before_batch: Option<Answer>,
    /// Predictions written by the batch, as the operator recorded them.
    pub batch_predictions: i64,
    /// Batch answers checked against ONNX Runtime's output for the same rows.
    pub batch_checked: usize,
    /// The largest difference seen in those.
    pub batch_max_error: f64,
    /// An answer while Redis was down.
    pub redis_down: Option<Answer>,
    /// Scorer replicas before and after the miss spike.
    pub scaled: (i32, i32),
    /// From the spike's first request to the scale-up.
    pub scale_up_after: Duration,
    /// Real scorer processes serving after the spike.
    pub scorers_running: usize,
    /// The nodes (and their pool) the scorer pods were scheduled on.
    pub scorer_nodes: Vec<String>,
    /// The API server's message refusing a bad spec.
    pub refused: String,
    /// Redis keys of the resource just before its deletion.
    pub keys_before_delete: usize,
    /// Redis keys of the resource left after its deletion.
    pub keys_after_delete: usize,
    /// Online feature hashes left after the deletion (not the resource's: all of them).
    pub online_features_after_delete: usize,
}

/// Runs the story; see the module docs.
pub async fn run(client: &Client, options: &StoryOptions) -> Result<StoryReport, StoryError> {
    let say = options.narrator;
    let ns = options.namespace.as_str();
    let mut report = StoryReport::default();

    let data = ExampleData::prepare(client, ns, options.users, say).await?;
    let mut redis = data.redis;

    say.step("kubectl apply the example InferenceDeployment");
    let kubelet = Kubelet::start(
        client.clone(),
        ns,
        Images::default().with("millrace-scorer", &options.scorer_binary),
    );
    let resource = example(&redis.url(), json!({}));
    let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), ns);
    api.patch(
        NAME,
        &PatchParams::apply("millrace-demo").force(),
        &Patch::Apply(&resource),
    )
    .await?;
    crate::wait_ready(&api, NAME).await?;
    say.say("Ready: the operator rendered a ConfigMap, the scorer Deployment, a Service, a PDB and the batch CronJob.");

    say.step("A bad spec never reaches the operator: the API server names the field");
    let refused = api
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cache": {"maxStaleness": "48h"}}})),
        )
        .await;
    match refused {
        Err(kube::Error::Api(status)) if status.message.contains("spec.cache.maxStaleness") => {
            say.say(&format!("maxStaleness: 48h -> {}", status.message));
            report.refused = status.message;
        }
        other => {
            return Err(fail(
                "validation",
                format!("maxStaleness beyond batchTTL must be refused naming the field: {other:?}"),
            ));
        }
    }

    say.step("The scorer: a real process started from the rendered pod spec");
    let scorer = wait_endpoints(&kubelet, 1, "a ready scorer").await?;
    let (_, port) = scorer[0].clone();
    report.provider = provider(port).await.unwrap_or_default();
    say.say(&format!(
        "pod {} fetched the model from S3 in its init container and serves on 127.0.0.1:{port}; execution provider: {} (executionProviders [tensorrt, cuda, cpu]: no GPU here, so CPU)",
        scorer[0].0, report.provider
    ));

    say.step("Before any batch: a request is a cache miss, computed in real time");
    let answer = predict(port, "user-000001").await?;
    say.say(&describe(&answer));
    if answer.source != "realtime" {
        return Err(fail(
            "real time",
            format!("expected a real-time answer, got {answer:?}"),
        ));
    }
    report.before_batch = Some(answer);

    say.step("The batch: 2 shards as an Indexed Job, each a real `millrace-scorer batch`");
    api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"millrace.dev/run-batch": "story-1"}}})),
    )
    .await?;
    let published = crate::wait_named(&api, NAME, "the batch to be published", |r| {
        condition(r, "BatchSucceeded").is_some_and(|c| c.status == "True")
    })
    .await
    .map_err(|e| {
        fail(
            "batch",
            format!("{e} (shard logs: $TMPDIR/millrace-kubelet-{ns}-*.log)"),
        )
    })?;
    let status = published.status.clone().unwrap_or_default();
    report.batch_predictions = status
        .last_batch
        .as_ref()
        .and_then(|b| b.predictions)
        .unwrap_or_default();
    say.say(&format!(
        "generation {} published: {} predictions; the operator flipped the serving pointer only after both shards confirmed in Redis",
        status.serving_generation.clone().unwrap_or_default(),
        report.batch_predictions
    ));
    match condition(&published, "CacheWarm") {
        Some(warm) if warm.status == "True" => say.say(&format!(
            "CacheWarm=True ({}): {}",
            warm.reason, warm.message
        )),
        other => {
            return Err(fail(
                "batch",
                format!("a published generation must make CacheWarm True: {other:?}"),
            ));
        }
    }

    say.step("After the batch: cache hits, equal to the model's output for the same rows");
    let expected: BTreeMap<String, f64> = serde_json::from_str(
        &std::fs::read_to_string(data.dir.path().join("expected.json"))
            .map_err(|e| fail("batch", e.to_string()))?,
    )
    .map_err(|e| fail("batch", e.to_string()))?;
    // The scorer re-reads the serving pointer every second.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut next_id = 2;
    let mut first = predict(port, "user-000002").await?;
    while first.source != "batch" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        next_id += 1;
        first = predict(port, &format!("user-{next_id:06}")).await?;
    }
    say.say(&describe(&first));
    let mut max_error: f64 = 0.0;
    let mut checked = 0;
    for i in (100..options.users).step_by(options.users / 20 + 1) {
        let id = format!("user-{i:06}");
        let answer = predict(port, &id).await?;
        if answer.source != "batch" {
            return Err(fail(
                "batch",
                format!("{id} was not a batch hit: {answer:?}"),
            ));
        }
        let want = expected
            .get(&id)
            .copied()
            .ok_or_else(|| fail("batch", format!("{id} is not in expected.json")))?;
        max_error = max_error.max((answer.prediction - want).abs());
        checked += 1;
    }
    report.batch_checked = checked;
    report.batch_max_error = max_error;
    say.say(&format!(
        "{checked} users answered from the batch; largest difference from ONNX Runtime's own output: {max_error:e}"
    ));
    if max_error.is_nan() || max_error >= 1e-6 {
        return Err(fail("batch", format!("predictions differ by {max_error}")));
    }

    say.step("Redis stops: the scorer degrades, it does not fail");
    redis.stop();
    let answer = predict(port, "user-000099").await?;
    say.say(&describe(&answer));
    if answer.degraded.is_empty() {
        return Err(fail(
            "redis down",
            format!("an answer with Redis down must say what degraded: {answer:?}"),
        ));
    }
    report.redis_down = Some(answer);
    redis.restart();
    load_online_features(&redis, &data.dir.path().join("online.json"))?;
    say.say("Redis is back (empty: this one keeps no data); requests compute in real time again.");

    say.step("A miss spike: the autoscaler adds scorers (real processes; their pods on GPU nodes)");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let before = replicas(&deployments.get("churn-scorer").await?);
    let spike = Instant::now();
    let load = tokio::spawn(miss_load(kubelet_ports(&kubelet), Duration::from_secs(40)));
    let scaled = crate::wait_named(&deployments, "churn-scorer", "scale-up on misses", |d| {
        replicas(d) > before
    })
    .await;
    let scaled = match scaled {
        Ok(d) => d,
        Err(e) => {
            load.abort();
            return Err(fail("autoscaling", e.to_string()));
        }
    };
    let after = replicas(&scaled);
    report.scaled = (before, after);
    report.scale_up_after = spike.elapsed();
    let serving = wait_endpoints(&kubelet, after as usize, "the new scorers").await;
    load.abort();
    let serving = serving?;
    report.scorers_running = serving.len();
    // Where the scheduler put the scorers: nodes of the GPU pool, one GPU each.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let scorer_pods = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/component=scorer"))
        .await?;
    for pod in &scorer_pods.items {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let pool = nodes
            .get(&node)
            .await?
            .metadata
            .labels
            .and_then(|l| l.get("pool").cloned())
            .unwrap_or_default();
        report.scorer_nodes.push(format!("{node} (pool {pool})"));
    }
    let resource = api.get(NAME).await?;
    let shown = resource
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .map(|a| {
            format!(
                "status.autoscaling: {} replicas desired, {:.0} misses/s, hit rate {}",
                a.desired_replicas,
                a.misses_per_second.unwrap_or_default(),
                a.hit_rate.clone().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    say.say(&format!(
        "{before} -> {after} replicas {:.1} s after the spike began (the scorers publish a traffic window every 5 s; the operator syncs every 2 s); {} scorer processes serving, scheduled on {}. {shown}",
        report.scale_up_after.as_secs_f64(),
        serving.len(),
        report.scorer_nodes.join(", ")
    ));

    say.step("Deleting the resource removes its children and its Redis keys");
    let pattern = millrace_crds::keys::resource_scan_pattern(&format!("{ns}/{NAME}"));
    report.keys_before_delete = count_keys(&redis, &pattern);
    api.delete(NAME, &DeleteParams::default()).await?;
    crate::wait_deleted(&api, NAME, "the resource's deletion").await?;
    report.keys_after_delete = count_keys(&redis, &pattern);
    report.online_features_after_delete = count_keys(&redis, "features:*");
    say.say(&format!(
        "{} keys matching {pattern} before, {} after; the online features (features:*) are untouched",
        report.keys_before_delete, report.keys_after_delete
    ));
    drop(kubelet);
    Ok(report)
}

/// The example's model and users in a local S3 server, a Redis with its online features, and
/// the `s3-credentials` Secret the pods read them with.
pub struct ExampleData {
    /// The generator's output (model, Parquet, online features, expected outputs).
    pub dir: tempfile::TempDir,
    /// The S3 server holding `s3://models/churn/1/model.onnx` and `s3://lake/churn/users/`.
    pub s3: S3Server,
    /// The Redis for predictions, with `features:{id}` hashes loaded.
    pub redis: RedisServer,
}

impl ExampleData {
    /// Generates `users` users and serves them as the example expects, in `namespace`.
    pub async fn prepare(
        client: &Client,
        namespace: &str,
        users: usize,
        say: Narrator,
    ) -> Result<Self, StoryError> {
        say.step("The example's model and users: an ONNX model and a Parquet table in S3");
        let dir = tempfile::tempdir().map_err(|e| fail("data", e.to_string()))?;
        generate(dir.path(), users)?;
        let s3 = S3Server::start();
        s3.create_bucket("models");
        s3.create_bucket("lake");
        s3.put_file(
            "models",
            "churn/1/model.onnx",
            &dir.path().join("model.onnx"),
        );
        s3.put_file(
            "lake",
            "churn/users/part-0.parquet",
            &dir.path().join("users/part-0.parquet"),
        );
        say.say(&format!(
            "s3://models/churn/1/model.onnx and s3://lake/churn/users/ ({users} users) on {}",
            s3.endpoint()
        ));

        say.step("A Redis for predictions, with the online feature store loaded");
        let redis = RedisServer::start();
        load_online_features(&redis, &dir.path().join("online.json"))?;
        say.say(&format!(
            "{} (features:{{user}} hashes for every user)",
            redis.url()
        ));

        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let credentials: BTreeMap<String, String> = s3
            .credentials()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        secrets
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "metadata": {"name": "s3-credentials"},
                    "stringData": credentials,
                })),
            )
            .await?;
        Ok(Self { dir, s3, redis })
    }
}

/// The example as a user would apply it here: the model and features in the local S3, the
/// local Redis, two shards, a quick autoscaler, the pods handed to the e2e kubelet, and
/// `patch` merged on top.
pub fn example(redis_url: &str, patch: Value) -> InferenceDeployment {
    let path = workspace_root().join("examples/churn/inferencedeployment.yaml");
    let mut value: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap_or_default())
            .unwrap_or_default();
    let secret = json!({"name": "s3-credentials"});
    merge_patch(
        &mut value,
        &json!({"spec": {
            "model": {"uri": "s3://models/churn/1/model.onnx", "version": "1",
                      "credentialsSecretRef": secret},
            "features": {"offline": {"uri": "s3://lake/churn/users/", "credentialsSecretRef": secret}},
            "cache": {"redis": {"url": redis_url}},
            "batch": {"shards": 2, "batchSize": 512},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetMissesPerReplica": 20,
                            "syncPeriod": "2s", "scaleDownStabilization": "1m"},
            "podMetadata": {"annotations": {HOLD_ANNOTATION: "e2e-kubelet"}},
        }}),
    );
    merge_patch(&mut value, &patch);
    from_json(value)
}

/// Runs the example's generator into `dir`.
fn generate(dir: &Path, users: usize) -> Result<(), StoryError> {
    let root = workspace_root();
    let status = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("examples/churn/generate.py"))
        .arg(dir)
        .args(["--users", &users.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| fail("data", format!("cannot run the generator: {e}")))?;
    if !status.success() {
        return Err(fail("data", "examples/churn/generate.py failed"));
    }
    Ok(())
}

/// Writes every user's online features as a `features:{id}` hash (redis-cli's pipe mode).
fn load_online_features(redis: &RedisServer, file: &Path) -> Result<(), StoryError> {
    let online: BTreeMap<String, BTreeMap<String, f64>> = serde_json::from_str(
        &std::fs::read_to_string(file).map_err(|e| fail("online features", e.to_string()))?,
    )
    .map_err(|e| fail("online features", e.to_string()))?;
    let mut commands = String::new();
    for (id, features) in online {
        let mut parts = vec!["HSET".to_string(), format!("features:{id}")];
        for (name, value) in features {
            parts.push(name);
            parts.push(value.to_string());
        }
        commands.push_str(&format!("*{}\r\n", parts.len()));
        for part in parts {
            commands.push_str(&format!("${}\r\n{part}\r\n", part.len()));
        }
    }
    let input =
        tempfile::NamedTempFile::new().map_err(|e| fail("online features", e.to_string()))?;
    std::fs::write(input.path(), commands).map_err(|e| fail("online features", e.to_string()))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -p {} --pipe < {} > /dev/null",
            redis.port(),
            input.path().display()
        ))
        .status()
        .map_err(|e| fail("online features", e.to_string()))?;
    if !status.success() {
        return Err(fail("online features", "redis-cli --pipe failed"));
    }
    Ok(())
}

fn count_keys(redis: &RedisServer, pattern: &str) -> usize {
    Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "--scan",
            "--pattern",
            pattern,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(usize::MAX)
}

/// Waits until at least `count` scorer pods serve and answer `/readyz`.
pub async fn wait_endpoints(
    kubelet: &Kubelet,
    count: usize,
    what: &str,
) -> Result<Vec<(String, u16)>, StoryError> {
    wait_component(kubelet, "scorer", count, what).await
}

/// Waits until at least `count` pods of `component` (scorer, compute) answer `/readyz`.
pub async fn wait_component(
    kubelet: &Kubelet,
    component: &str,
    count: usize,
    what: &str,
) -> Result<Vec<(String, u16)>, StoryError> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut ready = Vec::new();
        for (pod, port) in kubelet.endpoints("app.kubernetes.io/component", component) {
            if crate::net::http(port, "GET", "/readyz", None)
                .await
                .is_some_and(|(code, _)| code == 200)
            {
                ready.push((pod, port));
            }
        }
        if ready.len() >= count {
            return Ok(ready);
        }
        if Instant::now() > deadline {
            return Err(fail(
                "scorers",
                format!("waited 90 s for {what}: {} of {count} ready", ready.len()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kubelet_ports(kubelet: &Kubelet) -> Vec<u16> {
    kubelet
        .endpoints("app.kubernetes.io/component", "scorer")
        .into_iter()
        .map(|(_, port)| port)
        .collect()
}

/// Requests for ids never seen (every one a miss) at about 150 per second.
async fn miss_load(ports: Vec<u16>, duration: Duration) {
    let started = Instant::now();
    let mut n: u64 = 0;
    while started.elapsed() < duration && !ports.is_empty() {
        let port = ports[(n as usize) % ports.len()];
        let id = format!("spike-{n}");
        tokio::spawn(async move {
            let _ = crate::net::http(port, "GET", &format!("/v1/predictions/{id}"), None).await;
        });
        n += 1;
        tokio::time::sleep(Duration::from_micros(6_500)).await;
    }
}

/// `GET /v1/predictions/{id}`.
pub async fn predict(port: u16, id: &str) -> Result<Answer, StoryError> {
    let path = format!("/v1/predictions/{id}");
    let request = crate::net::http(port, "GET", &path, None);
    let (code, body) = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| fail("request", format!("no answer for {id} within 10 s")))?;
    let value: Value = serde_json::from_str(&body)
        .map_err(|e| fail("request", format!("{id}: {code} {body}: {e}")))?;
    if code != 200 {
        return Err(fail("request", format!("{id}: {code} {body}")));
    }
    Ok(Answer {
        id: id.to_string(),
        prediction: value["prediction"].as_f64().unwrap_or(f64::NAN),
        source: value["source"].as_str().unwrap_or_default().to_string(),
        degraded: value["degraded"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The execution provider from the OIP model metadata.
async fn provider(port: u16) -> Option<String> {
    let (_, body) = crate::net::http(port, "GET", "/v2/models/churn", None).await?;
    let value: Value = serde_json::from_str(&body).ok()?;
    value["parameters"]["execution_provider"]
        .as_str()
        .map(str::to_string)
}

fn describe(answer: &Answer) -> String {
    let degraded = if answer.degraded.is_empty() {
        String::new()
    } else {
        format!(", degraded: {}", answer.degraded.join(", "))
    };
    format!(
        "GET /v1/predictions/{} -> {:.4} from {}{degraded}",
        answer.id, answer.prediction, answer.source
    )
}
