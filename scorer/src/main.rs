//! `millrace-scorer`: one binary for the scorer's serve, batch and warm modes.
//!
//! The modes arrive with their issues; for now the binary states its identity.

use clap::Parser;

/// Command-line interface of the scorer.
#[derive(Parser, Debug)]
#[command(version, about = "Serves, precomputes and warms Millrace predictions")]
struct Args {}

fn main() {
    let _args = Args::parse();
    println!("millrace-scorer for {}", millrace_crds::api_version());
}
