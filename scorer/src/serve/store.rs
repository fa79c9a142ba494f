//! The Redis tier: cached predictions (the serving batch generation's bucket field and the
//! real-time key in one round trip), the online feature store, real-time write-backs, the
//! serving pointer and the traffic windows the autoscaler reads.
//!
//! Every call goes through the circuit breaker and carries a deadline, so a Redis that is
//! down or slow costs a request at most its share of the latency budget, and nothing while
//! the circuit is open. The connection is made lazily and remade by `redis`' connection
//! manager (or cluster client), so the scorer starts and serves with Redis down and recovers
//! on its own when Redis returns.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use millrace_crds::keys::{BatchLayout, CachedPrediction, Keyspace, RunPlan};
use millrace_crds::traffic::TrafficWindow;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisError};
use tracing::{info, warn};

use super::breaker::{BreakerPolicy, CircuitBreaker, Transition};
use super::metrics::Metrics;

/// Longest any single Redis call may take, whatever budget is left.
const CALL_CEILING: Duration = Duration::from_secs(1);

/// ZINCRBY every (count, id) pair of ARGV[2..] into KEYS[1], then keep it ARGV[1] seconds.
const ACTIVITY_SCRIPT: &str = "for i = 2, #ARGV, 2 do redis.call('ZINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end \
     return redis.call('EXPIRE', KEYS[1], ARGV[1])";

/// Why the Redis tier gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The circuit is open: Redis was failing, so it was not called.
    #[error("redis circuit open")]
    CircuitOpen,
    /// The call did not finish in time.
    #[error("redis call timed out")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, RedisError> {
        let value = match self {
            Connection::Single(c) => c.req_packed_command(cmd).await?,
            Connection::Cluster(c) => c.req_packed_command(cmd).await?,
        };
        Ok(redis::from_redis_value(value)?)
    }

    /// `GET realtime` and, when there is one, `HGET bucket id`, in one round trip: one
    /// pipeline on a single Redis; on a cluster (the two keys live in different slots) two
    /// commands sent at once.
    async fn cached(
        &mut self,
        realtime: String,
        batch: Option<(String, String)>,
    ) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        match self {
            Connection::Single(c) => {
                let mut pipe = redis::pipe();
                pipe.get(realtime);
                if let Some((key, field)) = batch {
                    pipe.hget(key, field);
                }
                pipe.query_async(c).await
            }
            Connection::Cluster(c) => {
                let mut rt_connection = c.clone();
                let rt = async move {
                    redis::cmd("GET")
                        .arg(realtime)
                        .query_async::<Option<Vec<u8>>>(&mut rt_connection)
                        .await
                };
                let mut batch_connection = c.clone();
                let batch = async move {
                    match batch {
                        Some((key, field)) => redis::cmd("HGET")
                            .arg(key)
                            .arg(field)
                            .query_async::<Option<Vec<u8>>>(&mut batch_connection)
                            .await
                            .map(Some),
                        None => Ok(None),
                    }
                };
                let (rt, batch) = tokio::try_join!(rt, batch)?;
                Ok(std::iter::once(rt).chain(batch).collect())
            }
        }
    }
}

/// The published generation scorers read, and where its predictions are.
struct Serving {
    generation: Arc<str>,
    layout: Arc<BatchLayout>,
    /// When the published run started, if it recorded its plan: an incremental run confirms
    /// then that every prediction it carried still matches the features.
    confirmed_ms: Option<u64>,
}

/// What one lookup found for an entity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Found {
    /// The serving generation's batch prediction.
    pub batch: Option<CachedPrediction>,
    /// When the published run started (see [`Found::batch_age`]).
    pub batch_confirmed_ms: Option<u64>,
    /// The cached real-time prediction.
    pub realtime: Option<CachedPrediction>,
}

impl Found {
    /// How old the batch prediction's view of the features is at `now_ms`: from when it was
    /// computed or, if later, from when the published run started. An incremental run
    /// rewrites only what changed; every prediction it carries was checked against the
    /// features at that run, so it is as fresh as one computed then (counted from its full
    /// run instead, every carried prediction would pass `maxStaleness` and be recomputed on
    /// every request, however recently a run confirmed it).
    pub fn batch_age(&self, now_ms: u64) -> Option<Duration> {
        let batch = self.batch?;
        let seen = batch
            .computed_at_ms
            .max(self.batch_confirmed_ms.unwrap_or(0));
        Some(Duration::from_millis(now_ms.saturating_sub(seen)))
    }
}

/// The Redis tier.
pub struct RedisTier {
    url: String,
    cluster: bool,
    keyspace: Keyspace,
    connection: Mutex<Option<Connection>>,
    connecting: tokio::sync::Mutex<()>,
    breaker: CircuitBreaker,
    serving: RwLock<Option<Serving>>,
    metrics: Arc<Metrics>,
}

impl RedisTier {
    /// A tier for `url` (a cluster node's URL when `cluster`); connects on first use.
    pub fn new(
        url: String,
        cluster: bool,
        keyspace: Keyspace,
        breaker: BreakerPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            url,
            cluster,
            keyspace,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: CircuitBreaker::new(breaker),
            serving: RwLock::new(None),
            metrics,
        }
    }

    fn cached_connection(&self) -> Option<Connection> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn connection(&self) -> Result<Connection, RedisError> {
        if let Some(c) = self.cached_connection() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.cached_connection() {
            return Ok(c);
        }
        let connection = if self.cluster {
            let client = ClusterClient::builder(vec![self.url.as_str()])
                .connection_timeout(CALL_CEILING)
                .response_timeout(CALL_CEILING)
                .build()?;
            Connection::Cluster(client.get_async_connection().await?)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_CEILING))
                .set_response_timeout(Some(CALL_CEILING))
                .set_number_of_retries(1);
            let client = redis::Client::open(self.url.as_str())?;
            Connection::Single(client.get_connection_manager_with_config(config).await?)
        };
        info!(cluster = self.cluster, "connected to redis");
        *self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `cmd` through the breaker within `timeout`.
    async fn call<T: FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T, TierError> {
        self.guarded(operation, timeout, |mut connection| async move {
            connection.query::<T>(cmd).await
        })
        .await
    }

    /// Runs `work` on the connection through the breaker within `timeout`.
    async fn guarded<T, F, Fut>(
        &self,
        operation: &'static str,
        timeout: Duration,
        work: F,
    ) -> Result<T, TierError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        if !self.breaker.allow(Instant::now()) {
            self.publish_circuit();
            return Err(TierError::CircuitOpen);
        }
        let attempt = async {
            let connection = self.connection().await?;
            work(connection).await
        };
        let result = match tokio::time::timeout(timeout.min(CALL_CEILING), attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(TierError::Redis(e)),
            Err(_) => Err(TierError::Timeout),
        };
        let transition = match &result {
            Ok(_) => self.breaker.record_success(),
            // A reply of the wrong type is our bug or bad data, not Redis being down.
            Err(TierError::Redis(e)) if e.kind() == redis::ErrorKind::UnexpectedReturnType => {
                self.metrics.redis_error(operation);
                Transition::None
            }
            Err(_) => {
                self.metrics.redis_error(operation);
                self.breaker.record_failure(Instant::now())
            }
        };
        match transition {
            Transition::Opened => warn!(
                error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "redis is failing: circuit opened, answering from memory, model or default"
            ),
            Transition::Closed => info!("redis is back: circuit closed"),
            Transition::None => {}
        }
        if transition != Transition::None {
            self.publish_circuit();
        }
        result
    }

    fn publish_circuit(&self) {
        self.metrics.circuit(self.breaker.state());
    }

    /// `GET key`, as part of finding the serving generation.
    async fn get<T: FromRedisValue>(&self, key: String) -> Result<Option<T>, TierError> {
        self.call("generation", redis::cmd("GET").arg(key), CALL_CEILING)
            .await
    }

    /// The batch generation scorers currently read, if one is published.
    pub fn generation(&self) -> Option<Arc<str>> {
        self.serving
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|s| Arc::clone(&s.generation))
    }

    /// Where the serving generation's predictions are, and when its run started.
    fn layout(&self) -> Option<(Arc<BatchLayout>, Option<u64>)> {
        self.serving
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|s| (Arc::clone(&s.layout), s.confirmed_ms))
    }

    /// Reads the serving pointer (and, when it names an incremental run, the generation
    /// that run updated in place) and that generation's bucket count. A failure keeps the
    /// last known generation: Redis being briefly away must not make every batch prediction
    /// a miss. A generation without a bucket count (written by an older release) is not
    /// read: its entities are computed in real time until the next run.
    pub async fn refresh_generation(&self) -> Result<Option<Arc<str>>, TierError> {
        let pointer: Option<String> = self.get(self.keyspace.serving_pointer()).await?;
        let (resolved, confirmed_ms) = match pointer {
            Some(published) => {
                let alias: Option<String> = self.get(self.keyspace.alias(&published)).await?;
                let plan: Option<String> = self.get(self.keyspace.run_plan(&published)).await?;
                let started = plan
                    .as_deref()
                    .and_then(RunPlan::parse)
                    .map(|p| p.started_ms());
                (Some(alias.unwrap_or(published)), started)
            }
            None => (None, None),
        };
        let serving = match resolved {
            Some(generation) => {
                let buckets: Option<u32> = self
                    .get(self.keyspace.bucket_count_key(&generation))
                    .await?;
                match buckets {
                    Some(buckets) => Some(Serving {
                        layout: Arc::new(self.keyspace.batch_layout(&generation, buckets)),
                        generation: Arc::from(generation),
                        confirmed_ms,
                    }),
                    None => {
                        warn!(%generation, "the published generation records no bucket count: not reading it");
                        None
                    }
                }
            }
            None => None,
        };
        let generation = serving.as_ref().map(|s| Arc::clone(&s.generation));
        let mut current = self
            .serving
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = current
            .as_ref()
            .map(|s| (&s.generation, s.layout.buckets()))
            != serving
                .as_ref()
                .map(|s| (&s.generation, s.layout.buckets()));
        if changed {
            info!(generation = ?generation.as_deref(), "serving batch generation changed");
        }
        // Also when only the run changed: an incremental run published over the same
        // generation confirms its predictions anew.
        *current = serving;
        Ok(generation)
    }

    /// One round trip for `id`: the serving generation's batch prediction (a field of its
    /// bucket) and the real-time one. Undecodable values count as absent, never as
    /// predictions.
    pub async fn lookup(&self, id: &str, timeout: Duration) -> Result<Found, TierError> {
        let realtime = self.keyspace.realtime(id);
        let serving = self.layout();
        let batch_confirmed_ms = serving.as_ref().and_then(|(_, confirmed)| *confirmed);
        let batch = serving.map(|(layout, _)| (layout.key_of(id), id.to_string()));
        let values: Vec<Option<Vec<u8>>> = self
            .guarded("lookup", timeout, |mut connection| async move {
                connection.cached(realtime, batch).await
            })
            .await?;
        let decode = |value: Option<&Option<Vec<u8>>>| {
            let bytes = value?.as_ref()?;
            match CachedPrediction::decode(bytes) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.metrics.corrupt_value();
                    None
                }
            }
        };
        Ok(Found {
            realtime: decode(values.first()),
            batch: decode(values.get(1)),
            batch_confirmed_ms,
        })
    }

    /// The online store's values of `fields` in hash `key` (one `HMGET`).
    pub async fn online_features(
        &self,
        key: &str,
        fields: &[String],
        timeout: Duration,
    ) -> Result<Vec<Option<String>>, TierError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg(fields);
        self.call("features", &cmd, timeout).await
    }

    /// Writes `id`'s real-time prediction with `ttl` (in the background: the answer does
    /// not wait for it).
    pub fn write_back(self: &Arc<Self>, id: &str, prediction: CachedPrediction, ttl: Duration) {
        let tier = Arc::clone(self);
        let id = id.to_string();
        tokio::spawn(async move {
            let _ = tier.store_realtime(&id, prediction, ttl).await;
        });
    }

    /// Publishes this pod's traffic `window` under `pod`; the hash expires after `keep` so
    /// records of vanished pods do not live forever.
    pub async fn publish_traffic(
        &self,
        pod: &str,
        window: TrafficWindow,
        keep: Duration,
    ) -> Result<(), TierError> {
        let key = self.keyspace.traffic();
        let mut cmd = redis::cmd("EVAL");
        // HSET + PEXPIRE as one script keeps it one round trip on a cluster connection too.
        cmd.arg("redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); return redis.call('PEXPIRE', KEYS[1], ARGV[3])")
            .arg(1)
            .arg(&key)
            .arg(pod)
            .arg(&window.encode()[..])
            .arg(keep.as_millis() as u64);
        let _: i64 = self.call("traffic", &cmd, CALL_CEILING).await?;
        Ok(())
    }

    /// Adds sampled request counts to this hour's activity set (kept three hours).
    pub async fn record_activity(&self, counts: &[(String, u32)]) -> Result<(), TierError> {
        let hour = millrace_crds::keys::now_ms() / 3_600_000;
        let key = self.keyspace.activity(hour);
        for chunk in counts.chunks(1_000) {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(ACTIVITY_SCRIPT).arg(1).arg(&key).arg(3 * 3_600);
            for (id, count) in chunk {
                cmd.arg(*count).arg(id);
            }
            let _: i64 = self.call("activity", &cmd, CALL_CEILING).await?;
        }
        Ok(())
    }

    /// The `top` most active entities over the last `hours` hours, most active first.
    pub async fn most_active(&self, hours: u64, top: usize) -> Result<Vec<String>, TierError> {
        let hour = millrace_crds::keys::now_ms() / 3_600_000;
        let keys: Vec<String> = (0..hours.max(1))
            .map(|back| self.keyspace.activity(hour.saturating_sub(back)))
            .collect();
        let mut union = redis::cmd("ZUNION");
        union.arg(keys.len()).arg(&keys).arg("WITHSCORES");
        let scored: Vec<(String, f64)> = self.call("activity", &union, CALL_CEILING).await?;
        let mut scored = scored;
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(scored.into_iter().take(top).map(|(id, _)| id).collect())
    }

    /// Writes `id`'s real-time prediction with `ttl`, waiting for Redis to take it.
    pub async fn store_realtime(
        &self,
        id: &str,
        prediction: CachedPrediction,
        ttl: Duration,
    ) -> Result<(), TierError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keyspace.realtime(id))
            .arg(&prediction.encode()[..])
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let _: () = self.call("write_back", &cmd, CALL_CEILING).await?;
        Ok(())
    }

    /// Removes this pod's traffic record (on shutdown: a pod that is gone has no traffic).
    pub async fn remove_traffic(&self, pod: &str) -> Result<(), TierError> {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(self.keyspace.traffic()).arg(pod);
        let _: i64 = self.call("traffic", &cmd, CALL_CEILING).await?;
        Ok(())
    }

    /// The breaker's state.
    pub fn circuit(&self) -> super::breaker::CircuitState {
        self.breaker.state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_prediction_is_as_old_as_its_computation_or_the_run_that_confirmed_it() {
        let computed = CachedPrediction {
            value: 0.5,
            computed_at_ms: 1_000,
        };
        let found = |confirmed_ms| Found {
            batch: Some(computed),
            batch_confirmed_ms: confirmed_ms,
            realtime: None,
        };
        let ms = Duration::from_millis;
        assert_eq!(found(None).batch_age(5_000), Some(ms(4_000)));
        assert_eq!(found(Some(3_000)).batch_age(5_000), Some(ms(2_000)));
        // A run that started before the prediction was computed says nothing newer.
        assert_eq!(found(Some(500)).batch_age(5_000), Some(ms(4_000)));
        assert_eq!(found(Some(9_000)).batch_age(5_000), Some(ms(0)));
        assert_eq!(Found::default().batch_age(5_000), None);
    }
}
