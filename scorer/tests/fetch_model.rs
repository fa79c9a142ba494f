//! `millrace-scorer fetch-model` as the init container runs it: from a real HTTP server, a
//! real S3-compatible server (moto, from the project venv), a GCS emulator (fake-gcs-server)
//! and an Azure Blob emulator (Azurite), checksum enforced, nothing left at the destination
//! when anything fails.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use millrace_e2e::azure::AzuriteServer;
use millrace_e2e::gcs::GcsServer;
use support::{Moto, s3_bucket};

use sha2::{Digest, Sha256};

const MODEL: &[u8] = b"\x08\x08\x12\x0cmillrace-testmodel bytes standing in for an ONNX file";

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn fetch(uri: &str, dest: &Path, sha256: Option<&str>, env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"));
    command
        .args(["fetch-model", "--uri", uri, "--dest"])
        .arg(dest);
    if let Some(sha256) = sha256 {
        command.args(["--sha256", sha256]);
    }
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command.output().expect("run millrace-scorer")
}

/// Serves `MODEL` at /models/churn.onnx on a free port; 404 elsewhere.
async fn http_server() -> u16 {
    let app =
        axum::Router::new().route("/models/churn.onnx", axum::routing::get(|| async { MODEL }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test]
async fn an_https_model_is_downloaded_and_checked() {
    let port = http_server().await;
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("model/model.onnx");
    let uri = format!("http://127.0.0.1:{port}/models/churn.onnx");
    let out = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || fetch(&uri, &dest, Some(&sha(MODEL)), &[])
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest).expect("written"), MODEL);
}

#[tokio::test]
async fn a_checksum_mismatch_leaves_nothing_behind() {
    let port = http_server().await;
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("model.onnx");
    let uri = format!("http://127.0.0.1:{port}/models/churn.onnx");
    let wrong = sha(b"another model");
    let out = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || fetch(&uri, &dest, Some(&wrong), &[])
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing it") && stderr.contains(&sha(MODEL)),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "no model, no partial file"
    );
}

#[tokio::test]
async fn a_missing_model_fails_clearly() {
    let port = http_server().await;
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("model.onnx");
    let uri = format!("http://127.0.0.1:{port}/models/absent.onnx");
    let out = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || fetch(&uri, &dest, None, &[])
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.onnx"));
    assert!(!dest.exists());
}

#[test]
fn a_file_model_is_copied() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("source.onnx");
    std::fs::write(&source, MODEL).expect("write");
    let dest = dir.path().join("out/model.onnx");
    let uri = format!("file://{}", source.display());
    let out = fetch(&uri, &dest, Some(&sha(MODEL)), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest).expect("copied"), MODEL);
}

#[test]
fn an_unsupported_scheme_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = fetch(
        "ftp://models/churn.onnx",
        &dir.path().join("m.onnx"),
        None,
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported scheme"));
}

#[tokio::test]
async fn an_s3_model_is_downloaded_with_credentials_from_the_environment() {
    use object_store::ObjectStoreExt;
    let moto = Moto::start();
    let env = moto.credentials();
    let store = s3_bucket(&moto, "models");
    store
        .put(&"churn/3/model.onnx".into(), MODEL.to_vec().into())
        .await
        .expect("upload");

    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("model.onnx");
    let out = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || {
            fetch(
                "s3://models/churn/3/model.onnx",
                &dest,
                Some(&sha(MODEL)),
                &env,
            )
        }
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest).expect("written"), MODEL);
}

#[test]
fn gcs_and_azure_models_are_downloaded_with_credentials_from_the_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = dir.path().join("upload.onnx");
    std::fs::write(&source, MODEL).expect("write");
    let gcs = GcsServer::start();
    gcs.create_bucket("models");
    gcs.put_file("models", "churn/3/model.onnx", &source);
    let azure = AzuriteServer::start();
    azure.create_container("models");
    azure.put_file("models", "churn/3/model.onnx", &source);

    for (uri, env) in [
        ("gs://models/churn/3/model.onnx", gcs.credentials()),
        ("az://models/churn/3/model.onnx", azure.credentials()),
    ] {
        let dest = dir.path().join(format!("{}.onnx", &uri[..2]));
        let out = fetch(uri, &dest, Some(&sha(MODEL)), &env);
        assert!(
            out.status.success(),
            "{uri}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&dest).expect("written"), MODEL, "{uri}");

        let missing = uri.replace("model.onnx", "absent.onnx");
        let dest = dir.path().join("absent.onnx");
        let out = fetch(&missing, &dest, None, &env);
        assert!(!out.status.success(), "{missing} does not exist");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&missing),
            "{missing}: the error names the URI: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dest.exists(), "nothing left at the destination");
    }
}
