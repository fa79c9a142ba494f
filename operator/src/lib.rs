//! The Millrace operator: reconciles `InferenceDeployment` resources into the batch
//! CronJob, the scorer Deployment, its Service, config and PodDisruptionBudget.
//!
//! The reconcile is a pipeline of one module per step: [`validate`] (pure) → [`build`]
//! (pure) → [`apply`] (server-side apply) → [`status`] (pure, from what was applied).

pub mod admin;
pub mod apply;
pub mod autoscale;
pub mod build;
pub mod claims;
pub mod cli;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod publish;
pub mod redis_store;
pub mod scaler;
pub mod simulate;
pub mod status;
pub mod validate;
