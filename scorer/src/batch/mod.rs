//! `millrace-scorer batch`: one shard of a batch precompute. It scores its share of the
//! offline feature table and writes every prediction under the run's generation with the
//! batch TTL; only when all of them are in Redis does it record the shard as done. The
//! operator publishes the generation (flips the serving pointer) once every shard is done,
//! so a failed or partial run is never served.
//!
//! **Incremental** (`batch.incremental`): every batch value carries a fingerprint of the
//! features it was scored on. An incremental run reads the published generation's values,
//! scores only the entities whose fingerprint changed (or that are new), and updates that
//! generation **in place**; unchanged entities are not touched at all, which is what makes
//! it cheap. When all shards are done it records its own name as an alias of the updated
//! generation, so publishing it (the operator flips the pointer as for any run) changes
//! nothing for scorers. The trade-offs, by design: each prediction is replaced atomically,
//! but a failed incremental run leaves a mix of new and previous predictions (each valid);
//! every bucket of the updated generation gets the batch TTL again when the run starts, so
//! carried predictions live as long as written ones (and scorers count their staleness from
//! the run's start). An entity gone from the input loses its prediction when the run's last
//! shard is done ([`removal`]); where that cannot be worked out cheaply (the table laid out
//! anew, an index missing) it is served until the next rebuild, a full run once the
//! published generation is `batch.rebuildAfter` old. Whether a run is full or
//! incremental is decided once, by its first shard ([`plan`]); with nothing published yet
//! (or a published generation written by an older release) it is a full one. Unchanged rows
//! are found through a per-row-group fingerprint index ([`index`]) rather than one read per
//! entity, and a row group whose raw bytes did not change ([`digest`]) is not decoded at
//! all. A bucket the run finds absent (evicted or expired) has its entities scored again,
//! each shard those of its own row groups ([`repair`]), since the index would otherwise
//! vouch for predictions that are no longer there.
//!
//! **Layout.** Predictions live in hash buckets ([`millrace_crds::keys::BatchLayout`]); a
//! full run sizes them from the whole input's row count, which every shard reads from the
//! footers, and records the count under the generation (a shard that computes another count
//! fails: the input changed during the run). An incremental run keeps its base's layout.
//!
//! **Retries.** Each shard counts its attempts under the generation. Only a full run's first
//! attempt writes blind, expecting every field to be new; a retried shard (or a rerun of the
//! same generation) reads each field before replacing it, so its own earlier predictions
//! compare equal instead of passing for duplicates.
//!
//! Run by the operator's Indexed Job: the generation is the Job's name
//! (`MILLRACE_GENERATION`), the shard count `MILLRACE_SHARDS`, the shard index Kubernetes'
//! `JOB_COMPLETION_INDEX`.

pub mod budget;
pub mod convert;
pub mod decode;
pub mod digest;
pub mod index;
pub mod input;
pub mod plan;
pub mod progress;
pub mod removal;
pub mod repair;
pub mod scoring;
pub mod shard;
pub mod sizing;
pub mod writer;

use std::sync::Arc;

use clap::Args;
use millrace_crds::keys::{BatchLayout, Keyspace, RunPlan, bucket_count, now_ms};
use millrace_crds::spec::duration;
use tracing::{info, warn};

use crate::job::{JobArgs, JobError};
use crate::model::{Model, ModelError, SessionOptions};
use budget::Budget;
use convert::ConvertError;
use input::{Input, InputError};
use progress::Progress;
use scoring::{IndexPlace, Scoring};
use writer::PredictionWriter;

/// Rows per ONNX run and Redis pipeline when the config has no batch section.
const DEFAULT_BATCH_SIZE: usize = 4096;

/// `batch`'s flags.
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// The config, Redis and model.
    #[command(flatten)]
    pub job: JobArgs,
    /// The generation this run writes (the Job's name).
    #[arg(long, env = "MILLRACE_GENERATION")]
    pub generation: String,
    /// Shards of the run (default: the config's `batch.shards`).
    #[arg(long, env = "MILLRACE_SHARDS")]
    pub shards: Option<usize>,
    /// This shard's index, 0-based.
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    pub shard_index: usize,
    /// Read this URI instead of the config's `features.offline.uri`.
    #[arg(long, env = "MILLRACE_INPUT")]
    pub input: Option<String>,
    /// Write windows (pipelines of up to 64Ki predictions) in flight while the next batch
    /// is scored. Two keep Redis busy (one being answered, one queued); more only hold memory.
    #[arg(long, default_value_t = 2)]
    pub writes_in_flight: usize,
    /// ONNX Runtime threads per inference (0: one per core). One by default: batches are
    /// large enough to keep one core busy, and the others go to decoding, encoding and Redis.
    #[arg(long, default_value_t = 1)]
    pub inference_threads: usize,
    /// Row groups read and decoded at once, each by its own task. Default: 2 from a local
    /// file system, where decoding is the work and two keep two cores busy; from an object
    /// store as many as fit in 128 MiB of row groups (2 to 8), since there each read mostly
    /// waits on the store (simulated 20 ms and 80 MB/s a request: 1.6 s with 2, 0.5 s with 8).
    #[arg(long)]
    pub decoders: Option<usize>,
    /// Row groups whose columns read (compressed) exceed this many MiB are streamed to
    /// `--spool-dir` and decoded from there page by page, so memory does not grow with row
    /// group size (pandas and pyarrow write a million rows to a row group); smaller ones are
    /// read into memory whole. 0 spools every row group.
    #[arg(long, default_value_t = 64)]
    pub max_group_mib: u64,
    /// Where row groups too large for memory are spooled (anonymous files, gone with the
    /// process; at most one row group per decoder at a time, within `batch.scratchBytes`
    /// when set: `spec.batch.scratchSize`). Default: the temporary
    /// directory (the pod's `/tmp` volume).
    #[arg(long, env = "MILLRACE_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
    /// Memory the decoders share (`256Mi`, `1Gi`: bytes with an optional suffix): each
    /// reserves what decoding its row group holds, estimated from the footer (every column's
    /// dictionary and one page, and the group itself if it is held in memory), and waits
    /// while the others hold the rest; a row group needing more than all of it is decoded
    /// alone. Default: a third of the container's memory limit, or 256Mi without one.
    #[arg(long, env = "MILLRACE_DECODE_MEMORY", value_parser = parse_quantity)]
    pub decode_memory: Option<u64>,
    /// Entities gone from their row groups the last shard of an incremental run sorts out
    /// at most (about 24 bytes of memory each). Past it (the table laid out anew, rather than
    /// entities deleted) they are dropped: those really gone stay until the rebuild.
    #[arg(long, default_value_t = removal::MAX_CANDIDATES)]
    pub max_removal_candidates: usize,
}

/// A byte quantity flag (`192Mi`, `1Gi`, `500M`, `1048576`).
fn parse_quantity(text: &str) -> Result<u64, String> {
    millrace_crds::spec::quantity_bytes(text).ok_or_else(|| {
        format!("{text:?} is not a size: an integer with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T")
    })
}

/// Why a shard failed. The shard is then not recorded as done, and the run is not published.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The config or the model could not be loaded.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The shard index is out of range.
    #[error("shard index {index} is not below the shard count {shards}")]
    Shard {
        /// The index.
        index: usize,
        /// The count.
        shards: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The input is unreadable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The input's data is bad.
    #[error(transparent)]
    Data(#[from] ConvertError),
    /// The input holds an entity twice with different predictions.
    #[error(
        "{file}: row group {row_group}: entity {id:?} appears more than once in the input with different features (its predictions differ); refusing to pick one"
    )]
    Duplicate {
        /// The entity.
        id: String,
        /// The file of the second occurrence.
        file: String,
        /// Its row group.
        row_group: usize,
    },
    /// The input holds an entity twice, among these (the write saw a field of their bucket
    /// taken but cannot say which).
    #[error(
        "{file}: row group {row_group}: one of the entities {ids:?}{} appears more than once in the input (or another process writes this generation); refusing to pick one",
        if *more > 0 { format!(" (and {more} more of the same bucket)") } else { String::new() }
    )]
    DuplicateAmong {
        /// The candidates.
        ids: Vec<String>,
        /// Candidates not listed.
        more: usize,
        /// The file of a row written with them.
        file: String,
        /// Its row group.
        row_group: usize,
    },
    /// Shards of one run computed different bucket counts: the input changed during the run.
    #[error(
        "generation {generation} has {recorded} buckets but this shard computed {computed} from the input: did the input change while the run was going? Rerun under a new generation"
    )]
    Layout {
        /// The generation.
        generation: String,
        /// The count another shard recorded.
        recorded: u32,
        /// This shard's count.
        computed: u32,
    },
    /// A row group too large for memory is also too large for the spool space.
    #[error(
        "row group {row_group} of {file} needs {needed} bytes of local disk to be spooled (it is too large for memory), more than batch.scratchSize allows at once ({limit} bytes): raise spec.batch.scratchSize, or write the table with smaller row groups"
    )]
    Scratch {
        /// The file.
        file: String,
        /// The row group.
        row_group: usize,
        /// Its columns' bytes, compressed.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// The run's recorded plan cannot be followed.
    #[error(
        "the plan of generation {generation} cannot be followed: {problem}; rerun under a new generation"
    )]
    Plan {
        /// The run's generation.
        generation: String,
        /// What is wrong.
        problem: String,
    },
    /// Redis failed.
    #[error("redis ({during}): {source}")]
    Redis {
        /// What was being done.
        during: &'static str,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
}

/// What a shard did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Rows read.
    pub rows: u64,
    /// Predictions written.
    pub written: u64,
    /// Rows scored with a filled feature.
    pub filled: u64,
    /// Rows skipped for a missing feature.
    pub skipped: u64,
    /// Predictions an incremental run withdrew from the generation it updated: those of
    /// entities now skipped for a missing feature.
    pub withdrawn: u64,
    /// Predictions of entities gone from the input that an incremental run's last shard
    /// removed from the generation it updated.
    pub removed: u64,
    /// Predictions an incremental run's last shard wrote again because their bucket was
    /// absent (evicted or expired) when the run refreshed its TTL.
    pub repaired: u64,
    /// Entities whose features had not changed, so their prediction was kept (incremental).
    pub carried: u64,
    /// Row groups an incremental run found unchanged (the file still the version its index
    /// was read from, or the same content digest), and carried whole without decoding them.
    pub unread_groups: u64,
    /// Bytes read from the input store.
    pub bytes_read: u64,
    /// Row groups too large for memory, read through a spool file on local disk.
    pub spooled_groups: u64,
    /// The most bytes spooled at once (what `batch.scratchSize` must allow).
    pub spool_peak_bytes: u64,
    /// The most decoding memory reserved at once, as estimated (what `--decode-memory`
    /// would have to allow for no decoder to wait).
    pub decode_peak_bytes: u64,
    /// The most row groups decoded at once.
    pub decode_peak_groups: u64,
    /// Seconds taken.
    pub seconds: f64,
}

/// The last shard's sweep of an incremental run: removes the predictions of entities gone
/// from the input from `base` and says what it did; returns how many it removed.
async fn sweep(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    base: &str,
    layout: &BatchLayout,
    row_groups: &[Vec<u64>],
    max_candidates: usize,
) -> Result<u64, BatchError> {
    let swept = removal::sweep(writer, keyspace, base, layout, row_groups, max_candidates)
        .await
        .map_err(redis("removing entities gone from the input"))?;
    match swept {
        removal::Sweep::Done {
            candidates,
            removed,
        } => {
            if candidates > 0 {
                info!(
                    candidates,
                    removed, "removed the predictions of entities gone from the input"
                );
            }
            Ok(removed)
        }
        removal::Sweep::Deferred { candidates, reason } => {
            warn!(
                candidates,
                reason, "entities gone from the input are not removed by this run"
            );
            Ok(0)
        }
    }
}

/// What a shard of an incremental run needs to score again the entities of buckets found
/// absent in its own row groups ([`repair`]).
struct Repair<'a> {
    writer: &'a Arc<PredictionWriter>,
    /// The set of absent buckets.
    key: &'a str,
    keyspace: &'a Keyspace,
    layout: &'a Arc<BatchLayout>,
    /// The shard's row groups.
    units: &'a [shard::Unit],
    model: &'a Arc<Model>,
    writes_in_flight: usize,
    computed_at_ms: u64,
}

impl Repair<'_> {
    /// Scores again, from `plan`'s input, every entity of the shard's row groups in a bucket
    /// recorded as absent; returns how many predictions it wrote. The record stays for the
    /// other shards: the run's last shard forgets it once every shard is done.
    async fn run(&self, mut plan: decode::DecodePlan, in_flight: usize) -> Result<u64, BatchError> {
        if self.units.is_empty() {
            return Ok(0); // every row group was decided knowing the absent buckets
        }
        let absent = repair::recorded(self.writer, self.key)
            .await
            .map_err(redis("reading the buckets found absent"))?;
        if absent.is_empty() {
            return Ok(0);
        }
        let table = repair::absent_table(&absent, self.layout.buckets());
        let units = repair::row_groups_to_repair(
            self.writer,
            self.keyspace,
            &plan.generation,
            self.layout,
            self.units.to_vec(),
            &table,
        )
        .await
        .map_err(redis("reading the fingerprint indexes"))?;
        if units.is_empty() {
            // Empty, not evicted (or their entities are in other shards' row groups).
            info!(
                buckets = absent.len(),
                "buckets of the updated generation were absent, and no entity of this shard's input is in one"
            );
            return Ok(0);
        }
        warn!(
            buckets = absent.len(),
            row_groups = units.len(),
            "buckets of the updated generation were absent (evicted or expired): scoring their entities in this shard's row groups again"
        );
        plan.known = None;
        plan.absent = None;
        plan.repair = Some(Arc::new(table));
        let index = IndexPlace {
            keyspace: self.keyspace.clone(),
            generation: plan.generation.clone(),
        };
        let mut decoded = decode::start(plan, units, in_flight);
        let mut scoring = Scoring::new(
            Arc::clone(self.model),
            Arc::clone(self.writer),
            self.writes_in_flight,
            self.computed_at_ms,
            index,
            Arc::clone(self.layout),
            false,
        );
        while let Some(message) = decoded.recv().await {
            match message? {
                decode::Decoded::Batch(batch) => scoring.push(batch).await?,
                decode::Decoded::GroupDone { group, index, .. } => {
                    scoring.group_done(group, index)?
                }
                decode::Decoded::Unchanged { .. } => {}
            }
        }
        scoring.finish().await?;
        info!(
            predictions = scoring.written,
            "scored again the entities of the absent buckets in row groups decided before the refresh was done"
        );
        Ok(scoring.written)
    }
}

/// Says in the log what the run does and why.
fn log_plan(settled: &plan::Settled, rebuild_after: &str) {
    use plan::Reason;
    let published = settled.published.as_deref().unwrap_or_default();
    match (&settled.plan, &settled.reason) {
        (RunPlan::Update { base, .. }, None | Some(Reason::Incremental)) => {
            info!(%base, "incremental: updating the published generation in place; unchanged entities are carried")
        }
        (RunPlan::Full { .. }, None) => info!("a full run, as the run's first shard decided"),
        (RunPlan::Full { .. }, Some(Reason::NotIncremental)) => {}
        (RunPlan::Full { .. }, Some(Reason::NothingPublished)) => {
            info!("incremental: nothing is published yet, so this is a full run")
        }
        (RunPlan::Full { .. }, Some(Reason::NoBucketCount)) => warn!(
            %published,
            "the published generation records no bucket count (an older release wrote it, or it expired): this incremental run is a full one"
        ),
        (RunPlan::Full { .. }, Some(Reason::NoFullRunStart)) => warn!(
            %published,
            "the published generation records no start of its full run (an older release wrote it, or it expired): this incremental run is a full one"
        ),
        (RunPlan::Full { .. }, Some(Reason::Rebuild { age })) => info!(
            %published, age_hours = format!("{:.1}", age.as_secs_f64() / 3600.0), rebuild_after,
            "incremental: the published generation's full run is older than batch.rebuildAfter, so this run scores every entity into a new generation (entities gone from the input stop being served)"
        ),
        // `plan::decide` never pairs these.
        (RunPlan::Full { .. }, Some(Reason::Incremental)) | (RunPlan::Update { .. }, Some(_)) => {}
    }
}

/// Turns a Redis error met `during` something into the shard's error.
fn redis(during: &'static str) -> impl FnOnce(redis::RedisError) -> BatchError {
    move |source| BatchError::Redis { during, source }
}

/// Records `buckets` as `generation`'s bucket count, or checks it against the count an
/// earlier shard recorded (every shard computes it from the same input). `SET … NX`, then a
/// `GET` only when it was taken (`NX` with `GET` in one command needs Redis 7).
async fn record_buckets(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    buckets: u32,
    ttl_ms: u64,
) -> Result<(), BatchError> {
    let key = keyspace.bucket_count_key(generation);
    let mut set = redis::cmd("SET");
    set.arg(&key).arg(buckets).arg("PX").arg(ttl_ms).arg("NX");
    let written: Option<String> = writer
        .command(&key, &set)
        .await
        .map_err(redis("recording the generation's bucket count"))?;
    if written.is_some() {
        return Ok(());
    }
    match plan::recorded_buckets(writer, keyspace, generation).await? {
        Some(recorded) if recorded != buckets => Err(BatchError::Layout {
            generation: generation.to_string(),
            recorded,
            computed: buckets,
        }),
        _ => Ok(()),
    }
}

/// Counts this attempt of the shard: 1 for the first, more for a retried pod or a rerun.
async fn count_attempt(
    writer: &PredictionWriter,
    keyspace: &Keyspace,
    generation: &str,
    shard: usize,
    ttl_ms: u64,
) -> Result<i64, BatchError> {
    let key = keyspace.shard_attempts(generation);
    let mut count = redis::cmd("EVAL");
    count
        .arg("local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1); redis.call('PEXPIRE', KEYS[1], ARGV[2]); return n")
        .arg(1)
        .arg(&key)
        .arg(shard)
        .arg(ttl_ms);
    writer
        .command(&key, &count)
        .await
        .map_err(redis("counting the shard's attempts"))
}

/// Runs one shard.
pub async fn run(args: BatchArgs) -> Result<Summary, BatchError> {
    let config_error = |message: String| BatchError::Job(args.job.config_error(message));
    let config = args.job.load_config()?;
    let offline = config.features.offline.as_ref();
    let uri = match (&args.input, offline) {
        (Some(uri), _) => uri.clone(),
        (None, Some(offline)) => offline.uri.clone(),
        (None, None) => {
            return Err(config_error(
                "features.offline is required for a batch run".into(),
            ));
        }
    };
    let id_column = offline
        .map_or("entity_id", |o| o.id_column.as_str())
        .to_string();
    let batch_size = config
        .batch
        .as_ref()
        .map_or(DEFAULT_BATCH_SIZE, |b| b.batch_size.max(1) as usize);
    let shards = args
        .shards
        .or(config.batch.as_ref().map(|b| b.shards.max(1) as usize))
        .unwrap_or(1);
    if args.shard_index >= shards {
        return Err(BatchError::Shard {
            index: args.shard_index,
            shards,
        });
    }
    let ttl = duration::parse(&config.cache.batch_ttl)
        .map_err(|e| config_error(format!("cache.batchTTL: {e}")))?;
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let keyspace = config.keyspace();

    // The model loads (tens of milliseconds) while the input is listed and decoding starts.
    let loading = {
        let (job, config) = (args.job.clone(), config.clone());
        let options = SessionOptions {
            intra_op_threads: (args.inference_threads > 0).then_some(args.inference_threads),
            memory_arena: true,
        };
        tokio::task::spawn_blocking(move || job.load_model(&config, options))
    };

    let input = Input::open(&uri).await?;
    let mut columns: Vec<&str> = vec![id_column.as_str()];
    columns.extend(config.model.inputs.iter().map(String::as_str));
    input.check_columns(&columns)?;
    let row_groups = input.row_groups();
    let all_rows: u64 = row_groups.iter().flatten().sum();
    let units = shard::assign(&row_groups, shards, args.shard_index);
    let total: u64 = units.iter().map(|u| u.rows).sum();
    let in_flight = match args.decoders {
        Some(decoders) => decoders.max(1),
        None => {
            let mut largest = 0;
            for unit in &units {
                largest = largest.max(input.chunk_bytes(unit, &columns)?);
            }
            decode::row_groups_in_flight(input.remote, largest)
        }
    };
    let max_group_bytes = args.max_group_mib.saturating_mul(1 << 20);
    let scratch = Budget::new(config.batch.as_ref().and_then(|b| b.scratch_bytes));
    let memory = Budget::new(Some(sizing::decode_budget(
        args.decode_memory,
        sizing::container_memory_limit(),
    )));
    let record_batch_rows = sizing::rows_per_batch(batch_size, config.model.inputs.len());
    if let Some(limit) = scratch.limit() {
        for unit in &units {
            let needed = input.chunk_bytes(unit, &columns)?;
            if needed > max_group_bytes && !scratch.fits(needed) {
                return Err(BatchError::Scratch {
                    file: input.files[unit.file].uri.clone(),
                    row_group: unit.row_group,
                    needed,
                    limit,
                });
            }
        }
    }
    info!(
        generation = %args.generation, shard = args.shard_index, shards, files = input.files.len(),
        row_groups = units.len(), rows = total, input_rows = all_rows, row_groups_in_flight = in_flight,
        decode_memory_bytes = memory.limit().unwrap_or(0), record_batch_rows,
        %uri, "scoring this shard"
    );

    let writer = Arc::new(
        PredictionWriter::connect(&args.job.redis_url, config.cache.redis_cluster, ttl_ms)
            .await
            .map_err(redis("connecting"))?,
    );
    let computed_at_ms = now_ms();
    let incremental = config.batch.as_ref().is_some_and(|b| b.incremental);
    let rebuild_after = match &config.batch {
        Some(batch) => duration::parse(&batch.rebuild_after)
            .map_err(|e| config_error(format!("batch.rebuildAfter: {e}")))?,
        None => std::time::Duration::ZERO,
    };
    // An incremental run's decoders read and keep each row group's fingerprint index on a
    // connection of their own, opened while the run is planned. On the writes' connection
    // each of those round trips queued behind a window's pipeline of up to 64Ki `HSET`s, and
    // the decoder waited with it: in a timeline of a 10% run both decoders sat idle for
    // 10-28 ms at a time, and decoding ended 30-60 ms later than on a connection of its own.
    let index_connection = async {
        if !incremental {
            return Ok(None);
        }
        PredictionWriter::connect(&args.job.redis_url, config.cache.redis_cluster, ttl_ms)
            .await
            .map(Some)
            .map_err(redis("connecting for the fingerprint indexes"))
    };
    // Full or incremental, and which generation an incremental run updates: decided by the
    // run's first shard, followed by the others (plan module docs).
    let (planned, index_connection) = tokio::try_join!(
        plan::settle(
            &writer,
            &keyspace,
            &args.generation,
            incremental,
            rebuild_after,
            computed_at_ms,
            ttl_ms,
        ),
        index_connection,
    )?;
    log_plan(
        &planned,
        config
            .batch
            .as_ref()
            .map_or("", |b| b.rebuild_after.as_str()),
    );
    let (base, base_buckets) = match planned.base {
        Some(base) => (Some(base.generation), Some(base.buckets)),
        None => (None, None),
    };
    let target = base.clone().unwrap_or_else(|| args.generation.clone());
    let buckets = match base_buckets {
        Some(buckets) => buckets,
        None => {
            let buckets = bucket_count(all_rows);
            record_buckets(&writer, &keyspace, &target, buckets, ttl_ms).await?;
            buckets
        }
    };
    let layout: Arc<BatchLayout> = Arc::new(keyspace.batch_layout(&target, buckets));
    let attempt = count_attempt(
        &writer,
        &keyspace,
        &args.generation,
        args.shard_index,
        ttl_ms,
    )
    .await?;
    // Only a full run's first attempt can expect every field to be new.
    let fresh = base.is_none() && attempt == 1;
    // An incremental run: the predictions it carries live as long as those it writes,
    // buckets found need no transaction for their TTL, and those absent are recorded for
    // every shard to repair in its row groups (done while decoding starts; the first write
    // waits for it).
    let absent_key = keyspace.absent_buckets(&target);
    // What the refresh found, for the decoders: rows they decide after it is known are
    // repaired inline, without the repair pass decoding their row group again.
    let absent_known: Arc<std::sync::OnceLock<Arc<Vec<bool>>>> = Arc::default();
    let adopting = base.is_some().then(|| {
        let (writer, layout) = (Arc::clone(&writer), Arc::clone(&layout));
        let known = Arc::clone(&absent_known);
        let keys = repair::RefreshKeys {
            absent: absent_key.clone(),
            refreshed: keyspace.buckets_refreshed(&args.generation),
            claim: keyspace.refresh_claim(&args.generation),
            holder: format!(
                "shard {} ({})",
                args.shard_index,
                std::env::var("HOSTNAME").unwrap_or_else(|_| "no HOSTNAME".into())
            ),
            claim_ms: repair::CLAIM_MS,
        };
        tokio::spawn(async move {
            let absent = repair::refresh(&writer, &layout, &keys).await?;
            let _ = known.set(Arc::new(repair::absent_table(&absent, layout.buckets())));
            Ok(absent)
        })
    });
    let mut progress = Progress::new(total);
    let (mut rows, mut filled, mut skipped) = (0u64, 0u64, 0u64);
    let (mut unread_groups, mut bytes_read, mut spooled_groups) = (0u64, 0u64, 0u64);
    let missing = config.features.missing.clone();

    let plan = decode::DecodePlan {
        input: Arc::new(input),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        id_column: id_column.clone(),
        inputs: config.model.inputs.clone(),
        missing,
        batch_size: record_batch_rows,
        keyspace: keyspace.clone(),
        generation: target.clone(),
        layout: Arc::clone(&layout),
        known: index_connection.filter(|_| base.is_some()).map(Arc::new),
        repair: None,
        absent: base.is_some().then_some(absent_known),
        digest_seed: digest::seed(&id_column, &config.model.inputs, &config.features.missing),
        ttl_ms,
        spool: decode::Spool {
            dir: args.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            max_group_bytes,
            scratch: Arc::clone(&scratch),
        },
        memory: Arc::clone(&memory),
    };
    // Kept for a repair pass (an incremental run that found buckets absent).
    let repair_plan = plan.clone();
    let own_units = units.clone();
    // Row groups decided before the refresh said which buckets are absent: the repair pass's.
    let mut unchecked: std::collections::HashSet<scoring::Group> = Default::default();
    let mut decoded = decode::start(plan, units, in_flight);
    let model = Arc::new(
        loading
            .await
            .map_err(|e| ModelError::Run(format!("the model loading task failed: {e}")))??,
    );
    let mut scoring = Scoring::new(
        Arc::clone(&model),
        Arc::clone(&writer),
        args.writes_in_flight,
        computed_at_ms,
        IndexPlace {
            keyspace: keyspace.clone(),
            generation: target.clone(),
        },
        Arc::clone(&layout),
        fresh,
    );
    if let Some(refresh) = adopting {
        scoring.after_ttl_refresh(refresh);
    }
    while let Some(message) = decoded.recv().await {
        match message? {
            decode::Decoded::Batch(batch) => {
                rows += batch.rows;
                filled += batch.filled;
                skipped += batch.skipped;
                progress.advance(batch.rows);
                scoring.push(batch).await?;
            }
            decode::Decoded::GroupDone {
                group,
                index,
                bytes_read: read,
                spooled,
                absent_checked,
            } => {
                bytes_read += read;
                spooled_groups += u64::from(spooled);
                if !absent_checked {
                    unchecked.insert(group);
                }
                scoring.group_done(group, index)?
            }
            decode::Decoded::Unchanged {
                group,
                absent_checked,
                rows: group_rows,
                scored,
                bytes_read: read,
                spooled,
            } => {
                if !absent_checked {
                    unchecked.insert(group);
                }
                bytes_read += read;
                spooled_groups += u64::from(spooled);
                rows += group_rows;
                skipped += group_rows - scored.min(group_rows);
                progress.advance(group_rows);
                scoring.carried += scored;
                scoring.settled += scored;
                unread_groups += 1;
            }
        }
    }
    scoring.finish().await?;
    // Repairs made inline are counted as repairs, not as computed predictions.
    let (written, mut carried, mut settled, withdrawn) = (
        scoring.written - scoring.repaired,
        scoring.carried,
        scoring.settled,
        scoring.withdrawn,
    );
    // An incremental run, before the shard can count as done: its row groups' entities in
    // buckets found absent that were decided before the refresh said which are absent are
    // scored again. Each was counted as carried (and settled by the index): it is not.
    let mut repaired = scoring.repaired;
    if base.is_some() {
        let late: Vec<shard::Unit> = own_units
            .iter()
            .filter(|unit| unchecked.contains(&(unit.file, unit.row_group)))
            .cloned()
            .collect();
        let repair = Repair {
            writer: &writer,
            key: &absent_key,
            keyspace: &keyspace,
            layout: &layout,
            units: &late,
            model: &model,
            writes_in_flight: args.writes_in_flight,
            computed_at_ms,
        };
        let late_repairs = repair.run(repair_plan, in_flight).await?;
        repaired += late_repairs;
        carried = carried.saturating_sub(late_repairs);
        settled = settled.saturating_sub(late_repairs);
    }
    if let Some(base) = &base {
        // The updated generation's records live as long as its predictions: its bucket
        // count, and the start of its full run (what `batch.rebuildAfter` is measured from).
        for key in [keyspace.bucket_count_key(base), keyspace.run_plan(base)] {
            let _: i64 = writer
                .command(&key, redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms))
                .await
                .map_err(redis("refreshing the TTL of carried predictions"))?;
        }
        // Publishing this run's name must lead scorers to the generation it updated.
        let alias = keyspace.alias(&args.generation);
        writer
            .set_with_ttl(&alias, base)
            .await
            .map_err(redis("recording the updated generation"))?;
    }
    progress.finish();
    // Written even when the shard drew nothing (more shards than row groups): the operator
    // counts shards, and an idle shard is a finished one. The last shard first removes what
    // the input no longer has (removal module docs), so the run is published with it.
    let done_key = keyspace.shards_done(&args.generation);
    let report_key = keyspace.run_report(&args.generation);
    let report = |removed: u64, repaired: u64| {
        let counts = [
            ("carried", carried),
            ("removed", removed),
            ("repaired", repaired),
        ];
        let (writer, key, shard) = (&writer, &report_key, args.shard_index);
        async move {
            removal::record_report(writer, key, shard, &counts)
                .await
                .map_err(redis("recording what the shard did"))
        }
    };
    // An incremental run's report, before the shard can count as done: the operator reads
    // it once all are.
    if base.is_some() {
        report(0, repaired).await?;
    }
    let last = removal::finish(
        &writer,
        &done_key,
        args.shard_index,
        shards,
        written,
        ttl_ms,
    )
    .await
    .map_err(redis("recording the shard as done"))?;
    let mut removed = 0;
    if last {
        match &base {
            Some(base) => {
                // Every other shard repaired its part before it counted as done, and this
                // one did too: the record of absent buckets has served.
                repair::clear(&writer, &absent_key)
                    .await
                    .map_err(redis("forgetting the buckets repaired"))?;
                removed = sweep(
                    &writer,
                    &keyspace,
                    base,
                    &layout,
                    &row_groups,
                    args.max_removal_candidates,
                )
                .await?;
            }
            None => {
                let listing = removal::listing(&row_groups);
                removal::record_listing(&writer, &keyspace, &target, &listing)
                    .await
                    .map_err(redis("recording the input's layout"))?
            }
        }
        if base.is_some() {
            report(removed, repaired).await?;
        }
        removal::record_done(&writer, &done_key, args.shard_index, written)
            .await
            .map_err(redis("recording the shard as done"))?;
    }
    let summary = Summary {
        rows,
        written,
        filled,
        skipped,
        withdrawn,
        removed,
        repaired,
        carried,
        unread_groups,
        bytes_read,
        spooled_groups,
        spool_peak_bytes: scratch.peak(),
        decode_peak_bytes: memory.peak(),
        decode_peak_groups: memory.peak_holders(),
        seconds: progress.elapsed().as_secs_f64(),
    };
    info!(
        generation = %args.generation, shard = args.shard_index, rows, computed = written, carried, settled_by_index = settled, unread_groups, bytes_read, spooled_groups, spool_peak_bytes = scratch.peak(), decode_peak_bytes = memory.peak(), decode_peak_groups = memory.peak_holders(), filled, skipped, withdrawn, removed, repaired,
        seconds = format!("{:.2}", summary.seconds), rows_per_second = progress.rate().round(),
        "shard done"
    );
    Ok(summary)
}
