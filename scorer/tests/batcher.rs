//! The micro-batcher on a real model with the real ONNX Runtime library: a batch waits for
//! requests announced as on their way (and shares its run with them), stops waiting for one
//! dropped without a job, and a lone job with nobody announced runs at once rather than
//! waiting out `max_delay`.
//!
//! Needs ORT_DYLIB_PATH (`eval "$(scripts/env.sh)"`, as `make test` does) and the project
//! venv (`scripts/setup.sh`).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_crds::spec::ExecutionProvider;
use millrace_scorer::model::Model;
use millrace_scorer::serve::batcher::{BatchPolicy, InferError, MicroBatcher};
use millrace_scorer::serve::metrics::Metrics;

const FEATURES: usize = 4;

/// ONNX runs the batcher has made, from its metrics.
fn runs(metrics: &Metrics) -> f64 {
    let exposition = metrics.encode().expect("encode");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix("millrace_scorer_microbatch_rows_count "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Queues `row` in the background; the answer and how long it took.
fn infer_timed(
    batcher: &MicroBatcher,
    row: &[f32],
    deadline: Instant,
) -> tokio::task::JoinHandle<(Result<Vec<f32>, InferError>, Duration)> {
    let (batcher, row) = (batcher.clone(), row.to_vec());
    tokio::spawn(async move {
        let started = Instant::now();
        let answer = batcher.infer(row, deadline).await;
        (answer, started.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_announced_requests_and_for_nobody_else() {
    let dir = tempfile::tempdir().expect("tmp");
    support::make_model(dir.path(), FEATURES, 1);
    let model = Arc::new(
        Model::load(
            &dir.path().join("model.onnx"),
            FEATURES,
            None,
            Some("y"),
            &[ExecutionProvider::Cpu],
        )
        .expect("load"),
    );
    let metrics = Arc::new(Metrics::default());
    let policy = BatchPolicy {
        max_rows: 64,
        max_delay: Duration::from_secs(2),
        queue: 16,
    };
    let (batcher, _thread) =
        MicroBatcher::start(Arc::clone(&model), policy, Arc::clone(&metrics)).expect("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (row_a, row_b, row_c) = (
        vec![0.1; FEATURES],
        vec![0.7; FEATURES],
        vec![-0.4; FEATURES],
    );

    // B announces itself (it is fetching its features) before A queues: A's batch waits for
    // B, then both share one run.
    let coming = batcher.expect();
    let first = infer_timed(&batcher, &row_a, deadline);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = batcher
        .infer_expected(coming, row_b.clone(), deadline)
        .await
        .expect("B");
    let (first, waited) = first.await.expect("join");
    let first = first.expect("A");
    assert!(
        waited >= Duration::from_millis(250),
        "A ran after {waited:?}, without waiting for B"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "A ran after {waited:?}: it waited out max_delay though B had arrived"
    );
    assert_eq!(runs(&metrics), 1.0, "A and B share one run");
    assert_eq!(first, model.predict(&row_a).expect("A alone"));
    assert_eq!(second, model.predict(&row_b).expect("B alone"));

    // Nobody announced: a lone job runs at once, not after max_delay.
    let started = Instant::now();
    let third = batcher.infer(row_c.clone(), deadline).await.expect("C");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "a lone job waited {waited:?} for company nobody announced"
    );
    assert_eq!(third, model.predict(&row_c).expect("C alone"));
    assert_eq!(runs(&metrics), 2.0);

    // An announced request answered without the model (a cache hit) stops being waited for
    // when it is dropped: the batch waiting only for it runs then, not after max_delay.
    let coming = batcher.expect();
    let waiting = infer_timed(&batcher, &row_a, deadline);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(coming);
    let (answer, waited) = waiting.await.expect("join");
    assert_eq!(
        answer.expect("A again"),
        model.predict(&row_a).expect("A alone")
    );
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(1500)).contains(&waited),
        "A ran after {waited:?}; its batch should have waited for the announced request and run once it was dropped"
    );
    assert_eq!(runs(&metrics), 3.0);
}
