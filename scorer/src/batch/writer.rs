//! Writes batch predictions to Redis: each generation's predictions live in hash buckets
//! ([`millrace_crds::keys::BatchLayout`]), so a window of predictions becomes one `HSET`
//! per bucket with every field of that bucket in the window, pipelined; on Redis Cluster
//! one pipeline per master (buckets grouped by slot owner from `CLUSTER SLOTS`, refreshed and
//! retried on `MOVED`).
//!
//! **TTL.** A bucket's TTL is set with its first write of this process, in the same
//! transaction (`MULTI`, `HSET`, `PEXPIRE`, `EXEC`), so no bucket ever exists without one,
//! even if the process dies mid-pipeline. Later writes to the bucket are bare `HSET`s.
//!
//! **What was there before.** Each prediction says what its field should hold
//! ([`Expect`]): a full run's first attempt expects every field to be new and checks
//! `HSET`'s count of fields added (fewer means the input holds an entity twice, or another
//! process writes the same generation), reported as [`Written::unexpected`]; a field to be
//! compared is read with `HMGET` just before the `HSET`, in the same pipeline, and its old
//! value returned; a field the fingerprint index vouches for is replaced without a read.

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use millrace_crds::keys::{BatchLayout, VALUE_V2_LEN, cluster_slot};
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
    /// Buckets this process has set the TTL of (one flag per bucket).
    expiring: Mutex<Vec<bool>>,
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

/// What a field or key held before (`None` when it was absent).
pub type Previous = Option<Vec<u8>>;

/// One prediction to write: its bucket, its entity (the hash field), its encoded value and
/// what the field should hold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldWrite {
    /// The bucket, from the generation's layout.
    pub bucket: u32,
    /// The entity id.
    pub id: String,
    /// The encoded prediction (held inline: a window holds tens of thousands).
    pub value: [u8; VALUE_V2_LEN],
    /// What the field should hold before this write.
    pub expect: Expect,
}

/// What a field should hold before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing (a full run's first attempt): not read; a field found taken is reported.
    Absent,
    /// Unknown: read just before it is replaced, and the old value returned.
    Read,
    /// A value the caller knows about (from the fingerprint index): replaced unread.
    Present,
}

/// What a write found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Per entry, the value it replaced (for [`Expect::Read`] entries; `None` otherwise).
    pub previous: Vec<Previous>,
    /// Entries written together with a field that was not where the write expected it (a
    /// duplicate entity, or another writer in between). Which of them it was is not known:
    /// every entry of the affected bucket is listed.
    pub unexpected: Vec<usize>,
}

/// Buckets per pipeline: a window's commands are built and sent in parts of this many
/// buckets (up to four commands each), so a window of one-field buckets (a large
/// generation) does not hold a quarter-million command objects at once.
const PIPELINE_BUCKETS: usize = 8_192;

/// Entry indexes ordered by bucket, each bucket's in entry order. A counting sort when the
/// buckets are no more than a few per entry (a window: tens of thousands of entries over a
/// generation's buckets), where the comparison sort it replaced was a third of building a
/// window's pipelines; a comparison sort otherwise.
fn by_bucket_order(entries: &[FieldWrite], buckets: usize) -> Vec<usize> {
    let counted = entries.iter().all(|e| (e.bucket as usize) < buckets);
    if !counted || buckets > entries.len().saturating_mul(4) {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].bucket);
        return order;
    }
    // starts[b]: where bucket b's entries begin in the order.
    let mut starts = vec![0usize; buckets + 1];
    for entry in entries {
        starts[entry.bucket as usize + 1] += 1;
    }
    for b in 0..buckets {
        starts[b + 1] += starts[b];
    }
    let mut order = vec![0usize; entries.len()];
    for (i, entry) in entries.iter().enumerate() {
        let at = &mut starts[entry.bucket as usize];
        order[*at] = i;
        *at += 1;
    }
    order
}

/// One bucket's part of a write.
struct BucketWrite {
    bucket: u32,
    /// Its entries: `order[start..end]` of the [`Plan`].
    start: usize,
    end: usize,
    /// Whether this write sets the bucket's TTL (wrapped in `MULTI`/`EXEC`).
    first: bool,
}

/// A write grouped by bucket (no per-bucket allocation: a window of a large generation
/// touches tens of thousands of buckets).
struct Plan<'a> {
    layout: &'a BatchLayout,
    /// Entry indexes sorted by bucket.
    order: Vec<usize>,
    buckets: Vec<BucketWrite>,
}

impl Plan<'_> {
    fn members(&self, b: usize) -> &[usize] {
        let bucket = &self.buckets[b];
        &self.order[bucket.start..bucket.end]
    }

    fn key(&self, b: usize) -> String {
        self.layout.bucket_key(self.buckets[b].bucket)
    }
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
        Ok(Self {
            target,
            ttl_ms,
            expiring: Mutex::new(Vec::new()),
        })
    }

    /// Writes `entries` into `layout`'s buckets: one `HSET` per bucket (its first write
    /// with the TTL, see the module docs).
    pub async fn write(
        &self,
        layout: &BatchLayout,
        entries: &[FieldWrite],
    ) -> Result<Written, RedisError> {
        let plan = self.plan(layout, entries);
        match &self.target {
            Target::Single(connection) => {
                let all: Vec<usize> = (0..plan.buckets.len()).collect();
                let replies = self
                    .send(connection.clone(), &plan, &all, entries, false)
                    .await?;
                Ok(read_replies(&plan, &all, replies, entries, false))
            }
            Target::Cluster { seed, topology } => {
                let mut attempt = 0;
                loop {
                    let current = topology
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    // A retry reads fields expected absent first: part of the window may
                    // already be in (our own values then compare equal).
                    match self
                        .write_cluster(&current, &plan, entries, attempt > 0)
                        .await
                    {
                        Ok(written) => return Ok(written),
                        // The slots moved (resharding, failover): learn the new owners and
                        // write the whole window again.
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

    /// Groups `entries` by bucket, marking each bucket's first write of this process.
    fn plan<'a>(&self, layout: &'a BatchLayout, entries: &[FieldWrite]) -> Plan<'a> {
        let order = by_bucket_order(entries, layout.buckets() as usize);
        let mut expiring = self
            .expiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buckets: Vec<BucketWrite> = Vec::new();
        for (at, &i) in order.iter().enumerate() {
            let bucket = entries[i].bucket;
            match buckets.last_mut() {
                Some(last) if last.bucket == bucket => last.end = at + 1,
                _ => {
                    let slot = bucket as usize;
                    if expiring.len() <= slot {
                        expiring.resize(slot + 1, false);
                    }
                    let first = !expiring[slot];
                    expiring[slot] = true;
                    buckets.push(BucketWrite {
                        bucket,
                        start: at,
                        end: at + 1,
                        first,
                    });
                }
            }
        }
        Plan {
            layout,
            order,
            buckets,
        }
    }

    /// The commands of `which` buckets, in pipelines of at most [`PIPELINE_BUCKETS`]
    /// buckets sent one after another; their replies, in order. `recheck`: read fields
    /// expected absent too.
    async fn send(
        &self,
        mut connection: MultiplexedConnection,
        plan: &Plan<'_>,
        which: &[usize],
        entries: &[FieldWrite],
        recheck: bool,
    ) -> Result<Vec<Value>, RedisError> {
        let mut replies = Vec::new();
        for part in which.chunks(PIPELINE_BUCKETS) {
            let pipe = self.pipeline(plan, part, entries, recheck);
            let part_replies: Vec<Value> = pipe.query_async(&mut connection).await?;
            replies.extend(part_replies);
        }
        Ok(replies)
    }

    fn pipeline(
        &self,
        plan: &Plan<'_>,
        which: &[usize],
        entries: &[FieldWrite],
        recheck: bool,
    ) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for &b in which {
            let first = plan.buckets[b].first;
            let key = plan.key(b);
            let members = plan.members(b);
            let mut read = members
                .iter()
                .filter(|&&i| reads(entries[i].expect, recheck))
                .peekable();
            if read.peek().is_some() {
                let hmget = pipe.cmd("HMGET").arg(&key);
                for &i in read {
                    hmget.arg(&entries[i].id);
                }
            }
            if first {
                pipe.cmd("MULTI");
            }
            let set = pipe.cmd("HSET").arg(&key);
            for &i in members {
                set.arg(&entries[i].id).arg(entries[i].value.as_slice());
            }
            if first {
                pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms);
                pipe.cmd("EXEC");
            }
        }
        pipe
    }

    async fn write_cluster(
        &self,
        topology: &Topology,
        plan: &Plan<'_>,
        entries: &[FieldWrite],
        recheck: bool,
    ) -> Result<Written, RedisError> {
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); topology.nodes.len()];
        for b in 0..plan.buckets.len() {
            per_node[topology.owner[usize::from(cluster_slot(plan.key(b).as_bytes()))]].push(b);
        }
        let writes = per_node
            .iter()
            .enumerate()
            .filter(|(_, which)| !which.is_empty())
            .map(|(node, which)| {
                let connection = topology.nodes[node].clone();
                async move {
                    let replies = self.send(connection, plan, which, entries, recheck).await?;
                    Ok::<_, RedisError>(read_replies(plan, which, replies, entries, recheck))
                }
            });
        let mut out = Written {
            previous: vec![None; entries.len()],
            unexpected: Vec::new(),
        };
        for written in futures::future::try_join_all(writes).await? {
            for (slot, previous) in out.previous.iter_mut().zip(written.previous) {
                if previous.is_some() {
                    *slot = previous;
                }
            }
            out.unexpected.extend(written.unexpected);
        }
        Ok(out)
    }

    /// Sets the batch TTL again on every bucket of `layout` (an incremental run, so the
    /// predictions it carries live as long as those it writes). Buckets found are marked as
    /// having their TTL, so their writes need no transaction (others get theirs with their
    /// first write); returns the buckets that were missing (evicted, expired, or never
    /// written).
    pub async fn adopt_buckets(&self, layout: &BatchLayout) -> Result<Vec<u32>, RedisError> {
        let mut missing = Vec::new();
        let buckets: Vec<u32> = (0..layout.buckets()).collect();
        for chunk in buckets.chunks(4096) {
            let keys: Vec<String> = chunk.iter().map(|&b| layout.bucket_key(b)).collect();
            let replies = self
                .per_node(&keys, |pipe, i| {
                    pipe.cmd("PEXPIRE").arg(&keys[i]).arg(self.ttl_ms);
                })
                .await?;
            let mut expiring = self
                .expiring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (&bucket, reply) in chunk.iter().zip(replies) {
                let slot = bucket as usize;
                if expiring.len() <= slot {
                    expiring.resize(slot + 1, false);
                }
                if as_int(&reply) == Some(1) {
                    expiring[slot] = true;
                } else {
                    missing.push(bucket);
                }
            }
        }
        Ok(missing)
    }

    /// Marks every bucket of `layout` but `absent` as having its TTL, as another shard of
    /// the run found them when it refreshed them all ([`super::repair::refresh`]), so their
    /// writes need no transaction.
    pub fn assume_refreshed(&self, layout: &BatchLayout, absent: &[u32]) {
        let mut expiring = self
            .expiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        expiring.clear();
        expiring.resize(layout.buckets() as usize, true);
        for &bucket in absent {
            if let Some(slot) = expiring.get_mut(bucket as usize) {
                *slot = false;
            }
        }
    }

    /// Reads the stored values of `fields` (bucket, entity id) of `layout`: one `HMGET` per
    /// bucket, pipelined (on a cluster, one pipeline per master).
    pub async fn read_fields(
        &self,
        layout: &BatchLayout,
        fields: &[(u32, String)],
    ) -> Result<Vec<Previous>, RedisError> {
        let groups = by_bucket(layout, fields);
        let keys: Vec<String> = groups.iter().map(|(key, _)| key.clone()).collect();
        let replies = self
            .per_node(&keys, |pipe, g| {
                let (key, members) = &groups[g];
                let read = pipe.cmd("HMGET").arg(key);
                for &i in members {
                    read.arg(&fields[i].1);
                }
            })
            .await?;
        let mut out = vec![None; fields.len()];
        for ((_, members), reply) in groups.iter().zip(replies) {
            let values: Vec<Previous> = redis::from_redis_value(reply)?;
            for (&i, value) in members.iter().zip(values) {
                out[i] = value;
            }
        }
        Ok(out)
    }

    /// Deletes `fields` (bucket, entity id) of `layout`: one `HDEL` per bucket, pipelined
    /// (on a cluster, one pipeline per master). Returns how many were there.
    pub async fn delete_fields(
        &self,
        layout: &BatchLayout,
        fields: &[(u32, String)],
    ) -> Result<u64, RedisError> {
        let groups = by_bucket(layout, fields);
        let keys: Vec<String> = groups.iter().map(|(key, _)| key.clone()).collect();
        let replies = self
            .per_node(&keys, |pipe, g| {
                let (key, members) = &groups[g];
                let delete = pipe.cmd("HDEL").arg(key);
                for &i in members {
                    delete.arg(&fields[i].1);
                }
            })
            .await?;
        Ok(replies
            .iter()
            .filter_map(as_int)
            .map(|n| n.max(0) as u64)
            .sum())
    }

    /// The fields (entity ids) of each of `buckets` of `layout`: one `HKEYS` per bucket,
    /// pipelined (on a cluster, one pipeline per master).
    pub async fn bucket_fields(
        &self,
        layout: &BatchLayout,
        buckets: &[u32],
    ) -> Result<Vec<Vec<String>>, RedisError> {
        let keys: Vec<String> = buckets.iter().map(|&b| layout.bucket_key(b)).collect();
        self.per_node(&keys, |pipe, i| {
            pipe.cmd("HKEYS").arg(&keys[i]);
        })
        .await?
        .into_iter()
        .map(|reply| Ok(redis::from_redis_value(reply)?))
        .collect()
    }

    /// Runs one command per key (built by `add` from the key's index) in one pipeline per
    /// node owning them; the replies in the order of `keys`.
    async fn per_node(
        &self,
        keys: &[String],
        add: impl Fn(&mut redis::Pipeline, usize),
    ) -> Result<Vec<Value>, RedisError> {
        let (nodes, owner_of): (Vec<MultiplexedConnection>, Vec<usize>) = match &self.target {
            Target::Single(connection) => (vec![connection.clone()], vec![0; keys.len()]),
            Target::Cluster { topology, .. } => {
                let topology = topology
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let owners = keys
                    .iter()
                    .map(|k| topology.owner[usize::from(cluster_slot(k.as_bytes()))])
                    .collect();
                (topology.nodes.clone(), owners)
            }
        };
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for (i, &node) in owner_of.iter().enumerate() {
            per_node[node].push(i);
        }
        let calls = per_node
            .iter()
            .enumerate()
            .filter(|(_, which)| !which.is_empty())
            .map(|(node, which)| {
                let mut pipe = redis::pipe();
                for &i in which {
                    add(&mut pipe, i);
                }
                let mut connection = nodes[node].clone();
                async move {
                    let replies: Vec<Value> = pipe.query_async(&mut connection).await?;
                    Ok::<_, RedisError>((which, replies))
                }
            });
        let mut out = vec![Value::Nil; keys.len()];
        for (which, replies) in futures::future::try_join_all(calls).await? {
            for (&i, reply) in which.iter().zip(replies) {
                out[i] = reply;
            }
        }
        Ok(out)
    }

    /// Reads `keys` (one pipeline of `GET`s per node owning them).
    pub async fn read(&self, keys: &[String]) -> Result<Vec<Previous>, RedisError> {
        self.per_node(keys, |pipe, i| {
            pipe.get(&keys[i]);
        })
        .await?
        .into_iter()
        .map(|value| Ok(redis::from_redis_value(value)?))
        .collect()
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

    /// Adds `members` (binary) to the set at `key` with the batch TTL: one script per 4Ki
    /// members, each adding and setting the TTL at once, so the set never lives without it.
    pub async fn add_to_set<const N: usize>(
        &self,
        key: &str,
        members: &[[u8; N]],
    ) -> Result<(), RedisError> {
        for chunk in members.chunks(4_096) {
            let mut add = redis::cmd("EVAL");
            add.arg(
                "redis.call('SADD', KEYS[1], unpack(ARGV, 2)); return redis.call('PEXPIRE', KEYS[1], ARGV[1])",
            )
            .arg(1)
            .arg(key)
            .arg(self.ttl_ms);
            for member in chunk {
                add.arg(&member[..]);
            }
            let _: i64 = self.command(key, &add).await?;
        }
        Ok(())
    }

    /// Sets `fields` of the hash at `key` and gives it the batch TTL, in one script so the
    /// hash never lives without it.
    pub async fn hset_with_ttl(
        &self,
        key: &str,
        fields: &[(String, u64)],
    ) -> Result<(), RedisError> {
        let mut record = redis::cmd("EVAL");
        record
            .arg("redis.call('HSET', KEYS[1], unpack(ARGV, 2)); return redis.call('PEXPIRE', KEYS[1], ARGV[1])")
            .arg(1)
            .arg(key)
            .arg(self.ttl_ms);
        for (field, value) in fields {
            record.arg(field).arg(value);
        }
        let _: i64 = self.command(key, &record).await?;
        Ok(())
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

/// `fields` (bucket, entity id) grouped by bucket: each bucket's key and the indexes of its
/// fields, buckets in ascending order.
fn by_bucket(layout: &BatchLayout, fields: &[(u32, String)]) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<usize> = (0..fields.len()).collect();
    order.sort_unstable_by_key(|&i| fields[i].0);
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for i in order {
        match groups.last_mut() {
            Some((bucket, members)) if *bucket == fields[i].0 => members.push(i),
            _ => groups.push((fields[i].0, vec![i])),
        }
    }
    groups
        .into_iter()
        .map(|(bucket, members)| (layout.bucket_key(bucket), members))
        .collect()
}

/// Whether a field expected `expect` is read before it is written.
fn reads(expect: Expect, recheck: bool) -> bool {
    expect == Expect::Read || (recheck && expect == Expect::Absent)
}

/// Reads the replies of `which` buckets' commands (in the order [`PredictionWriter::send`]
/// queued them) into what the write found.
fn read_replies(
    plan: &Plan<'_>,
    which: &[usize],
    replies: Vec<Value>,
    entries: &[FieldWrite],
    recheck: bool,
) -> Written {
    let mut out = Written {
        previous: vec![None; entries.len()],
        unexpected: Vec::new(),
    };
    let mut replies = replies.into_iter();
    for &b in which {
        let members = plan.members(b);
        let read: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| reads(entries[i].expect, recheck))
            .collect();
        // Fields that must be added: those expected absent, and those read absent.
        let mut must_add = members
            .iter()
            .filter(|&&i| entries[i].expect == Expect::Absent && !recheck)
            .count();
        if !read.is_empty() {
            let values: Vec<Previous> = replies
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            must_add += values.iter().filter(|v| v.is_none()).count();
            for (&i, value) in read.iter().zip(values) {
                out.previous[i] = value;
            }
        }
        let added = if plan.buckets[b].first {
            // OK, QUEUED, QUEUED, then EXEC's [HSET's count, PEXPIRE's 1].
            match replies.nth(3) {
                Some(Value::Array(results)) => results.first().and_then(as_int),
                _ => None,
            }
        } else {
            replies.next().as_ref().and_then(as_int)
        };
        // A field replaced unread may have been absent (evicted) and add one more.
        if added.is_none_or(|added| added < must_add as i64) {
            out.unexpected.extend(members.iter().copied());
        }
    }
    out
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_crds::keys::Keyspace;

    fn entry(bucket: u32, id: &str, expect: Expect) -> FieldWrite {
        FieldWrite {
            bucket,
            id: id.to_string(),
            value: [7; VALUE_V2_LEN],
            expect,
        }
    }

    #[test]
    fn entries_are_ordered_by_bucket_by_counting_or_by_comparing() {
        let buckets = [5_u32, 0, 5, 3, 0, 7, 5, 3];
        let entries: Vec<FieldWrite> = buckets
            .iter()
            .enumerate()
            .map(|(i, &b)| entry(b, &format!("e{i}"), Expect::Present))
            .collect();
        let mut stable: Vec<usize> = (0..entries.len()).collect();
        stable.sort_by_key(|&i| entries[i].bucket);
        assert_eq!(stable, vec![1, 4, 3, 7, 0, 2, 6, 5]);
        // Counted (8 buckets for 8 entries), compared (far more buckets than entries), and
        // compared when a bucket is out of the layout's range (never counted past its end).
        for layout_buckets in [8, 1 << 20, 6] {
            assert_eq!(
                by_bucket_order(&entries, layout_buckets),
                stable,
                "{layout_buckets}"
            );
        }
        assert!(by_bucket_order(&[], 16).is_empty());
    }

    /// A plan of one bucket holding every entry, its first write or not.
    fn one_bucket<'a>(layout: &'a BatchLayout, entries: usize, first: bool) -> Plan<'a> {
        Plan {
            layout,
            order: (0..entries).collect(),
            buckets: vec![BucketWrite {
                bucket: 0,
                start: 0,
                end: entries,
                first,
            }],
        }
    }

    fn exec(added: i64) -> Vec<Value> {
        vec![
            Value::Okay,
            Value::SimpleString("QUEUED".into()),
            Value::SimpleString("QUEUED".into()),
            Value::Array(vec![Value::Int(added), Value::Int(1)]),
        ]
    }

    #[test]
    fn a_first_write_reads_its_count_from_exec_and_a_short_count_is_reported() {
        let layout = Keyspace::new("ml/churn", "3").batch_layout("G", 4);
        let entries = vec![entry(0, "a", Expect::Absent), entry(0, "b", Expect::Absent)];
        let plan = one_bucket(&layout, 2, true);
        let ok = read_replies(&plan, &[0], exec(2), &entries, false);
        assert!(ok.unexpected.is_empty());
        let short = read_replies(&plan, &[0], exec(1), &entries, false);
        assert_eq!(
            short.unexpected,
            vec![0, 1],
            "one field was taken: which is unknown"
        );
    }

    #[test]
    fn read_fields_return_what_they_replaced_and_count_only_what_was_absent() {
        let layout = Keyspace::new("ml/churn", "3").batch_layout("G", 4);
        let entries = vec![
            entry(0, "new", Expect::Read),
            entry(0, "old", Expect::Read),
            entry(0, "vouched", Expect::Present),
        ];
        let plan = one_bucket(&layout, 3, false);
        let hmget = Value::Array(vec![Value::Nil, Value::BulkString(b"was".to_vec())]);
        // HSET adds "new" and, had it been evicted, "vouched" too: both are fine.
        for added in [1, 2] {
            let written = read_replies(
                &plan,
                &[0],
                vec![hmget.clone(), Value::Int(added)],
                &entries,
                false,
            );
            assert_eq!(written.previous, vec![None, Some(b"was".to_vec()), None]);
            assert!(written.unexpected.is_empty(), "added {added}");
        }
        // "new" was absent when read and taken when written: another writer came between.
        let raced = read_replies(&plan, &[0], vec![hmget, Value::Int(0)], &entries, false);
        assert_eq!(raced.unexpected, vec![0, 1, 2]);
    }

    #[test]
    fn a_retried_window_reads_the_fields_it_expected_absent() {
        let layout = Keyspace::new("ml/churn", "3").batch_layout("G", 4);
        let entries = vec![entry(0, "a", Expect::Absent)];
        let plan = one_bucket(&layout, 1, true);
        let mut replies = vec![Value::Array(vec![Value::BulkString(b"mine".to_vec())])];
        replies.extend(exec(0));
        let written = read_replies(&plan, &[0], replies, &entries, true);
        assert_eq!(written.previous, vec![Some(b"mine".to_vec())]);
        assert!(
            written.unexpected.is_empty(),
            "its own earlier write, compared by the caller"
        );
    }
}
