//! The model: one ONNX Runtime session shared by every scorer mode (serve, batch, warm), so
//! real-time and batch predictions come from the same code.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`) from `ORT_DYLIB_PATH`.
//! Execution providers are tried in the configured order, each one failing loudly into the
//! next; CPU is the last resort and [`Model::provider`] says which one won.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use millrace_crds::spec::ExecutionProvider;
use ort::session::Session;
use ort::value::{Tensor, ValueType};
use tracing::{info, warn};

/// Why the model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The ONNX Runtime library could not be loaded.
    #[error("cannot load ONNX Runtime (set ORT_DYLIB_PATH to libonnxruntime.so): {0}")]
    Runtime(String),
    /// The model file could not be loaded.
    #[error("cannot load the model {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The model's inputs or outputs do not match the config.
    #[error("the model does not match spec.model: {0}")]
    Contract(String),
    /// Input of the wrong size.
    #[error("expected a multiple of {features} values (one row per entity), got {got}")]
    Shape {
        /// Features per row.
        features: usize,
        /// Values given.
        got: usize,
    },
    /// ONNX Runtime failed during a run.
    #[error("inference failed: {0}")]
    Run(String),
}

/// How the ONNX Runtime session runs, beyond the model contract.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Threads one inference may use; `None` lets ONNX Runtime decide (one per core).
    /// The online path uses one: its batches are small, and spinning pool threads would take
    /// cores from the HTTP and Redis work beside them.
    pub intra_op_threads: Option<usize>,
    /// Whether the CPU provider keeps freed tensor memory in its arena for the next
    /// inference. On for the batch job: it runs thousands of inferences of one size, and
    /// without the arena each one asked the system allocator for megabytes afresh, so a full
    /// run spent a tenth of its CPU time in page faults and peaked 50 MiB higher. Off for
    /// the online path, whose batches vary in size (an arena keeps the largest it ever saw).
    pub memory_arena: bool,
}

/// A loaded model.
pub struct Model {
    session: Mutex<Session>,
    input: String,
    output: String,
    features: usize,
    provider: ExecutionProvider,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("features", &self.features)
            .field("provider", &self.provider)
            .finish()
    }
}

impl Model {
    /// Loads `path`, expecting `features` input columns in one f32 tensor (`input_tensor`,
    /// else the first input) and reading `output` (else the first output).
    pub fn load(
        path: &Path,
        features: usize,
        input_tensor: Option<&str>,
        output: Option<&str>,
        providers: &[ExecutionProvider],
    ) -> Result<Self, ModelError> {
        Self::load_with(
            path,
            features,
            input_tensor,
            output,
            providers,
            SessionOptions::default(),
        )
    }

    /// [`Model::load`] with explicit session options.
    pub fn load_with(
        path: &Path,
        features: usize,
        input_tensor: Option<&str>,
        output: Option<&str>,
        providers: &[ExecutionProvider],
        options: SessionOptions,
    ) -> Result<Self, ModelError> {
        let environment = environment()?;
        let load_error = |message: String| ModelError::Load {
            path: path.display().to_string(),
            message,
        };
        let mut chosen = None;
        for &provider in providers
            .iter()
            .chain(std::iter::once(&ExecutionProvider::Cpu))
        {
            let Some(dispatch) = dispatch(provider, &options) else {
                warn!(
                    ?provider,
                    "execution provider not compiled into this build; trying the next"
                );
                continue;
            };
            let mut builder =
                Session::builder(environment).map_err(|e| load_error(e.to_string()))?;
            if let Some(threads) = options.intra_op_threads {
                builder = builder
                    .with_intra_threads(threads)
                    .map_err(|e| load_error(e.to_string()))?
                    .with_intra_op_spinning(false)
                    .map_err(|e| load_error(e.to_string()))?;
            }
            let session = builder
                .with_execution_providers([dispatch.error_on_failure()])
                .map_err(|e| e.to_string())
                .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()));
            match session {
                Ok(session) => {
                    chosen = Some((session, provider));
                    break;
                }
                Err(message) if provider == ExecutionProvider::Cpu => {
                    return Err(load_error(message));
                }
                Err(message) => {
                    warn!(?provider, %message, "execution provider failed; trying the next")
                }
            }
        }
        let Some((session, provider)) = chosen else {
            return Err(load_error(
                "no execution provider could load the model".into(),
            ));
        };

        let input = pick(
            session.inputs().iter().map(|o| (o.name(), o.dtype())),
            input_tensor,
            "input",
        )?;
        let output = pick(
            session.outputs().iter().map(|o| (o.name(), o.dtype())),
            output,
            "output",
        )?;
        let input_type = session
            .inputs()
            .iter()
            .find(|o| o.name() == input)
            .map(|o| o.dtype().clone());
        if let Some(ValueType::Tensor { shape, .. }) = input_type {
            let width = shape.last().copied().unwrap_or(-1);
            if shape.len() != 2 || (width >= 0 && width as usize != features) {
                return Err(ModelError::Contract(format!(
                    "input {input:?} has shape {:?}; spec.model.inputs lists {features} features, so it must be [N, {features}]",
                    &shape[..]
                )));
            }
        }
        info!(?provider, %input, %output, features, "model loaded");
        Ok(Self {
            session: Mutex::new(session),
            input,
            output,
            features,
            provider,
        })
    }

    /// The execution provider that loaded the model.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// Features per row.
    pub fn features(&self) -> usize {
        self.features
    }

    /// The input tensor's name.
    pub fn input_name(&self) -> &str {
        &self.input
    }

    /// The output tensor's name.
    pub fn output_name(&self) -> &str {
        &self.output
    }

    /// Scores `rows` (row-major, `features` values per row): one prediction per row, the
    /// first column of the output tensor.
    pub fn predict(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        if rows.is_empty() || !rows.len().is_multiple_of(self.features) {
            return Err(ModelError::Shape {
                features: self.features,
                got: rows.len(),
            });
        }
        let n = rows.len() / self.features;
        let tensor = Tensor::from_array(([n, self.features], rows.to_vec()))
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| ModelError::Run("a previous inference panicked".into()))?;
        let outputs = session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let (shape, values) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let per_row = shape
            .num_elements()
            .checked_div(n)
            .filter(|&per_row| per_row > 0)
            .ok_or_else(|| ModelError::Run(format!("output {:?} is empty", self.output)))?;
        Ok(values.iter().step_by(per_row).copied().collect())
    }
}

/// The process's one ONNX Runtime environment (ONNX Runtime allows a single one).
fn environment() -> Result<&'static ort::environment::Environment, ModelError> {
    static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            ort::environment::init()
                .with_name("millrace")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|message| ModelError::Runtime(message.clone()))
}

/// The input or output to use: the named one (which must exist), else the first.
fn pick<'a>(
    mut outlets: impl Iterator<Item = (&'a str, &'a ValueType)>,
    wanted: Option<&str>,
    what: &str,
) -> Result<String, ModelError> {
    let names: Vec<&str> = outlets.by_ref().map(|(name, _)| name).collect();
    match wanted {
        Some(name) if names.contains(&name) => Ok(name.to_string()),
        Some(name) => Err(ModelError::Contract(format!(
            "no {what} named {name:?}; the model has {names:?}"
        ))),
        None => names
            .first()
            .map(|n| n.to_string())
            .ok_or_else(|| ModelError::Contract(format!("the model has no {what}"))),
    }
}

/// The `ort` dispatch for a provider, if this build includes it.
fn dispatch(
    provider: ExecutionProvider,
    options: &SessionOptions,
) -> Option<ort::ep::ExecutionProviderDispatch> {
    match provider {
        ExecutionProvider::Cpu => Some(
            ort::ep::CPU::default()
                .with_arena_allocator(options.memory_arena)
                .build(),
        ),
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda => Some(ort::ep::CUDA::default().build()),
        #[cfg(feature = "tensorrt")]
        ExecutionProvider::Tensorrt => Some(ort::ep::TensorRT::default().build()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
