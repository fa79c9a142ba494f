//! The scorer's command line: one binary, one image, a subcommand per job: `serve` (the
//! online path), `batch` (one shard of a precompute run), `warm` (cache the most active
//! entities), `fetch-model` (the operator's init container).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::batch::{BatchArgs, run as batch};
use crate::fetch::fetch_model;
use crate::serve::{ServeArgs, run as serve};
use crate::warm::{WarmArgs, run as warm};

/// Serves, precomputes and warms Millrace predictions.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer predictions over HTTP: memory, Redis, real-time ONNX inference, default.
    Serve(ServeArgs),
    /// Score one shard of the offline feature table into Redis under a new generation.
    Batch(BatchArgs),
    /// Compute and cache real-time predictions for the most active entities.
    Warm(WarmArgs),
    /// Download the model (s3://, https://, file://) to a local path, verifying its
    /// SHA-256; the scorer pods' init container.
    FetchModel {
        /// Where the model is.
        #[arg(long, env = "MILLRACE_MODEL_URI")]
        uri: String,
        /// Where to write it.
        #[arg(long, env = "MILLRACE_MODEL_DEST")]
        dest: PathBuf,
        /// The expected SHA-256 (hex); a mismatch fails and leaves nothing at `dest`.
        #[arg(long, env = "MILLRACE_MODEL_SHA256")]
        sha256: Option<String>,
    },
}

impl Cli {
    /// Parses the command line and runs the subcommand; the whole of `main`.
    pub async fn parse_and_run() -> ExitCode {
        let cli = Cli::parse();
        tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init();
        match cli.command {
            Command::Batch(args) => match batch(args).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            },
            Command::Warm(args) => match warm(args).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            },
            Command::Serve(args) => match serve(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            },
            Command::FetchModel { uri, dest, sha256 } => {
                match fetch_model(&uri, &dest, sha256.as_deref()).await {
                    Ok(fetched) => {
                        info!(%uri, dest = %dest.display(), bytes = fetched.bytes, sha256 = %fetched.sha256, "model fetched");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        error!("{e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}
