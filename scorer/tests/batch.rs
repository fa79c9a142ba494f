//! `millrace-scorer batch` as real processes on real Parquet files (written here with the
//! `parquet` crate), a real ONNX model, a real `redis-server`, a real 3-master Redis
//! Cluster, a real S3-compatible server (moto) and GCS and Azure Blob emulators
//! (fake-gcs-server, Azurite): shards cover every row exactly once, predictions equal the
//! model's, a killed shard records nothing and a rerun completes, bad input fails
//! with the file, column and row group named, an incremental run rescores exactly the
//! changed rows, withdraws the predictions of entities whose features turned null and
//! removes those of entities gone from the input (moved ones kept), a failed one never
//! leaves a fingerprint index ahead of its predictions, all
//! shards of a run follow the plan its first shard recorded, an incremental run rebuilds a
//! generation older than `batch.rebuildAfter`, and a write follows a Redis Cluster slot that
//! moved to another master mid-run.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Float32Array, Float64Array, RecordBatch, StringArray};
use millrace_crds::config::{BatchConfig, ScorerConfig};
use millrace_crds::keys::{BatchLayout, CachedPrediction, Keyspace, RunPlan, entity_hash};
use millrace_crds::spec::{ExecutionProvider, MissingFeaturePolicy, OfflineFeatures};
use millrace_e2e::azure::AzuriteServer;
use millrace_e2e::gcs::GcsServer;
use millrace_e2e::redis_server::{RedisCluster, RedisServer};
use millrace_scorer::model::Model;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use redis::AsyncCommands;
use support::{Moto, config, make_model};

const INPUTS: [&str; 4] = ["tenure", "spend", "calls", "region"];

/// Deterministic feature values for entity `i`.
fn features_of(i: usize) -> [f32; 4] {
    let x = i as f32;
    [
        (x * 0.013).sin(),
        (x * 0.7).cos(),
        (x % 17.0) / 17.0,
        ((x * 1.3) % 5.0) - 2.5,
    ]
}

/// Writes `ids` (with `features_of`) to `path` in row groups of `row_group` rows.
fn write_parquet(path: &Path, ids: &[usize], row_group: usize) {
    write_parquet_with(path, ids, row_group, |i| i);
}

/// Writes `ids` to `path` in row groups of `row_group` rows, entity `i` with the features
/// of `feature_source(i)`.
fn write_parquet_with(
    path: &Path,
    ids: &[usize],
    row_group: usize,
    feature_source: impl Fn(usize) -> usize,
) {
    let columns: Vec<(&str, ArrayRef)> = std::iter::once((
        "user_id",
        Arc::new(StringArray::from(
            ids.iter().map(|i| format!("e{i}")).collect::<Vec<_>>(),
        )) as ArrayRef,
    ))
    .chain(INPUTS.iter().enumerate().map(|(j, name)| {
        (
            *name,
            Arc::new(Float32Array::from(
                ids.iter()
                    .map(|&i| features_of(feature_source(i))[j])
                    .collect::<Vec<_>>(),
            )) as ArrayRef,
        )
    }))
    .collect();
    write_batch(
        path,
        RecordBatch::try_from_iter(columns).expect("batch"),
        row_group,
    );
}

fn write_batch(path: &Path, batch: RecordBatch, row_group: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let file = std::fs::File::create(path).expect("create");
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

struct Setup {
    dir: tempfile::TempDir,
    model: Model,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        make_model(dir.path(), INPUTS.len(), 1);
        let model = Model::load(
            &dir.path().join("model.onnx"),
            4,
            None,
            Some("y"),
            &[ExecutionProvider::Cpu],
        )
        .expect("model");
        std::fs::create_dir_all(dir.path().join("lake")).expect("lake");
        Self { dir, model }
    }

    fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    fn config(&self, uri: &str, batch_size: i32, shards: i32) -> ScorerConfig {
        let mut cfg = config(&self.dir.path().join("model.onnx"), &INPUTS);
        cfg.features.offline = Some(OfflineFeatures {
            uri: uri.to_string(),
            format: Default::default(),
            id_column: "user_id".into(),
            credentials_secret_ref: None,
        });
        cfg.batch = Some(BatchConfig {
            shards,
            batch_size,
            incremental: false,
            rebuild_after: millrace_crds::spec::default_rebuild_after(),
            scratch_bytes: None,
        });
        cfg
    }

    /// [`Setup::config`] for an incremental run over lake/`dir`.
    fn incremental(&self, dir: &str, batch_size: i32, shards: i32) -> ScorerConfig {
        let mut cfg = self.config(
            &format!("file://{}/{dir}/", self.lake().display()),
            batch_size,
            shards,
        );
        if let Some(batch) = cfg.batch.as_mut() {
            batch.incremental = true;
        }
        cfg
    }

    fn expected(&self, i: usize) -> f32 {
        self.model.predict(&features_of(i)).expect("predict")[0]
    }
}

fn config_file(dir: &Path, cfg: &ScorerConfig) -> PathBuf {
    let path = dir.join(format!("scorer-{}.json", rand_suffix()));
    std::fs::write(&path, serde_json::to_string(cfg).expect("json")).expect("write");
    path
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

fn batch_command(
    config: &Path,
    redis_url: &str,
    generation: &str,
    shards: usize,
    index: usize,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"));
    cmd.args(["batch", "--config"])
        .arg(config)
        .env("MILLRACE_REDIS_URL", redis_url)
        .env("MILLRACE_GENERATION", generation)
        .env("MILLRACE_SHARDS", shards.to_string())
        .env("JOB_COMPLETION_INDEX", index.to_string())
        .env("RUST_LOG", "info");
    cmd
}

fn run_batch(
    config: &Path,
    redis_url: &str,
    generation: &str,
    shards: usize,
    index: usize,
) -> Output {
    batch_command(config, redis_url, generation, shards, index)
        .output()
        .expect("run batch")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Where `generation`'s predictions are, as its batch run recorded.
async fn layout_of(conn: &mut impl redis::aio::ConnectionLike, generation: &str) -> BatchLayout {
    let ks = Keyspace::new("ml/churn", "3");
    let buckets: u32 = redis::cmd("GET")
        .arg(ks.bucket_count_key(generation))
        .query_async(conn)
        .await
        .expect("the run records its bucket count");
    ks.batch_layout(generation, buckets)
}

/// The stored batch value of entity `id` in `generation`.
async fn batch_value(
    conn: &mut impl redis::aio::ConnectionLike,
    generation: &str,
    id: &str,
) -> Option<Vec<u8>> {
    let layout = layout_of(conn, generation).await;
    redis::cmd("HGET")
        .arg(layout.key_of(id))
        .arg(id)
        .query_async(conn)
        .await
        .expect("hget")
}

/// Every prediction of `generation` for ids `0..n`, read back and decoded.
async fn read_all(
    conn: &mut impl redis::aio::ConnectionLike,
    generation: &str,
    n: usize,
) -> Vec<Option<CachedPrediction>> {
    let layout = layout_of(conn, generation).await;
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let id = format!("e{i}");
            pipe.hget(layout.key_of(&id), &id);
        }
        let values: Vec<Option<Vec<u8>>> = pipe.query_async(conn).await.expect("get");
        out.extend(
            values
                .into_iter()
                .map(|v| v.map(|b| CachedPrediction::decode(&b).expect("decodes"))),
        );
    }
    out
}

/// Asserts that `generation` holds, for every entity `e{i}` below `n`, the model's
/// prediction on the features of entity `source(i)`.
async fn assert_scored_as(
    conn: &mut impl redis::aio::ConnectionLike,
    setup: &Setup,
    generation: &str,
    n: usize,
    source: impl Fn(usize) -> usize,
) {
    for (i, p) in read_all(conn, generation, n).await.into_iter().enumerate() {
        let p = p.unwrap_or_else(|| panic!("e{i} missing from {generation}"));
        let expected = setup.expected(source(i));
        assert!(
            (p.value - expected).abs() < 1e-6,
            "e{i}: {} vs {expected}",
            p.value
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_cover_every_row_exactly_once_and_equal_the_model() {
    let setup = Setup::new();
    let n = 2_500;
    let ids: Vec<usize> = (0..n).collect();
    // Three files of different sizes and row-group counts.
    write_parquet(&setup.lake().join("part-0.parquet"), &ids[..1_000], 128);
    write_parquet(
        &setup.lake().join("part-1.parquet"),
        &ids[1_000..1_100],
        1_000,
    );
    write_parquet(&setup.lake().join("part-2.parquet"), &ids[1_100..], 300);
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let uri = format!("file://{}/", setup.lake().display());
    let ks = Keyspace::new("ml/churn", "3");
    for shards in [1, 3, 7, 20] {
        let generation = format!("g-{shards}");
        let cfg = config_file(setup.dir.path(), &setup.config(&uri, 100, shards as i32));
        for index in 0..shards {
            let out = run_batch(&cfg, &server.url(), &generation, shards, index);
            assert!(
                out.status.success(),
                "shard {index}/{shards}: {}",
                stderr(&out)
            );
        }
        let done: HashMap<String, u64> = conn
            .hgetall(ks.shards_done(&generation))
            .await
            .expect("done");
        assert_eq!(done.len(), shards, "every shard recorded: {done:?}");
        assert_eq!(
            done.values().sum::<u64>(),
            n as u64,
            "each row written once: {done:?}"
        );
        let keys: Vec<String> = conn
            .keys(format!("mr:ml/churn:3:b:{generation}:*"))
            .await
            .expect("keys");
        let mut fields = 0;
        for key in &keys {
            let len: usize = conn.hlen(key).await.expect("hlen");
            fields += len;
        }
        assert_eq!(fields, n, "one field per entity across the buckets");
        assert_scored_as(&mut conn, &setup, &generation, n, |i| i).await;
        let bucket = layout_of(&mut conn, &generation).await.key_of("e0");
        let ttl: i64 = conn.pttl(bucket).await.expect("pttl");
        assert!(ttl > 86_000_000 && ttl <= 86_400_000, "batchTTL 24h: {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_records_nothing_and_a_rerun_completes() {
    let setup = Setup::new();
    // Several 64Ki-prediction write windows, so the kill lands between two of them.
    let n = 200_000;
    let ids: Vec<usize> = (0..n).collect();
    write_parquet(&setup.lake().join("big.parquet"), &ids, 5_000);
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let ks = Keyspace::new("ml/churn", "3");
    let uri = format!("file://{}/big.parquet", setup.lake().display());
    // Small batches, one pipeline in flight: slow enough to be killed midway.
    let cfg = config_file(setup.dir.path(), &setup.config(&uri, 16, 1));
    let mut child = batch_command(&cfg, &server.url(), "g-kill", 1, 0)
        .arg("--writes-in-flight")
        .arg("1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let size: u64 = redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("dbsize");
        if size > 1_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the shard never started writing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    let buckets: Vec<String> = conn.keys("mr:ml/churn:3:b:g-kill:*").await.expect("keys");
    let mut written = 0;
    for bucket in &buckets {
        let fields: usize = conn.hlen(bucket).await.expect("hlen");
        written += fields;
    }
    assert!(
        written > 0 && written < n,
        "killed midway: {written} of {n} written"
    );
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-kill")).await.expect("done");
    assert!(done.is_empty(), "a killed shard is not done: {done:?}");

    // The rerun rewrites the same keys (same predictions) and completes.
    let cfg = config_file(setup.dir.path(), &setup.config(&uri, 4096, 1));
    let out = run_batch(&cfg, &server.url(), "g-kill", 1, 0);
    assert!(out.status.success(), "{}", stderr(&out));
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-kill")).await.expect("done");
    assert_eq!(done.get("0"), Some(&(n as u64)));
    let all = read_all(&mut conn, "g-kill", n).await;
    assert!(all.iter().all(Option::is_some));
    assert!(
        stderr(&out).contains("shard done"),
        "a final summary: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_sizes_the_generation_otherwise_writes_nothing() {
    let setup = Setup::new();
    let ids: Vec<usize> = (0..1_000).collect();
    write_parquet(&setup.lake().join("p.parquet"), &ids, 500);
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let ks = Keyspace::new("ml/churn", "3");
    // Another shard of the run saw a table twice this size (it changed during the run).
    let _: () = conn
        .set(ks.bucket_count_key("g-moved"), 32)
        .await
        .expect("set");
    let uri = format!("file://{}/", setup.lake().display());
    let cfg = config_file(setup.dir.path(), &setup.config(&uri, 128, 2));
    let out = run_batch(&cfg, &server.url(), "g-moved", 2, 0);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has 32 buckets but this shard computed 16"),
        "{}",
        stderr(&out)
    );
    let written: Vec<String> = conn.keys("mr:ml/churn:3:b:g-moved:*").await.expect("keys");
    assert!(written.is_empty(), "{written:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_spread_over_a_real_redis_cluster() {
    let setup = Setup::new();
    let n = 3_000;
    let ids: Vec<usize> = (0..n).collect();
    write_parquet(&setup.lake().join("p.parquet"), &ids, 500);
    let cluster = RedisCluster::start(3);
    let uri = format!("file://{}/", setup.lake().display());
    let mut scorer_config = setup.config(&uri, 256, 2);
    scorer_config.cache.redis_cluster = true;
    let cfg = config_file(setup.dir.path(), &scorer_config);
    for index in 0..2 {
        let out = run_batch(&cfg, &cluster.url(), "g-c", 2, index);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
    let mut conn = client.get_async_connection().await.expect("cluster");
    let ks = Keyspace::new("ml/churn", "3");
    let layout = layout_of(&mut conn, "g-c").await;
    for i in 0..n {
        let id = format!("e{i}");
        let raw: Option<Vec<u8>> = conn.hget(layout.key_of(&id), &id).await.expect("hget");
        let p = CachedPrediction::decode(&raw.expect("present")).expect("decodes");
        assert!((p.value - setup.expected(i)).abs() < 1e-6);
    }
    let buckets = u64::from(layout.buckets());
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-c")).await.expect("done");
    assert_eq!(done.values().sum::<u64>(), n as u64);
    // Every master holds a share of the buckets: no key pattern forces one slot.
    for url in cluster.urls() {
        let mut node = connection(&url).await;
        let size: u64 = redis::cmd("DBSIZE")
            .query_async(&mut node)
            .await
            .expect("dbsize");
        assert!(
            size > buckets / 6,
            "{url} holds {size} of {buckets} buckets"
        );
    }

    // A scorer on the cluster answers from the published generation's buckets, and from a
    // real-time key (another slot) in the same lookup.
    let _: () = conn
        .set(ks.serving_pointer(), "g-c")
        .await
        .expect("publish");
    let fresh = CachedPrediction::now(0.75);
    let _: () = conn
        .set(ks.realtime("e1"), &fresh.encode()[..])
        .await
        .expect("realtime");
    let scorer = support::Scorer::start(&scorer_config, &cluster.url(), &[]).await;
    let (status, body) = scorer.get("/v1/predictions/e7").await;
    assert_eq!(
        (status, body["source"].as_str()),
        (200, Some("batch")),
        "{body}"
    );
    let served = body["prediction"].as_f64().expect("prediction");
    assert!(
        (served - f64::from(setup.expected(7))).abs() < 1e-6,
        "{body}"
    );
    let (_, body) = scorer.get("/v1/predictions/e1").await;
    assert_eq!(
        (body["source"].as_str(), body["prediction"].as_f64()),
        (Some("realtime"), Some(0.75)),
        "the newer real-time prediction wins: {body}"
    );

    // Day 2, incrementally on the cluster: every tenth entity's features changed. The
    // fingerprint indexes are read and written on the cluster like the predictions. Two
    // buckets were evicted meanwhile, each holding entities of both shards' row groups: the
    // first shard's writes recreate them before the second starts, and they are still
    // found and repaired.
    let before = cluster_values(&mut conn, &layout, n).await;
    let bucket_of = |i: usize| layout.bucket_of_hash(entity_hash(&format!("e{i}")));
    let evicted = [bucket_of(0), bucket_of(1)];
    for bucket in evicted {
        let _: i64 = conn.del(layout.bucket_key(bucket)).await.expect("evict");
    }
    let repaired_entities = |i: usize| evicted.contains(&bucket_of(i)) && !changed(i);
    std::fs::create_dir_all(setup.lake().join("day2")).expect("dir");
    write_parquet_with(&setup.lake().join("day2/p.parquet"), &ids, 500, day2_source);
    let mut incremental = setup.incremental("day2", 256, 2);
    incremental.cache.redis_cluster = true;
    let cfg = config_file(setup.dir.path(), &incremental);
    let (mut computed, mut carried, mut settled, mut repaired) = (0, 0, 0, 0);
    for index in 0..2 {
        let out = run_batch(&cfg, &cluster.url(), "g-c2", 2, index);
        let (c, k, i) = shard_summary(&out);
        (computed, carried, settled) = (computed + c, carried + k, settled + i);
        repaired += summary_field(&out, "repaired");
    }
    assert_eq!(
        repaired,
        (0..n).filter(|&i| repaired_entities(i)).count() as u64,
        "the evicted buckets' unchanged entities are scored again"
    );
    assert_eq!(
        (computed, carried + repaired, settled + repaired),
        (300, 2_700, 3_000),
        "exactly the changed rows are scored, every other row decided by the indexes, \
         carried or repaired"
    );
    let after = cluster_values(&mut conn, &layout, n).await;
    for i in 0..n {
        if repaired_entities(i) {
            let p =
                CachedPrediction::decode(after[i].as_deref().expect("repaired")).expect("decodes");
            assert!((p.value - setup.expected(i)).abs() < 1e-6, "e{i} repaired");
        } else if changed(i) {
            let p =
                CachedPrediction::decode(after[i].as_deref().expect("written")).expect("decodes");
            assert!(
                (p.value - setup.expected(day2_source(i))).abs() < 1e-6,
                "e{i} rescored"
            );
        } else {
            assert_eq!(after[i], before[i], "e{i} untouched");
        }
    }
}

/// The stored values of entities `0..n` in `layout`'s buckets on a cluster.
async fn cluster_values(
    conn: &mut redis::cluster_async::ClusterConnection,
    layout: &BatchLayout,
    n: usize,
) -> Vec<Option<Vec<u8>>> {
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("e{i}");
        values.push(conn.hget(layout.key_of(&id), &id).await.expect("hget"));
    }
    values
}

/// `url`'s node id and the slots it owns, from its `CLUSTER NODES` line.
async fn node_slots(url: &str) -> (String, Vec<std::ops::RangeInclusive<u16>>) {
    let mut node = connection(url).await;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node)
        .await
        .expect("cluster nodes");
    let line = nodes
        .lines()
        .find(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("myself")))
        .expect("a myself line");
    let fields: Vec<&str> = line.split(' ').collect();
    let slots = fields[8..]
        .iter()
        .filter_map(|range| {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            Some(from.parse().ok()?..=to.parse().ok()?)
        })
        .collect();
    (fields[0].to_string(), slots)
}

/// A slot that moves to another master after the writer learned the cluster's layout (a
/// reshard during a run) answers with `MOVED`: the writer learns the new owners and writes
/// the window again, reading the fields it expected absent first, so the fields it already
/// wrote on the other masters compare equal instead of passing for duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_follows_a_slot_that_moved_to_another_master() {
    use millrace_scorer::batch::writer::{Expect, FieldWrite, PredictionWriter};

    let cluster = RedisCluster::start(3);
    let layout = Keyspace::new("ml/churn", "3").batch_layout("g-moved", 16);
    let writer = PredictionWriter::connect(&cluster.url(), true, 60_000)
        .await
        .expect("connect");
    let entries: Vec<FieldWrite> = (0..400)
        .map(|i| {
            let id = format!("e{i}");
            FieldWrite {
                bucket: layout.bucket_of_hash(millrace_crds::keys::entity_hash(&id)),
                value: CachedPrediction::now(i as f32).encode_with_fingerprint(i),
                id,
                expect: Expect::Absent,
            }
        })
        .collect();

    // Move the (still empty) slot of e0's bucket to another master, telling every node.
    let slot = millrace_crds::keys::cluster_slot(layout.key_of("e0").as_bytes());
    let mut nodes = Vec::new();
    for url in cluster.urls() {
        let (id, slots) = node_slots(&url).await;
        nodes.push((url, id, slots.iter().any(|r| r.contains(&slot))));
    }
    let owner = nodes.iter().position(|n| n.2).expect("an owner");
    let target = (owner + 1) % nodes.len();
    let target_id = nodes[target].1.clone();
    for k in [owner, target, (owner + 2) % nodes.len()] {
        let mut node = connection(&nodes[k].0).await;
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&target_id)
            .query_async(&mut node)
            .await
            .expect("setslot");
    }

    let written = writer.write(&layout, &entries).await.expect("written");
    assert!(
        written.unexpected.is_empty(),
        "our own fields passed for duplicates: {:?}",
        written.unexpected
    );
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
    let mut conn = client.get_async_connection().await.expect("cluster");
    for (i, entry) in entries.iter().enumerate() {
        let raw: Option<Vec<u8>> = conn
            .hget(layout.bucket_key(entry.bucket), &entry.id)
            .await
            .expect("hget");
        let p = CachedPrediction::decode(&raw.expect("present")).expect("decodes");
        assert_eq!(p.value, i as f32);
    }
    // The moved bucket lives on its new master, with the batch TTL.
    let mut new_owner = connection(&nodes[target].0).await;
    let ttl: i64 = new_owner.pttl(layout.key_of("e0")).await.expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_on_s3_gcs_and_azure_is_read_with_credentials_from_the_environment() {
    let setup = Setup::new();
    let n = 500;
    let ids: Vec<usize> = (0..n).collect();
    write_parquet(&setup.lake().join("a.parquet"), &ids[..300], 100);
    write_parquet(&setup.lake().join("b.parquet"), &ids[300..], 100);
    // A Spark-style marker beside the data: not Parquet, so not listed.
    std::fs::write(setup.lake().join("_SUCCESS"), b"").expect("marker");
    let moto = Moto::start();
    moto.create_bucket("lake");
    let gcs = GcsServer::start();
    gcs.create_bucket("lake");
    let azure = AzuriteServer::start();
    azure.create_container("lake");
    for name in ["a.parquet", "b.parquet", "_SUCCESS"] {
        let path = setup.lake().join(name);
        let key = format!("users/{name}");
        moto.put_file("lake", &key, &path);
        gcs.put_file("lake", &key, &path);
        azure.put_file("lake", &key, &path);
    }
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    // The last: every row group streamed from S3 to a spool file in ranged reads.
    for (uri, env, generation, max_group_mib) in [
        ("s3://lake/users/", moto.credentials(), "g-s3", "64"),
        ("gs://lake/users/", gcs.credentials(), "g-gcs", "64"),
        ("az://lake/users/", azure.credentials(), "g-azure", "64"),
        ("s3://lake/users/", moto.credentials(), "g-s3-spooled", "0"),
    ] {
        let cfg = config_file(setup.dir.path(), &setup.config(uri, 128, 2));
        let mut spooled = 0;
        for shard in 0..2 {
            let out = batch_command(&cfg, &server.url(), generation, 2, shard)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .args(["--max-group-mib", max_group_mib])
                .output()
                .expect("run");
            if out.status.success() {
                spooled += summary_field(&out, "spooled_groups");
                // Small row groups on an object store: reads overlap, 8 at once by default.
                assert!(
                    stderr(&out).contains("row_groups_in_flight=8"),
                    "{}",
                    stderr(&out)
                );
            }
            assert!(
                out.status.success(),
                "{uri} shard {shard}: {}",
                stderr(&out)
            );
        }
        let expect_spooled = if max_group_mib == "0" { 3 + 2 } else { 0 };
        assert_eq!(spooled, expect_spooled, "{generation}: row groups spooled");
        let all = read_all(&mut conn, generation, n).await;
        for (i, p) in all.iter().enumerate() {
            let p = p.unwrap_or_else(|| panic!("{uri}: e{i} has no prediction"));
            assert!((p.value - setup.expected(i)).abs() < 1e-6, "{uri}: e{i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_file_column_and_row_group() {
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let ks = Keyspace::new("ml/churn", "3");
    let lake = setup.lake();
    let fails_with = |uri: String, cfg: Option<ScorerConfig>, generation: &str, wanted: &[&str]| {
        let cfg = cfg.unwrap_or_else(|| setup.config(&uri, 64, 1));
        let path = config_file(setup.dir.path(), &cfg);
        let out = run_batch(&path, &server.url(), generation, 1, 0);
        assert!(!out.status.success(), "{uri} should fail");
        for w in wanted {
            assert!(
                stderr(&out).contains(w),
                "{uri}: {:?} should mention {w}",
                stderr(&out)
            );
        }
    };

    // A missing column.
    std::fs::create_dir_all(lake.join("nocol")).expect("dir");
    let batch = RecordBatch::try_from_iter([
        (
            "user_id",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        ),
        (
            "tenure",
            Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
        ),
    ])
    .expect("batch");
    write_batch(&lake.join("nocol/x.parquet"), batch, 10);
    fails_with(
        format!("file://{}/nocol/", lake.display()),
        None,
        "g1",
        &["nocol/x.parquet", "\"spend\""],
    );

    // A wrong type.
    std::fs::create_dir_all(lake.join("types")).expect("dir");
    let mut cols: Vec<(&str, ArrayRef)> = vec![(
        "user_id",
        Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
    )];
    for name in INPUTS {
        let col: ArrayRef = if name == "calls" {
            Arc::new(StringArray::from(vec!["many"]))
        } else {
            Arc::new(Float64Array::from(vec![1.0]))
        };
        cols.push((name, col));
    }
    write_batch(
        &lake.join("types/t.parquet"),
        RecordBatch::try_from_iter(cols).expect("batch"),
        10,
    );
    fails_with(
        format!("file://{}/types/", lake.display()),
        None,
        "g2",
        &["types/t.parquet", "\"calls\"", "Utf8"],
    );

    // Nothing there, an empty file, a corrupt one.
    std::fs::create_dir_all(lake.join("none")).expect("dir");
    fails_with(
        format!("file://{}/none/", lake.display()),
        None,
        "g3",
        &["no .parquet files"],
    );
    std::fs::create_dir_all(lake.join("empty")).expect("dir");
    write_parquet(&lake.join("empty/e.parquet"), &[], 10);
    fails_with(
        format!("file://{}/empty/", lake.display()),
        None,
        "g4",
        &["empty/e.parquet", "no rows"],
    );
    std::fs::create_dir_all(lake.join("corrupt")).expect("dir");
    std::fs::write(lake.join("corrupt/c.parquet"), b"PAR1 this is not parquet").expect("write");
    fails_with(
        format!("file://{}/corrupt/", lake.display()),
        None,
        "g5",
        &["corrupt/c.parquet", "not a readable Parquet file"],
    );

    // Duplicate ids with different features, in different row groups.
    std::fs::create_dir_all(lake.join("dup")).expect("dir");
    let mut ids: Vec<usize> = (0..100).collect();
    ids.push(7);
    let mut batch_ids: Vec<String> = ids.iter().map(|i| format!("e{i}")).collect();
    batch_ids[100] = "e7".into();
    let mut cols: Vec<(&str, ArrayRef)> = vec![(
        "user_id",
        Arc::new(StringArray::from(batch_ids)) as ArrayRef,
    )];
    for (j, name) in INPUTS.iter().enumerate() {
        // Row 100 (e7 again) gets e50's features: a different prediction.
        let values: Vec<f32> = (0..101)
            .map(|r| features_of(if r == 100 { 50 } else { r })[j])
            .collect();
        cols.push((name, Arc::new(Float32Array::from(values))));
    }
    write_batch(
        &lake.join("dup/d.parquet"),
        RecordBatch::try_from_iter(cols).expect("batch"),
        50,
    );
    // Whichever occurrence is written second reports it (writes are concurrent): the
    // message names the file, the row group it was found in and the entity.
    fails_with(
        format!("file://{}/dup/", lake.display()),
        None,
        "g6",
        &["dup/d.parquet", "row group", "\"e7\""],
    );

    // A null feature: filled (and counted) under fill; the row skipped under fallback.
    std::fs::create_dir_all(lake.join("nulls")).expect("dir");
    let mut cols: Vec<(&str, ArrayRef)> = vec![(
        "user_id",
        Arc::new(StringArray::from(vec!["n0", "n1"])) as ArrayRef,
    )];
    for name in INPUTS {
        cols.push((
            name,
            Arc::new(Float64Array::from(vec![
                Some(1.0),
                if name == "spend" { None } else { Some(1.0) },
            ])) as ArrayRef,
        ));
    }
    write_batch(
        &lake.join("nulls/n.parquet"),
        RecordBatch::try_from_iter(cols).expect("batch"),
        10,
    );
    let uri = format!("file://{}/nulls/", lake.display());
    let out = run_batch(
        &config_file(setup.dir.path(), &setup.config(&uri, 64, 1)),
        &server.url(),
        "g7",
        1,
        0,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("filled=1"), "{}", stderr(&out));
    let n1 = batch_value(&mut conn, "g7", "n1").await;
    let want = setup.model.predict(&[1.0, 0.0, 1.0, 1.0]).expect("predict")[0];
    assert_eq!(
        CachedPrediction::decode(&n1.expect("filled"))
            .expect("decode")
            .value,
        want
    );
    let mut cfg = setup.config(&uri, 64, 1);
    cfg.features.missing.policy = MissingFeaturePolicy::Fallback;
    let out = run_one(&setup, &server, &cfg, "g8");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipped=1"), "{}", stderr(&out));
    let n1 = batch_value(&mut conn, "g8", "n1").await;
    assert_eq!(
        n1, None,
        "skipped, so the online path computes it on request"
    );

    // No failed run recorded a finished shard.
    for g in ["g1", "g2", "g3", "g4", "g5", "g6"] {
        let done: HashMap<String, u64> = conn.hgetall(ks.shards_done(g)).await.expect("done");
        assert!(done.is_empty(), "{g}: {done:?}");
    }
}

async fn raw_values(
    conn: &mut redis::aio::MultiplexedConnection,
    generation: &str,
    ids: &[usize],
) -> Vec<Option<Vec<u8>>> {
    let layout = layout_of(conn, generation).await;
    let mut pipe = redis::pipe();
    for i in ids {
        let id = format!("e{i}");
        pipe.hget(layout.key_of(&id), &id);
    }
    pipe.query_async(conn).await.expect("hget")
}

/// Whether day 2 changed entity `i`'s features (every tenth entity).
fn changed(i: usize) -> bool {
    i % 10 == 3
}

/// The entity whose features `i` has on day 2.
fn day2_source(i: usize) -> usize {
    if changed(i) { i + 50_000 } else { i }
}

/// Writes lake/day1 (entities `0..day1`) and lake/day2 (`day2`, features of
/// [`day2_source`]), in row groups of `row_group` rows.
fn write_two_days(setup: &Setup, day1: usize, day2: &[usize], row_group: usize) {
    for day in ["day1", "day2"] {
        std::fs::create_dir_all(setup.lake().join(day)).expect("dir");
    }
    let day1: Vec<usize> = (0..day1).collect();
    write_parquet(&setup.lake().join("day1/p.parquet"), &day1, row_group);
    write_parquet_with(
        &setup.lake().join("day2/p.parquet"),
        day2,
        row_group,
        day2_source,
    );
}

/// The full run of lake/day1 as generation `g-full`, published (what the operator does once
/// every shard is done).
async fn publish_day1(
    setup: &Setup,
    server: &RedisServer,
    conn: &mut redis::aio::MultiplexedConnection,
    batch_size: i32,
) {
    let cfg = config_file(
        setup.dir.path(),
        &setup.config(
            &format!("file://{}/day1/", setup.lake().display()),
            batch_size,
            1,
        ),
    );
    let out = run_batch(&cfg, &server.url(), "g-full", 1, 0);
    assert!(out.status.success(), "{}", stderr(&out));
    let ks = Keyspace::new("ml/churn", "3");
    let _: () = conn
        .set(ks.serving_pointer(), "g-full")
        .await
        .expect("publish");
}

/// A Redis with day 1 (`day1` entities) published as `g-full` and day 2 (`day2`) written
/// beside it, in row groups of `row_group` rows.
async fn day1_published(
    day1: usize,
    day2: &[usize],
    row_group: usize,
    batch_size: i32,
) -> (Setup, RedisServer, redis::aio::MultiplexedConnection) {
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    write_two_days(&setup, day1, day2, row_group);
    publish_day1(&setup, &server, &mut conn, batch_size).await;
    (setup, server, conn)
}

/// A single-shard run of `config` as `generation`.
fn run_one(setup: &Setup, server: &RedisServer, config: &ScorerConfig, generation: &str) -> Output {
    run_batch(
        &config_file(setup.dir.path(), config),
        &server.url(),
        generation,
        1,
        0,
    )
}

/// One shard of `generation` that spools every row group (`--max-group-mib 0`) to `spool`.
fn run_spooled(
    setup: &Setup,
    server: &RedisServer,
    config: &ScorerConfig,
    generation: &str,
    spool: &Path,
) -> Output {
    batch_command(
        &config_file(setup.dir.path(), config),
        &server.url(),
        generation,
        1,
        0,
    )
    .args(["--max-group-mib", "0", "--spool-dir"])
    .arg(spool)
    .output()
    .expect("run")
}

/// Numeric fields of a shard's summary line, in the order named.
fn summary_fields<const N: usize>(out: &Output, names: [&str; N]) -> [u64; N] {
    names.map(|name| summary_field(out, name))
}

/// A numeric field of a shard's summary line (its last "shard done" line).
fn summary_field(out: &Output, name: &str) -> u64 {
    let log = stderr(out);
    assert!(out.status.success(), "{log}");
    let summary = log
        .lines()
        .rfind(|line| line.contains("shard done"))
        .unwrap_or_else(|| panic!("no summary line in {log}"));
    summary
        .split(&format!(" {name}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_groups_whose_bytes_did_not_change_are_carried_unread() {
    // Day 1: three files of two row groups (100 entities each).
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    for day in ["day1", "day2"] {
        std::fs::create_dir_all(setup.lake().join(day)).expect("dir");
    }
    for file in 0..3 {
        let ids: Vec<usize> = (file * 200..file * 200 + 200).collect();
        write_parquet(
            &setup.lake().join(format!("day1/p{file}.parquet")),
            &ids,
            100,
        );
    }
    publish_day1(&setup, &server, &mut conn, 64).await;
    let day1: Vec<usize> = (0..600).collect();
    let before = raw_values(&mut conn, "g-full", &day1).await;

    // Day 2: files 0 and 2 as they were; file 1 rewritten, its second row group (entities
    // 300-399) with new features, its first byte for byte as before.
    for file in [0, 2] {
        std::fs::copy(
            setup.lake().join(format!("day1/p{file}.parquet")),
            setup.lake().join(format!("day2/p{file}.parquet")),
        )
        .expect("copy");
    }
    let moved = |i: usize| (300..400).contains(&i);
    write_parquet_with(
        &setup.lake().join("day2/p1.parquet"),
        &(200..400).collect::<Vec<_>>(),
        100,
        |i| if moved(i) { i + 50_000 } else { i },
    );
    let mut incremental = setup.incremental("day2", 64, 1);
    let out = run_one(&setup, &server, &incremental, "g-inc");
    assert_eq!(
        summary_fields(&out, ["unread_groups", "computed", "carried"]),
        [5, 100, 500],
        "only the changed row group is decoded: {}",
        stderr(&out)
    );
    let after = raw_values(&mut conn, "g-full", &day1).await;
    for i in 0..600 {
        if moved(i) {
            let p =
                CachedPrediction::decode(after[i].as_deref().expect("written")).expect("decodes");
            assert!(
                (p.value - setup.expected(i + 50_000)).abs() < 1e-6,
                "e{i} rescored"
            );
        } else {
            assert_eq!(after[i], before[i], "e{i} carried untouched");
        }
    }
    assert!(
        summary_field(&out, "bytes_read") > 0,
        "copied files are new versions: read, and found unchanged by their digest"
    );
    // Now every index names the version it was read from: nothing is read at all.
    let again = run_one(&setup, &server, &incremental, "g-inc1");
    assert_eq!(
        summary_fields(&again, ["unread_groups", "bytes_read", "computed"]),
        [6, 0, 0]
    );
    // The unread groups' indexes live on with the buckets.
    let ks = Keyspace::new("ml/churn", "3");
    let ttl: i64 = conn
        .pttl(ks.fingerprint_index("g-full", 0, 0))
        .await
        .expect("pttl");
    assert!(ttl > 86_000_000, "{ttl}");

    // Other settings make other digests: with another fill value every group is read again
    // (and, nothing being missing, every row found unchanged by its fingerprint).
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc")
        .await
        .expect("publish");
    incremental.features.missing.fill_value = 9.0;
    let out = run_one(&setup, &server, &incremental, "g-inc2");
    assert_eq!(
        summary_fields(&out, ["unread_groups", "computed", "carried"]),
        [0, 0, 600]
    );
}

/// A local file rewritten in place with its size and modification time put back (what
/// `cp -p` over the old file does when the new content is the same size) keeps the inode,
/// size and modification time that make object_store's version of it: its change time is
/// what shows it is not the version the index was read from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_with_its_timestamps_restored_is_read_again() {
    use std::os::unix::fs::MetadataExt;
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    std::fs::create_dir_all(setup.lake().join("day1")).expect("dir");
    let path = setup.lake().join("day1/p0.parquet");
    let ids: Vec<usize> = (0..200).collect();
    write_parquet(&path, &ids, 100);
    publish_day1(&setup, &server, &mut conn, 64).await;
    let incremental = setup.incremental("day1", 64, 1);
    let out = run_one(&setup, &server, &incremental, "g-inc0");
    assert_eq!(
        summary_fields(&out, ["unread_groups", "computed"]),
        [2, 0],
        "the premise: an unchanged file is not read at all: {}",
        stderr(&out)
    );

    let listed = std::fs::metadata(&path).expect("stat");
    // The change time ticks with the clock: make sure the rewrite lands on a later tick.
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Two rows trade features: the same values, so the same size, in other rows.
    let swapped = |i: usize| match i {
        150 => 151,
        151 => 150,
        i => i,
    };
    write_parquet_with(&path, &ids, 100, swapped);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_modified(listed.modified().expect("mtime"))
        .expect("restore the modification time");
    let now = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        (now.ino(), now.len(), now.modified().expect("mtime")),
        (
            listed.ino(),
            listed.len(),
            listed.modified().expect("mtime")
        ),
        "the premise: inode, size and modification time as listed"
    );

    let out = run_one(&setup, &server, &incremental, "g-inc1");
    assert_eq!(
        summary_fields(&out, ["unread_groups", "computed", "carried"]),
        [1, 2, 198],
        "the changed group decoded, the other carried whole by its digest: {}",
        stderr(&out)
    );
    assert!(
        summary_field(&out, "bytes_read") > 0,
        "a new version: read, not carried by the index's version"
    );
    let values = raw_values(&mut conn, "g-full", &[150, 151]).await;
    for (i, value) in [150, 151].into_iter().zip(values) {
        let p = CachedPrediction::decode(value.as_deref().expect("written")).expect("decodes");
        assert!(
            (p.value - setup.expected(swapped(i))).abs() < 1e-6,
            "e{i} rescored on its new features"
        );
    }
}

/// A bucket evicted (or expired) while the fingerprint index still vouches for its
/// entities: an incremental run finds it absent when it refreshes the TTL, and each shard
/// scores those entities of its own row groups again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_scores_again_the_entities_of_evicted_buckets() {
    let day1 = 600;
    let everyone: Vec<usize> = (0..day1).collect();
    let (setup, server, mut conn) = day1_published(day1, &everyone, 100, 64).await;
    let layout = layout_of(&mut conn, "g-full").await;
    let bucket_of = |i: usize| layout.bucket_of_hash(entity_hash(&format!("e{i}")));
    // Two buckets (of different parity: a refresh split into shares by bucket parity, an
    // earlier design, missed one of them).
    let first = bucket_of(5);
    let second = (0..day1)
        .map(bucket_of)
        .find(|b| b % 2 != first % 2)
        .expect("a bucket of the other parity");
    let evicted = [first, second];
    for bucket in evicted {
        let _: i64 = conn.del(layout.bucket_key(bucket)).await.expect("evict");
    }
    // Their unchanged entities: the changed ones are written by their shard's own pass.
    let unchanged_in_evicted = (0..day1)
        .filter(|&i| evicted.contains(&bucket_of(i)) && !changed(i))
        .count() as u64;
    assert!(unchanged_in_evicted > 0);

    // Day 2 (every tenth entity changed), in two shards run one after the other.
    let cfg = config_file(setup.dir.path(), &setup.incremental("day2", 64, 2));
    // Each shard repairs the entities of its own row groups (100 rows each, in order).
    let repaired_by = |shard: usize| {
        millrace_scorer::batch::shard::assign(&[vec![100; day1 / 100]], 2, shard)
            .iter()
            .flat_map(|unit| unit.row_group * 100..(unit.row_group + 1) * 100)
            .filter(|&i| evicted.contains(&bucket_of(i)) && !changed(i))
            .count() as u64
    };
    assert_eq!(repaired_by(0) + repaired_by(1), unchanged_in_evicted);
    assert!(
        repaired_by(0) > 0 && repaired_by(1) > 0,
        "both shards have some"
    );
    let shard0 = run_batch(&cfg, &server.url(), "g-inc", 2, 0);
    assert_eq!(
        summary_field(&shard0, "repaired"),
        repaired_by(0),
        "its own row groups' entities of both buckets: {}",
        stderr(&shard0)
    );
    assert!(
        absent_recorded(&mut conn, "g-full").await,
        "kept for the other shard"
    );
    let shard1 = run_batch(&cfg, &server.url(), "g-inc", 2, 1);
    assert_eq!(
        summary_field(&shard1, "repaired"),
        repaired_by(1),
        "its own row groups' entities of both buckets: {}",
        stderr(&shard1)
    );
    assert_scored_as(&mut conn, &setup, "g-full", day1, day2_source).await;
    // What the operator puts in status.lastBatch: each shard's counts.
    let ks = Keyspace::new("ml/churn", "3");
    let report: HashMap<String, u64> = conn.hgetall(ks.run_report("g-inc")).await.expect("report");
    let carried = summary_field(&shard0, "carried") + summary_field(&shard1, "carried");
    assert_eq!(
        (
            report["carried:0"] + report["carried:1"],
            report["repaired:0"],
            report["repaired:1"],
            report["removed:1"],
        ),
        (carried, repaired_by(0), repaired_by(1), 0),
        "{report:?}"
    );
    assert!(
        !absent_recorded(&mut conn, "g-full").await,
        "the repaired buckets are forgotten"
    );
    for bucket in evicted {
        let ttl: i64 = conn.pttl(layout.bucket_key(bucket)).await.expect("pttl");
        assert!(
            ttl > 86_000_000,
            "bucket {bucket} lives with the batch TTL: {ttl}"
        );
    }

    // Nothing is absent any more: the next run repairs nothing and computes nothing.
    let again = config_file(setup.dir.path(), &setup.incremental("day2", 64, 1));
    let out = run_batch(&again, &server.url(), "g-inc2", 1, 0);
    assert_eq!(summary_fields(&out, ["repaired", "computed"]), [0, 0]);
}

/// Calls of `command` Redis has served since its statistics were last reset.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// The shards of an Indexed Job start together: one refreshes the buckets' TTL (and finds
/// those evicted) while the others wait for it, instead of each refreshing every bucket.
/// The evicted buckets are still found before any write, and repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_started_together_refresh_the_buckets_once() {
    let day1 = 8000;
    let everyone: Vec<usize> = (0..day1).collect();
    let (setup, server, mut conn) = day1_published(day1, &everyone, 500, 256).await;
    let layout = layout_of(&mut conn, "g-full").await;
    let bucket_of = |i: usize| layout.bucket_of_hash(entity_hash(&format!("e{i}")));
    let evicted = [bucket_of(5), bucket_of(6)];
    for bucket in evicted {
        let _: i64 = conn.del(layout.bucket_key(bucket)).await.expect("evict");
    }
    let unchanged_in_evicted = (0..day1)
        .filter(|&i| evicted.contains(&bucket_of(i)) && !changed(i))
        .count() as u64;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .expect("reset");

    let shards = 4;
    let cfg = config_file(
        setup.dir.path(),
        &setup.incremental("day2", 256, shards as i32),
    );
    let running: Vec<_> = (0..shards)
        .map(|index| {
            batch_command(&cfg, &server.url(), "g-inc", shards, index)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn shard")
        })
        .collect();
    let outs: Vec<Output> = running
        .into_iter()
        .map(|child| child.wait_with_output().expect("shard"))
        .collect();
    let repaired: u64 = outs.iter().map(|out| summary_field(out, "repaired")).sum();
    assert_eq!(
        repaired, unchanged_in_evicted,
        "the evicted buckets' entities"
    );
    assert_scored_as(&mut conn, &setup, "g-full", day1, day2_source).await;

    // One PEXPIRE per bucket, plus a few per shard (the run's records, the repaired
    // buckets' first writes); each shard refreshing every bucket made it 4 per bucket.
    let buckets = u64::from(layout.buckets());
    let pexpires = command_calls(&mut conn, "pexpire").await;
    assert!(
        pexpires >= buckets && pexpires < 2 * buckets,
        "{pexpires} PEXPIREs for {buckets} buckets and {shards} shards"
    );
    let ks = Keyspace::new("ml/churn", "3");
    let claim_left: bool = conn
        .exists(ks.refresh_claim("g-inc"))
        .await
        .expect("exists");
    assert!(!claim_left, "the claim is released once the mark is set");
    let waited = outs
        .iter()
        .filter(|out| stderr(out).contains("another shard refreshes the buckets' TTL"))
        .count();
    assert!(waited < shards, "one shard refreshed");
}

/// A shard that claimed the refresh and died (its claim still there, no mark): the next
/// shard waits for the claim to lapse, then refreshes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_claim_on_the_refresh_is_taken_over() {
    let day1 = 600;
    let everyone: Vec<usize> = (0..day1).collect();
    let (setup, server, mut conn) = day1_published(day1, &everyone, 100, 64).await;
    let layout = layout_of(&mut conn, "g-full").await;
    let evicted = layout.bucket_of_hash(entity_hash("e5"));
    let _: i64 = conn.del(layout.bucket_key(evicted)).await.expect("evict");
    hold_the_refresh(&mut conn, "g-inc", 1_500).await;

    let started = Instant::now();
    let out = run_one(&setup, &server, &setup.incremental("day2", 64, 1), "g-inc");
    let log = stderr(&out);
    assert!(started.elapsed() >= Duration::from_millis(1400), "{log}");
    assert!(log.contains("shard 1 (a pod that died)"), "{log}");
    assert!(log.contains("this shard takes over"), "{log}");
    assert!(
        summary_field(&out, "repaired") > 0,
        "the eviction was found: {log}"
    );
    assert_scored_as(&mut conn, &setup, "g-full", day1, day2_source).await;
}

/// A Redis, a connection to it, a batch writer on it and the keyspace the claim tests use.
async fn claim_fixture() -> (
    RedisServer,
    redis::aio::MultiplexedConnection,
    millrace_scorer::batch::writer::PredictionWriter,
    Keyspace,
) {
    let server = RedisServer::start();
    let conn = connection(&server.url()).await;
    let writer =
        millrace_scorer::batch::writer::PredictionWriter::connect(&server.url(), false, 60_000)
            .await
            .expect("connect");
    (server, conn, writer, Keyspace::new("ml/churn", "3"))
}

/// The refresh keys of run `run` as `holder` sees them, with a claim living `claim_ms`.
fn refresh_keys(
    ks: &Keyspace,
    run: &str,
    holder: &str,
    claim_ms: u64,
) -> millrace_scorer::batch::repair::RefreshKeys {
    millrace_scorer::batch::repair::RefreshKeys {
        absent: ks.absent_buckets(run),
        refreshed: ks.buckets_refreshed(run),
        claim: ks.refresh_claim(run),
        holder: holder.to_string(),
        claim_ms,
    }
}

/// A holder renews and releases its claim on the refresh only while it holds it: one whose
/// claim lapsed and was taken over leaves its successor's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_renewed_and_released_only_by_its_holder() {
    use millrace_scorer::batch::repair::{CLAIM_MS, release_claim, renew_claim};
    let (_server, mut conn, writer, ks) = claim_fixture().await;
    let (lapsed, successor) = (
        refresh_keys(&ks, "g", "shard 0 (pod a)", CLAIM_MS),
        refresh_keys(&ks, "g", "shard 1 (pod b)", CLAIM_MS),
    );
    let _: () = redis::cmd("SET")
        .arg(&successor.claim)
        .arg(&successor.holder)
        .arg("PX")
        .arg(1_000)
        .query_async(&mut conn)
        .await
        .expect("claim");

    assert!(!renew_claim(&writer, &lapsed).await.expect("renew"));
    let ttl: i64 = conn.pttl(&successor.claim).await.expect("pttl");
    assert!(ttl <= 1_000, "not extended by the lapsed holder: {ttl}");
    assert!(!release_claim(&writer, &lapsed).await.expect("release"));
    let held: Option<String> = conn.get(&successor.claim).await.expect("get");
    assert_eq!(held.as_deref(), Some("shard 1 (pod b)"));

    assert!(renew_claim(&writer, &successor).await.expect("renew"));
    let ttl: i64 = conn.pttl(&successor.claim).await.expect("pttl");
    assert!(ttl > 1_000 && ttl <= CLAIM_MS as i64, "renewed: {ttl}");
    assert!(release_claim(&writer, &successor).await.expect("release"));
    let exists: bool = conn.exists(&successor.claim).await.expect("exists");
    assert!(!exists, "released");
}

/// The holder of the refresh's claim keeps renewing it while it works: a refresh that
/// takes several times the claim's life never lets it lapse (the other shards would take
/// over and refresh every bucket again), and the claim is gone once the mark is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refresh_keeps_its_claim_alive() {
    use millrace_scorer::batch::repair::refresh;
    let (_server, mut conn, writer, ks) = claim_fixture().await;
    // 256Ki buckets take seconds to refresh here: many claims' lives.
    let layout = ks.batch_layout("g", 1 << 18);
    let claim_ms = 300;
    let keys = refresh_keys(&ks, "g", "shard 0 (pod a)", claim_ms);
    let watched = (keys.claim.clone(), keys.refreshed.clone());
    let watcher = tokio::spawn(async move {
        let (claim, refreshed) = watched;
        let (mut looks, mut lapsed, mut claimed) = (0u32, Vec::new(), false);
        loop {
            let holder: Option<String> = conn.get(&claim).await.expect("get");
            let done: bool = conn.exists(&refreshed).await.expect("exists");
            if done {
                break;
            }
            // From the moment the refresh claims it until the mark is set.
            claimed |= holder.is_some();
            if claimed {
                looks += 1;
                if holder.as_deref() != Some("shard 0 (pod a)") {
                    lapsed.push(looks);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (looks, lapsed, conn)
    });

    let started = Instant::now();
    let absent = refresh(&writer, &layout, &keys).await.expect("refresh");
    let took = started.elapsed();
    let (looks, lapsed, mut conn) = watcher.await.expect("watcher");
    let left: bool = conn.exists(&keys.claim).await.expect("exists");

    assert_eq!(absent.len(), 1 << 18, "no bucket exists: all absent");
    assert!(
        took > Duration::from_millis(2 * claim_ms),
        "the refresh outlived its claim several times over ({took:?}), or this proves nothing"
    );
    assert!(
        looks > 10,
        "the claim was watched while held ({looks} looks)"
    );
    assert!(
        lapsed.is_empty(),
        "the claim lapsed while its holder refreshed: gone at {} of {looks} looks, first at look {:?} ({took:?})",
        lapsed.len(),
        lapsed.first()
    );
    assert!(!left, "released once the mark was set");
}

/// A holder that stalls past its claim's life while another shard takes over and finishes
/// first uses the run's record, not only what it found itself: by the time it looked, the
/// other shards' writes may have recreated buckets that were absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_claim_was_taken_over_uses_the_record() {
    use millrace_scorer::batch::repair::refresh;
    let (_server, mut conn, writer, ks) = claim_fixture().await;
    let layout = ks.batch_layout("g", 1 << 18);
    // Bucket 7 exists when this shard looks (another shard's write recreated it), but the
    // shard that took over found it absent before any write.
    let recreated = 7u32;
    let _: () = conn
        .hset(layout.bucket_key(recreated), "e", 1)
        .await
        .expect("bucket");
    let keys = refresh_keys(&ks, "g", "shard 0 (pod a)", 300);
    let successor = refresh_keys(&ks, "g", "shard 1 (pod b)", 300);
    let taking_over = tokio::spawn(async move {
        loop {
            let holder: Option<String> = conn.get(&successor.claim).await.expect("get");
            if holder.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _: () = conn
            .set(&successor.claim, &successor.holder)
            .await
            .expect("take over");
        let member = recreated.to_le_bytes().to_vec();
        let _: i64 = conn.sadd(&successor.absent, member).await.expect("record");
        let _: () = conn.set(&successor.refreshed, "1").await.expect("mark");
    });

    let absent = refresh(&writer, &layout, &keys).await.expect("refresh");
    taking_over.await.expect("successor");
    assert!(
        absent.contains(&recreated),
        "the bucket the successor recorded is repaired by this shard too"
    );
    assert_eq!(
        absent.len(),
        1 << 18,
        "every other bucket is absent as well"
    );
}

/// Shards racing for the refresh refresh once, even when one finishes (sets the mark and
/// releases its claim) between another's look for the mark and its claim: that one must
/// not refresh again, after other shards may have begun writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_racing_for_the_refresh_refresh_once() {
    use millrace_scorer::batch::repair::{CLAIM_MS, refresh};
    use millrace_scorer::batch::writer::PredictionWriter;
    let (server, mut conn, _, ks) = claim_fixture().await;
    let mut writers = Vec::new();
    for _ in 0..6 {
        let writer = PredictionWriter::connect(&server.url(), false, 60_000)
            .await
            .expect("connect");
        writers.push(Arc::new(writer));
    }
    let (runs, buckets) = (60, 4);
    let before = command_calls(&mut conn, "pexpire").await;
    for run in 0..runs {
        let generation = format!("race-{run}");
        let layout = Arc::new(ks.batch_layout(&generation, buckets));
        for bucket in 0..buckets {
            let _: () = conn
                .hset(layout.bucket_key(bucket), "e", 1)
                .await
                .expect("bucket");
        }
        let racing: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(shard, writer)| {
                let (writer, layout) = (Arc::clone(writer), Arc::clone(&layout));
                let keys = refresh_keys(&ks, &generation, &format!("shard {shard}"), CLAIM_MS);
                // Staggered by round trips, so that some shard looks for the mark just
                // before the first one sets it, and claims just after it is released.
                let delay = (shard + run as usize) % writers.len();
                tokio::spawn(async move {
                    for _ in 0..delay {
                        let look = redis::cmd("EXISTS").arg(&keys.refreshed).clone();
                        let _: i64 = writer.command(&keys.refreshed, &look).await?;
                    }
                    refresh(&writer, &layout, &keys).await
                })
            })
            .collect();
        for shard in racing {
            let absent = shard.await.expect("shard").expect("refresh");
            assert!(absent.is_empty(), "every bucket exists");
        }
    }
    let pexpires = command_calls(&mut conn, "pexpire").await - before;
    assert_eq!(
        pexpires,
        u64::from(buckets) * runs,
        "one refresh a run: {} runs refreshed twice or more",
        (pexpires - u64::from(buckets) * runs) / u64::from(buckets)
    );
}

/// Rows decided once the refresh has said which buckets are absent are repaired inline:
/// the decoder sends the rows the index finds unchanged in an absent bucket to be scored
/// again, and marks the row group as decided knowing them; before that, it carries them
/// and leaves the group to the repair pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_decided_after_the_refresh_are_repaired_inline() {
    use millrace_scorer::batch::budget::Budget;
    use millrace_scorer::batch::decode::{self, DecodePlan, Decoded, Spool};
    use millrace_scorer::batch::input::Input;
    use millrace_scorer::batch::repair::absent_table;
    use millrace_scorer::batch::writer::PredictionWriter;
    use millrace_scorer::batch::{digest, shard};

    let day1 = 600;
    let everyone: Vec<usize> = (0..day1).collect();
    let (setup, server, mut conn) = day1_published(day1, &everyone, 100, 64).await;
    let layout = Arc::new(layout_of(&mut conn, "g-full").await);
    let bucket_of = |i: usize| layout.bucket_of_hash(entity_hash(&format!("e{i}")));
    let absent_bucket = bucket_of(5);
    let in_absent_unchanged = (0..day1)
        .filter(|&i| bucket_of(i) == absent_bucket && !changed(i))
        .count();
    assert!(in_absent_unchanged > 0);

    let uri = format!("file://{}/day2/", setup.lake().display());
    let input = Arc::new(Input::open(&uri).await.expect("input"));
    let units = shard::assign(&input.row_groups(), 1, 0);
    let inputs: Vec<String> = INPUTS.iter().map(|s| s.to_string()).collect();
    let missing = setup.incremental("day2", 64, 1).features.missing;
    let writer = Arc::new(
        PredictionWriter::connect(&server.url(), false, 60_000)
            .await
            .expect("connect"),
    );
    let plan = |absent: Option<Vec<bool>>| {
        let known = Arc::new(std::sync::OnceLock::new());
        if let Some(table) = absent {
            known.set(Arc::new(table)).expect("unset");
        }
        DecodePlan {
            input: Arc::clone(&input),
            columns: std::iter::once("user_id".to_string())
                .chain(inputs.iter().cloned())
                .collect(),
            id_column: "user_id".into(),
            inputs: inputs.clone(),
            missing: missing.clone(),
            batch_size: 64,
            keyspace: Keyspace::new("ml/churn", "3"),
            generation: "g-full".into(),
            layout: Arc::clone(&layout),
            known: Some(Arc::clone(&writer)),
            repair: None,
            absent: Some(known),
            digest_seed: digest::seed("user_id", &inputs, &missing),
            ttl_ms: 60_000,
            spool: Spool {
                dir: std::env::temp_dir(),
                max_group_bytes: 64 << 20,
                scratch: Budget::new(None),
            },
            memory: Budget::new(None),
        }
    };
    // (rows marked for repair, rows found unchanged, row groups decided knowing the absent)
    let decide = |plan: DecodePlan| {
        let units = units.clone();
        async move {
            let mut received = decode::start(plan, units, 1);
            let (mut repairs, mut unchanged, mut checked) = (0, 0, 0);
            while let Some(message) = received.recv().await {
                match message.expect("decoded") {
                    Decoded::Batch(batch) => {
                        repairs += batch.repairs.iter().filter(|&&r| r).count();
                        unchanged += batch.unchanged;
                    }
                    Decoded::GroupDone { absent_checked, .. }
                    | Decoded::Unchanged { absent_checked, .. } => {
                        checked += usize::from(absent_checked);
                    }
                }
            }
            (repairs, unchanged, checked)
        }
    };
    let unchanged_total = (day1 - (0..day1).filter(|&i| changed(i)).count()) as u64;
    assert_eq!(
        decide(plan(None)).await,
        (0, unchanged_total, 0),
        "before the refresh: every unchanged row carried, every group left to the pass"
    );
    let absent = absent_table(&[absent_bucket], layout.buckets());
    assert_eq!(
        decide(plan(Some(absent))).await,
        (
            in_absent_unchanged,
            unchanged_total - in_absent_unchanged as u64,
            units.len()
        ),
        "after it: the unchanged rows of the absent bucket repaired, every group decided"
    );
    let nothing_absent = absent_table(&[], layout.buckets());
    assert_eq!(
        decide(plan(Some(nothing_absent))).await,
        (0, unchanged_total, units.len()),
        "nothing absent: nothing repaired, every group decided"
    );
}

/// A bucket absent because none of the input's entities falls in it any more (all gone
/// from the input): the indexes say so, and nothing is decoded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_bucket_no_entity_of_the_input_falls_in_is_not_repaired() {
    let day1 = 600;
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let everyone: Vec<usize> = (0..day1).collect();
    write_two_days(&setup, day1, &everyone, 100);
    publish_day1(&setup, &server, &mut conn, 64).await;
    let layout = layout_of(&mut conn, "g-full").await;
    let bucket_of = |i: usize| layout.bucket_of_hash(entity_hash(&format!("e{i}")));
    let emptied = bucket_of(5);
    let _: i64 = conn.del(layout.bucket_key(emptied)).await.expect("evict");
    // Day 2: every entity of that bucket gone from the input.
    let staying: Vec<usize> = everyone
        .iter()
        .copied()
        .filter(|&i| bucket_of(i) != emptied)
        .collect();
    write_parquet_with(
        &setup.lake().join("day2/p.parquet"),
        &staying,
        100,
        day2_source,
    );
    // The refresh held up (by a claim left to lapse) until every row group is decided, so
    // the bucket is left to the repair pass, whose index filter this test is about.
    hold_the_refresh(&mut conn, "g-inc", 1_000).await;
    let out = run_one(&setup, &server, &setup.incremental("day2", 64, 1), "g-inc");
    assert_eq!(summary_field(&out, "repaired"), 0);
    let log = stderr(&out);
    assert!(
        log.contains("no entity of this shard's input is in one"),
        "the indexes rule the bucket out: {log}"
    );
    assert!(!log.contains("scoring their entities again"), "{log}");
    assert!(!absent_recorded(&mut conn, "g-full").await, "forgotten");
}

/// Leaves a claim on run `generation`'s TTL refresh, as a shard that died would, lapsing in
/// `ms`: the run's refresh waits for it.
async fn hold_the_refresh(conn: &mut redis::aio::MultiplexedConnection, generation: &str, ms: u64) {
    let ks = Keyspace::new("ml/churn", "3");
    let _: () = redis::cmd("SET")
        .arg(ks.refresh_claim(generation))
        .arg("shard 1 (a pod that died)")
        .arg("PX")
        .arg(ms)
        .query_async(conn)
        .await
        .expect("claim");
}

/// Whether `generation` has absent buckets recorded for a repair.
async fn absent_recorded(conn: &mut redis::aio::MultiplexedConnection, generation: &str) -> bool {
    let ks = Keyspace::new("ml/churn", "3");
    conn.exists(ks.absent_buckets(generation))
        .await
        .expect("exists")
}

/// A row group over `--max-group-mib` (0 here: every one) is streamed to a spool file and
/// decoded from there page by page: the same predictions, the same content digests (a run
/// holding the same bytes in memory carries every group by digest), nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_groups_over_the_memory_limit_are_spooled_and_score_the_same() {
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let spool = setup.dir.path().join("spool");
    for dir in ["day1", "day1-copy", "day2"] {
        std::fs::create_dir_all(setup.lake().join(dir)).expect("dir");
    }
    std::fs::create_dir_all(&spool).expect("spool dir");
    let ids: Vec<usize> = (0..900).collect();
    write_parquet(&setup.lake().join("day1/a.parquet"), &ids[..500], 128);
    write_parquet(&setup.lake().join("day1/b.parquet"), &ids[500..], 200);
    let spooled = |config: &ScorerConfig, generation: &str| {
        run_spooled(&setup, &server, config, generation, &spool)
    };
    let full = setup.config(&format!("file://{}/day1/", setup.lake().display()), 64, 1);
    let out = spooled(&full, "g-full");
    assert!(
        stderr(&out).contains("row_groups_in_flight=2"),
        "a local file system: two at once, {}",
        stderr(&out)
    );
    assert_eq!(
        summary_fields(&out, ["spooled_groups", "computed"]),
        [4 + 2, 900],
        "{}",
        stderr(&out)
    );
    assert_scored_as(&mut conn, &setup, "g-full", 900, |i| i).await;
    assert_eq!(
        std::fs::read_dir(&spool).expect("spool").count(),
        0,
        "spool files are anonymous: nothing left behind"
    );
    let ks = Keyspace::new("ml/churn", "3");
    let _: () = conn
        .set(ks.serving_pointer(), "g-full")
        .await
        .expect("publish");

    // The same bytes as new files, read into memory: every group carried by its digest.
    for name in ["a.parquet", "b.parquet"] {
        std::fs::copy(
            setup.lake().join("day1").join(name),
            setup.lake().join("day1-copy").join(name),
        )
        .expect("copy");
    }
    let mut incremental = setup.incremental("day1-copy", 64, 1);
    let out = run_one(&setup, &server, &incremental, "g-inc");
    assert_eq!(
        summary_fields(&out, ["unread_groups", "spooled_groups", "computed"]),
        [6, 0, 0],
        "a spooled group's digest is the one the same bytes get in memory: {}",
        stderr(&out)
    );
    assert!(
        summary_field(&out, "bytes_read") > 0,
        "new versions are read"
    );

    // Day 2, spooled and incremental: exactly the changed rows are rescored.
    write_parquet_with(
        &setup.lake().join("day2/a.parquet"),
        &ids[..500],
        128,
        day2_source,
    );
    std::fs::copy(
        setup.lake().join("day1/b.parquet"),
        setup.lake().join("day2/b.parquet"),
    )
    .expect("copy");
    incremental.features.offline = Some(OfflineFeatures {
        uri: format!("file://{}/day2/", setup.lake().display()),
        ..incremental.features.offline.clone().expect("offline")
    });
    let out = spooled(&incremental, "g-inc2");
    let changed_rows = ids[..500].iter().filter(|&&i| changed(i)).count() as u64;
    assert_eq!(
        summary_fields(&out, ["computed", "carried"]),
        [changed_rows, 900 - changed_rows],
        "{}",
        stderr(&out)
    );
    let source = |i| if i < 500 { day2_source(i) } else { i };
    assert_scored_as(&mut conn, &setup, "g-full", 900, source).await;

    // Nowhere to spool: the shard fails, saying where and what to do, and records nothing.
    let out = batch_command(
        &config_file(setup.dir.path(), &full),
        &server.url(),
        "g-nowhere",
        1,
        0,
    )
    .args(["--max-group-mib", "0", "--spool-dir", "/nonexistent/spool"])
    .output()
    .expect("run");
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("spooling a row group to /nonexistent/spool")
            && log.contains("ephemeral storage"),
        "{log}"
    );
    let done: HashMap<String, u64> = conn
        .hgetall(Keyspace::new("ml/churn", "3").shards_done("g-nowhere"))
        .await
        .expect("done");
    assert!(done.is_empty(), "{done:?}");
}

/// `batch.scratchSize` bounds the local disk spooled at once: decoders wait for room rather
/// than spool two groups the pod's `/tmp` cannot hold together, and a group that could never
/// fit fails the shard at start, naming it, before anything is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_row_groups_stay_within_the_scratch_size() {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let spool = setup.dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    let ids: Vec<usize> = (0..900).collect();
    write_parquet(&setup.lake().join("a.parquet"), &ids[..500], 128);
    write_parquet(&setup.lake().join("b.parquet"), &ids[500..], 200);
    // Each group's spool file: the bytes of its column chunks (every column is read).
    let group_bytes: Vec<(String, u64)> = ["a.parquet", "b.parquet"]
        .iter()
        .flat_map(|name| {
            let file = std::fs::File::open(setup.lake().join(name)).expect("open");
            let reader = SerializedFileReader::new(file).expect("footer");
            let sizes: Vec<u64> = reader
                .metadata()
                .row_groups()
                .iter()
                .map(|group| group.columns().iter().map(|c| c.byte_range().1).sum())
                .collect();
            sizes.into_iter().map(|size| (name.to_string(), size))
        })
        .collect();
    let (largest_file, largest) = group_bytes
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .expect("groups");
    let spooled = |scratch_bytes: Option<u64>, generation: &str| {
        // Small batches: a decoder holds its group while the scorer drains it.
        let mut config = setup.config(&format!("file://{}/", setup.lake().display()), 16, 1);
        if let Some(batch) = config.batch.as_mut() {
            batch.scratch_bytes = scratch_bytes;
        }
        run_spooled(&setup, &server, &config, generation, &spool)
    };

    // No limit: two decoders spool two groups at once, more than the largest alone.
    let out = spooled(None, "g-free");
    assert!(
        stderr(&out).contains("row_groups_in_flight=2"),
        "{}",
        stderr(&out)
    );
    let free_peak = summary_field(&out, "spool_peak_bytes");
    assert!(
        free_peak > largest,
        "unbounded decoders overlap ({free_peak} > {largest}), or this test proves nothing"
    );

    // Room for the largest group only: one at a time, every row scored all the same.
    let out = spooled(Some(largest), "g-bounded");
    assert_eq!(
        summary_fields(&out, ["spooled_groups", "computed"]),
        [6, 900],
        "{}",
        stderr(&out)
    );
    let peak = summary_field(&out, "spool_peak_bytes");
    assert!(
        (1..=largest).contains(&peak),
        "spooled {peak} bytes at once, allowed {largest}"
    );
    assert_scored_as(&mut conn, &setup, "g-bounded", 900, |i| i).await;

    // Room for less than the largest group: refused up front, naming the group.
    let out = spooled(Some(largest - 1), "g-small");
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&largest_file)
            && log.contains(&format!("needs {largest} bytes of local disk"))
            && log.contains("spec.batch.scratchSize"),
        "{log}"
    );
    assert!(
        !log.contains("spooled_groups="),
        "nothing was decoded: {log}"
    );
}

/// Decoders share `--decode-memory`: with room for two row groups, two are decoded at once;
/// with less than one group needs, one at a time (a group takes the whole budget), and every
/// row is scored all the same. What a table of hundreds of features needs to stay within
/// its pod's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoders_wait_for_room_within_the_decoding_memory() {
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    let ids: Vec<usize> = (0..900).collect();
    write_parquet(&setup.lake().join("a.parquet"), &ids[..500], 128);
    write_parquet(&setup.lake().join("b.parquet"), &ids[500..], 200);
    // Small batches: a decoder holds its group while the scorer drains it.
    let config = setup.config(&format!("file://{}/", setup.lake().display()), 16, 1);
    let config_path = config_file(setup.dir.path(), &config);
    let run = |memory: &str, generation: &str| {
        batch_command(&config_path, &server.url(), generation, 1, 0)
            .args(["--decoders", "2", "--decode-memory", memory])
            .output()
            .expect("run")
    };

    let out = run("64Mi", "g-room");
    let [groups, peak] = summary_fields(&out, ["decode_peak_groups", "decode_peak_bytes"]);
    assert_eq!(
        groups,
        2,
        "room for both: two decoders at once, or this test proves nothing: {}",
        stderr(&out)
    );
    assert!(
        (1..64 << 20).contains(&peak),
        "estimated {peak} bytes for two small groups"
    );

    let out = run("1Ki", "g-tight");
    assert_eq!(
        summary_fields(&out, ["decode_peak_groups", "computed"]),
        [1, 900],
        "{}",
        stderr(&out)
    );
    assert_scored_as(&mut conn, &setup, "g-tight", 900, |i| i).await;

    let out = run("lots", "g-bad");
    let log = stderr(&out);
    assert!(
        !out.status.success() && log.contains("--decode-memory") && log.contains("not a size"),
        "{log}"
    );
}

/// Bytes are read only from the file version that was listed: a file rewritten after the
/// listing fails with a message saying so, and is never decoded against the old footer.
#[tokio::test]
async fn a_file_rewritten_after_it_was_listed_is_refused() {
    use millrace_scorer::batch::digest::Digest;
    use millrace_scorer::batch::input::{Input, InputError};
    use millrace_scorer::batch::shard::Unit;

    let setup = Setup::new();
    let path = setup.lake().join("p.parquet");
    write_parquet(&path, &(0..100).collect::<Vec<_>>(), 50);
    let input = Input::open(&format!("file://{}", path.display()))
        .await
        .expect("open");
    let unit = Unit {
        file: 0,
        row_group: 1,
        rows: 50,
    };
    let columns = ["user_id", "tenure"];
    let spool = setup.dir.path();
    assert!(input.fetch(&unit, &columns).await.is_ok());
    assert!(
        input
            .spool(&unit, &columns, spool, &mut Digest::new(0))
            .await
            .is_ok()
    );
    std::thread::sleep(Duration::from_millis(10));
    write_parquet(&path, &(100..200).collect::<Vec<_>>(), 50);
    let refused = |result: Result<u64, InputError>, how: &str| match result {
        Err(error @ InputError::Changed { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("p.parquet") && message.contains("changed while this run read it"),
                "{how}: {message}"
            );
        }
        other => panic!("{how}: expected Changed, got {other:?}"),
    };
    refused(
        input.fetch(&unit, &columns).await.map(|b| b.bytes_read),
        "in memory",
    );
    refused(
        input
            .spool(&unit, &columns, spool, &mut Digest::new(0))
            .await
            .map(|s| s.bytes_read),
        "spooled",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_recomputes_exactly_the_changed_rows() {
    let ks = Keyspace::new("ml/churn", "3");
    // Day 2: every tenth entity's features changed, and five entities are new.
    let day2: Vec<usize> = (0..1_005).collect();
    let (setup, server, mut conn) = day1_published(1_000, &day2, 100, 128).await;
    let before = raw_values(&mut conn, "g-full", &day2).await;
    // A day has passed: the full run's buckets have a minute left.
    let layout = layout_of(&mut conn, "g-full").await;
    for bucket in 0..layout.buckets() {
        let _: bool = conn
            .pexpire(layout.bucket_key(bucket), 60_000)
            .await
            .expect("pexpire");
    }

    // The incremental run of day 2, in two shards.
    let incremental = setup.incremental("day2", 128, 2);
    let cfg = config_file(setup.dir.path(), &incremental);
    let mut computed = 0;
    let mut carried = 0;
    let mut settled = 0;
    for index in 0..2 {
        let out = run_batch(&cfg, &server.url(), "g-inc", 2, index);
        let (c, k, i) = shard_summary(&out);
        computed += c;
        carried += k;
        settled += i;
    }
    assert_eq!(
        (computed, carried),
        (105, 900),
        "exactly the changed and the new rows are scored"
    );
    assert_eq!(
        settled, 1_000,
        "day 2 is laid out like day 1: the fingerprint index decides all 1000 known rows (900 unchanged, 100 changed) without a read; only the 5 new ones are read"
    );
    let after = raw_values(&mut conn, "g-full", &day2).await;
    for &i in &day2 {
        if changed(i) || i >= 1_000 {
            let p =
                CachedPrediction::decode(after[i].as_deref().expect("written")).expect("decodes");
            let source = day2_source(i);
            assert!(
                (p.value - setup.expected(source)).abs() < 1e-6,
                "e{i} rescored on its new features"
            );
        } else {
            assert_eq!(
                after[i], before[i],
                "e{i} unchanged: its value is untouched, byte for byte"
            );
        }
    }
    for bucket in 0..layout.buckets() {
        let ttl: i64 = conn.pttl(layout.bucket_key(bucket)).await.expect("pttl");
        assert!(
            ttl > 86_000_000,
            "bucket {bucket}: the predictions carried live as long as those written ({ttl} ms)"
        );
    }
    let alias: Option<String> = conn.get(ks.alias("g-inc")).await.expect("alias");
    assert_eq!(
        alias.as_deref(),
        Some("g-full"),
        "publishing g-inc leads scorers to g-full"
    );
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-inc")).await.expect("done");
    assert_eq!((done.len(), done.values().sum::<u64>()), (2, 105));

    // Run again after publishing it (the operator flips to g-inc): nothing left to score,
    // every row decided by the index.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc")
        .await
        .expect("publish");
    let out = run_batch(&cfg, &server.url(), "g-inc2", 1, 0);
    assert_eq!(shard_summary(&out), (0, 1005, 1005));
    assert_eq!(
        summary_fields(&out, ["unread_groups", "bytes_read"]),
        [11, 0],
        "every file is the version the last run read: no row group is even read"
    );

    // Without the index (lost, or a table laid out anew) the answer is the same, found the
    // exact way: every value read back and compared.
    let index_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}*",
            ks.fingerprint_index("g-full", 0, 0).trim_end_matches("0:0")
        ))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(!index_keys.is_empty(), "every run writes its index");
    let _: () = conn.del(&index_keys).await.expect("del");
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc2")
        .await
        .expect("publish");
    let out = run_batch(&cfg, &server.url(), "g-inc3", 1, 0);
    assert_eq!(shard_summary(&out), (0, 1005, 0));
}

/// Writes entities `n0..n{count}` to `path` (features of [`features_of`]) in row groups of
/// `row_group` rows, with a null `spend` for the entities in `null_spend`.
fn write_with_null_spend(path: &Path, count: usize, null_spend: &[usize], row_group: usize) {
    let mut columns: Vec<(&str, ArrayRef)> = vec![(
        "user_id",
        Arc::new(StringArray::from(
            (0..count).map(|i| format!("n{i}")).collect::<Vec<_>>(),
        )) as ArrayRef,
    )];
    for (j, name) in INPUTS.iter().enumerate() {
        let values: Vec<Option<f32>> = (0..count)
            .map(|i| {
                let missing = *name == "spend" && null_spend.contains(&i);
                (!missing).then(|| features_of(i)[j])
            })
            .collect();
        columns.push((name, Arc::new(Float32Array::from(values)) as ArrayRef));
    }
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("dir");
    write_batch(
        path,
        RecordBatch::try_from_iter(columns).expect("batch"),
        row_group,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_withdraws_predictions_whose_features_turned_null() {
    let ks = Keyspace::new("ml/churn", "3");
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    // Day 1: every feature of n0..n9 present. Day 2: n3's and n7's `spend` is null. Day 3:
    // present again.
    write_with_null_spend(&setup.lake().join("day1/p.parquet"), 10, &[], 5);
    write_with_null_spend(&setup.lake().join("day2/p.parquet"), 10, &[3, 7], 5);
    write_with_null_spend(&setup.lake().join("day3/p.parquet"), 10, &[], 5);
    let policy = |mut cfg: ScorerConfig| {
        cfg.features.missing.policy = MissingFeaturePolicy::Fallback;
        cfg
    };
    let day1 = policy(setup.config(&format!("file://{}/day1/", setup.lake().display()), 4, 1));
    let out = run_one(&setup, &server, &day1, "g-full");
    assert_eq!(summary_fields(&out, ["computed", "skipped"]), [10, 0]);
    let _: () = conn
        .set(ks.serving_pointer(), "g-full")
        .await
        .expect("publish");
    let before: Vec<Option<Vec<u8>>> = {
        let mut values = Vec::new();
        for i in 0..10 {
            values.push(batch_value(&mut conn, "g-full", &format!("n{i}")).await);
        }
        values
    };
    assert!(before.iter().all(Option::is_some), "day 1 scored everyone");

    // Day 2 updates g-full in place: the predictions of n3 and n7 were made on features
    // they no longer have, and the fallback policy promises they are computed on request,
    // so they must go (left in place, they would be served as fresh).
    let out = run_one(
        &setup,
        &server,
        &policy(setup.incremental("day2", 4, 1)),
        "g-inc",
    );
    assert_eq!(
        summary_fields(&out, ["computed", "carried", "skipped", "withdrawn"]),
        [0, 8, 2, 2]
    );
    for (i, was) in before.iter().enumerate() {
        let now = batch_value(&mut conn, "g-full", &format!("n{i}")).await;
        if i == 3 || i == 7 {
            assert_eq!(
                now, None,
                "n{i}'s features turned null: its prediction is withdrawn"
            );
        } else {
            assert_eq!(&now, was, "n{i} unchanged: untouched");
        }
    }

    // The same day again, published: its row groups are carried unread, n3 and n7 stay
    // withdrawn. Decoded again (its index lost), nothing is left to withdraw.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc")
        .await
        .expect("publish");
    let out = run_one(
        &setup,
        &server,
        &policy(setup.incremental("day2", 4, 1)),
        "g-inc2",
    );
    assert_eq!(
        summary_fields(&out, ["unread_groups", "skipped", "withdrawn"]),
        [2, 2, 0]
    );
    let index_keys: Vec<String> = (0..2)
        .map(|group| ks.fingerprint_index("g-full", 0, group))
        .collect();
    let _: () = conn.del(&index_keys).await.expect("del");
    let out = run_one(
        &setup,
        &server,
        &policy(setup.incremental("day2", 4, 1)),
        "g-inc3",
    );
    assert_eq!(
        summary_fields(&out, ["computed", "carried", "skipped", "withdrawn"]),
        [0, 8, 2, 0]
    );
    for i in [3, 7] {
        let now = batch_value(&mut conn, "g-full", &format!("n{i}")).await;
        assert_eq!(now, None, "n{i} stays withdrawn");
    }

    // Day 3: their features are back, so they are scored again.
    let out = run_one(
        &setup,
        &server,
        &policy(setup.incremental("day3", 4, 1)),
        "g-inc4",
    );
    assert_eq!(
        summary_fields(&out, ["computed", "carried", "withdrawn"]),
        [2, 8, 0]
    );
    for i in [3, 7] {
        let value = |stored: &Option<Vec<u8>>| {
            CachedPrediction::decode(stored.as_deref().expect("a prediction"))
                .expect("decodes")
                .value
        };
        let now = batch_value(&mut conn, "g-full", &format!("n{i}")).await;
        assert_eq!(
            value(&now),
            value(&before[i]),
            "n{i} scored again, on the same features as day 1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_run_removes_the_predictions_of_entities_gone_from_the_input() {
    let ks = Keyspace::new("ml/churn", "3");
    let setup = Setup::new();
    let server = RedisServer::start();
    let mut conn = connection(&server.url()).await;
    // Day 1: a.parquet holds e0..e199 (two row groups), b.parquet e200..e299 (one).
    // Day 2: e5 and e150 deleted, b.parquet gone but for e250, which moved into a.parquet,
    // and e1000 new. Every other row keeps its features.
    for day in ["day1", "day2"] {
        std::fs::create_dir_all(setup.lake().join(day)).expect("dir");
    }
    let (a, b): (Vec<usize>, Vec<usize>) = ((0..200).collect(), (200..300).collect());
    write_parquet(&setup.lake().join("day1/a.parquet"), &a, 100);
    write_parquet(&setup.lake().join("day1/b.parquet"), &b, 100);
    let gone = |i: usize| i == 5 || i == 150 || (200..300).contains(&i) && i != 250;
    let day2: Vec<usize> = (0..200).filter(|&i| !gone(i)).chain([250, 1_000]).collect();
    write_parquet(&setup.lake().join("day2/a.parquet"), &day2, 100);

    let day1 = config_file(
        setup.dir.path(),
        &setup.config(&format!("file://{}/day1/", setup.lake().display()), 64, 2),
    );
    for shard in 0..2 {
        let out = run_batch(&day1, &server.url(), "g-full", 2, shard);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let _: () = conn
        .set(ks.serving_pointer(), "g-full")
        .await
        .expect("publish");
    let everyone: Vec<usize> = (0..300).chain([1_000]).collect();
    let before = raw_values(&mut conn, "g-full", &everyone).await;

    // Day 2, in two shards: the first records itself done; the last removes the gone
    // entities before it does, so the operator publishes the run with them removed.
    let cfg = config_file(setup.dir.path(), &setup.incremental("day2", 64, 2));
    let first = run_batch(&cfg, &server.url(), "g-inc", 2, 0);
    assert_eq!(summary_field(&first, "removed"), 0, "not the last shard");
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-inc")).await.expect("done");
    assert_eq!(done.len(), 1);
    let last = run_batch(&cfg, &server.url(), "g-inc", 2, 1);
    assert_eq!(
        summary_field(&first, "computed") + summary_field(&last, "computed"),
        1,
        "only e1000 is scored: the moved rows are found by their values"
    );
    assert_eq!(summary_field(&last, "removed"), 101);
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-inc")).await.expect("done");
    assert_eq!(done.len(), 2, "recorded done after the sweep");
    let after = raw_values(&mut conn, "g-full", &everyone).await;
    for (k, &i) in everyone.iter().enumerate() {
        if gone(i) {
            assert_eq!(after[k], None, "e{i} is gone from the input: removed");
        } else if i == 1_000 {
            assert!(after[k].is_some(), "e1000 scored");
        } else {
            assert_eq!(
                after[k], before[k],
                "e{i} kept (e250 and e100 moved): untouched"
            );
        }
    }
    let candidates: Vec<Vec<u8>> = conn
        .smembers(ks.removal_candidates("g-full"))
        .await
        .expect("smembers");
    assert!(candidates.is_empty(), "the candidates handled are cleared");
    let orphan: bool = conn
        .exists(ks.fingerprint_index("g-full", 1, 0))
        .await
        .expect("exists");
    assert!(
        !orphan,
        "the index of b.parquet's row group, gone, is deleted"
    );
    let listing: String = conn.get(ks.index_listing("g-full")).await.expect("listing");
    assert_eq!(listing, "2");

    // The next run finds nothing more to remove.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc")
        .await
        .expect("publish");
    let out = run_batch(&cfg, &server.url(), "g-inc2", 1, 0);
    assert_eq!(
        summary_fields(&out, ["computed", "carried", "removed"]),
        [0, 200, 0]
    );

    // Day 3: e10 deleted, and e180 moved into the first row group. When the last shard
    // sweeps, that group's index is missing (evicted, say): without it e180 would look
    // gone, so nothing is removed and the candidates wait for the next run.
    std::fs::create_dir_all(setup.lake().join("day3")).expect("dir");
    let day3: Vec<usize> = std::iter::once(180)
        .chain(day2.iter().copied().filter(|&i| i != 10 && i != 180))
        .collect();
    write_parquet(&setup.lake().join("day3/a.parquet"), &day3, 100);
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc2")
        .await
        .expect("publish");
    let cfg = config_file(setup.dir.path(), &setup.incremental("day3", 64, 2));
    let first = run_batch(&cfg, &server.url(), "g-inc3", 2, 0);
    assert!(first.status.success(), "{}", stderr(&first));
    let _: () = conn
        .del(ks.fingerprint_index("g-full", 0, 0))
        .await
        .expect("evict the index shard 0 wrote");
    let last = run_batch(&cfg, &server.url(), "g-inc3", 2, 1);
    assert_eq!(summary_field(&last, "removed"), 0);
    assert!(
        stderr(&last).contains("not removed by this run"),
        "{}",
        stderr(&last)
    );
    let done: HashMap<String, u64> = conn.hgetall(ks.shards_done("g-inc3")).await.expect("done");
    assert_eq!(done.len(), 2, "the run completes all the same");
    let kept = raw_values(&mut conn, "g-full", &[10, 180]).await;
    assert!(kept.iter().all(Option::is_some), "nothing removed");
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc3")
        .await
        .expect("publish");
    let out = run_batch(&cfg, &server.url(), "g-inc4", 1, 0);
    assert_eq!(summary_field(&out, "removed"), 1, "e10, at the next run");
    let now = raw_values(&mut conn, "g-full", &[10, 180]).await;
    assert_eq!(now[0], None, "e10 removed");
    assert_eq!(now[1], kept[1], "e180 moved, kept");

    // Day 5: the table laid out anew (reversed) and e20 deleted, under a limit of ten
    // candidates: far more than ten left their row groups, so they are dropped unread, e20
    // among them (it stays until the rebuild), and the run completes.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc4")
        .await
        .expect("publish");
    for day in ["day5", "day6"] {
        std::fs::create_dir_all(setup.lake().join(day)).expect("dir");
    }
    let limited = |dir: &str, generation: &str| {
        let cfg = config_file(setup.dir.path(), &setup.incremental(dir, 64, 1));
        batch_command(&cfg, &server.url(), generation, 1, 0)
            .args(["--max-removal-candidates", "10"])
            .output()
            .expect("run")
    };
    let day5: Vec<usize> = day3.iter().rev().copied().filter(|&i| i != 20).collect();
    write_parquet(&setup.lake().join("day5/a.parquet"), &day5, 100);
    let out = limited("day5", "g-inc5");
    assert_eq!(summary_field(&out, "removed"), 0);
    assert!(
        stderr(&out).contains("too many entities left"),
        "{}",
        stderr(&out)
    );
    let left: i64 = conn
        .scard(ks.removal_candidates("g-full"))
        .await
        .expect("scard");
    assert_eq!(left, 0, "dropped, not kept to be too many again");
    assert!(raw_values(&mut conn, "g-full", &[20]).await[0].is_some());

    // Day 6, the same layout and e30 deleted: one candidate, removed as usual.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc5")
        .await
        .expect("publish");
    let day6: Vec<usize> = day5.iter().copied().filter(|&i| i != 30).collect();
    write_parquet(&setup.lake().join("day6/a.parquet"), &day6, 100);
    let out = limited("day6", "g-inc6");
    assert_eq!(summary_field(&out, "removed"), 1, "{}", stderr(&out));
    assert_eq!(raw_values(&mut conn, "g-full", &[30]).await[0], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_shard_decides_the_run_and_an_old_generation_is_rebuilt() {
    let ks = Keyspace::new("ml/churn", "3");
    // Day 2: every tenth entity changed, five new, and entity 7 gone from the input.
    let day2: Vec<usize> = (0..1_005).filter(|&i| i != 7).collect();
    let (setup, server, mut conn) = day1_published(1_000, &day2, 100, 128).await;
    let incremental = setup.incremental("day2", 128, 2);
    let cfg = config_file(setup.dir.path(), &incremental);

    // Shard 0 starts and decides: update g-full in place. Before shard 1 starts, the
    // pointer moves (an operator publishing late) to a generation an incremental run could
    // not update: shard 1 must still do what shard 0 decided.
    let first = run_batch(&cfg, &server.url(), "g-inc", 2, 0);
    let base_of = |plan: Option<String>| match plan.as_deref().and_then(RunPlan::parse) {
        Some(RunPlan::Update { base, .. }) => Some(base),
        _ => None,
    };
    let plan = conn.get(ks.run_plan("g-inc")).await.expect("plan");
    assert_eq!(base_of(plan), Some("g-full".into()));
    let _: () = conn
        .set(ks.serving_pointer(), "g-elsewhere")
        .await
        .expect("move the pointer");
    let second = run_batch(&cfg, &server.url(), "g-inc", 2, 1);
    let computed = shard_summary(&first).0 + shard_summary(&second).0;
    assert_eq!(
        computed, 105,
        "one run: the changed and the new rows of both shards"
    );
    let own_layout: Option<u32> = conn.get(ks.bucket_count_key("g-inc")).await.expect("get");
    assert_eq!(own_layout, None, "no shard wrote a generation of its own");
    let gone = raw_values(&mut conn, "g-full", &[7]).await;
    assert_eq!(
        gone[0], None,
        "entity 7, gone from the input, is removed by the run's last shard"
    );

    // A week later (its full run's recorded start moved back eight days), the next
    // incremental run scores everything into a generation of its own.
    let _: () = conn
        .set(ks.serving_pointer(), "g-inc")
        .await
        .expect("publish");
    let started = |plan: Option<String>| match plan.as_deref().and_then(RunPlan::parse) {
        Some(RunPlan::Full { started_ms }) => started_ms,
        other => panic!("a full run's plan records its start, not {other:?}"),
    };
    let full_started = started(conn.get(ks.run_plan("g-full")).await.expect("plan"));
    let backdated = RunPlan::Full {
        started_ms: full_started - 8 * 86_400_000,
    };
    let _: () = conn
        .set(ks.run_plan("g-full"), backdated.encode())
        .await
        .expect("backdate");
    let rebuild = run_one(&setup, &server, &incremental, "g-week");
    assert!(
        stderr(&rebuild).contains("older than batch.rebuildAfter"),
        "{}",
        stderr(&rebuild)
    );
    assert_eq!(
        shard_summary(&rebuild),
        (1_004, 0, 0),
        "every row scored afresh"
    );
    let alias: Option<String> = conn.get(ks.alias("g-week")).await.expect("alias");
    assert_eq!(
        alias, None,
        "published as itself, not as an update of g-full"
    );
    let rebuilt = raw_values(&mut conn, "g-week", &day2).await;
    for (&i, value) in day2.iter().zip(&rebuilt) {
        let p = CachedPrediction::decode(value.as_deref().expect("written")).expect("decodes");
        assert!(
            (p.value - setup.expected(day2_source(i))).abs() < 1e-6,
            "e{i}"
        );
    }
    assert_eq!(
        raw_values(&mut conn, "g-week", &[7]).await,
        vec![None],
        "entity 7 is not in the new generation"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let week_started = started(conn.get(ks.run_plan("g-week")).await.expect("plan"));
    assert!(
        now_ms - week_started < 60_000,
        "the rebuild records its own start"
    );

    // Published, the rebuilt generation is what the next incremental run updates.
    let _: () = conn
        .set(ks.serving_pointer(), "g-week")
        .await
        .expect("publish");
    let next = run_one(&setup, &server, &incremental, "g-next");
    assert_eq!(shard_summary(&next), (0, 1_004, 1_004));
    let plan = conn.get(ks.run_plan("g-next")).await.expect("plan");
    assert_eq!(base_of(plan), Some("g-week".into()));

    // A garbled record: under the run's own name nobody can follow it, so the shard fails
    // and writes nothing; under the published generation it only hides its age, so the run
    // rebuilds.
    let _: () = conn
        .set(ks.run_plan("g-garbled"), "half a plan")
        .await
        .expect("garble");
    let garbled = run_one(&setup, &server, &incremental, "g-garbled");
    assert!(!garbled.status.success());
    assert!(
        stderr(&garbled).contains("the plan of generation g-garbled cannot be followed"),
        "{}",
        stderr(&garbled)
    );
    let _: () = conn
        .set(ks.run_plan("g-week"), "half a plan")
        .await
        .expect("garble");
    let rebuilt = run_one(&setup, &server, &incremental, "g-after");
    assert!(
        stderr(&rebuilt).contains("records no start of its full run"),
        "{}",
        stderr(&rebuilt)
    );
    assert_eq!(shard_summary(&rebuilt).0, 1_004);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_twice_in_a_row_group_fails_an_incremental_run_before_it_writes() {
    let ids: Vec<usize> = (0..100).collect();
    let (setup, server, mut conn) = day1_published(ids.len(), &ids, 100, 32).await;
    let before = raw_values(&mut conn, "g-full", &ids).await;

    // Day 3: day 2's rows and e3 once more, with other features, in the same row group.
    std::fs::create_dir_all(setup.lake().join("day3")).expect("dir");
    let mut names: Vec<String> = ids.iter().map(|i| format!("e{i}")).collect();
    names.push("e3".into());
    let mut columns: Vec<(&str, ArrayRef)> =
        vec![("user_id", Arc::new(StringArray::from(names)) as ArrayRef)];
    for (j, name) in INPUTS.iter().enumerate() {
        let values: Vec<f32> = ids
            .iter()
            .map(|&i| features_of(day2_source(i))[j])
            .chain(std::iter::once(features_of(70_000)[j]))
            .collect();
        columns.push((name, Arc::new(Float32Array::from(values)) as ArrayRef));
    }
    write_batch(
        &setup.lake().join("day3/d.parquet"),
        RecordBatch::try_from_iter(columns).expect("batch"),
        200,
    );
    let incremental = setup.incremental("day3", 32, 1);
    let out = run_one(&setup, &server, &incremental, "g-dup");
    assert!(!out.status.success(), "a repeated entity must fail the run");
    let log = stderr(&out);
    assert!(
        log.contains("day3/d.parquet") && log.contains("row group 0") && log.contains("\"e3\""),
        "{log}"
    );
    // Found by the fingerprint index while decoding: e3's batch was never written.
    let after = raw_values(&mut conn, "g-full", &[3]).await;
    assert_eq!(after[0], before[3], "e3 is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_incremental_run_leaves_no_index_ahead_of_its_predictions() {
    let ks = Keyspace::new("ml/churn", "3");
    let ids: Vec<usize> = (0..300).collect();
    let (setup, server, mut conn) = day1_published(ids.len(), &ids, 300, 64).await;
    let index_key = ks.fingerprint_index("g-full", 0, 0);
    let index_before: Vec<u8> = conn.get(&index_key).await.expect("index");

    // One changed entity's bucket is set aside and a string stands in its place: its write
    // fails (WRONGTYPE), the other buckets of the pipeline land, and the run fails.
    let broken = layout_of(&mut conn, "g-full").await.key_of("e13");
    let aside = format!("{broken}:aside");
    let _: () = conn.rename(&broken, &aside).await.expect("rename");
    let _: () = conn.set(&broken, "not a hash").await.expect("set");
    let incremental = setup.incremental("day2", 64, 1);
    let cfg = config_file(setup.dir.path(), &incremental);
    let out = run_batch(&cfg, &server.url(), "g-inc", 1, 0);
    assert!(!out.status.success(), "the write to e13 must fail the run");
    assert!(
        stderr(&out).contains("writing predictions"),
        "{}",
        stderr(&out)
    );
    let index_after: Vec<u8> = conn.get(&index_key).await.expect("index");
    assert!(
        index_after == index_before,
        "the group's index is not rewritten before all its predictions are written"
    );

    // Fixed and rerun: every changed entity is rescored, e13 included (an index written
    // ahead would have called it unchanged and left it without a prediction).
    let _: () = conn.rename(&aside, &broken).await.expect("restore");
    let out = run_batch(&cfg, &server.url(), "g-inc-retry", 1, 0);
    let (computed, carried, settled) = shard_summary(&out);
    assert_eq!((computed, carried, settled), (30, 270, 300));
    let after = read_all(&mut conn, "g-full", ids.len()).await;
    for &i in &ids {
        let source = day2_source(i);
        let p = after[i]
            .as_ref()
            .unwrap_or_else(|| panic!("e{i} has no prediction"));
        assert!(
            (p.value - setup.expected(source)).abs() < 1e-6,
            "e{i} carries the prediction of its current features"
        );
    }
}

/// A successful shard's (computed, carried, settled_by_index) from its summary line.
fn shard_summary(out: &std::process::Output) -> (u64, u64, u64) {
    (
        summary_field(out, "computed"),
        summary_field(out, "carried"),
        summary_field(out, "settled_by_index"),
    )
}
