//! `millrace-operator`: see the crate docs of `millrace_operator`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    millrace_operator::cli::Cli::parse_and_run().await
}
