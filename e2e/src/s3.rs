//! A real S3-compatible server for tests and the demo: moto's server mode from the project's
//! virtualenv (installed by scripts/setup.sh), on a free loopback port, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::net::{LoopbackServer, free_port};

/// The workspace root (where `.venv` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running moto S3 server.
pub struct S3Server {
    server: LoopbackServer,
}

impl S3Server {
    /// Starts `moto_server` and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let binary = workspace_root().join(".venv/bin/moto_server");
        let mut command = Command::new(&binary);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let server = LoopbackServer::spawn(
            command,
            port,
            &binary.display().to_string(),
            "installed by scripts/setup.sh",
            Duration::from_secs(30),
        );
        Self { server }
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        self.curl_put(&format!("{}/{bucket}", self.endpoint()), None);
    }

    /// Uploads the file at `path` as `s3://bucket/key`.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        self.curl_put(&format!("{}/{bucket}/{key}", self.endpoint()), Some(path));
    }

    fn curl_put(&self, url: &str, file: Option<&Path>) {
        // Signed like any S3 client (curl's SigV4): moto stalls on an unsigned upload.
        // Retried (both PUTs are idempotent): a fresh-clone CI run saw the first PUT, right
        // after the server started, fail once, with no reason shown; `-S` now prints
        // curl's reason if it fails for good.
        let mut command = Command::new("curl");
        command.args([
            "-sSf",
            "--retry",
            "5",
            "--retry-all-errors",
            "--retry-delay",
            "1",
            "--max-time",
            "30",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "test:test",
            "-X",
            "PUT",
            url,
        ]);
        if let Some(file) = file {
            command.arg("-T").arg(file);
        }
        let status = command.status().expect("curl");
        assert!(status.success(), "PUT {url}");
    }

    /// The `AWS_*` variables the scorer's object store reads to reach this server.
    pub fn credentials(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}
