//! What a batch run does: score every entity into its own generation (a full run), or update
//! the published generation in place (an incremental run). Decided once, by the first of the
//! run's shards to start, and recorded under the run's generation
//! ([`millrace_crds::keys::Keyspace::run_plan`]): every other shard, and every retry, reads
//! the record and does the same, even if the serving pointer moved in between (an operator
//! that publishes the previous run late must not split one run over two generations).
//!
//! An incremental run updates the published generation unless [`decide`] finds a reason not
//! to: nothing is published, the published generation records no bucket count or no
//! readable start of its full run (an older release wrote it, or the records expired), or
//! that full run is older than `batch.rebuildAfter`. The last is what bounds an incremental
//! deployment's staleness: incremental runs carry what did not change, and remove entities
//! gone from the input only where the fingerprint indexes tell ([`super::removal`]), so a
//! carried prediction would otherwise never be recomputed, nor an entity the removal had to
//! defer stop being served, for as long as runs keep its bucket alive.

use std::time::Duration;

use millrace_crds::keys::{Keyspace, RunPlan};

use super::writer::PredictionWriter;
use super::{BatchError, redis};

/// What the run found published when it decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The generation scorers read (an incremental run's alias followed).
    pub generation: String,
    /// Its bucket count, if recorded.
    pub buckets: Option<u32>,
    /// When its full run started, if recorded.
    pub full_run_started_ms: Option<u64>,
}

/// Why a run is full or incremental, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `batch.incremental` is off.
    NotIncremental,
    /// Nothing is published yet.
    NothingPublished,
    /// The published generation records no bucket count.
    NoBucketCount,
    /// The published generation records no start of its full run.
    NoFullRunStart,
    /// The published generation's full run is older than `rebuildAfter`.
    Rebuild {
        /// How old it is.
        age: Duration,
    },
    /// The published generation is updated in place.
    Incremental,
}

/// Decides a run's plan: pure, from what the run found (`published`) at `now_ms`.
/// `rebuild_after` zero never rebuilds.
pub fn decide(
    incremental: bool,
    published: Option<&Published>,
    rebuild_after: Duration,
    now_ms: u64,
) -> (RunPlan, Reason) {
    let full = RunPlan::Full { started_ms: now_ms };
    if !incremental {
        return (full, Reason::NotIncremental);
    }
    let Some(published) = published else {
        return (full, Reason::NothingPublished);
    };
    if published.buckets.is_none() {
        return (full, Reason::NoBucketCount);
    }
    let Some(started_ms) = published.full_run_started_ms else {
        return (full, Reason::NoFullRunStart);
    };
    let age = Duration::from_millis(now_ms.saturating_sub(started_ms));
    if !rebuild_after.is_zero() && age >= rebuild_after {
        return (full, Reason::Rebuild { age });
    }
    (
        RunPlan::Update {
            started_ms: now_ms,
            base: published.generation.clone(),
        },
        Reason::Incremental,
    )
}

/// The generation an incremental run updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// Its name.
    pub generation: String,
    /// Its bucket count.
    pub buckets: u32,
}

/// A run's plan as this shard found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The plan.
    pub plan: RunPlan,
    /// What an incremental run updates; `None` for a full run.
    pub base: Option<Base>,
    /// Why, when this shard made the decision; `None` when it followed another's record.
    pub reason: Option<Reason>,
    /// What was published when this shard decided.
    pub published: Option<String>,
}

/// The run's plan: the one recorded under `generation` if a shard already decided, else
/// this shard's decision, recorded (`SET … NX`; a shard that loses the race follows the
/// winner's record).
pub async fn settle(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    incremental: bool,
    rebuild_after: Duration,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Settled, BatchError> {
    let key = keyspace.run_plan(generation);
    if let Some(recorded) = recorded_plan(writer, keyspace, generation).await? {
        return follow(writer, keyspace, generation, recorded).await;
    }
    // A full run by configuration has no use for what is published.
    let published_now = if incremental {
        published_generation(writer, keyspace).await?
    } else {
        None
    };
    let published = match published_now {
        Some(generation) => Some(Published {
            buckets: recorded_buckets(writer, keyspace, &generation).await?,
            // Unreadable counts as unrecorded: the run rebuilds rather than fail.
            full_run_started_ms: match plan_text(writer, keyspace, &generation)
                .await?
                .as_deref()
                .and_then(RunPlan::parse)
            {
                Some(RunPlan::Full { started_ms }) => Some(started_ms),
                _ => None,
            },
            generation,
        }),
        None => None,
    };
    let (plan, reason) = decide(incremental, published.as_ref(), rebuild_after, now_ms);
    let mut set = redis::cmd("SET");
    set.arg(&key)
        .arg(plan.encode())
        .arg("PX")
        .arg(ttl_ms)
        .arg("NX");
    let taken: Option<String> = writer
        .command(&key, &set)
        .await
        .map_err(redis("recording the run's plan"))?;
    if taken.is_none() {
        // Another shard decided first: its record stands.
        if let Some(recorded) = recorded_plan(writer, keyspace, generation).await? {
            return follow(writer, keyspace, generation, recorded).await;
        }
    }
    let base = match &plan {
        RunPlan::Update { base, .. } => Some(Base {
            generation: base.clone(),
            // `decide` updates only a generation with a bucket count.
            buckets: published.as_ref().and_then(|p| p.buckets).ok_or_else(|| {
                BatchError::Plan {
                    generation: generation.to_string(),
                    problem: format!("generation {base} records no bucket count"),
                }
            })?,
        }),
        RunPlan::Full { .. } => None,
    };
    Ok(Settled {
        plan,
        base,
        reason: Some(reason),
        published: published.map(|p| p.generation),
    })
}

/// The plan another shard recorded, with what it needs: the base's bucket count.
async fn follow(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    plan: RunPlan,
) -> Result<Settled, BatchError> {
    let base = match &plan {
        RunPlan::Update { base, .. } => Some(Base {
            generation: base.clone(),
            buckets: recorded_buckets(writer, keyspace, base)
                .await?
                .ok_or_else(|| BatchError::Plan {
                    generation: generation.to_string(),
                    problem: format!(
                        "it updates generation {base}, which no longer records a bucket count (expired?)"
                    ),
                })?,
        }),
        RunPlan::Full { .. } => None,
    };
    Ok(Settled {
        plan,
        base,
        reason: None,
        published: None,
    })
}

/// The plan recorded under `generation`, if any; an unreadable record is an error (this
/// run's shards cannot agree on what they do without it).
async fn recorded_plan(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
) -> Result<Option<RunPlan>, BatchError> {
    let text = plan_text(writer, keyspace, generation).await?;
    text.map(|text| {
        RunPlan::parse(&text).ok_or_else(|| BatchError::Plan {
            generation: generation.to_string(),
            problem: format!("its recorded plan {text:?} is unreadable"),
        })
    })
    .transpose()
}

/// The text of `generation`'s plan record, if any.
async fn plan_text(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
) -> Result<Option<String>, BatchError> {
    get(
        writer,
        &keyspace.run_plan(generation),
        "reading a run's plan",
    )
    .await
}

/// The generation scorers read now (following an incremental run's alias), if any.
async fn published_generation(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
) -> Result<Option<String>, BatchError> {
    let during = "reading the published generation";
    let Some(published) = get::<String>(writer, &keyspace.serving_pointer(), during).await? else {
        return Ok(None);
    };
    let aliased = get(writer, &keyspace.alias(&published), during).await?;
    Ok(Some(aliased.unwrap_or(published)))
}

/// The bucket count `generation` recorded, if any.
pub async fn recorded_buckets(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
) -> Result<Option<u32>, BatchError> {
    let key = keyspace.bucket_count_key(generation);
    get(writer, &key, "reading the generation's bucket count").await
}

/// `GET key`, a failure reported as met `during` something.
async fn get<T: redis::FromRedisValue>(
    writer: &PredictionWriter,
    key: &str,
    during: &'static str,
) -> Result<Option<T>, BatchError> {
    writer
        .command(key, redis::cmd("GET").arg(key))
        .await
        .map_err(redis(during))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn published(buckets: Option<u32>, started_ms: Option<u64>) -> Published {
        Published {
            generation: "g1".into(),
            buckets,
            full_run_started_ms: started_ms,
        }
    }

    #[test]
    fn an_incremental_run_updates_the_published_generation_until_it_is_too_old() {
        let now = 1_000 * 3600 * 1000;
        let week = 168 * HOUR;
        let young = published(Some(64), Some(now - 167 * 3600 * 1000));
        assert_eq!(
            decide(true, Some(&young), week, now),
            (
                RunPlan::Update {
                    started_ms: now,
                    base: "g1".into()
                },
                Reason::Incremental
            )
        );
        let old = published(Some(64), Some(now - 168 * 3600 * 1000));
        assert_eq!(
            decide(true, Some(&old), week, now),
            (
                RunPlan::Full { started_ms: now },
                Reason::Rebuild { age: week }
            )
        );
        // Zero never rebuilds; a clock behind the record counts as no age at all.
        assert_eq!(
            decide(true, Some(&old), Duration::ZERO, now).1,
            Reason::Incremental
        );
        let ahead = published(Some(64), Some(now + 5_000));
        assert_eq!(decide(true, Some(&ahead), HOUR, now).1, Reason::Incremental);
    }

    #[test]
    fn a_run_is_full_when_there_is_nothing_it_could_update() {
        let now = 5_000;
        let full = RunPlan::Full { started_ms: now };
        let fine = published(Some(64), Some(now));
        assert_eq!(
            decide(false, Some(&fine), HOUR, now),
            (full.clone(), Reason::NotIncremental)
        );
        assert_eq!(
            decide(true, None, HOUR, now),
            (full.clone(), Reason::NothingPublished)
        );
        assert_eq!(
            decide(true, Some(&published(None, Some(now))), HOUR, now),
            (full.clone(), Reason::NoBucketCount)
        );
        assert_eq!(
            decide(true, Some(&published(Some(64), None)), HOUR, now),
            (full, Reason::NoFullRunStart)
        );
    }
}
