//! `millrace-story`: the end-to-end story of `millrace_e2e::story`, narrated, for `make demo`.
//!
//! usage: millrace-story --namespace NS --scorer PATH [--users N]
//! Needs the local control plane (KUBECONFIG) and an operator watching NS.

use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use millrace_e2e::story::{Narrator, StoryOptions, run};

fn usage() -> ExitCode {
    eprintln!("usage: millrace-story --namespace NS --scorer PATH [--users N]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut namespace = None;
    let mut scorer = None;
    let mut users = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        match (flag.as_str(), value) {
            ("--namespace", Some(v)) => namespace = Some(v),
            ("--scorer", Some(v)) => scorer = Some(PathBuf::from(v)),
            ("--users", Some(v)) => match v.parse() {
                Ok(n) => users = n,
                Err(_) => return usage(),
            },
            _ => return usage(),
        }
    }
    let (Some(namespace), Some(scorer_binary)) = (namespace, scorer) else {
        return usage();
    };
    let client = match millrace_e2e::client().await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let wanted = millrace_e2e::from_json(serde_json::json!({"metadata": {"name": namespace}}));
    if let Err(error) = namespaces.create(&PostParams::default(), &wanted).await
        && !matches!(&error, kube::Error::Api(status) if status.code == 409)
    {
        eprintln!("cannot create namespace {namespace}: {error}");
        return ExitCode::FAILURE;
    }
    let options = StoryOptions {
        namespace,
        scorer_binary,
        users,
        narrator: Narrator::Print,
    };
    match run(&client, &options).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nthe story stopped: {error}");
            ExitCode::FAILURE
        }
    }
}
