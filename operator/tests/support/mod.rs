//! Runs the real `millrace-operator` binary against the local control plane, scoped to one
//! test namespace so tests in parallel never reconcile each other's resources.

use std::process::{Child, Command, Stdio};

/// A running operator process; killed when dropped.
pub struct OperatorProcess {
    child: Child,
}

impl OperatorProcess {
    /// Starts an operator watching `namespace`, electing its leader on a Lease there.
    pub fn start(namespace: &str, identity: &str) -> Self {
        Self::start_with(namespace, identity, &[])
    }

    /// Like [`OperatorProcess::start`], with extra command-line arguments.
    pub fn start_with(namespace: &str, identity: &str, extra: &[&str]) -> Self {
        let log =
            std::env::temp_dir().join(format!("millrace-operator-{namespace}-{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log file");
        let child = Command::new(env!("CARGO_BIN_EXE_millrace-operator"))
            .args(["--namespace", namespace, "--lease-namespace", namespace])
            .args(["--identity", identity, "--admin-addr", "127.0.0.1:0"])
            .args([
                "--lease-seconds",
                "4",
                "--scorer-image",
                "registry.local/millrace-scorer:e2e",
            ])
            .args(extra)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::from(file.try_clone().expect("log handle")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start millrace-operator");
        eprintln!("operator {identity} logs to {}", log.display());
        Self { child }
    }

    /// Kills the process at once (SIGKILL): no lease release, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The churn example (`examples/churn.yaml`) pointed at `redis_url`, with `patch` merged in
/// (RFC 7386: objects merge, null deletes).
pub fn example(redis_url: &str, patch: serde_json::Value) -> millrace_crds::InferenceDeployment {
    let mut value: serde_json::Value =
        serde_yaml_ng::from_str(include_str!("../../../examples/churn.yaml")).expect("example");
    merge(
        &mut value,
        &serde_json::json!({"spec": {"cache": {"redis": {"url": redis_url}}}}),
    );
    merge(&mut value, &patch);
    serde_json::from_value(value).expect("a resource")
}

fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
