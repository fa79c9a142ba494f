//! The end-to-end story `make demo` narrates, asserted: the example's model and users in S3,
//! the operator, real scorer and batch processes started from the pod specs it rendered,
//! batch hits equal to the model's output, real-time misses, a fallback while Redis is
//! down, the autoscaler adding real scorers on a miss spike, and deletion cleaning Redis.
//! The story itself lives in `millrace_e2e::story`, shared with the demo.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use millrace_e2e::story::{Narrator, StoryOptions, run};
use millrace_e2e::{install_crd, with_temp_ns};
use support::OperatorProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_story_holds_end_to_end_with_real_processes() {
    let scorer = support::scorer_binary();
    with_temp_ns("story", |client, ns| async move {
        install_crd(&client).await.expect("CRD");
        let _operator = OperatorProcess::start(&ns, "story");
        let options = StoryOptions {
            namespace: ns.clone(),
            scorer_binary: scorer,
            users: 3000,
            // MILLRACE_STORY_VERBOSE=1 narrates the steps, as `make demo` does.
            narrator: if std::env::var_os("MILLRACE_STORY_VERBOSE").is_some() {
                Narrator::Print
            } else {
                Narrator::Quiet
            },
        };
        let report = run(&client, &options).await.unwrap_or_else(|e| {
            panic!("{e}\n(logs: $TMPDIR/millrace-kubelet-{ns}-*.log, $TMPDIR/millrace-operator-{ns}-story.log)")
        });
        assert_eq!(report.provider, "cpu", "no GPU here: cuda must fall back to cpu");
        let before = report.before_batch.as_ref().expect("an answer before the batch");
        assert_eq!(before.source, "realtime");
        assert!((0.0..=1.0).contains(&before.prediction));
        assert_eq!(report.batch_predictions, 3000, "every user scored once");
        assert!(report.batch_checked >= 20, "{report:?}");
        assert!(report.batch_max_error < 1e-6, "{report:?}");
        let down = report.redis_down.as_ref().expect("an answer with Redis down");
        assert!(down.degraded.iter().any(|d| d.contains("redis")), "{down:?}");
        assert!(report.scaled.1 > report.scaled.0, "{report:?}");
        // Within two sync periods (2 s) of the first traffic window that shows the spike
        // (windows close every 5 s), plus slack for a loaded machine.
        assert!(
            report.scale_up_after <= std::time::Duration::from_secs(2 * 2 + 5 + 3),
            "scale-up took {:?}",
            report.scale_up_after
        );
        assert!(report.scorers_running as i32 >= report.scaled.1, "{report:?}");
        assert!(
            !report.scorer_nodes.is_empty()
                && report.scorer_nodes.iter().all(|n| n.ends_with("(pool gpu)")),
            "scorers must land on the GPU pool: {:?}",
            report.scorer_nodes
        );
        assert!(report.refused.contains("maxStaleness"), "{}", report.refused);
        assert!(report.keys_before_delete > 0, "{report:?}");
        assert_eq!(report.keys_after_delete, 0, "deletion leaves no keys");
        assert_eq!(report.online_features_after_delete, 3000, "and touches nothing else");
    })
    .await;
}
