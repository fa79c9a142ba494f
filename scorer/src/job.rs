//! What every scorer job (`serve`, `batch`, `warm`) starts from: the config the operator
//! renders, the Redis URL and the model, with errors that name the file.

use std::path::PathBuf;

use clap::Args;
use millrace_crds::config::{REDIS_URL_ENV, ScorerConfig};

use crate::model::{Model, ModelError, SessionOptions};

/// The flags every job shares.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// The config file the operator renders.
    #[arg(
        long,
        env = "MILLRACE_CONFIG",
        default_value = "/etc/millrace/scorer.json"
    )]
    pub config: PathBuf,
    /// The Redis URL (a node of the cluster when `cache.redisCluster`).
    #[arg(long, env = REDIS_URL_ENV)]
    pub redis_url: String,
    /// Load the model from here instead of the config's `model.path`.
    #[arg(long, env = "MILLRACE_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
}

/// The config or the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The config file is unreadable or invalid.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The model failed to load.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl JobArgs {
    /// A config error about this job's config file.
    pub fn config_error(&self, message: impl Into<String>) -> JobError {
        JobError::Config {
            path: self.config.display().to_string(),
            message: message.into(),
        }
    }

    /// Reads and checks the config file.
    pub fn load_config(&self) -> Result<ScorerConfig, JobError> {
        let text =
            std::fs::read_to_string(&self.config).map_err(|e| self.config_error(e.to_string()))?;
        ScorerConfig::from_json(&text).map_err(|e| self.config_error(e.to_string()))
    }

    /// Where the model file is: the flag, else the config's `model.path`.
    pub fn model_path(&self, config: &ScorerConfig) -> PathBuf {
        self.model_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(&config.model.path))
    }

    /// Loads the model `config` declares.
    pub fn load_model(
        &self,
        config: &ScorerConfig,
        options: SessionOptions,
    ) -> Result<Model, ModelError> {
        Model::load_with(
            &self.model_path(config),
            config.model.inputs.len(),
            config.model.input_tensor.as_deref(),
            config.model.output.as_deref(),
            &config.execution_providers,
            options,
        )
    }
}
