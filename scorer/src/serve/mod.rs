//! `millrace-scorer serve`: the online path. Loads the config the operator renders and the
//! model, warms the model up, then answers on HTTP until SIGTERM, draining in-flight
//! requests before it exits.

pub mod activity;
pub mod batcher;
pub mod breaker;
pub mod chain;
pub mod features;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod oip;
pub mod remote;
pub mod settings;
pub mod singleflight;
pub mod store;
pub mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use millrace_crds::spec::duration;
use tracing::{info, warn};

use crate::job::{JobArgs, JobError};
use crate::model::{Model, ModelError, SessionOptions};
use activity::ActivitySampler;
use batcher::{BatchPolicy, MicroBatcher};
use breaker::BreakerPolicy;
use chain::{Engine, Scorer};
use http::AppState;
use metrics::Metrics;
use remote::{RemoteCompute, RemotePolicy};
use settings::{RequestLimits, ServeSettings};
use store::RedisTier;
use traffic::TrafficCounter;

/// `serve`'s flags. The config file carries everything the resource declares; these are
/// the pod's own facts and limits.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The config, Redis and model.
    #[command(flatten)]
    pub job: JobArgs,
    /// `unified`: one pod does everything. In `serving.topology: split`, `cache` answers
    /// from memory and Redis and forwards misses to `--compute-url` (no model, no GPU);
    /// `compute` is a unified scorer that the cache tier calls (it publishes no traffic
    /// windows: its load is the cache tier's misses, already counted there).
    #[arg(long, env = "MILLRACE_ROLE", value_enum, default_value_t = Role::Unified)]
    pub role: Role,
    /// The compute tier's base URL (`http://{name}-compute`), for `--role cache`.
    #[arg(long, env = "MILLRACE_COMPUTE_URL", required_if_eq("role", "cache"))]
    pub compute_url: Option<String>,
    /// Listen here instead of `0.0.0.0:<serving.port>`.
    #[arg(long, env = "MILLRACE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// This pod's name, under which it publishes its traffic windows.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How often hit/miss counts are published to Redis for the autoscaler.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub traffic_window: Duration,
    /// How often the serving batch generation is re-read.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub generation_refresh: Duration,
    /// Count one request in this many for the activity sample `warm` reads (0: off).
    #[arg(long, default_value_t = 16)]
    pub activity_sample_every: u64,
    /// Most distinct entities sampled per traffic window.
    #[arg(long, default_value_t = 10_000)]
    pub activity_max_ids: usize,
    /// Most ids in one batchGet.
    #[arg(long, default_value_t = RequestLimits::default().max_ids_per_batch)]
    pub max_ids_per_batch: usize,
    /// Most rows in one v2 infer tensor.
    #[arg(long, default_value_t = RequestLimits::default().max_infer_rows)]
    pub max_infer_rows: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = RequestLimits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Inference jobs that may wait; beyond this, misses fall to the default at once.
    #[arg(long, default_value_t = 4096)]
    pub inference_queue: usize,
    /// Consecutive Redis failures that open the circuit.
    #[arg(long, default_value_t = BreakerPolicy::default().failure_threshold)]
    pub breaker_failures: u32,
    /// How long the circuit stays open before a probe.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub breaker_open_for: Duration,
    /// Longest wait for in-flight requests on shutdown.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    duration::parse(value).map_err(|e| e.to_string())
}

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config or the model could not be loaded.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The model could not be warmed up.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The listener or the inference thread could not start.
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
}

/// What this scorer pod is in its topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Cache and model in one pod.
    Unified,
    /// The split topology's CPU cache tier.
    Cache,
    /// The split topology's GPU compute tier.
    Compute,
}

/// Runs the online path until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let config = args.job.load_config()?;
    let settings =
        ServeSettings::from_config(&config).map_err(|e| args.job.config_error(e.to_string()))?;

    let metrics = Arc::new(Metrics::default());
    metrics.set_latency_budget(settings.latency_budget);
    // The cache tier loads no model: its misses go to the compute tier.
    let (engine, model, inference_thread) = match (args.role, &args.compute_url) {
        (Role::Cache, Some(url)) => {
            info!(compute = %url, "cache tier: misses go to the compute tier");
            let remote = RemoteCompute::start(
                url,
                RemotePolicy {
                    max_rows: settings.max_batch_rows,
                    max_delay: settings.max_batch_delay,
                    queue: args.inference_queue,
                    in_flight: 32,
                },
            );
            (Engine::Remote(remote), None, None)
        }
        _ => {
            let model_path = args.job.model_path(&config);
            let model = Arc::new(
                args.job
                    .load_model(
                        &config,
                        SessionOptions {
                            intra_op_threads: Some(1),
                            memory_arena: false,
                        },
                    )
                    .map_err(JobError::from)?,
            );
            warm_up(&model, settings.max_batch_rows)?;
            let provider = format!("{:?}", model.provider()).to_lowercase();
            metrics.model_loaded(&settings.model_version, &provider);
            info!(version = %settings.model_version, %provider, model = %model_path.display(), role = ?args.role, "model loaded and warmed up");
            let (batcher, thread) = MicroBatcher::start(
                Arc::clone(&model),
                BatchPolicy {
                    max_rows: settings.max_batch_rows,
                    max_delay: settings.max_batch_delay,
                    queue: args.inference_queue,
                },
                Arc::clone(&metrics),
            )?;
            (Engine::Local(batcher), Some(model), Some(thread))
        }
    };
    let redis = Arc::new(RedisTier::new(
        args.job.redis_url.clone(),
        settings.redis_cluster,
        settings.keyspace.clone(),
        BreakerPolicy {
            failure_threshold: args.breaker_failures.max(1),
            open_for: args.breaker_open_for,
        },
        Arc::clone(&metrics),
    ));
    let traffic = Arc::new(TrafficCounter::default());
    let activity = Arc::new(ActivitySampler::new(
        args.activity_sample_every,
        args.activity_max_ids,
    ));
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], settings.port)));
    let limits = RequestLimits {
        max_ids_per_batch: args.max_ids_per_batch,
        max_infer_rows: args.max_infer_rows,
        max_body_bytes: args.max_body_bytes,
    };
    let state = Arc::new(AppState {
        scorer: Scorer::new(
            settings,
            Arc::clone(&redis),
            engine,
            Arc::clone(&metrics),
            Arc::clone(&traffic),
            Arc::clone(&activity),
        ),
        model,
        metrics,
        limits,
        ready: AtomicBool::new(false),
    });

    if let Err(e) = redis.refresh_generation().await {
        warn!(error = %e, "cannot read the serving generation yet; serving without batch predictions until Redis answers");
    }
    let background = tokio::spawn(background_loops(
        Arc::clone(&redis),
        Arc::clone(&traffic),
        Arc::clone(&activity),
        pod_name(&args),
        args.generation_refresh,
        // The compute tier's requests are the cache tier's misses, counted there.
        (args.role != Role::Compute).then_some(args.traffic_window),
    ));

    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(addr = %listener.local_addr()?, "serving");
    state.ready.store(true, Ordering::Relaxed);
    let app = http::router(Arc::clone(&state));
    let shutdown_state = Arc::clone(&state);
    let (drain_started, drain_started_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        shutdown_state.ready.store(false, Ordering::Relaxed);
        info!("shutting down: no new connections, draining in-flight requests");
        let _ = drain_started.send(());
    });
    let drain_timeout = args.drain_timeout;
    tokio::select! {
        result = server => result?,
        () = async {
            let _ = drain_started_rx.await;
            tokio::time::sleep(drain_timeout).await;
        } => warn!(?drain_timeout, "drain timed out; exiting with requests in flight"),
    }

    background.abort();
    let pod = pod_name(&args);
    if let Err(e) = redis.remove_traffic(&pod).await {
        warn!(error = %e, "cannot remove this pod's traffic record; it expires on its own");
    }
    drop(state);
    // The inference thread ends once the last batcher handle is gone.
    if let Some(thread) = inference_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    info!("stopped");
    Ok(())
}

/// Runs the model on a fill row, once alone and once as a full batch, so the first real
/// request does not pay for ONNX Runtime's lazy allocations.
fn warm_up(model: &Model, max_batch_rows: usize) -> Result<(), ModelError> {
    let row = vec![0.0f32; model.features()];
    model.predict(&row)?;
    model.predict(&row.repeat(max_batch_rows.max(1)))?;
    Ok(())
}

fn pod_name(args: &ServeArgs) -> String {
    args.pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("scorer-{}", std::process::id()))
}

/// Re-reads the serving generation and publishes traffic windows, forever.
async fn background_loops(
    redis: Arc<RedisTier>,
    traffic: Arc<TrafficCounter>,
    activity: Arc<ActivitySampler>,
    pod: String,
    refresh: Duration,
    window: Option<Duration>,
) {
    let generations = {
        let redis = Arc::clone(&redis);
        async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = redis.refresh_generation().await;
            }
        }
    };
    let windows = async move {
        let Some(window) = window else {
            return std::future::pending::<()>().await;
        };
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let closed = traffic.close_window(window);
            // Kept for a few windows: the autoscaler tells stale records by their end time.
            if let Err(e) = redis.publish_traffic(&pod, closed, window * 6).await {
                warn!(error = %e, "cannot publish the traffic window");
            }
            let sampled = activity.drain();
            if !sampled.is_empty()
                && let Err(e) = redis.record_activity(&sampled).await
            {
                warn!(error = %e, "cannot record the activity sample");
            }
        }
    };
    tokio::join!(generations, windows);
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
