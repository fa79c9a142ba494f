//! The operator's command line: every flag also reads an environment variable, so the
//! chart configures it with `env:` alone.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use crate::admin::{AdminState, serve};
use crate::build::BuildOptions;
use crate::controller::{Context, run};
use crate::leader::LeaderElection;
use crate::metrics::Metrics;

/// Reconciles millrace.dev InferenceDeployments.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The scorer image children run (serve, batch, warm, fetch-model).
    #[arg(long, env = "MILLRACE_SCORER_IMAGE", default_value = concat!("ghcr.io/millrace-dev/millrace-scorer:", env!("CARGO_PKG_VERSION")))]
    scorer_image: String,

    /// Pull policy of the scorer image (Always, IfNotPresent, Never); the cluster default when unset.
    #[arg(long, env = "MILLRACE_IMAGE_PULL_POLICY")]
    image_pull_policy: Option<String>,

    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(long, env = "MILLRACE_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    admin_addr: SocketAddr,

    /// Elect a leader through a Lease, so several replicas can run safely.
    #[arg(long, env = "MILLRACE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Namespace of the leader Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    /// Name of the leader Lease.
    #[arg(long, env = "MILLRACE_LEASE_NAME", default_value = "millrace-operator")]
    lease_name: String,

    /// How long a leader's lease lasts without renewal, in seconds.
    #[arg(long, env = "MILLRACE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,

    /// Watch only this namespace (a namespace-scoped install). Default: all namespaces.
    #[arg(long, env = "MILLRACE_WATCH_NAMESPACE")]
    namespace: Option<String>,

    /// How long, in seconds after a resource's deletion, an unreachable Redis may hold the
    /// deletion back before the keys are left to expire and the finalizer is released.
    #[arg(
        long,
        env = "MILLRACE_REDIS_CLEANUP_TIMEOUT_SECONDS",
        default_value_t = 300
    )]
    redis_cleanup_timeout_seconds: u64,

    /// Reconciles run at once, at most (0: no limit). A burst (a GitOps sync of hundreds of
    /// resources, or the operator's start) otherwise starts one reconcile per resource at
    /// once: every one holds its requests and responses in memory while the API server
    /// answers them in turn, and an API server on small nodes times some out.
    #[arg(
        long,
        env = "MILLRACE_MAX_CONCURRENT_RECONCILES",
        default_value_t = crate::controller::DEFAULT_MAX_CONCURRENT_RECONCILES
    )]
    max_concurrent_reconciles: u16,

    /// This replica's identity in the Lease and in events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the InferenceDeployment CRD as YAML.
    Crd,
}

impl Cli {
    /// Parses the command line and runs the operator; the whole of `main`.
    pub async fn parse_and_run() -> ExitCode {
        let cli = Cli::parse();
        if let Some(Command::Crd) = cli.command {
            return match millrace_crds::crd::crd_yaml() {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("cannot render the CRD: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
        match cli.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                error!("{message}");
                ExitCode::FAILURE
            }
        }
    }

    async fn run(self) -> Result<(), String> {
        let client = Client::try_default().await.map_err(|e| {
            format!("no Kubernetes client configuration (KUBECONFIG or in-cluster): {e}")
        })?;
        let identity = self.identity.clone().unwrap_or_else(default_identity);
        let metrics = Arc::new(Metrics::default());
        let admin = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind(self.admin_addr)
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {} for the admin server: {e}",
                    self.admin_addr
                )
            })?;
        let admin_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(serve(listener, admin.clone(), async {
            let _ = admin_stopped.await;
        }));
        info!(addr = %admin_addr, %identity, "admin server listening");

        wait_for_crd(&client).await;
        admin.ready.store(true, Ordering::Relaxed);

        let election = self.leader_election.then(|| {
            LeaderElection::new(
                client.clone(),
                &self.lease_namespace,
                &self.lease_name,
                &identity,
                Duration::from_secs(self.lease_seconds),
            )
        });
        if let Some(election) = &election {
            tokio::select! {
                result = election.acquire() => result.map_err(|e| e.to_string())?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        metrics.set_leader(true);

        let options = BuildOptions {
            scorer_image: self.scorer_image,
            image_pull_policy: self.image_pull_policy,
        };
        let ctx = Arc::new(Context::new(
            client,
            options,
            metrics.clone(),
            &identity,
            self.namespace.clone(),
            Duration::from_secs(self.redis_cleanup_timeout_seconds),
        ));
        let lost = match &election {
            Some(election) => tokio::select! {
                () = run(ctx, self.max_concurrent_reconciles) => false,
                () = election.hold() => true,
            },
            None => {
                run(ctx, self.max_concurrent_reconciles).await;
                false
            }
        };
        metrics.set_leader(false);
        if let Some(election) = &election
            && !lost
        {
            election.release().await;
        }
        let _ = stop_admin.send(());
        let _ = admin_task.await;
        if lost {
            // Never keep reconciling without the lease: exit and let the next start stand by.
            return Err("lost the leader lease; exiting".into());
        }
        info!("shut down");
        Ok(())
    }
}

/// Waits (logging, never exiting) until the CRD is established: installing the operator
/// before its CRD is a normal order of events in GitOps.
async fn wait_for_crd(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "inferencedeployments.millrace.dev";
    loop {
        match api.get_opt(name).await {
            Ok(Some(_)) => {
                if await_condition(api.clone(), name, conditions::is_crd_established())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            Ok(None) => info!(crd = name, "waiting for the CRD to be installed"),
            Err(error) => info!(%error, "waiting for the API server"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
