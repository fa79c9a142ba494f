//! `crdgen`: writes every file generated from the API types (the CRD YAML under `crds/`, the
//! chart's copy of it, and the resource reference `docs/reference.md`), or with `--check`
//! fails when a committed file differs from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

use millrace_crds::crd::{CHART_CRD_PATH, CRD_PATH, crd, crd_yaml};
use millrace_crds::reference::{REFERENCE_PATH, reference_markdown};

fn main() -> ExitCode {
    let check = std::env::args().any(|arg| arg == "--check");
    // The checkout `cargo run` was started from: cargo sets the variable when it runs the
    // binary. The path compiled in is only the fallback, since two checkouts sharing one
    // target directory share this binary, and the one built last would otherwise check
    // (or write) the other's files.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let root = PathBuf::from(manifest_dir).join("..");
    let yaml = match crd_yaml() {
        Ok(yaml) => yaml,
        Err(error) => {
            eprintln!("crdgen: cannot serialize the CRD: {error}");
            return ExitCode::FAILURE;
        }
    };
    let reference = match reference_markdown(&crd()) {
        Ok(markdown) => markdown,
        Err(error) => {
            eprintln!("crdgen: cannot render the reference: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outputs = [
        (CRD_PATH, yaml.as_str()),
        (CHART_CRD_PATH, yaml.as_str()),
        (REFERENCE_PATH, reference.as_str()),
    ];
    let mut stale = false;
    for (relative, generated) in outputs {
        let path = root.join(relative);
        if check {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed == generated {
                println!("crdgen: {relative} is up to date");
            } else {
                eprintln!(
                    "crdgen: {relative} is stale; run `make crds` (cargo run -p millrace-crds --bin crdgen) and commit it"
                );
                stale = true;
            }
            continue;
        }
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, generated));
        if let Err(error) = written {
            eprintln!("crdgen: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("crdgen: wrote {relative}");
    }
    if stale {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
