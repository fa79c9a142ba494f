//! The Millrace API, shared by the operator, the scorer and the end-to-end tests.
//!
//! One source of truth: the `InferenceDeployment` resource ([`spec`], [`status`]), the
//! scorer's runtime config that the operator renders, and the Redis key and value encoding
//! all live here, so no two binaries can disagree on them.

pub mod config;
pub mod crd;
pub mod keys;
pub mod reference;
pub mod spec;
pub mod status;
pub mod traffic;

pub use spec::{InferenceDeployment, InferenceDeploymentSpec};
pub use status::InferenceDeploymentStatus;

/// The API group of every Millrace resource.
pub const API_GROUP: &str = "millrace.dev";

/// The served version of the API group.
pub const API_VERSION: &str = "v1alpha1";

/// `group/version`, as written in a manifest's `apiVersion`.
pub fn api_version() -> String {
    format!("{API_GROUP}/{API_VERSION}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_joins_group_and_version() {
        assert_eq!(api_version(), "millrace.dev/v1alpha1");
    }
}
