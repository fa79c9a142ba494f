//! `millrace-scorer`: see the crate docs of `millrace_scorer`.

use std::process::ExitCode;

// Many small, short-lived allocations per request: mimalloc keeps them cheap and RSS flat.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    millrace_scorer::cli::Cli::parse_and_run().await
}
