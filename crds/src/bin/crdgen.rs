//! `crdgen`: writes the InferenceDeployment CRD YAML to `crds/`, or with `--check` fails
//! when the committed file differs from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

use millrace_crds::crd::{CRD_PATH, crd_yaml};

fn main() -> ExitCode {
    let check = std::env::args().any(|arg| arg == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(CRD_PATH);
    let generated = match crd_yaml() {
        Ok(yaml) => yaml,
        Err(error) => {
            eprintln!("crdgen: cannot serialize the CRD: {error}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed == generated {
            println!("crdgen: {CRD_PATH} is up to date");
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "crdgen: {CRD_PATH} is stale; run `cargo run -p millrace-crds --bin crdgen` and commit it"
        );
        return ExitCode::FAILURE;
    }
    if let Err(error) = std::fs::write(&path, generated) {
        eprintln!("crdgen: cannot write {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    println!("crdgen: wrote {CRD_PATH}");
    ExitCode::SUCCESS
}
