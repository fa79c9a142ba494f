//! The Helm chart on the local control plane: lint, render, a server-side dry-run of every
//! optional part against real schemas (the monitoring.coreos.com CRDs generated from the
//! Prometheus Operator's types), `helm install` then `helm upgrade` with a changed CRD, and
//! the operator running with nothing but the chart's RBAC (a ServiceAccount token), proven
//! least-privilege with `kubectl auth can-i`.
//!
//! The tests here share the cluster-wide CRD, so they run one at a time (a lock) and put the
//! CRD back as they found it.
//!
//! Needs `e2e/cluster up` (see the README's test command).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use millrace_crds::InferenceDeployment;
use millrace_e2e::net::free_port;
use millrace_e2e::redis_server::RedisServer;
use millrace_e2e::{wait_deleted, wait_for, with_temp_ns};
use serde_json::{Value, json};
use support::{apply_until_ready, example, http_get};

const CRD_NAME: &str = "inferencedeployments.millrace.dev";

/// One chart test at a time: they install and upgrade the one cluster-wide CRD.
static CLUSTER_CRD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("charts/millrace")
}

/// Runs `program args`, returning stdout; panics with stderr when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Runs `program args` expecting failure; returns stderr.
fn run_failing(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        !output.status.success(),
        "{program} {} succeeded but should have failed",
        args.join(" ")
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The directory of the generated monitoring.coreos.com CRDs (see build-tools.sh).
fn monitoring_crds() -> PathBuf {
    let script = root().join("e2e/scripts/versions.sh");
    let dir = run(
        "bash",
        &[
            "-c",
            &format!("source {} && echo $MONITORING_DIR", script.display()),
        ],
    );
    PathBuf::from(dir.trim()).join("crds")
}

fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn the_chart_lints_and_every_optional_part_passes_a_server_side_dry_run() {
    let _one = CLUSTER_CRD.lock().await;
    let full = s(&chart().join("ci/full-values.yaml"));
    run("helm", &["lint", "--strict", &s(&chart())]);
    run("helm", &["lint", "--strict", &s(&chart()), "-f", &full]);

    // A misspelt or mistyped value is refused by values.schema.json, naming it; a
    // combination that cannot work is refused by the templates, saying why.
    for (values, named) in [
        ("replicaCont=2", "replicaCont"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "replicaCount=2,leaderElection.enabled=false",
            "leaderElection",
        ),
    ] {
        let error = run_failing("helm", &["template", "r", &s(&chart()), "--set", values]);
        assert!(error.contains(named), "--set {values}: {error}");
    }

    // The real ServiceMonitor and PrometheusRule schemas.
    let crds = monitoring_crds();
    for kind in ["servicemonitors", "prometheusrules"] {
        let file = crds.join(format!("monitoring.coreos.com_{kind}.yaml"));
        run(
            "kubectl",
            &[
                "apply",
                "--server-side",
                "--field-manager=millrace-e2e",
                "-f",
                &s(&file),
            ],
        );
        run(
            "kubectl",
            &[
                "wait",
                "--for=condition=Established",
                &format!("crd/{kind}.monitoring.coreos.com"),
                "--timeout=60s",
            ],
        );
    }

    with_temp_ns("chart-dry-run", |_client, ns| async move {
        for values in [None, Some(full.as_str())] {
            let mut args = vec!["template", "dry", "--namespace", &ns];
            if let Some(values) = values {
                args.extend(["-f", values]);
            }
            let chart = s(&chart());
            args.push(&chart);
            let rendered = run("helm", &args);
            let file = std::env::temp_dir().join(format!("millrace-chart-{ns}.yaml"));
            std::fs::write(&file, &rendered).expect("write the rendered chart");
            let applied = run(
                "kubectl",
                &[
                    "apply",
                    "--server-side",
                    "--dry-run=server",
                    "--field-manager=millrace-e2e",
                    "--force-conflicts",
                    "-f",
                    &s(&file),
                ],
            );
            let expected: &[&str] = match values {
                None => &[
                    "serviceaccount/dry-millrace",
                    "customresourcedefinition.apiextensions.k8s.io/inferencedeployments.millrace.dev",
                    "clusterrole.rbac.authorization.k8s.io/dry-millrace",
                    "role.rbac.authorization.k8s.io/dry-millrace-leader-election",
                    "deployment.apps/dry-millrace",
                    "service/dry-millrace-metrics",
                ],
                Some(_) => &[
                    "servicemonitor.monitoring.coreos.com/dry-millrace-operator",
                    "servicemonitor.monitoring.coreos.com/dry-millrace-scorers",
                    "prometheusrule.monitoring.coreos.com/dry-millrace",
                    "networkpolicy.networking.k8s.io/dry-millrace",
                    "configmap/dry-millrace-dashboard",
                ],
            };
            for object in expected {
                assert!(
                    applied.contains(&format!("{object} serverside-applied (server dry run)")),
                    "{object} missing from:\n{applied}"
                );
            }
        }
    })
    .await;
}

/// A kubeconfig for the local API server that authenticates with `token` only.
fn token_kubeconfig(token: &str, name: &str) -> PathBuf {
    let admin: Value = serde_json::from_str(&run(
        "kubectl",
        &["config", "view", "--raw", "--minify", "-o", "json"],
    ))
    .expect("kubeconfig JSON");
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "chart-sa", "user": {"token": token}}],
        "contexts": [{"name": "chart", "context": {"cluster": "local", "user": "chart-sa"}}],
        "current-context": "chart",
    });
    let path = std::env::temp_dir().join(format!("millrace-kubeconfig-{name}.json"));
    std::fs::write(&path, config.to_string()).expect("write the kubeconfig");
    path
}

/// `kubectl auth can-i` for the chart's ServiceAccount.
fn can_i(service_account: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let output = Command::new("kubectl")
        .args([
            "auth",
            "can-i",
            verb,
            resource,
            "--as",
            service_account,
            "-n",
            namespace,
        ])
        .output()
        .expect("run kubectl auth can-i");
    String::from_utf8_lossy(&output.stdout).trim() == "yes"
}

/// Every (resource, verb) the ServiceAccount holds in `namespace`, from `can-i --list`,
/// less what every authenticated user holds (self reviews, discovery).
fn granted(service_account: &str, namespace: &str) -> Vec<(String, String)> {
    let table = run(
        "kubectl",
        &[
            "auth",
            "can-i",
            "--list",
            "--as",
            service_account,
            "-n",
            namespace,
        ],
    );
    let mut grants = Vec::new();
    for line in table.lines().skip(1) {
        // Resources  Non-Resource URLs  Resource Names  Verbs
        let Some(open) = line.find('[') else { continue };
        let resource = line.split_whitespace().next().unwrap_or_default();
        if resource.starts_with('[') || resource.starts_with("self") {
            continue; // a non-resource URL, or a self review every user may make
        }
        let verbs = line[line.rfind('[').unwrap_or(open)..]
            .trim_matches(|c| c == '[' || c == ']' || c == ' ');
        for verb in verbs.split_whitespace() {
            grants.push((resource.to_string(), verb.to_string()));
        }
    }
    grants
}

#[tokio::test]
async fn the_operator_reconciles_with_only_the_charts_rbac_and_helm_upgrade_updates_the_crd() {
    let _one = CLUSTER_CRD.lock().await;
    with_temp_ns("chart", |client, ns| async move {
        let release = "e2e";
        let fullname = "e2e-millrace";
        let chart_dir = s(&chart());
        // --take-ownership: earlier tests applied the CRD without Helm's labels.
        run(
            "helm",
            &[
                "install",
                release,
                &chart_dir,
                "--namespace",
                &ns,
                "--take-ownership",
                "--wait",
                "--timeout",
                "90s",
            ],
        );

        // Least privilege, proven by the API server's own authorizer.
        let sa = format!("system:serviceaccount:{ns}:{fullname}");
        for (verb, resource) in [
            ("patch", "inferencedeployments.millrace.dev"),
            ("patch", "inferencedeployments.millrace.dev/status"),
            ("patch", "deployments.apps"),
            ("patch", "deployments.apps/scale"),
            ("create", "jobs.batch"),
            ("delete", "cronjobs.batch"),
            ("get", "secrets"),
            ("create", "events.events.k8s.io"),
        ] {
            assert!(
                can_i(&sa, verb, resource, "default"),
                "cannot {verb} {resource}"
            );
        }
        for (verb, resource, namespace) in [
            ("list", "secrets", "default"),
            ("watch", "secrets", "default"),
            ("delete", "deployments.apps", "default"),
            ("update", "deployments.apps", "default"),
            ("delete", "inferencedeployments.millrace.dev", "default"),
            ("create", "pods", "default"),
            ("delete", "pods", "default"),
            ("get", "nodes", "default"),
            ("create", "serviceaccounts/token", "default"),
            ("escalate", "clusterroles", "default"),
            ("bind", "clusterroles", "default"),
            (
                "create",
                "rolebindings.rbac.authorization.k8s.io",
                "default",
            ),
            (
                "delete",
                "customresourcedefinitions.apiextensions.k8s.io",
                "default",
            ),
            ("update", "leases.coordination.k8s.io", "default"),
            ("get", "leases.coordination.k8s.io", "kube-system"),
            ("*", "*", "default"),
        ] {
            assert!(
                !can_i(&sa, verb, resource, namespace),
                "the chart grants {verb} {resource} in {namespace}"
            );
        }
        let allowed: Vec<(&str, &[&str])> = vec![
            (
                "inferencedeployments.millrace.dev",
                &["get", "list", "watch", "patch"],
            ),
            ("inferencedeployments.millrace.dev/status", &["patch"]),
            (
                "deployments.apps",
                &["get", "list", "watch", "create", "patch"],
            ),
            ("deployments.apps/scale", &["get", "patch"]),
            ("services", &["get", "list", "watch", "create", "patch"]),
            ("configmaps", &["get", "list", "watch", "create", "patch"]),
            ("secrets", &["get"]),
            (
                "poddisruptionbudgets.policy",
                &["get", "list", "watch", "create", "patch"],
            ),
            (
                "cronjobs.batch",
                &["get", "list", "watch", "create", "patch", "delete"],
            ),
            ("jobs.batch", &["get", "list", "watch", "create"]),
            (
                "horizontalpodautoscalers.autoscaling",
                &["get", "list", "watch", "create", "patch", "delete"],
            ),
            ("events.events.k8s.io", &["create", "patch"]),
            (
                "customresourcedefinitions.apiextensions.k8s.io",
                &["get", "list", "watch"],
            ),
            ("leases.coordination.k8s.io", &["create", "get", "update"]),
        ];
        for (resource, verb) in granted(&sa, &ns) {
            assert!(
                allowed
                    .iter()
                    .any(|(r, verbs)| *r == resource && verbs.contains(&verb.as_str())),
                "the chart grants {verb} on {resource}, which the operator does not need"
            );
        }

        // The operator as the chart runs it: the installed Deployment's environment, the
        // ServiceAccount's token as its only credential.
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let installed = deployments
            .get(fullname)
            .await
            .expect("the operator Deployment");
        let container = &installed
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("a pod spec")
            .containers[0];
        let token = run(
            "kubectl",
            &["create", "token", fullname, "-n", &ns, "--duration", "1h"],
        );
        let kubeconfig = token_kubeconfig(token.trim(), &ns);
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_millrace-operator"));
        for var in container.env.iter().flatten() {
            if let Some(value) = &var.value {
                command.env(&var.name, value);
            }
        }
        let log = std::env::temp_dir().join(format!("millrace-operator-chart-{ns}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        command
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", "e2e-millrace-0")
            .env("POD_NAMESPACE", &ns)
            // Loopback instead of the pod's 0.0.0.0:8081, and only this test's namespace:
            // a ClusterRole covers a namespaced watch too.
            .env("MILLRACE_ADMIN_ADDR", format!("127.0.0.1:{port}"))
            .env("MILLRACE_WATCH_NAMESPACE", &ns)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file);
        let mut operator =
            support::OperatorProcess::from_child(command.spawn().expect("start the operator"));
        eprintln!("operator logs to {}", log.display());

        let redis = RedisServer::start();
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &ns);
        let resource = apply_until_ready(&api, &example(&redis.url(), json!({}))).await;
        assert_eq!(resource.name_any(), "churn");
        // A run-batch request makes the operator create a Job (jobs: create).
        api.patch(
            "churn",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"millrace.dev/run-batch": "chart-1"}}}),
            ),
        )
        .await
        .expect("annotate");
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
        wait_for(
            &jobs,
            kube::runtime::watcher::Config::default()
                .labels("millrace.dev/inference-deployment=churn"),
            "a batch Job from the run-batch annotation",
            |_: &Job| true,
        )
        .await
        .expect("the operator creates the Job");
        // Deletion runs the finalizer (patch on the resource) through the chart's RBAC.
        api.delete("churn", &DeleteParams::default())
            .await
            .expect("delete");
        wait_deleted(&api, "churn", "the resource after its finalizer")
            .await
            .expect("the finalizer is released");
        let (code, metrics) = http_get(port, "/metrics").expect("the operator serves metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("millrace_operator_leader 1"), "{metrics}");
        let stopped = operator.terminate();
        assert!(stopped.success(), "the operator exited with {stopped}");
        let logged = std::fs::read_to_string(&log).expect("operator log");
        assert!(
            !logged.contains("forbidden") && !logged.contains("Forbidden"),
            "the operator hit RBAC denials:\n{logged}"
        );

        // helm upgrade with a changed CRD updates the CRD on the server.
        let changed = std::env::temp_dir().join(format!("millrace-chart-{ns}"));
        copy_dir(&chart(), &changed);
        let crd_file = changed.join("files/crds/inferencedeployments.millrace.dev.yaml");
        let text = std::fs::read_to_string(&crd_file).expect("the chart's CRD");
        let (header, body) = text.split_once('\n').expect("a header line");
        let mut crd: Value = serde_yaml_ng::from_str(body).expect("CRD YAML");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["e2eUpgradeProbe"] =
            json!({"type": "string", "description": "Added by the chart upgrade test."});
        let body = serde_yaml_ng::to_string(&crd).expect("serialize");
        std::fs::write(&crd_file, format!("{header}\n{body}")).expect("write the CRD");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let has_probe = |crd: &CustomResourceDefinition| {
            serde_json::to_value(&crd.spec.versions[0].schema)
                .ok()
                .and_then(|schema| {
                    schema
                        .pointer("/openAPIV3Schema/properties/spec/properties/e2eUpgradeProbe")
                        .cloned()
                })
                .is_some()
        };
        assert!(!has_probe(&crds.get(CRD_NAME).await.expect("the CRD")));
        run(
            "helm",
            &["upgrade", release, &s(&changed), "--namespace", &ns],
        );
        assert!(
            has_probe(&crds.get(CRD_NAME).await.expect("the CRD")),
            "helm upgrade did not update the CRD"
        );
        // Back to the chart as committed, then uninstall: the CRD stays (crds.keep).
        run(
            "helm",
            &["upgrade", release, &chart_dir, "--namespace", &ns],
        );
        assert!(!has_probe(&crds.get(CRD_NAME).await.expect("the CRD")));
        run(
            "helm",
            &["uninstall", release, "--namespace", &ns, "--wait"],
        );
        assert!(
            crds.get_opt(CRD_NAME).await.expect("get the CRD").is_some(),
            "uninstall deleted the CRD (and with it every InferenceDeployment)"
        );
        let left = deployments
            .list(&ListParams::default())
            .await
            .expect("list");
        assert!(
            left.items.is_empty(),
            "uninstall left the operator Deployment"
        );
        let _ = std::fs::remove_dir_all(&changed);
    })
    .await;
}

#[tokio::test]
async fn a_namespace_scoped_install_grants_nothing_outside_its_namespace() {
    let _one = CLUSTER_CRD.lock().await;
    with_temp_ns("chart-scoped", |_client, ns| async move {
        run(
            "helm",
            &[
                "install",
                "scoped",
                &s(&chart()),
                "--namespace",
                &ns,
                "--take-ownership",
                "--set",
                &format!("watchNamespace={ns}"),
            ],
        );
        let sa = format!("system:serviceaccount:{ns}:scoped-millrace");
        assert!(can_i(
            &sa,
            "watch",
            "inferencedeployments.millrace.dev",
            &ns
        ));
        assert!(can_i(&sa, "patch", "deployments.apps", &ns));
        for namespace in ["default", "kube-system"] {
            for (verb, resource) in [
                ("watch", "inferencedeployments.millrace.dev"),
                ("patch", "deployments.apps"),
                ("get", "secrets"),
            ] {
                assert!(
                    !can_i(&sa, verb, resource, namespace),
                    "a namespace-scoped install grants {verb} {resource} in {namespace}"
                );
            }
        }
        run(
            "helm",
            &["uninstall", "scoped", "--namespace", &ns, "--wait"],
        );
    })
    .await;
}

/// Copies a directory tree (the chart) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the chart") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}
