//! A real Azure Blob Storage emulator for tests: Azurite (npm, installed by
//! e2e/scripts/build-tools.sh, on PATH from scripts/env.sh) on a free loopback port, in
//! memory, killed when dropped. Containers and blobs are created with the Azure SDK from the
//! project's virtualenv (object_store cannot create a container); the scorer reads them
//! through object_store's Azure client in emulator mode.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::{LoopbackServer, free_port};
use crate::s3::workspace_root;

/// Azurite's well-known development account (public, the same in every emulator).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite blob service.
pub struct AzuriteServer {
    server: LoopbackServer,
}

impl AzuriteServer {
    /// Starts the blob service and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let mut command = Command::new("azurite-blob");
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--extentMemoryLimit", "256"])
            .args(["--skipApiVersionCheck", "--silent"]);
        let server = LoopbackServer::spawn(
            command,
            port,
            "azurite-blob",
            "installed by scripts/setup.sh, on PATH via scripts/env.sh",
            Duration::from_secs(60),
        );
        Self { server }
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// Creates `container`.
    pub fn create_container(&self, container: &str) {
        self.sdk(
            "client.get_container_client(sys.argv[2]).create_container()",
            &[container],
        );
    }

    /// Uploads the file at `path` as `az://container/name`.
    pub fn put_file(&self, container: &str, name: &str, path: &Path) {
        let path = path.display().to_string();
        self.sdk(
            "client.get_blob_client(sys.argv[2], sys.argv[3]).upload_blob(open(sys.argv[4], 'rb'), overwrite=True)",
            &[container, name, &path],
        );
    }

    fn sdk(&self, statement: &str, args: &[&str]) {
        let script = format!(
            "import sys\nfrom azure.storage.blob import BlobServiceClient\nclient = BlobServiceClient.from_connection_string(sys.argv[1])\n{statement}\n"
        );
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={}/{ACCOUNT};",
            self.endpoint()
        );
        let python = workspace_root().join(".venv/bin/python");
        let status = Command::new(&python)
            .args(["-c", &script, &connection])
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("{} (scripts/setup.sh): {e}", python.display()));
        assert!(status.success(), "azure sdk: {statement} {args:?}");
    }

    /// The environment the scorer's object store reads to reach this emulator.
    pub fn credentials(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
        ]
    }
}
