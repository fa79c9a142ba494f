//! `fetch-model`: the init container that puts the model file where the scorer loads it.
//!
//! It streams the object to a temporary file beside the destination while hashing it,
//! checks the SHA-256 when one is given, and only then renames it into place: a partial
//! or corrupt download never becomes the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::ClientOptions;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URI is not one the fetcher understands.
    #[error("cannot fetch {uri:?}: {reason}")]
    BadUri {
        /// The URI given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store refused or failed.
    #[error("fetching {uri}: {source}")]
    Store {
        /// The URI.
        uri: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// Writing the destination failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the one the spec names.
    #[error("{uri} has SHA-256 {actual}, but spec.model.sha256 is {expected}; refusing it")]
    Checksum {
        /// The URI.
        uri: String,
        /// The expected digest.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
}

/// What was fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written.
    pub bytes: u64,
    /// The file's SHA-256, hex.
    pub sha256: String,
}

/// The store and object path for `uri`:
/// - `s3://bucket/key`: credentials, region and endpoint from the `AWS_*` environment
///   (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
///   `AWS_ALLOW_HTTP`; IRSA's web identity too);
/// - `gs://bucket/key`: a service account from `GOOGLE_SERVICE_ACCOUNT_KEY` (the JSON),
///   `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS` (a path), else the
///   metadata server (GKE Workload Identity);
/// - `az://container/path`: the account from `AZURE_STORAGE_ACCOUNT_NAME`, with
///   `AZURE_STORAGE_ACCOUNT_KEY`, a SAS, a client secret or workload identity
///   (`AZURE_*`); `AZURE_STORAGE_USE_EMULATOR` for Azurite;
/// - `https://` or `http://`, or `file://`.
///
/// The variables come from the `credentialsSecretRef` Secret, whose keys become the pod's
/// environment.
pub(crate) fn store_for(uri: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath), FetchError> {
    let bad = |reason: &str| FetchError::BadUri {
        uri: uri.to_string(),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
    let store = |source| FetchError::Store {
        uri: uri.to_string(),
        source,
    };
    match url.scheme() {
        scheme @ ("s3" | "gs" | "az") => {
            let cloud: Arc<dyn ObjectStore> = match scheme {
                "s3" => Arc::new(
                    AmazonS3Builder::from_env()
                        .with_url(uri)
                        .build()
                        .map_err(store)?,
                ),
                "gs" => Arc::new(
                    GoogleCloudStorageBuilder::from_env()
                        .with_url(uri)
                        .build()
                        .map_err(store)?,
                ),
                _ => Arc::new(
                    MicrosoftAzureBuilder::from_env()
                        .with_url(uri)
                        .build()
                        .map_err(store)?,
                ),
            };
            let key = url.path().trim_start_matches('/');
            Ok((cloud, ObjectPath::from(key)))
        }
        "https" | "http" => {
            let base = format!("{}://{}", url.scheme(), url.authority());
            // Plain http only when asked for by name (local development and tests); the
            // CRD admits https:// alone.
            let options = ClientOptions::new().with_allow_http(url.scheme() == "http");
            let http = HttpBuilder::new()
                .with_url(base)
                .with_client_options(options)
                .build()
                .map_err(store)?;
            Ok((
                Arc::new(http),
                ObjectPath::from(url.path().trim_start_matches('/')),
            ))
        }
        "file" => {
            let path = url
                .to_file_path()
                .map_err(|()| bad("not an absolute file path"))?;
            let local = LocalFileSystem::new();
            let object = ObjectPath::from_absolute_path(&path).map_err(|e| bad(&e.to_string()))?;
            Ok((Arc::new(local), object))
        }
        other => Err(bad(&format!(
            "unsupported scheme {other:?}; use s3, gs, az, https or file"
        ))),
    }
}

/// Downloads `uri` to `dest`, verifying `sha256` (hex) when given.
pub async fn fetch_model(
    uri: &str,
    dest: &Path,
    sha256: Option<&str>,
) -> Result<Fetched, FetchError> {
    let (store, path) = store_for(uri)?;
    let store_error = |source| FetchError::Store {
        uri: uri.to_string(),
        source,
    };
    let tmp = dest.with_extension("part");
    let write_error = |source| FetchError::Write {
        path: tmp.clone(),
        source,
    };
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(write_error)?;
    }
    let mut stream = store.get(&path).await.map_err(store_error)?.into_stream();
    let mut file = tokio::fs::File::create(&tmp).await.map_err(write_error)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(store_error(error));
            }
        };
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(write_error)?;
    }
    file.sync_all().await.map_err(write_error)?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = sha256
        && !expected.eq_ignore_ascii_case(&actual)
    {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(FetchError::Checksum {
            uri: uri.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    tokio::fs::rename(&tmp, dest)
        .await
        .map_err(|source| FetchError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    Ok(Fetched {
        bytes,
        sha256: actual,
    })
}
