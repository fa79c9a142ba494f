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

/// The cause the API server gives a write refused in a namespace being deleted
/// (`metav1.NamespaceTerminatingCause`).
const NAMESPACE_TERMINATING_CAUSE: &str = "NamespaceTerminating";

/// Whether `error` is the API server refusing a write in a namespace being deleted.
pub fn refused_for_terminating_namespace(error: &kube::Error) -> bool {
    let kube::Error::Api(status) = error else {
        return false;
    };
    status.details.as_ref().is_some_and(|details| {
        details
            .causes
            .iter()
            .any(|cause| cause.reason == NAMESPACE_TERMINATING_CAUSE)
    })
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

    /// Whether the API server refused a write because the namespace is being deleted (the
    /// NamespaceLifecycle admission plugin's `NamespaceTerminating` cause). Retrying cannot
    /// help: the namespace's deletion reaches the resource itself soon after.
    pub fn is_namespace_terminating(&self) -> bool {
        match self {
            Error::Kube { source, .. } => refused_for_terminating_namespace(source),
            // Only the Apply side: a cleanup is always retried, since the namespace cannot
            // go until it releases the finalizer.
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) => e.is_namespace_terminating(),
                kube::runtime::finalizer::Error::AddFinalizer(e) => {
                    refused_for_terminating_namespace(e)
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Wraps a kube error with what the operator was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: serde_json::Value) -> Error {
        let status: kube::core::Status = serde_json::from_value(body).expect("a Status");
        Error::kube("applying ConfigMap churn-config")(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn only_a_refusal_for_a_namespace_being_deleted_counts_as_terminating() {
        // As the NamespaceLifecycle admission plugin answers.
        let terminating = || {
            refused(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "reason": "Forbidden",
                "message": "configmaps \"churn-config\" is forbidden: unable to create new content in namespace ml because it is being terminated",
                "details": {"name": "churn-config", "kind": "configmaps", "causes": [
                    {"reason": "NamespaceTerminating", "message": "namespace ml is being terminated", "field": "metadata.namespace"}
                ]}
            }))
        };
        assert!(terminating().is_namespace_terminating());
        // As the controller's error policy sees it: under the finalizer's Apply step. A
        // cleanup is retried whatever refused it: the namespace waits for its finalizer.
        use kube::runtime::finalizer::Error as Step;
        let apply = Error::Finalizer(Box::new(Step::ApplyFailed(terminating())));
        assert!(apply.is_namespace_terminating());
        let cleanup = Error::Finalizer(Box::new(Step::CleanupFailed(terminating())));
        assert!(!cleanup.is_namespace_terminating());
        // Another 403 (RBAC), and a failure that is not the API server's answer at all.
        let rbac = refused(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "configmaps is forbidden: User cannot patch resource",
            "details": {"kind": "configmaps"}
        }));
        assert!(!rbac.is_namespace_terminating());
        assert!(!Error::RedisUrl("no Secret".into()).is_namespace_terminating());
    }
}
