//! `millrace-scorer`: see the crate docs of `millrace_scorer`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    millrace_scorer::cli::Cli::parse_and_run().await
}
