//! `millrace-operator`: reconciles `InferenceDeployment` resources.
//!
//! The reconcile pipeline arrives with the API issue; for now the binary states its identity
//! so the images and the chart have something real to run and probe.

use clap::Parser;

/// Command-line interface of the operator.
#[derive(Parser, Debug)]
#[command(version, about = "Reconciles millrace.dev InferenceDeployments")]
struct Args {}

fn main() {
    let _args = Args::parse();
    println!("millrace-operator for {}", millrace_crds::api_version());
}
