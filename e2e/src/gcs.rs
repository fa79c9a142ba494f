//! A real Google Cloud Storage emulator for tests: fake-gcs-server (built from its Go module
//! by e2e/scripts/build-tools.sh, on PATH from scripts/env.sh) on a free loopback port, in
//! memory, killed when dropped. The scorer reaches it through object_store's GCS client
//! with a service account that names the emulator's URL and turns OAuth off.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::{LoopbackServer, free_port};

/// A running fake-gcs-server.
pub struct GcsServer {
    server: LoopbackServer,
}

impl GcsServer {
    /// Starts the emulator and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let mut command = Command::new("fake-gcs-server");
        command
            .args([
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-backend",
                "memory",
            ])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-log-level", "error"]);
        let server = LoopbackServer::spawn(
            command,
            port,
            "fake-gcs-server",
            "built by scripts/setup.sh, on PATH via scripts/env.sh",
            Duration::from_secs(30),
        );
        Self { server }
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// Creates `bucket` (the JSON API, as `gcloud storage buckets create` does).
    pub fn create_bucket(&self, bucket: &str) {
        let url = format!("{}/storage/v1/b?project=test", self.endpoint());
        let body = format!("{{\"name\":\"{bucket}\"}}");
        curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ]);
    }

    /// Uploads the file at `path` as `gs://bucket/key` (a media upload).
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        let url = format!(
            "{}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={key}",
            self.endpoint()
        );
        let file = format!("@{}", path.display());
        curl(&["-X", "POST", "--data-binary", &file, &url]);
    }

    /// The environment the scorer's object store reads to reach this server: a service
    /// account key naming the emulator, with OAuth off.
    pub fn credentials(&self) -> Vec<(&'static str, String)> {
        let key = format!(
            r#"{{"gcs_base_url":"{}","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}}"#,
            self.endpoint()
        );
        vec![("GOOGLE_SERVICE_ACCOUNT_KEY", key)]
    }
}

fn curl(args: &[&str]) {
    let status = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "--max-time", "30"])
        .args(args)
        .status()
        .expect("curl");
    assert!(status.success(), "curl {args:?}");
}
