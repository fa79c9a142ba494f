//! Shared helpers of the scorer's integration tests: real models made with the venv's
//! `onnx`, the scorer binary as a real process, and a small HTTP client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use millrace_crds::config::{CacheConfig, ModelConfig, ResourceRef, ScorerConfig, ServingConfig};
use millrace_crds::spec::{
    ExecutionProvider, FallbackSpec, FeaturesSpec, MemoryCacheSpec, MicroBatchSpec, Topology,
};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Makes `dir/model.onnx` (`features` inputs) with `rows` sample rows and ONNX Runtime
/// Python's outputs for them.
pub fn make_model(dir: &Path, features: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
    run_make_model(dir, features, rows, &[])
}

/// Makes `dir/model.onnx` (`features` inputs) that takes about 180 ms an inference here (256
/// products with a 16 MB matrix), for tests of what happens past a latency budget.
pub fn make_slow_model(dir: &Path, features: usize) {
    run_make_model(dir, features, 1, &["slow"]);
}

fn run_make_model(
    dir: &Path,
    features: usize,
    rows: usize,
    extra: &[&str],
) -> (Vec<f32>, Vec<f32>) {
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scorer/tests/support/make_model.py"))
        .arg(dir)
        .args([features.to_string(), rows.to_string()])
        .args(extra)
        .status()
        .expect("the project venv (scripts/setup.sh)");
    assert!(status.success(), "make_model.py failed");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    let rows: Vec<Vec<f32>> = serde_json::from_str(&read("rows.json")).expect("rows");
    let expected: Vec<f32> = serde_json::from_str(&read("expected.json")).expect("expected");
    (rows.concat(), expected)
}

/// A scorer config for `model` with `inputs`, memory on, fill policy, default 0.5.
pub fn config(model: &Path, inputs: &[&str]) -> ScorerConfig {
    ScorerConfig {
        resource: ResourceRef {
            namespace: "ml".into(),
            name: "churn".into(),
        },
        model: ModelConfig {
            uri: format!("file://{}", model.display()),
            path: model.display().to_string(),
            version: "3".into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            input_tensor: None,
            output: Some("y".into()),
            sha256: None,
        },
        execution_providers: vec![ExecutionProvider::Cpu],
        key_prefix: "ml/churn".into(),
        cache: CacheConfig {
            redis_cluster: false,
            batch_ttl: "24h".into(),
            realtime_ttl: "1h".into(),
            max_staleness: "12h".into(),
            memory: MemoryCacheSpec {
                max_entries: 10_000,
                ttl: "30s".into(),
            },
        },
        features: FeaturesSpec {
            online: Some(millrace_crds::spec::OnlineFeatures {
                hash_prefix: "features:".into(),
            }),
            ..FeaturesSpec::default()
        },
        serving: ServingConfig {
            port: 8080,
            topology: Topology::Unified,
            latency_budget: "200ms".into(),
            fallback: FallbackSpec { default: Some(0.5) },
            micro_batch: MicroBatchSpec {
                max_batch_size: 64,
                max_delay: "2ms".into(),
            },
        },
        batch: None,
    }
}

pub use millrace_e2e::net::free_port;

/// `millrace-scorer serve` as a real process; killed when dropped.
pub struct Scorer {
    child: Option<Child>,
    /// Its HTTP port.
    pub port: u16,
    /// The pod name it publishes traffic under.
    pub pod: String,
    dir: tempfile::TempDir,
}

impl Scorer {
    /// Starts the scorer on `config` against `redis_url` with `extra` flags, and waits for
    /// `/readyz`.
    pub async fn start(config: &ScorerConfig, redis_url: &str, extra: &[&str]) -> Self {
        let scorer = Self::spawn(config, redis_url, extra);
        scorer.wait_ready().await;
        scorer
    }

    /// Starts the scorer without waiting.
    pub fn spawn(config: &ScorerConfig, redis_url: &str, extra: &[&str]) -> Self {
        Self::spawn_on(config, redis_url, extra, free_port())
    }

    /// Starts the scorer on `port` without waiting (a restart on the same address).
    pub fn spawn_on(config: &ScorerConfig, redis_url: &str, extra: &[&str], port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("scorer.json");
        std::fs::write(&path, serde_json::to_string(config).expect("json")).expect("write");
        let pod = format!("scorer-test-{port}");
        let log = std::fs::File::create(dir.path().join("scorer.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"))
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--redis-url", redis_url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--pod-name", &pod])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the scorer binary");
        Self {
            child: Some(child),
            port,
            pod,
            dir,
        }
    }

    /// Waits until `/readyz` answers 200 (or fails the test with the log).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = try_request(self.port, "GET", "/readyz", None).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the scorer never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// What the scorer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scorer.log")).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, returning its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the scorer did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path`, expecting an answer.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        request_json(self.port, "GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        request_json(self.port, "POST", path, Some(&body.to_string())).await
    }

    /// A metric's value: the sum of every sample whose line starts with `prefix`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let (status, text) = try_request(self.port, "GET", "/metrics", None)
            .await
            .expect("metrics");
        assert_eq!(status, 200);
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A request with a JSON body (`application/json`); the status and the body parsed as JSON
/// (a non-JSON body becomes a JSON string).
pub async fn request_json(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, text) = try_request(port, method, path, body)
        .await
        .unwrap_or_else(|| panic!("no answer to {method} {path}"));
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

/// One HTTP/1.0 request; `None` when nothing listens.
pub async fn try_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    raw_request(port, method, path, body.map(|b| ("application/json", b))).await
}

/// One HTTP/1.0 request with an explicit content type.
pub async fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> Option<(u16, String)> {
    millrace_e2e::net::http(port, method, path, body).await
}

pub use millrace_e2e::s3::S3Server as Moto;

/// Creates `bucket` on `moto` and returns an object_store client for it.
pub fn s3_bucket(moto: &Moto, bucket: &str) -> object_store::aws::AmazonS3 {
    moto.create_bucket(bucket);
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .expect("s3 client")
}
