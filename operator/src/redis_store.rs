//! The operator's Redis work: confirm that every shard of a batch run finished, publish the
//! generation scorers read, and delete one resource's keys when it is deleted.
//!
//! Connections are cached per URL and carry short timeouts, so an unreachable Redis costs a
//! reconcile seconds, never a hang.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, RedisError, RedisResult};
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_secs(2);

/// How many keys one `SCAN` step visits and one `UNLINK` removes.
const SCAN_BATCH: usize = 1000;

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Cached Redis connections, keyed by URL and mode.
#[derive(Default)]
pub struct RedisStore {
    connections: Mutex<HashMap<(String, bool), Connection>>,
}

/// The shards of one generation that recorded completion, and what they did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardReport {
    /// Distinct shard indexes that finished.
    pub shards: usize,
    /// Predictions written by those shards together.
    pub predictions: i64,
    /// Predictions kept unchanged (incremental), when the shards reported it.
    pub carried: Option<i64>,
    /// Predictions removed (incremental), when reported.
    pub removed: Option<i64>,
    /// Predictions written again for evicted buckets (incremental), when reported.
    pub repaired: Option<i64>,
}

impl ShardReport {
    /// Adds a run report's fields (`{what}:{shard}` → count,
    /// [`millrace_crds::keys::Keyspace::run_report`]); fields it does not know (a newer
    /// scorer's) are ignored, and a report absent (an older scorer) leaves `None`.
    pub fn with_run_report(mut self, report: &HashMap<String, i64>) -> Self {
        for (field, count) in report {
            let total = match field.split_once(':').map(|(what, _)| what) {
                Some("carried") => &mut self.carried,
                Some("removed") => &mut self.removed,
                Some("repaired") => &mut self.repaired,
                _ => continue,
            };
            *total = Some(total.unwrap_or(0) + count);
        }
        self
    }
}

impl RedisStore {
    async fn connection(&self, url: &str, cluster: bool) -> RedisResult<Connection> {
        let mut connections = self.connections.lock().await;
        if let Some(existing) = connections.get(&(url.to_string(), cluster)) {
            return Ok(existing.clone());
        }
        let connection = if cluster {
            let client = ClusterClient::builder(vec![url])
                .connection_timeout(TIMEOUT)
                .response_timeout(TIMEOUT)
                .build()?;
            Connection::Cluster(client.get_async_connection().await?)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1);
            let client = redis::Client::open(url)?;
            Connection::Single(client.get_connection_manager_with_config(config).await?)
        };
        connections.insert((url.to_string(), cluster), connection.clone());
        Ok(connection)
    }

    /// Reads the scorer pods' traffic windows from hash `key` (pod → record); records that
    /// do not decode are skipped (a newer scorer's format is not misread as traffic).
    pub async fn traffic(
        &self,
        url: &str,
        cluster: bool,
        key: &str,
    ) -> RedisResult<Vec<(String, millrace_crds::traffic::TrafficWindow)>> {
        let records: HashMap<String, Vec<u8>> = match self.connection(url, cluster).await? {
            Connection::Single(mut c) => c.hgetall(key).await?,
            Connection::Cluster(mut c) => c.hgetall(key).await?,
        };
        Ok(records
            .into_iter()
            .filter_map(|(pod, raw)| {
                millrace_crds::traffic::TrafficWindow::decode(&raw)
                    .ok()
                    .map(|w| (pod, w))
            })
            .collect())
    }

    /// Reads the shard completion hash `done_key` (shard index → predictions written) and
    /// the run report `report_key` beside it.
    pub async fn shard_report(
        &self,
        url: &str,
        cluster: bool,
        done_key: &str,
        report_key: &str,
    ) -> RedisResult<ShardReport> {
        let (counts, report): (HashMap<String, i64>, HashMap<String, i64>) = match self
            .connection(url, cluster)
            .await?
        {
            Connection::Single(mut c) => (c.hgetall(done_key).await?, c.hgetall(report_key).await?),
            Connection::Cluster(mut c) => {
                (c.hgetall(done_key).await?, c.hgetall(report_key).await?)
            }
        };
        Ok(ShardReport {
            shards: counts.len(),
            predictions: counts.values().sum(),
            ..ShardReport::default()
        }
        .with_run_report(&report))
    }

    /// Points scorers at `generation`: one `SET` of the serving pointer.
    pub async fn publish(
        &self,
        url: &str,
        cluster: bool,
        pointer: &str,
        generation: &str,
    ) -> RedisResult<()> {
        match self.connection(url, cluster).await? {
            Connection::Single(mut c) => c.set::<_, _, ()>(pointer, generation).await,
            Connection::Cluster(mut c) => c.set::<_, _, ()>(pointer, generation).await,
        }
    }

    /// Deletes every key matching `pattern`, `SCAN` step by `SCAN` step (never `KEYS`), on
    /// every master in cluster mode. Returns how many keys were removed.
    pub async fn delete_matching(
        &self,
        url: &str,
        cluster: bool,
        pattern: &str,
    ) -> RedisResult<u64> {
        if !cluster {
            let Connection::Single(mut c) = self.connection(url, false).await? else {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "expected a single-node connection",
                )));
            };
            return scan_unlink(&mut c, pattern).await;
        }
        let mut removed = 0;
        for master in cluster_masters(url).await? {
            let mut c = redis::Client::open(master)?
                .get_multiplexed_async_connection()
                .await?;
            removed += scan_unlink(&mut c, pattern).await?;
        }
        Ok(removed)
    }
}

async fn scan_unlink<C: redis::aio::ConnectionLike + Send>(
    c: &mut C,
    pattern: &str,
) -> RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(c)
            .await?;
        if !keys.is_empty() {
            // One key per UNLINK keeps cluster slots out of the way; pipelined, so one trip.
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let counts: Vec<u64> = pipe.query_async(c).await?;
            removed += counts.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// The `redis://host:port` of every master, from `CLUSTER SLOTS` on the seed node.
async fn cluster_masters(seed: &str) -> RedisResult<Vec<String>> {
    let mut c = redis::Client::open(seed)?
        .get_multiplexed_async_connection()
        .await?;
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await?;
    let mut masters = Vec::new();
    for range in slots {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let Some(redis::Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let host: String = master
            .first()
            .map(redis::from_redis_value_ref)
            .transpose()?
            .unwrap_or_default();
        let port: u16 = master
            .get(1)
            .map(redis::from_redis_value_ref)
            .transpose()?
            .unwrap_or_default();
        let address = format!("redis://{host}:{port}");
        if !masters.contains(&address) {
            masters.push(address);
        }
    }
    Ok(masters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_report_is_summed_per_count_and_unknown_fields_are_ignored() {
        let report: HashMap<String, i64> = [
            ("carried:0", 10),
            ("carried:1", 5),
            ("removed:1", 2),
            ("repaired:0", 0),
            ("something-newer:0", 99),
            ("no-shard", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let summed = ShardReport::default().with_run_report(&report);
        assert_eq!(
            (summed.carried, summed.removed, summed.repaired),
            (Some(15), Some(2), Some(0))
        );
        let none = ShardReport::default().with_run_report(&HashMap::new());
        assert_eq!(
            (none.carried, none.removed, none.repaired),
            (None, None, None)
        );
    }
}
