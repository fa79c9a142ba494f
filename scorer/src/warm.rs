//! `millrace-scorer warm`: compute and cache real-time predictions for the most active
//! entities, so the requests most likely to come next hit the cache.
//!
//! "Most active" is the activity sample the serving pods keep in Redis (see
//! [`crate::serve::activity`]): the top `--top` entities of the last `--hours` hours. An
//! entity that already has a fresh cached prediction (a real-time one, or a batch one
//! younger than `maxStaleness`) is left alone; the others are scored exactly as a miss
//! would be (online store, request-time features, the missing-feature policy), in batches,
//! and written with `realtimeTTL`. A summary says how many were computed, already cached or
//! skipped.

use std::collections::HashMap;
use std::sync::Arc;

use clap::Args;
use millrace_crds::keys::{CachedPrediction, now_ms};
use millrace_crds::spec::MissingFeaturePolicy;
use tracing::info;

use crate::job::{JobArgs, JobError};
use crate::model::{ModelError, SessionOptions};
use crate::serve::breaker::BreakerPolicy;
use crate::serve::metrics::Metrics;
use crate::serve::settings::ServeSettings;
use crate::serve::store::{RedisTier, TierError};

/// Entities looked up and scored together.
const CHUNK: usize = 512;

/// `warm`'s flags.
#[derive(Args, Debug, Clone)]
pub struct WarmArgs {
    /// The config, Redis and model.
    #[command(flatten)]
    pub job: JobArgs,
    /// How many of the most active entities to warm.
    #[arg(long, env = "MILLRACE_WARM_TOP", default_value_t = 10_000)]
    pub top: usize,
    /// How many recent hours of activity count.
    #[arg(long, default_value_t = 2)]
    pub hours: u64,
}

/// Why warming failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The config or the model could not be loaded.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] TierError),
}

/// What a warm run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmSummary {
    /// Entities considered.
    pub candidates: usize,
    /// Already had a fresh cached prediction.
    pub cached: usize,
    /// Scored and written.
    pub computed: usize,
    /// Not scored: a feature was missing under the fallback policy.
    pub skipped: usize,
}

/// Runs one warm pass.
pub async fn run(args: WarmArgs) -> Result<WarmSummary, WarmError> {
    let config = args.job.load_config()?;
    let settings =
        ServeSettings::from_config(&config).map_err(|e| args.job.config_error(e.to_string()))?;
    let model = args.job.load_model(
        &config,
        SessionOptions {
            intra_op_threads: Some(1),
            memory_arena: true,
        },
    )?;
    let redis = Arc::new(RedisTier::new(
        args.job.redis_url.clone(),
        settings.redis_cluster,
        settings.keyspace.clone(),
        BreakerPolicy {
            // A batch tool: fail on the first error rather than answer around it.
            failure_threshold: u32::MAX,
            ..BreakerPolicy::default()
        },
        Arc::new(Metrics::default()),
    ));
    redis.refresh_generation().await?;
    let ids = redis.most_active(args.hours, args.top).await?;
    let mut summary = WarmSummary {
        candidates: ids.len(),
        ..WarmSummary::default()
    };
    let call = std::time::Duration::from_secs(1);
    let plan = &settings.features;
    let none = HashMap::new();
    for chunk in ids.chunks(CHUNK) {
        let found = futures::future::join_all(chunk.iter().map(|id| redis.lookup(id, call))).await;
        let now = now_ms();
        let mut cold = Vec::new();
        for (id, found) in chunk.iter().zip(found) {
            let found = found?;
            let fresh_batch = found
                .batch_age(now)
                .is_some_and(|age| age <= settings.max_staleness);
            if found.realtime.is_some() || fresh_batch {
                summary.cached += 1;
            } else {
                cold.push(id.clone());
            }
        }
        let features = futures::future::join_all(cold.iter().map(|id| {
            let redis = Arc::clone(&redis);
            async move {
                match plan.online_key(id) {
                    Some(key) => {
                        redis
                            .online_features(&key, plan.online_fields(), call)
                            .await
                    }
                    None => Ok(Vec::new()),
                }
            }
        }))
        .await;
        let at = jiff::Timestamp::now();
        let mut scored_ids = Vec::new();
        let mut rows = Vec::new();
        for (id, online) in cold.iter().zip(features) {
            let assembled = plan.assemble(&none, &online?, at);
            if !assembled.missing.is_empty() && plan.policy() == MissingFeaturePolicy::Fallback {
                summary.skipped += 1;
                continue;
            }
            scored_ids.push(id.clone());
            rows.extend(assembled.row);
        }
        if scored_ids.is_empty() {
            continue;
        }
        let predictions = model.predict(&rows)?;
        let writes = scored_ids.iter().zip(&predictions).map(|(id, &value)| {
            let redis = Arc::clone(&redis);
            async move {
                redis
                    .store_realtime(id, CachedPrediction::now(value), settings.realtime_ttl)
                    .await
            }
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
        summary.computed += scored_ids.len();
    }
    info!(
        candidates = summary.candidates,
        computed = summary.computed,
        cached = summary.cached,
        skipped = summary.skipped,
        "warm done"
    );
    Ok(summary)
}
