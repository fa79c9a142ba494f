//! The split topology's cache tier sends its misses to the compute tier: micro-batched into
//! one `POST /v1/predictions:batchGet` per batch (at most `max_rows` ids, or `max_delay`
//! after the first), several batches in flight, each bounded by its requests' deadlines.
//!
//! The compute tier is an ordinary scorer (`--role compute`) behind its own Service: it reads
//! the online features, runs the model and writes the prediction back to Redis, so the cache
//! tier only remembers the answer in memory. When the compute tier is cold (scaled to zero:
//! no endpoints, connection refused) or slow, the call fails fast and the cache tier's chain
//! falls back to a stale batch prediction or the default, marked `compute_unavailable`, while
//! its traffic windows (these requests are misses) wake the compute tier up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How to batch and bound the calls.
#[derive(Debug, Clone, Copy)]
pub struct RemotePolicy {
    /// Most ids in one call.
    pub max_rows: usize,
    /// How long the first id waits for more.
    pub max_delay: Duration,
    /// Requests waiting to be batched before new ones are refused at once.
    pub queue: usize,
    /// Calls in flight at once.
    pub in_flight: usize,
}

/// A computed answer from the compute tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemoteAnswer {
    /// The prediction.
    pub value: f32,
    /// When it was computed (ms since the epoch).
    pub computed_at_ms: u64,
    /// The compute tier filled in missing features (served, never cached here).
    pub degraded: bool,
}

/// Why the compute tier gave no computed answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    /// Unreachable (no endpoints while scaled to zero), refused, or failed.
    #[error("the compute tier is unavailable: {0}")]
    Unavailable(String),
    /// The deadline passed first.
    #[error("the compute tier did not answer in time")]
    Timeout,
    /// Too many misses already wait.
    #[error("too many misses already wait for the compute tier")]
    Overloaded,
    /// It answered, but with a fallback rather than a computation.
    #[error("the compute tier could not compute: {0}")]
    NotComputed(String),
}

struct Job {
    id: String,
    features: HashMap<String, f32>,
    deadline: Instant,
    reply: oneshot::Sender<Result<RemoteAnswer, RemoteError>>,
}

/// A handle to the compute tier; cheap to clone.
#[derive(Clone)]
pub struct RemoteCompute {
    jobs: mpsc::Sender<Job>,
}

#[derive(Serialize)]
struct BatchGet<'a> {
    ids: Vec<&'a str>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    features: HashMap<&'a str, &'a HashMap<String, f32>>,
}

#[derive(Deserialize)]
struct BatchGetReply {
    predictions: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    id: String,
    prediction: Option<f32>,
    source: Option<String>,
    age_ms: Option<u64>,
    #[serde(default)]
    degraded: Vec<String>,
    error: Option<String>,
}

impl RemoteCompute {
    /// Starts the batching task for the compute tier at `base_url` (`http://host:port`).
    pub fn start(base_url: &str, policy: RemotePolicy) -> Self {
        let (jobs, queue) = mpsc::channel(policy.queue.max(1));
        let url = format!("{}/v1/predictions:batchGet", base_url.trim_end_matches('/'));
        tokio::spawn(collect(queue, url, policy));
        Self { jobs }
    }

    /// The compute tier's answer for `id`, by `deadline`.
    pub async fn score(
        &self,
        id: &str,
        features: &HashMap<String, f32>,
        deadline: Instant,
    ) -> Result<RemoteAnswer, RemoteError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id: id.to_string(),
            features: features.clone(),
            deadline,
            reply,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RemoteError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                RemoteError::Unavailable("the batching task stopped".into())
            }
        })?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RemoteError::Unavailable("the call was dropped".into())),
            Err(_) => Err(RemoteError::Timeout),
        }
    }
}

/// Gathers jobs into batches and sends each as one call.
async fn collect(mut queue: mpsc::Receiver<Job>, url: String, policy: RemotePolicy) {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(200))
        .pool_max_idle_per_host(policy.in_flight)
        .build()
        .unwrap_or_default();
    let calls = Arc::new(Semaphore::new(policy.in_flight.max(1)));
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let until = Instant::now() + policy.max_delay;
        let mut batch = vec![first];
        while batch.len() < policy.max_rows.max(1) {
            match tokio::time::timeout_at(until.into(), queue.recv()).await {
                Ok(Some(job)) => {
                    // One id per call: a second request for it (with its own features)
                    // goes in the next batch.
                    if batch.iter().any(|j| j.id == job.id) {
                        carried = Some(job);
                        break;
                    }
                    batch.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(permit) = Arc::clone(&calls).acquire_owned().await else {
            return;
        };
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            call(&client, &url, batch).await;
            drop(permit);
        });
    }
}

/// Sends one batch and answers each of its jobs.
async fn call(client: &reqwest::Client, url: &str, batch: Vec<Job>) {
    let deadline = batch
        .iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let body = BatchGet {
        ids: batch.iter().map(|j| j.id.as_str()).collect(),
        features: batch
            .iter()
            .filter(|j| !j.features.is_empty())
            .map(|j| (j.id.as_str(), &j.features))
            .collect(),
    };
    let result = send(client, url, &body, deadline).await;
    let now = millrace_crds::keys::now_ms();
    match result {
        Ok(reply) => {
            let mut by_id: HashMap<String, Item> = reply
                .predictions
                .into_iter()
                .map(|i| (i.id.clone(), i))
                .collect();
            for job in batch {
                let answer = match by_id.remove(&job.id) {
                    Some(item) => interpret(item, now),
                    None => Err(RemoteError::NotComputed("no answer for this id".into())),
                };
                let _ = job.reply.send(answer);
            }
        }
        Err(error) => {
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &BatchGet<'_>,
    deadline: Instant,
) -> Result<BatchGetReply, RemoteError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    if timeout.is_zero() {
        return Err(RemoteError::Timeout);
    }
    let json = serde_json::to_vec(body).map_err(|e| RemoteError::Unavailable(e.to_string()))?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(json)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                RemoteError::Timeout
            } else {
                RemoteError::Unavailable(e.to_string())
            }
        })?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| RemoteError::Unavailable(e.to_string()))?;
    if !status.is_success() {
        return Err(RemoteError::Unavailable(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| RemoteError::Unavailable(e.to_string()))
}

/// A computed or cached prediction counts; the compute tier's own fallbacks do not (the
/// cache tier falls back itself, stale batch first).
fn interpret(item: Item, now_ms: u64) -> Result<RemoteAnswer, RemoteError> {
    match (item.prediction, item.source.as_deref()) {
        (Some(value), Some(source)) if source != "default" => Ok(RemoteAnswer {
            value,
            computed_at_ms: now_ms.saturating_sub(item.age_ms.unwrap_or(0)),
            degraded: !item.degraded.is_empty(),
        }),
        _ => {
            Err(RemoteError::NotComputed(item.error.unwrap_or_else(|| {
                format!("answered from {:?}", item.source)
            })))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(source: &str, degraded: &[&str]) -> Item {
        Item {
            id: "u".into(),
            prediction: Some(0.25),
            source: Some(source.into()),
            age_ms: Some(40),
            degraded: degraded.iter().map(|s| s.to_string()).collect(),
            error: None,
        }
    }

    #[test]
    fn computed_and_cached_answers_count_and_fallbacks_do_not() {
        let answer = interpret(item("realtime", &[]), 1_000).expect("computed");
        assert_eq!(
            (answer.value, answer.computed_at_ms, answer.degraded),
            (0.25, 960, false)
        );
        assert!(interpret(item("batch", &[]), 1_000).is_ok());
        assert!(
            interpret(item("realtime", &["missing_features"]), 1_000).is_ok_and(|a| a.degraded)
        );
        assert!(matches!(
            interpret(item("default", &["model_error"]), 1_000),
            Err(RemoteError::NotComputed(_))
        ));
        let unanswered = Item {
            prediction: None,
            source: None,
            error: Some("no model".into()),
            ..item("realtime", &[])
        };
        assert_eq!(
            interpret(unanswered, 1_000),
            Err(RemoteError::NotComputed("no model".into()))
        );
    }
}
