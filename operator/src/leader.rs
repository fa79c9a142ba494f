//! Leader election on a `coordination.k8s.io` Lease, so two operator replicas are safe: one
//! reconciles, the other waits and takes over within one lease duration of the leader's
//! last renewal. Updates are conditional on the Lease's resourceVersion, so two candidates
//! can never both believe they won.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::error::Error;

/// Lease-based leader election for one identity.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

/// The result of one attempt to take or keep the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This identity holds the lease.
    Leading,
    /// Another live identity holds it.
    Following,
}

impl LeaderElection {
    /// Elects among replicas sharing the Lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
        }
    }

    /// How often a leader renews and a follower retries: a third of the lease.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// Waits until this identity leads.
    pub async fn acquire(&self) -> Result<(), Error> {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return Ok(());
                }
                Ok(Attempt::Following) if !announced => {
                    info!(lease = %self.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(Attempt::Following) => {}
                Err(error) => warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the lease until it is lost; returns when this identity no longer leads (or
    /// could not prove it still does within the lease duration).
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => last_renewal = tokio::time::Instant::now(),
                Ok(Attempt::Following) => {
                    warn!("the lease was taken over by another replica");
                    return;
                }
                Err(error) => {
                    warn!(%error, "renewing the lease failed");
                    if last_renewal.elapsed() >= self.lease_duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on shutdown), so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            warn!(%error, "could not release the lease");
        } else {
            info!("released the lease");
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<Attempt, Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::kube("reading the leader lease"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Following),
                Err(error) => Err(Error::kube("creating the leader lease")(error)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours && !lease_expired(spec, &now) {
            return Ok(Attempt::Following);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // `replace` carries the resourceVersion we read: a concurrent writer makes it 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Following),
            Err(error) => Err(Error::kube("renewing the leader lease")(error)),
        }
    }
}

/// Whether nobody holds `spec`, or its holder has not renewed within its duration.
fn lease_expired(spec: &LeaseSpec, now: &MicroTime) -> bool {
    let Some(holder) = spec.holder_identity.as_deref() else {
        return true;
    };
    if holder.is_empty() {
        return true;
    }
    let Some(renewed) = &spec.renew_time else {
        return true;
    };
    let duration =
        jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.0 + duration < now.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> (LeaseSpec, MicroTime) {
        let now = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        let spec = LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(
                now - jiff::SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        };
        (spec, MicroTime(now))
    }

    #[test]
    fn a_fresh_lease_is_held_and_a_stale_or_empty_one_is_free() {
        let (fresh, now) = spec(Some("a"), 5, 15);
        assert!(!lease_expired(&fresh, &now));
        let (stale, now) = spec(Some("a"), 16, 15);
        assert!(lease_expired(&stale, &now));
        let (released, now) = spec(None, 1, 15);
        assert!(lease_expired(&released, &now));
    }
}
