//! Runs the real `millrace-operator` binary against the local control plane, scoped to one
//! test namespace so tests in parallel never reconcile each other's resources.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

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
        // Defaults for the flags a test does not set itself (clap refuses a flag twice).
        let defaults: Vec<&str> = [
            ("--admin-addr", "127.0.0.1:0"),
            ("--lease-seconds", "4"),
            ("--lease-namespace", namespace),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .flat_map(|(flag, value)| [flag, value])
        .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_millrace-operator"))
            .args(["--namespace", namespace])
            .args([
                "--identity",
                identity,
                "--scorer-image",
                "registry.local/millrace-scorer:e2e",
            ])
            .args(defaults)
            .args(extra)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::from(file.try_clone().expect("log handle")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start millrace-operator");
        eprintln!("operator {identity} logs to {}", log.display());
        Self { child }
    }

    /// Wraps an operator started by the test itself (e.g. with a chart's environment).
    pub fn from_child(child: Child) -> Self {
        Self { child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the process to shut down (SIGTERM) and waits for its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        self.child.wait().expect("wait for the operator")
    }

    /// Kills the process at once (SIGKILL): no lease release, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies `resource` as a user would (`kubectl apply --server-side`).
pub async fn user_apply(
    api: &kube::Api<millrace_crds::InferenceDeployment>,
    resource: &millrace_crds::InferenceDeployment,
) {
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    api.patch(
        &resource.name_any(),
        &PatchParams::apply("e2e-user").force(),
        &Patch::Apply(resource),
    )
    .await
    .expect("apply the resource");
}

/// Applies `resource` as a user and waits until the operator has made it Ready for its
/// current generation.
pub async fn apply_until_ready(
    api: &kube::Api<millrace_crds::InferenceDeployment>,
    resource: &millrace_crds::InferenceDeployment,
) -> millrace_crds::InferenceDeployment {
    use kube::ResourceExt;
    user_apply(api, resource).await;
    millrace_e2e::wait_ready(api, &resource.name_any())
        .await
        .expect("the operator makes the resource Ready")
}

/// `GET path` on 127.0.0.1:`port` over plain HTTP/1.0: the status code and the body, or
/// `None` while nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    millrace_e2e::net::parse_response(&response)
}

/// The churn example (`examples/churn/inferencedeployment.yaml`) pointed at `redis_url`, with `patch` merged in
/// (RFC 7386: objects merge, null deletes).
pub fn example(redis_url: &str, patch: serde_json::Value) -> millrace_crds::InferenceDeployment {
    let mut value: serde_json::Value = serde_yaml_ng::from_str(include_str!(
        "../../../examples/churn/inferencedeployment.yaml"
    ))
    .expect("example");
    millrace_e2e::merge_patch(
        &mut value,
        &serde_json::json!({"spec": {"cache": {"redis": {"url": redis_url}}}}),
    );
    millrace_e2e::merge_patch(&mut value, &patch);
    serde_json::from_value(value).expect("a resource")
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The scorer binary beside the operator's, built first (so a test of the operator package
/// alone still has it).
pub fn scorer_binary() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "millrace-scorer",
            "--bin",
            "millrace-scorer",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p millrace-scorer");
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_millrace-operator"))
        .with_file_name("millrace-scorer")
}
