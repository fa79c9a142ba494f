//! Writes batch predictions to Redis: pipelined `SET key value PX ttl GET`, many pipelines
//! in flight, and on Redis Cluster one pipeline per master (keys grouped by slot owner from
//! `CLUSTER SLOTS`, refreshed and retried on `MOVED`).
//!
//! `GET` returns what the key held before: a retried shard finds its own earlier value (the
//! same prediction) and carries on, while a different prediction already under the same key
//! of this generation means the input holds the entity twice with different features, which
//! the caller turns into an error rather than let one of them win silently.
//!
//! Keys expected to be new (every key of a full run) are written with `SET … NX` instead
//! ([`PredictionWriter::write_new`]): Redis does about a tenth less work than for `GET`, and
//! only the rare key that already held a value is read back for the same comparison.

use std::sync::RwLock;
use std::time::Duration;

use millrace_crds::keys::cluster_slot;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisError, Value};

/// How long one pipeline may wait for its replies. Generous: a pipeline of thousands of
/// commands queued behind others on a busy Redis is slow, not lost, and giving up on it
/// would fail a run that was making progress.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(60);

async fn connect_to(info: redis::ConnectionInfo) -> Result<MultiplexedConnection, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(PIPELINE_TIMEOUT));
    redis::Client::open(info)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Where predictions go.
pub struct PredictionWriter {
    target: Target,
    ttl_ms: u64,
}

enum Target {
    Single(MultiplexedConnection),
    Cluster {
        seed: String,
        topology: RwLock<Topology>,
    },
}

#[derive(Clone)]
struct Topology {
    nodes: Vec<MultiplexedConnection>,
    /// Slot → index into `nodes`.
    owner: Vec<usize>,
}

/// What a key held before this write (`None` when it was absent).
pub type Previous = Option<Vec<u8>>;

/// How a `SET` treats a key that already holds a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetMode {
    /// Replace it and return it (`GET`).
    ReturnPrevious,
    /// Leave it (`NX`).
    OnlyIfAbsent,
}

impl PredictionWriter {
    /// Connects to `url` (any node of the cluster when `cluster`).
    pub async fn connect(url: &str, cluster: bool, ttl_ms: u64) -> Result<Self, RedisError> {
        let target = if cluster {
            let topology = discover(url).await?;
            Target::Cluster {
                seed: url.to_string(),
                topology: RwLock::new(topology),
            }
        } else {
            Target::Single(connect_to(url.into_connection_info()?).await?)
        };
        Ok(Self { target, ttl_ms })
    }

    /// Writes `entries` (key, encoded value) and returns each key's previous value, in order.
    pub async fn write(&self, entries: &[(String, Vec<u8>)]) -> Result<Vec<Previous>, RedisError> {
        self.set(entries, SetMode::ReturnPrevious).await
    }

    /// Writes `entries` whose keys are expected to be absent, leaving any key that already
    /// holds a value as it is; returns, in order, `None` for each key written and the value
    /// found for each key that was not (the caller compares it as for [`Self::write`]).
    pub async fn write_new(
        &self,
        entries: &[(String, Vec<u8>)],
    ) -> Result<Vec<Previous>, RedisError> {
        let replies: Vec<Option<Value>> = self.set(entries, SetMode::OnlyIfAbsent).await?;
        let taken: Vec<usize> = (0..entries.len())
            .filter(|&i| replies[i].is_none())
            .collect();
        let mut out: Vec<Previous> = vec![None; entries.len()];
        if taken.is_empty() {
            return Ok(out);
        }
        let keys: Vec<String> = taken.iter().map(|&i| entries[i].0.clone()).collect();
        let mut vanished = Vec::new();
        for (&i, value) in taken.iter().zip(self.read(&keys).await?) {
            match value {
                Some(value) => out[i] = Some(value),
                // Expired between the two commands: write it after all.
                None => vanished.push(i),
            }
        }
        if !vanished.is_empty() {
            let retry: Vec<(String, Vec<u8>)> =
                vanished.iter().map(|&i| entries[i].clone()).collect();
            for (&i, previous) in vanished.iter().zip(self.write(&retry).await?) {
                out[i] = previous;
            }
        }
        Ok(out)
    }

    /// One `SET` per entry in `mode`; each reply in order (`GET`: the previous value; `NX`:
    /// `OK` when written, nothing when the key was taken).
    async fn set<V: redis::FromRedisValue + Clone + Send>(
        &self,
        entries: &[(String, Vec<u8>)],
        mode: SetMode,
    ) -> Result<Vec<Option<V>>, RedisError> {
        match &self.target {
            Target::Single(connection) => {
                let pipe = self.pipeline(entries.iter(), mode);
                pipe.query_async(&mut connection.clone()).await
            }
            Target::Cluster { seed, topology } => {
                let mut attempt = 0;
                loop {
                    let current = topology
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    match self.set_cluster(&current, entries, mode).await {
                        Ok(previous) => return Ok(previous),
                        // The slots moved (resharding, failover): learn the new owners and
                        // write the whole batch again; SET is idempotent.
                        Err(e) if attempt < 3 && is_redirect(&e) => {
                            attempt += 1;
                            let fresh = discover(seed).await?;
                            *topology
                                .write()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Reads `keys` (one `MGET`; on a cluster, one pipeline of `GET`s per master).
    pub async fn read(&self, keys: &[String]) -> Result<Vec<Previous>, RedisError> {
        match &self.target {
            Target::Single(connection) => {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async(&mut connection.clone())
                    .await
            }
            Target::Cluster { topology, .. } => {
                let topology = topology
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); topology.nodes.len()];
                for (i, key) in keys.iter().enumerate() {
                    per_node[topology.owner[usize::from(cluster_slot(key.as_bytes()))]].push(i);
                }
                let reads = per_node
                    .iter()
                    .enumerate()
                    .filter(|(_, indexes)| !indexes.is_empty())
                    .map(|(node, indexes)| {
                        let mut pipe = redis::pipe();
                        for &i in indexes {
                            pipe.get(&keys[i]);
                        }
                        let mut connection = topology.nodes[node].clone();
                        async move {
                            let values: Vec<Previous> = pipe.query_async(&mut connection).await?;
                            Ok::<_, RedisError>((indexes, values))
                        }
                    });
                let mut out = vec![None; keys.len()];
                for (indexes, values) in futures::future::try_join_all(reads).await? {
                    for (&i, v) in indexes.iter().zip(values) {
                        out[i] = v;
                    }
                }
                Ok(out)
            }
        }
    }

    fn pipeline<'a>(
        &self,
        entries: impl Iterator<Item = &'a (String, Vec<u8>)>,
        mode: SetMode,
    ) -> redis::Pipeline {
        let option = match mode {
            SetMode::ReturnPrevious => "GET",
            SetMode::OnlyIfAbsent => "NX",
        };
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(value.as_slice())
                .arg("PX")
                .arg(self.ttl_ms)
                .arg(option);
        }
        pipe
    }

    async fn set_cluster<V: redis::FromRedisValue + Clone + Send>(
        &self,
        topology: &Topology,
        entries: &[(String, Vec<u8>)],
        mode: SetMode,
    ) -> Result<Vec<Option<V>>, RedisError> {
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); topology.nodes.len()];
        for (i, (key, _)) in entries.iter().enumerate() {
            let node = topology.owner[usize::from(cluster_slot(key.as_bytes()))];
            per_node[node].push(i);
        }
        let writes = per_node
            .iter()
            .enumerate()
            .filter(|(_, indexes)| !indexes.is_empty())
            .map(|(node, indexes)| {
                let pipe = self.pipeline(indexes.iter().map(|&i| &entries[i]), mode);
                let mut connection = topology.nodes[node].clone();
                async move {
                    let previous: Vec<Option<V>> = pipe.query_async(&mut connection).await?;
                    Ok::<_, RedisError>((indexes, previous))
                }
            });
        let mut out = vec![None; entries.len()];
        for (indexes, previous) in futures::future::try_join_all(writes).await? {
            for (&i, p) in indexes.iter().zip(previous) {
                out[i] = p;
            }
        }
        Ok(out)
    }

    /// Sets `key` to `value` with the batch TTL (an index or a generation's bookkeeping,
    /// which must expire with the predictions it describes).
    pub async fn set_with_ttl(
        &self,
        key: &str,
        value: impl redis::ToRedisArgs,
    ) -> Result<(), RedisError> {
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value).arg("PX").arg(self.ttl_ms);
        self.command(key, &set).await
    }

    /// Runs one command on the node owning `key` (single Redis: the only one).
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        let mut connection = match &self.target {
            Target::Single(connection) => connection.clone(),
            Target::Cluster { topology, .. } => {
                let topology = topology
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                topology.nodes[topology.owner[usize::from(cluster_slot(key.as_bytes()))]].clone()
            }
        };
        cmd.query_async(&mut connection).await
    }
}

fn is_redirect(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
    ) || e.to_string().contains("MOVED")
        || e.to_string().contains("ASK")
}

/// Reads `CLUSTER SLOTS` through `seed` and connects to every master.
async fn discover(seed: &str) -> Result<Topology, RedisError> {
    let info = seed.into_connection_info()?;
    let mut connection = connect_to(info.clone()).await?;
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut connection)
        .await?;
    let mut masters: Vec<(String, u16)> = Vec::new();
    let mut owner = vec![usize::MAX; 16_384];
    let Value::Array(ranges) = slots else {
        return Err(protocol("CLUSTER SLOTS did not answer an array"));
    };
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(protocol("a CLUSTER SLOTS range is not an array"));
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(protocol("a CLUSTER SLOTS range lacks start, end or master"));
        };
        let host = match master.first() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).to_string(),
            Some(Value::SimpleString(text)) => text.clone(),
            _ => return Err(protocol("a CLUSTER SLOTS master has no host")),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(protocol("a CLUSTER SLOTS master has no port"));
        };
        let address = (
            host,
            u16::try_from(*port).map_err(|_| protocol("bad port"))?,
        );
        let node = match masters.iter().position(|m| *m == address) {
            Some(node) => node,
            None => {
                masters.push(address);
                masters.len() - 1
            }
        };
        for slot in (*start).max(0)..=(*end).min(16_383) {
            owner[slot as usize] = node;
        }
    }
    if owner.contains(&usize::MAX) {
        return Err(protocol(
            "some hash slots have no master; is the cluster complete?",
        ));
    }
    let mut nodes = Vec::with_capacity(masters.len());
    for (host, port) in masters {
        let node_info = info.clone().set_addr(ConnectionAddr::Tcp(host, port));
        nodes.push(connect_to(node_info).await?);
    }
    Ok(Topology { nodes, owner })
}

fn protocol(message: &'static str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "cluster topology",
        message.to_string(),
    ))
}
