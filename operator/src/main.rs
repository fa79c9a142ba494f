//! `millrace-operator`: see the crate docs of `millrace_operator`.

use std::process::ExitCode;

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it: after
/// the burst of a full resync the operator's RSS falls back instead of staying at its peak.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    millrace_operator::cli::Cli::parse_and_run().await
}
