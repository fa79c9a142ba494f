//! The operator's errors, each with a bounded label for metrics and event reasons.

use crate::build::BuildError;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A child could not be built from the spec.
    #[error("building children: {0}")]
    Build(#[from] BuildError),
    /// The API server refused or failed a call.
    #[error("{action}: {source}")]
    Kube {
        /// What the operator was doing.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The watched object could not be deserialized (a malformed stored object).
    #[error("the stored object is malformed: {0}")]
    Malformed(String),
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Redis URL could not be resolved from the spec (missing Secret or key).
    #[error("redis URL: {0}")]
    RedisUrl(String),
    /// Adding or removing the finalizer, or a step under it, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A static label for metrics and event reasons: never built from object names or
    /// Debug strings, so the label set stays bounded.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Build(_) => "build",
            Error::Kube { .. } => "kube_api",
            Error::Malformed(_) => "malformed",
            Error::Redis(_) => "redis",
            Error::RedisUrl(_) => "redis_url",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }

    /// Wraps a kube error with what the operator was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}
