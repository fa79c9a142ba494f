//! Who holds a Redis key prefix. Every key of an `InferenceDeployment` lives under its
//! effective key prefix (`spec.cache.keyPrefix`, or `{namespace}/{name}`), and deleting the
//! resource deletes every key under it. Two resources with one prefix would overwrite each
//! other's predictions, and deleting either would delete the other's, so a prefix belongs to
//! the resource that has had it longest (the oldest; namespace and name break ties) and the
//! operator refuses the others (`Degraded`, reason `KeyPrefixConflict`) until it is free.
//! Deleting a refused resource leaves the keys to the holder; deleting the holder deletes
//! them (a refused resource never wrote any), and the next in line starts afresh.
//! Any two resources with one prefix conflict, even on different Redis servers: the operator
//! cannot tell whether two addresses (or two Secrets) reach the same server.
//!
//! Pure functions over the resources the operator sees (all namespaces, or its own in a
//! namespace-scoped install, where a conflict across namespaces goes unnoticed).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use millrace_crds::InferenceDeployment;

use crate::build::config::key_prefix;

/// The resource that holds `resource`'s key prefix ahead of it, if any: another live one
/// (not being deleted) with the same prefix that is older, or as old and first by namespace
/// and name.
pub fn prefix_holder<'a>(
    resource: &InferenceDeployment,
    all: impl IntoIterator<Item = &'a InferenceDeployment>,
) -> Option<&'a InferenceDeployment> {
    let prefix = key_prefix(resource);
    all.into_iter()
        .filter(|other| shares_prefix(resource, &prefix, other))
        .filter(|other| seniority(other) < seniority(resource))
        .min_by(|a, b| seniority(a).cmp(&seniority(b)))
}

/// Whether `other` is a live resource other than `resource` with key prefix `prefix`.
fn shares_prefix(
    resource: &InferenceDeployment,
    prefix: &str,
    other: &InferenceDeployment,
) -> bool {
    let same_object = match (&resource.metadata.uid, &other.metadata.uid) {
        (Some(a), Some(b)) => a == b,
        _ => resource.namespace() == other.namespace() && resource.name_any() == other.name_any(),
    };
    !same_object && other.metadata.deletion_timestamp.is_none() && key_prefix(other) == prefix
}

/// Older first; a resource without a creation time (not yet stored) comes last.
fn seniority(resource: &InferenceDeployment) -> (bool, Option<Time>, String, String) {
    let created = resource.metadata.creation_timestamp.clone();
    (
        created.is_none(),
        created,
        resource.namespace().unwrap_or_default(),
        resource.name_any(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    /// The churn fixture as `namespace`/`name`, with `prefix`, created `created_s` seconds
    /// after a fixed instant.
    fn resource(
        namespace: &str,
        name: &str,
        prefix: Option<&str>,
        created_s: i64,
    ) -> InferenceDeployment {
        let mut resource: InferenceDeployment =
            serde_yaml_ng::from_str(include_str!("../tests/fixtures/churn.yaml"))
                .expect("the fixture");
        resource.metadata.namespace = Some(namespace.into());
        resource.metadata.name = Some(name.into());
        resource.metadata.uid = Some(format!("{namespace}/{name}"));
        resource.spec.cache.key_prefix = prefix.map(String::from);
        resource.metadata.creation_timestamp = Some(Time(
            Timestamp::from_second(1_800_000_000 + created_s).expect("time"),
        ));
        resource
    }

    #[test]
    fn the_oldest_resource_holds_a_shared_prefix() {
        let old = resource("a", "churn", Some("shared"), 0);
        let new = resource("b", "churn", Some("shared"), 10);
        let other = resource("c", "churn", Some("elsewhere"), -10);
        let all = [old.clone(), new.clone(), other.clone()];
        assert_eq!(
            prefix_holder(&new, &all).map(ResourceExt::name_any),
            Some("churn".into())
        );
        assert_eq!(
            prefix_holder(&new, &all).and_then(|r| r.namespace()),
            Some("a".into())
        );
        assert!(
            prefix_holder(&old, &all).is_none(),
            "the holder is not refused"
        );
        assert!(prefix_holder(&other, &all).is_none());
    }

    #[test]
    fn a_default_prefix_can_collide_with_an_explicit_one() {
        // `ml/churn` is the default prefix of ml/churn, and any resource may name it.
        let default = resource("ml", "churn", None, 0);
        let explicit = resource("team", "scorer", Some("ml/churn"), 5);
        let all = [default.clone(), explicit.clone()];
        assert!(prefix_holder(&explicit, &all).is_some());
        assert!(prefix_holder(&default, &all).is_none());
    }

    #[test]
    fn ties_go_by_namespace_and_name_and_a_resource_never_conflicts_with_itself() {
        let a = resource("a", "x", Some("p"), 0);
        let b = resource("b", "x", Some("p"), 0);
        let all = [a.clone(), b.clone()];
        assert!(prefix_holder(&a, &all).is_none());
        assert!(prefix_holder(&b, &all).is_some());
        assert!(prefix_holder(&a, [&a]).is_none());
    }

    #[test]
    fn a_resource_being_deleted_holds_nothing() {
        let mut older = resource("a", "x", Some("p"), 0);
        let mut younger = resource("b", "x", Some("p"), 10);
        // The younger one going: the keys are the older one's (its cleanup keeps them).
        younger.metadata.deletion_timestamp = younger.metadata.creation_timestamp.clone();
        assert!(prefix_holder(&younger, [&older, &younger]).is_some());
        // The older one going: it holds nothing for the younger, which may start.
        younger.metadata.deletion_timestamp = None;
        older.metadata.deletion_timestamp = older.metadata.creation_timestamp.clone();
        assert!(prefix_holder(&younger, [&older, &younger]).is_none());
        assert!(prefix_holder(&older, [&older, &younger]).is_none());
    }
}
