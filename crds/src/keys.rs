//! Redis keys and values: the one encoding the batch writer, the scorer and the operator share.
//!
//! Every key of one resource starts with `mr:{keyspace}:`, where the keyspace is the cache's
//! `keyPrefix` (default `{namespace}/{name}`) and neither it nor a model version may contain
//! `:`, so the encoding is injective: two resources, or two model versions, never read each
//! other's keys.
//!
//! | key | holds |
//! |---|---|
//! | `mr:{ks}:{version}:b:{generation}:{{{ks}:{version}:{generation}/{bucket}}}` | hash: entity id → batch prediction, for the entities of one bucket of generation G |
//! | `mr:{ks}:{version}:g:{generation}:buckets` | the bucket count of generation G (a power of two) |
//! | `mr:{ks}:{version}:rt:{{id}}` | a real-time prediction |
//! | `mr:{ks}:{version}:serving` | the published generation scorers read |
//! | `mr:{ks}:{version}:g:{generation}:done` | hash: shard index → predictions it wrote, per finished shard of G |
//! | `mr:{ks}:{version}:g:{generation}:attempts` | hash: shard index → attempts started (a retried shard reads before it writes) |
//! | `mr:{ks}:{version}:g:{generation}:alias` | the generation an incremental run G updated in place |
//! | `mr:{ks}:{version}:g:{generation}:gone` | set: entity hashes an incremental run updating G no longer found where its index had them |
//! | `mr:{ks}:{version}:g:{generation}:listing` | row groups per input file of the run that last wrote G's fingerprint indexes |
//! | `mr:{ks}:{version}:traffic` | hash: scorer pod → its latest [`crate::traffic::TrafficWindow`] |
//! | `mr:{ks}:{version}:activity:{{ks:version}}:{hour}` | sorted set: sampled requests per entity in one hour (what `warm` reads) |
//!
//! **Batch predictions live in hash buckets**, not one key per entity: an entity's bucket is
//! [`bucket_of`] its id among the generation's [`bucket_count`] (about
//! [`ENTITIES_PER_BUCKET`] entities each), the field is the id. Every prediction of a
//! generation shares one TTL, so one TTL per bucket says the same as one per key, and a
//! small hash is a compact listpack in Redis: a quarter of the memory of string keys with
//! TTLs, and a batch run sends one `HSET` with several fields where it sent one `SET … PX`
//! per entity (about a third of Redis's CPU per prediction, measured in the README).
//!
//! The real-time key wraps the entity id in a Redis Cluster hash tag (`{...}`), so entities
//! spread over every slot; each bucket's tag names its resource, generation and bucket, so
//! buckets spread too. Ids may not contain braces; see [`validate_entity_id`]. Answering
//! "batch or real-time cached?" is one pipelined round trip (`GET` + `HGET`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Longest entity id accepted, in bytes.
pub const MAX_ENTITY_ID_LEN: usize = 256;

/// The version byte that starts every encoded prediction.
pub const VALUE_ENCODING_V1: u8 = 1;

/// Length of a v1 value: version byte, f32 prediction, u64 milliseconds since the epoch.
pub const VALUE_V1_LEN: usize = 1 + 4 + 8;

/// The version byte of a batch value that carries its features' fingerprint.
pub const VALUE_ENCODING_V2: u8 = 2;

/// Length of a v2 value: a v1 value and the u64 fingerprint of the features it was scored on.
pub const VALUE_V2_LEN: usize = VALUE_V1_LEN + 8;

/// An entity id that cannot be used in a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityIdError {
    /// The id is empty.
    #[error("entity id is empty")]
    Empty,
    /// The id is longer than [`MAX_ENTITY_ID_LEN`].
    #[error("entity id is {0} bytes; the limit is {MAX_ENTITY_ID_LEN}")]
    TooLong(usize),
    /// The id has a character outside `A-Z a-z 0-9 . _ - : @ / = +`.
    #[error("entity id contains {0:?}; allowed are letters, digits and . _ - : @ / = +")]
    BadCharacter(char),
}

/// Checks that `id` can be used in a key: 1-256 bytes of `A-Z a-z 0-9 . _ - : @ / = +`.
/// Braces (Redis Cluster hash tags), spaces and control characters are refused.
pub fn validate_entity_id(id: &str) -> Result<(), EntityIdError> {
    if id.is_empty() {
        return Err(EntityIdError::Empty);
    }
    if id.len() > MAX_ENTITY_ID_LEN {
        return Err(EntityIdError::TooLong(id.len()));
    }
    // Every allowed character is one ASCII byte, so a byte test decides (a batch run checks
    // every id of its input: this was 4% of an incremental run's CPU as a per-character
    // search); the offending character is looked for only when there is one.
    if id.bytes().all(allowed_in_entity_id) {
        return Ok(());
    }
    match id
        .chars()
        .find(|&c| !(c.is_ascii() && allowed_in_entity_id(c as u8)))
    {
        Some(bad) => Err(EntityIdError::BadCharacter(bad)),
        None => Ok(()),
    }
}

fn allowed_in_entity_id(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(byte, b'.' | b'_' | b'-' | b':' | b'@' | b'/' | b'=' | b'+')
}

/// The keys of one resource's model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    base: String,
    tag: String,
}

impl Keyspace {
    /// The keyspace for `key_prefix` (the cache's keyPrefix, or `{namespace}/{name}`) and
    /// model `version`. Neither may contain `:` or braces; the API schema guarantees it.
    pub fn new(key_prefix: &str, version: &str) -> Self {
        Self {
            base: format!("mr:{key_prefix}:{version}:"),
            tag: format!("{key_prefix}:{version}"),
        }
    }

    /// The default key prefix of a resource: `{namespace}/{name}`.
    pub fn default_prefix(namespace: &str, name: &str) -> String {
        format!("{namespace}/{name}")
    }

    /// The bucket layout of `generation`, which has `buckets` buckets (a power of two, as
    /// recorded under [`Keyspace::bucket_count_key`]).
    pub fn batch_layout(&self, generation: &str, buckets: u32) -> BatchLayout {
        BatchLayout {
            prefix: format!("{}b:{generation}:{{{}:{generation}/", self.base, self.tag),
            buckets: buckets.max(1).next_power_of_two(),
        }
    }

    /// Where `generation` records its bucket count.
    pub fn bucket_count_key(&self, generation: &str) -> String {
        format!("{}g:{generation}:buckets", self.base)
    }

    /// Where the real-time prediction of `id` lives.
    pub fn realtime(&self, id: &str) -> String {
        format!("{}rt:{{{id}}}", self.base)
    }

    /// The pointer to the published batch generation.
    pub fn serving_pointer(&self) -> String {
        format!("{}serving", self.base)
    }

    /// The hash of shards that completed `generation`: shard index → predictions written.
    /// A retried shard overwrites its own field, so the count stays exact.
    pub fn shards_done(&self, generation: &str) -> String {
        format!("{}g:{generation}:done", self.base)
    }

    /// What each shard of `generation` did beyond writing predictions, for the operator's
    /// `status.lastBatch`: fields `{what}:{shard}` (`carried`, `removed`, `repaired`) → a
    /// count. A retried shard overwrites its own fields, so sums stay exact.
    pub fn run_report(&self, generation: &str) -> String {
        format!("{}g:{generation}:report", self.base)
    }

    /// The set of entities (8-byte entity hashes) that incremental runs updating
    /// `generation` found in a row group's fingerprint index but not in the row group: gone
    /// from the input, or moved to another row group; the run's last shard sorts them out.
    pub fn removal_candidates(&self, generation: &str) -> String {
        format!("{}g:{generation}:gone", self.base)
    }

    /// The set of buckets (4-byte little-endian numbers) of `generation` that an incremental
    /// run found absent when it refreshed their TTL (evicted, or expired): every entity of
    /// the input that falls in one is scored again by the shard whose row group holds it,
    /// since the fingerprint index would otherwise carry a prediction that is no longer
    /// there; the run's last shard clears the set.
    pub fn absent_buckets(&self, generation: &str) -> String {
        format!("{}g:{generation}:absent", self.base)
    }

    /// Set once a shard of the incremental run `generation` has refreshed the TTL of every
    /// bucket it updates and recorded those absent: the run's other shards (and retries)
    /// then need not refresh them again.
    pub fn buckets_refreshed(&self, generation: &str) -> String {
        format!("{}g:{generation}:refreshed", self.base)
    }

    /// The claim of the one shard of the incremental run `generation` that refreshes the
    /// buckets' TTL while the others wait for [`Keyspace::buckets_refreshed`]: a string
    /// naming the shard, with a short TTL its holder keeps renewing (a shard that dies
    /// lets it lapse, and another takes over).
    pub fn refresh_claim(&self, generation: &str) -> String {
        format!("{}g:{generation}:refreshing", self.base)
    }

    /// The input layout whose fingerprint indexes `generation` holds (row groups per file,
    /// in listing order), so a run reading fewer files or row groups knows which indexes
    /// describe rows it no longer reads.
    pub fn index_listing(&self, generation: &str) -> String {
        format!("{}g:{generation}:listing", self.base)
    }

    /// The hash of attempts per shard of `generation`: a shard that finds itself retried
    /// reads before it writes.
    pub fn shard_attempts(&self, generation: &str) -> String {
        format!("{}g:{generation}:attempts", self.base)
    }

    /// The hash where every scorer pod publishes its latest traffic window (field = pod name),
    /// what the autoscaler reads without a Prometheus server.
    pub fn traffic(&self) -> String {
        format!("{}traffic", self.base)
    }

    /// The sorted set of sampled request counts per entity during `hour` (hours since the
    /// Unix epoch). Every hour of one version shares a hash tag, so a union of recent hours
    /// is one command on Redis Cluster; different resources spread over slots.
    pub fn activity(&self, hour: u64) -> String {
        format!("{}activity:{{{}}}:{hour}", self.base, self.tag)
    }

    /// The fingerprint index of one row group in `generation`: the (entity, features
    /// fingerprint) pairs its batch run scored, so an incremental run finds the unchanged
    /// rows with one read per row group instead of one per entity. A row group is named by
    /// its file's position in the sorted input listing and its index in the file, so a new
    /// snapshot laid out like the last one (`date=…/part-0.parquet`) finds its index.
    pub fn fingerprint_index(&self, generation: &str, file: usize, row_group: usize) -> String {
        format!("{}g:{generation}:fpi:{file}:{row_group}", self.base)
    }

    /// The generation an incremental run updated in place: scorers that find `generation`
    /// in the serving pointer read this one's keys.
    pub fn alias(&self, generation: &str) -> String {
        format!("{}g:{generation}:alias", self.base)
    }

    /// What a batch run of `generation` does ([`RunPlan`]), decided by the first of its
    /// shards to start so all of them do the same.
    pub fn run_plan(&self, generation: &str) -> String {
        format!("{}g:{generation}:plan", self.base)
    }

    /// A `SCAN MATCH` pattern for every key of this version.
    pub fn scan_pattern(&self) -> String {
        format!("{}*", escape_glob(&self.base))
    }
}

/// A `SCAN MATCH` pattern for every key of every version of one resource: what deleting the
/// resource removes.
pub fn resource_scan_pattern(key_prefix: &str) -> String {
    format!("{}*", escape_glob(&format!("mr:{key_prefix}:")))
}

/// Escapes the glob metacharacters Redis `MATCH` understands.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What a batch run does, as recorded under [`Keyspace::run_plan`]: written by the run's
/// first shard, followed by the others, and read by serving scorers to learn when the
/// published run looked at the features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunPlan {
    /// Score every entity into the run's own generation (`full {ms}`).
    Full {
        /// When the run started (Unix milliseconds): what later incremental runs measure
        /// the generation's age by.
        started_ms: u64,
    },
    /// Update generation `base` in place (`update {ms} {base}`).
    Update {
        /// When the run started (Unix milliseconds): every entity it carried had, then, the
        /// features its prediction was computed from.
        started_ms: u64,
        /// The generation updated.
        base: String,
    },
}

impl RunPlan {
    /// The record's text.
    pub fn encode(&self) -> String {
        match self {
            Self::Full { started_ms } => format!("full {started_ms}"),
            Self::Update { started_ms, base } => format!("update {started_ms} {base}"),
        }
    }

    /// Reads a record written by [`RunPlan::encode`]; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let plan = match (parts.next()?, parts.next()?.parse().ok()?) {
            ("full", started_ms) => Self::Full { started_ms },
            ("update", started_ms) => Self::Update {
                started_ms,
                base: parts.next().filter(|b| !b.is_empty())?.to_string(),
            },
            _ => return None,
        };
        parts.next().is_none().then_some(plan)
    }

    /// When the run started.
    pub fn started_ms(&self) -> u64 {
        match self {
            Self::Full { started_ms } | Self::Update { started_ms, .. } => *started_ms,
        }
    }
}

/// A cached prediction: the value and when it was computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachedPrediction {
    /// The model's output.
    pub value: f32,
    /// Milliseconds since the Unix epoch when it was computed.
    pub computed_at_ms: u64,
}

/// A stored value that is not a prediction this code can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value is empty.
    #[error("empty value")]
    Empty,
    /// Written by a newer encoding.
    #[error("unknown value encoding {0}")]
    UnknownEncoding(u8),
    /// The length does not match the encoding.
    #[error("value of {actual} bytes; encoding 1 has {VALUE_V1_LEN}")]
    BadLength {
        /// The bytes found.
        actual: usize,
    },
}

impl CachedPrediction {
    /// A prediction computed now.
    pub fn now(value: f32) -> Self {
        Self {
            value,
            computed_at_ms: now_ms(),
        }
    }

    /// The compact binary form: `[1][f32 LE][u64 LE ms]`, 13 bytes.
    pub fn encode(&self) -> [u8; VALUE_V1_LEN] {
        let mut out = [0u8; VALUE_V1_LEN];
        out[0] = VALUE_ENCODING_V1;
        out[1..5].copy_from_slice(&self.value.to_le_bytes());
        out[5..13].copy_from_slice(&self.computed_at_ms.to_le_bytes());
        out
    }

    /// The batch form: the v1 value plus the fingerprint of the features it was scored on
    /// (what incremental runs compare), 21 bytes, version byte 2.
    pub fn encode_with_fingerprint(&self, fingerprint: u64) -> [u8; VALUE_V2_LEN] {
        let mut out = [0u8; VALUE_V2_LEN];
        out[..VALUE_V1_LEN].copy_from_slice(&self.encode());
        out[0] = VALUE_ENCODING_V2;
        out[VALUE_V1_LEN..].copy_from_slice(&fingerprint.to_le_bytes());
        out
    }

    /// The fingerprint of a v2 value (`None` for a v1 value or garbage).
    pub fn fingerprint(bytes: &[u8]) -> Option<u64> {
        if bytes.len() != VALUE_V2_LEN || bytes[0] != VALUE_ENCODING_V2 {
            return None;
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[VALUE_V1_LEN..]);
        Some(u64::from_le_bytes(fp))
    }

    /// Reads a value written by [`CachedPrediction::encode`] or
    /// [`CachedPrediction::encode_with_fingerprint`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ValueError> {
        let (&version, rest) = bytes.split_first().ok_or(ValueError::Empty)?;
        let expected = match version {
            VALUE_ENCODING_V1 => VALUE_V1_LEN,
            VALUE_ENCODING_V2 => VALUE_V2_LEN,
            other => return Err(ValueError::UnknownEncoding(other)),
        };
        if bytes.len() != expected {
            return Err(ValueError::BadLength {
                actual: bytes.len(),
            });
        }
        let mut value = [0u8; 4];
        value.copy_from_slice(&rest[..4]);
        let mut at = [0u8; 8];
        at.copy_from_slice(&rest[4..12]);
        Ok(Self {
            value: f32::from_le_bytes(value),
            computed_at_ms: u64::from_le_bytes(at),
        })
    }
}

/// Entities per bucket a generation is sized for: well inside `hash-max-listpack-entries`
/// (512 built into Redis 7.0, 128 in many configs), so buckets stay compact listpacks whose
/// lookups scan a couple of kilobytes at most.
pub const ENTITIES_PER_BUCKET: u64 = 64;

/// The most buckets a generation has (a quarter of a billion entities at 64 each; more
/// entities make buckets larger, not more numerous).
pub const MAX_BUCKETS: u32 = 1 << 22;

/// The bucket count for a generation of `entities`: a power of two near
/// `entities / ENTITIES_PER_BUCKET`, at least 1 and at most [`MAX_BUCKETS`]. Every shard of a
/// run computes it from the whole input's row count, so all agree.
pub fn bucket_count(entities: u64) -> u32 {
    let wanted = entities.div_ceil(ENTITIES_PER_BUCKET).max(1);
    let power = wanted.next_power_of_two().min(u64::from(MAX_BUCKETS));
    u32::try_from(power).unwrap_or(MAX_BUCKETS)
}

/// The 64-bit hash of an entity id (FNV-1a over its bytes). Stored in fingerprint indexes
/// and behind every bucket choice: it must never change.
pub fn entity_hash(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The bucket, among `buckets` (a power of two), of the entity whose [`entity_hash`] is
/// `hash`. FNV-1a's low bits are weak, so they are mixed first.
pub fn bucket_of(hash: u64, buckets: u32) -> u32 {
    (fingerprint_finish(hash) & (u64::from(buckets.max(1)) - 1)) as u32
}

/// Where one generation keeps its batch predictions ([`Keyspace::batch_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    prefix: String,
    buckets: u32,
}

impl BatchLayout {
    /// The number of buckets.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The bucket of an entity whose [`entity_hash`] is `hash`.
    pub fn bucket_of_hash(&self, hash: u64) -> u32 {
        bucket_of(hash, self.buckets)
    }

    /// The hash key of `bucket`.
    pub fn bucket_key(&self, bucket: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 11);
        key.push_str(&self.prefix);
        key.push_str(&bucket.to_string());
        key.push('}');
        key
    }

    /// The hash key holding `id`'s prediction (the field is the id itself).
    pub fn key_of(&self, id: &str) -> String {
        self.bucket_key(self.bucket_of_hash(entity_hash(id)))
    }
}

/// Where every row's fingerprint starts.
pub const FINGERPRINT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// One feature folded into a row's running fingerprint: rotate, xor the value's bits,
/// multiply by an odd constant. Each step is a bijection in both the running hash and the
/// value, so changing any one feature always changes the fingerprint, and the rotation
/// carries high bits down so every bit of the result depends on every input bit. It works
/// on whole 32-bit words (the byte-wise FNV-1a it replaced cost four dependent multiplies
/// per feature), and [`fingerprint_column`] runs it down columns, where rows are
/// independent and the CPU overlaps them.
#[inline]
pub fn fingerprint_step(hash: u64, value: f32) -> u64 {
    (hash.rotate_left(23) ^ u64::from(value.to_bits())).wrapping_mul(0x9fb2_1c65_1e98_df25)
}

/// The last step of a fingerprint: a 64-bit finalizer (a bijection) mixing every bit into
/// every other.
#[inline]
pub fn fingerprint_finish(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The fingerprint of one row of features (the values as scored, in the model's order).
/// Equal rows give equal fingerprints in every process and version of this code: it is
/// stored in Redis. (Version 2: values written with version 1's FNV-1a fingerprint no
/// longer match, so the first incremental run after an upgrade rescores every entity once.)
pub fn features_fingerprint(row: &[f32]) -> u64 {
    fingerprint_finish(
        row.iter()
            .fold(FINGERPRINT_SEED, |h, &v| fingerprint_step(h, v)),
    )
}

/// Folds one column of features into the running fingerprints of its rows (`hashes` starts
/// at [`FINGERPRINT_SEED`]; finish each with [`fingerprint_finish`]). Columns folded in the
/// model's order give exactly [`features_fingerprint`] of each row.
pub fn fingerprint_column(hashes: &mut [u64], column: &[f32]) {
    for (hash, &value) in hashes.iter_mut().zip(column) {
        *hash = fingerprint_step(*hash, value);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, or of the whole key).
pub fn cluster_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&len| len > 0)
                .map(|len| &rest[..len])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % 16_384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_plans_read_back_as_written_and_nothing_else_reads() {
        for plan in [
            RunPlan::Full { started_ms: 0 },
            RunPlan::Full {
                started_ms: 1_764_547_200_000,
            },
            RunPlan::Update {
                started_ms: 1_764_547_200_000,
                base: "churn-batch-29012345".into(),
            },
        ] {
            assert_eq!(RunPlan::parse(&plan.encode()), Some(plan));
        }
        for bad in [
            "",
            "full",
            "full x",
            "full -1",
            "full 1 2",
            "update",
            "update 5",
            "update 5 ",
            "update g1",
            "update 5 g1 g2",
            "partial 3",
        ] {
            assert_eq!(RunPlan::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_name_the_resource_version_and_entity() {
        let ks = Keyspace::new("ml/churn", "3");
        let layout = ks.batch_layout("20261130-020000", 1024);
        assert_eq!(
            layout.bucket_key(7),
            "mr:ml/churn:3:b:20261130-020000:{ml/churn:3:20261130-020000/7}"
        );
        assert_eq!(
            layout.key_of("user_42"),
            layout.bucket_key(bucket_of(entity_hash("user_42"), 1024))
        );
        assert_eq!(ks.batch_layout("G", 1000).buckets(), 1024, "a power of two");
        assert_eq!(ks.bucket_count_key("G"), "mr:ml/churn:3:g:G:buckets");
        assert_eq!(ks.realtime("user_42"), "mr:ml/churn:3:rt:{user_42}");
        assert_eq!(ks.serving_pointer(), "mr:ml/churn:3:serving");
        assert_eq!(ks.shards_done("G"), "mr:ml/churn:3:g:G:done");
        assert_eq!(ks.removal_candidates("G"), "mr:ml/churn:3:g:G:gone");
        assert_eq!(ks.index_listing("G"), "mr:ml/churn:3:g:G:listing");
        assert_eq!(ks.absent_buckets("G"), "mr:ml/churn:3:g:G:absent");
        assert_eq!(ks.run_report("G"), "mr:ml/churn:3:g:G:report");
        assert_eq!(ks.buckets_refreshed("G"), "mr:ml/churn:3:g:G:refreshed");
        assert_eq!(ks.refresh_claim("G"), "mr:ml/churn:3:g:G:refreshing");
        assert_eq!(ks.traffic(), "mr:ml/churn:3:traffic");
        assert_eq!(ks.activity(7), "mr:ml/churn:3:activity:{ml/churn:3}:7");
        assert_eq!(
            cluster_slot(ks.activity(7).as_bytes()),
            cluster_slot(ks.activity(8).as_bytes())
        );
    }

    #[test]
    fn two_versions_or_resources_never_share_a_key() {
        let a = Keyspace::new("ml/churn", "3");
        let b = Keyspace::new("ml/churn", "4");
        let c = Keyspace::new("ml/churn2", "3");
        assert_ne!(a.realtime("x"), b.realtime("x"));
        assert_ne!(a.realtime("x"), c.realtime("x"));
        assert_ne!(a.serving_pointer(), b.serving_pointer());
    }

    #[test]
    fn entities_and_buckets_spread_over_slots() {
        let ks = Keyspace::new("ml/churn", "3");
        let layout = ks.batch_layout("G", 1024);
        let buckets: std::collections::HashSet<u16> = (0..1024)
            .map(|b| cluster_slot(layout.bucket_key(b).as_bytes()))
            .collect();
        assert!(
            buckets.len() > 900,
            "1024 buckets hit only {} slots",
            buckets.len()
        );
        let other = Keyspace::new("ml/other", "3").batch_layout("G", 1024);
        assert_ne!(
            cluster_slot(layout.bucket_key(0).as_bytes()),
            cluster_slot(other.bucket_key(0).as_bytes()),
            "bucket 0 of every resource must not share one slot"
        );
        let slots: std::collections::HashSet<u16> = (0..1000)
            .map(|i| cluster_slot(ks.realtime(&format!("user_{i}")).as_bytes()))
            .collect();
        assert!(slots.len() > 900, "1000 ids hit only {} slots", slots.len());
    }

    #[test]
    fn cluster_slot_matches_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(cluster_slot(b"foo"), 12182);
        assert_eq!(
            cluster_slot(b"{user1000}.following"),
            cluster_slot(b"user1000")
        );
        assert_eq!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"foo{}{bar}"));
    }

    #[test]
    fn values_round_trip_and_reject_garbage() {
        let p = CachedPrediction {
            value: 0.731,
            computed_at_ms: 1_764_468_000_123,
        };
        let bytes = p.encode();
        assert_eq!(bytes.len(), 13);
        assert_eq!(CachedPrediction::decode(&bytes), Ok(p));
        assert_eq!(CachedPrediction::decode(&[]), Err(ValueError::Empty));
        assert_eq!(
            CachedPrediction::decode(b"{\"prediction\":1}"),
            Err(ValueError::UnknownEncoding(b'{'))
        );
        assert_eq!(
            CachedPrediction::decode(&bytes[..12]),
            Err(ValueError::BadLength { actual: 12 })
        );
    }

    #[test]
    fn batch_values_carry_a_fingerprint_and_decode_as_predictions() {
        let p = CachedPrediction {
            value: 0.25,
            computed_at_ms: 42,
        };
        let fp = features_fingerprint(&[1.0, 2.0]);
        let bytes = p.encode_with_fingerprint(fp);
        assert_eq!(bytes.len(), 21);
        assert_eq!(CachedPrediction::decode(&bytes), Ok(p));
        assert_eq!(CachedPrediction::fingerprint(&bytes), Some(fp));
        assert_eq!(CachedPrediction::fingerprint(&p.encode()), None);
        assert_ne!(fp, features_fingerprint(&[1.0, 2.000_001]));
        assert_ne!(fp, features_fingerprint(&[2.0, 1.0]));
        assert_ne!(features_fingerprint(&[0.0]), features_fingerprint(&[-0.0]));
        assert_ne!(features_fingerprint(&[]), features_fingerprint(&[0.0]));
        // Stored in Redis: the function must never change.
        assert_eq!(features_fingerprint(&[]), PINNED_EMPTY);
        assert_eq!(features_fingerprint(&[1.0]), PINNED_ONE);
    }

    #[test]
    fn bucket_counts_track_the_input_and_buckets_fill_evenly() {
        assert_eq!(bucket_count(0), 1);
        assert_eq!(bucket_count(64), 1);
        assert_eq!(bucket_count(65), 2);
        assert_eq!(bucket_count(1_000_000), 16_384);
        assert_eq!(bucket_count(u64::MAX), MAX_BUCKETS);
        let mut sizes = vec![0u32; 1024];
        for i in 0..65_536 {
            sizes[bucket_of(entity_hash(&format!("user_{i}")), 1024) as usize] += 1;
        }
        let (min, max) = (sizes.iter().min(), sizes.iter().max());
        assert!(
            min >= Some(&30) && max <= Some(&110),
            "64 per bucket on average, found {min:?}..{max:?}"
        );
        // Stored in Redis and fingerprint indexes: the functions must never change.
        assert_eq!(entity_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(entity_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(bucket_of(entity_hash("user_42"), 1 << 22), PINNED_BUCKET);
    }

    const PINNED_BUCKET: u32 = 572_591;

    const PINNED_EMPTY: u64 = 0x9ca0_66f1_a4ab_2eea;
    const PINNED_ONE: u64 = 0xc365_aa08_1b87_384f;

    #[test]
    fn columns_folded_in_order_give_each_rows_fingerprint() {
        let rows = [[1.0f32, 2.0, 3.0], [0.5, -7.25, 1e-9], [0.0, 0.0, 0.0]];
        let mut hashes = vec![FINGERPRINT_SEED; rows.len()];
        for j in 0..3 {
            let column: Vec<f32> = rows.iter().map(|r| r[j]).collect();
            fingerprint_column(&mut hashes, &column);
        }
        for (row, hash) in rows.iter().zip(hashes) {
            assert_eq!(fingerprint_finish(hash), features_fingerprint(row));
        }
    }

    #[test]
    fn entity_ids_are_checked() {
        assert!(validate_entity_id("user_42").is_ok());
        assert!(validate_entity_id("tenant:7/user@x.com").is_ok());
        assert_eq!(validate_entity_id(""), Err(EntityIdError::Empty));
        assert_eq!(
            validate_entity_id("a{b}"),
            Err(EntityIdError::BadCharacter('{'))
        );
        assert_eq!(
            validate_entity_id("a b"),
            Err(EntityIdError::BadCharacter(' '))
        );
        // Not ASCII: named as the character, not as one of its bytes.
        assert_eq!(
            validate_entity_id("usér"),
            Err(EntityIdError::BadCharacter('é'))
        );
        assert!(validate_entity_id("A-Z.a_z+0=9").is_ok());
        assert_eq!(
            validate_entity_id(&"x".repeat(257)),
            Err(EntityIdError::TooLong(257))
        );
    }

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(resource_scan_pattern("ml/churn"), "mr:ml/churn:*");
        assert_eq!(escape_glob("a*b?[c]"), "a\\*b\\?\\[c\\]");
        assert_eq!(Keyspace::new("ml/c", "3").scan_pattern(), "mr:ml/c:3:*");
    }
}
