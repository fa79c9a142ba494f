//! The hybrid benchmark (not a test): Millrace's batch job and scorer against the baseline
//! in `../shared/baselines/seed_python/` (the hand-written pandas + FastAPI design), in one
//! run, on the same data (its generator: 1M entities x 32 features, the same MLP), the same
//! Redis, the same load generator (wrk, 32 connections, uniform random ids), plus
//! `redis-benchmark`'s rates as the store's ceiling. Prints figures; asserts nothing.
//!
//! `make bench` runs it. Environment knobs: `MILLRACE_BENCH_SECONDS` (per load run, default
//! 10), `MILLRACE_BENCH_ENTITIES` (default 1000000), `MILLRACE_BENCH_BATCH_ROUNDS` (rounds
//! of Millrace's batch job, each a full run, an incremental one on top of it and a full run
//! of the incremental run's changed rows alone, default 3: medians are reported, since
//! single runs on these machines vary by a fifth),
//! `MILLRACE_BENCH_BATCH_ONLY` (stop after the batch section), `MILLRACE_BENCH_BATCH_BASELINE`
//! (`0` skips the baseline's batch job, which runs at some 16-75k predictions/s: ten minutes
//! at 10M entities, for a scaling study of Millrace's own figures), `MILLRACE_BENCH_BASELINE`
//! (the baseline's directory).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use millrace_crds::config::{BatchConfig, ScorerConfig};
use millrace_crds::spec::OfflineFeatures;
use millrace_e2e::redis_server::RedisServer;

#[path = "../tests/support/mod.rs"]
mod support;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn baseline_dir() -> PathBuf {
    std::env::var("MILLRACE_BENCH_BASELINE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| support::root().join("../shared/baselines/seed_python"))
}

fn python() -> PathBuf {
    support::root().join(".venv/bin/python")
}

/// The baseline's data (features.parquet, model.onnx), generated once per size and cached.
fn data(entities: usize) -> PathBuf {
    data_of(entities, 32)
}

/// [`data`] of `features` features.
fn data_of(entities: usize, features: usize) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    let dir = PathBuf::from(home).join(format!(".cache/millrace/bench/seed-{entities}x{features}"));
    if !dir.join("model.onnx").exists() {
        eprintln!(
            "generating {entities} entities x {features} features with the baseline's generator ..."
        );
        let status = Command::new(python())
            .arg(baseline_dir().join("gen_data.py"))
            .arg(&dir)
            .arg(entities.to_string())
            .arg(features.to_string())
            .status()
            .expect("the project venv");
        assert!(status.success(), "gen_data.py failed");
    }
    dir
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_http(port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    while rt
        .block_on(support::try_request(port, "GET", path, None))
        .map(|(s, _)| s)
        != Some(200)
    {
        assert!(
            Instant::now() < deadline,
            "nothing answered on {port}{path}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What wrk measured.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_ms(text: &str) -> f64 {
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * factor)
}

fn wrk(port: u16, path_prefix: &str, id_prefix: &str, id_range: u64, seconds: u64) -> Load {
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(baseline_dir().join("random_ids.lua"))
        .arg(format!("http://127.0.0.1:{port}"))
        .env("PATH_PREFIX", path_prefix)
        .env("ID_PREFIX", id_prefix)
        .env("ID_RANGE", id_range.to_string())
        .output()
        .expect("wrk (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => load.p50_ms = parse_ms(v),
            ["99%", v] => load.p99_ms = parse_ms(v),
            ["Requests/sec:", v] => load.rps = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                load.errors += n.parse::<u64>().unwrap_or(0)
            }
            ["Socket", "errors:", rest @ ..] => {
                load.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    load
}

/// `redis-benchmark`'s rate (`-q` output: "SET: 523560.22 requests per second").
fn redis_benchmark(port: u16, args: &[&str]) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-q"])
        .args(args)
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(['\r', '\n'])
        .filter_map(|l| {
            l.split_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .next_back()
        .unwrap_or(0.0)
}

/// Redis's `INFO` `section`.
fn redis_info(url: &str, section: &str) -> String {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("redis");
    redis::cmd("INFO")
        .arg(section)
        .query(&mut conn)
        .expect("info")
}

/// The value of `field` in an `INFO` reply.
fn info_field<T: std::str::FromStr>(info: &str, field: &str) -> Option<T> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

/// Redis's `used_memory` in bytes.
fn used_memory(url: &str) -> u64 {
    info_field(&redis_info(url, "memory"), "used_memory").unwrap_or(0)
}

/// Seconds of CPU Redis has used (user and system).
fn redis_cpu_seconds(url: &str) -> f64 {
    let info = redis_info(url, "cpu");
    ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .filter_map(|field| info_field::<f64>(&info, field))
        .sum()
}

fn flushall(url: &str) {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).expect("flushall");
}

/// Runs `cmd` to completion: its wall time, peak RSS in MiB (VmHWM, polled) and output.
fn timed(mut cmd: Command) -> (Duration, u64, String) {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The peak RSS is sampled on another thread, so the time is taken the moment the
    // process ends rather than at the next sample: a 20 ms poll added 0-20 ms to every
    // figure, which pulled a 0.3 s run's ratio against a 1-2 s run down.
    let status_path = format!("/proc/{}/status", child.id());
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = Arc::clone(&running);
        std::thread::spawn(move || {
            let mut peak_kib = 0;
            while running.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(&status_path)
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peak_kib
        })
    };
    let out = child.wait_with_output().expect("output");
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    let peak_kib = sampler.join().expect("RSS sampler");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    (elapsed, peak_kib / 1024, text)
}

/// `millrace-scorer batch` of `config` as `generation` against `url`, logging at `log`.
fn batch_command(config: &Path, url: &str, generation: &str, log: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"));
    command
        .args(["batch", "--config"])
        .arg(config)
        .env("MILLRACE_REDIS_URL", url)
        .env("MILLRACE_GENERATION", generation)
        .env("RUST_LOG", log);
    command
}

/// The median peak RSS (MiB) of `runs` ([`timed`]'s time and RSS).
fn median_mib(runs: &[(Duration, u64)]) -> f64 {
    median(runs.iter().map(|r| r.1 as f64))
}

/// The median seconds of `runs`.
fn median_secs(runs: &[(Duration, u64)]) -> f64 {
    median(runs.iter().map(|r| r.0.as_secs_f64()))
}

/// One round of the batch section: a full run, then an incremental one on top of it.
struct Round {
    full_time: Duration,
    full_rss: u64,
    /// Redis memory the full run added.
    memory: u64,
    inc_time: Duration,
    inc_rss: u64,
    /// CPU seconds the incremental run used, in the job and in Redis.
    inc_cpu: (f64, f64),
    /// The incremental run's log (its counts).
    log: String,
    /// A full run of the incremental run's changed rows alone, if the section has one.
    changed_only_time: Option<Duration>,
}

/// A batch section's runs: the full run's and the incremental run's configs, and the key
/// the operator would flip to publish.
struct BatchRun<'a> {
    full: &'a Path,
    incremental: &'a Path,
    /// A full run of only the rows the incremental run finds changed (its own key prefix):
    /// what scoring and writing them costs with no other row to read or decide.
    changed_only: Option<&'a Path>,
    pointer: &'a str,
    url: &'a str,
}

impl BatchRun<'_> {
    /// A full run under `generation`, published (what the operator does once every shard is
    /// done), then an incremental run on top of it, which updates it in place.
    fn round(&self, generation: &str, conn: &mut redis::Connection) -> Round {
        let run = |config: &Path, generation: &str, log: &str| {
            timed(batch_command(config, self.url, generation, log))
        };
        let memory_before = used_memory(self.url);
        let (full_time, full_rss, _) = run(self.full, generation, "warn");
        let memory = used_memory(self.url).saturating_sub(memory_before);
        let _: () = redis::cmd("SET")
            .arg(self.pointer)
            .arg(generation)
            .query(conn)
            .expect("publish");
        let cpu_before = (
            millrace_e2e::procfs::children_cpu_seconds(),
            redis_cpu_seconds(self.url),
        );
        let (inc_time, inc_rss, log) = run(
            self.incremental,
            &format!("{generation}-incremental"),
            "info",
        );
        let inc_cpu = (
            millrace_e2e::procfs::children_cpu_seconds() - cpu_before.0,
            redis_cpu_seconds(self.url) - cpu_before.1,
        );
        let changed_only_time = self
            .changed_only
            .map(|config| run(config, generation, "warn").0);
        Round {
            full_time,
            full_rss,
            memory,
            inc_time,
            inc_rss,
            inc_cpu,
            log,
            changed_only_time,
        }
    }
}

/// Field `name` of the last round's incremental summary line ("?" when absent).
fn last_log_field(rounds: &[Round], name: &str) -> String {
    rounds
        .last()
        .and_then(|r| r.log.split(&format!("{name}=")).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// The median of `values` (the mean of the middle two for an even count; 0 for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

/// The feature table split into four files (`partitioned/`), and the same with the last
/// file rewritten with 10% of its rows' features changed and the others copied byte for byte
/// (`partitioned-changed/`): a table that changes by partition. Cached beside the data.
fn partitioned_copies(data: &Path) -> (PathBuf, PathBuf) {
    let (base, changed) = (data.join("partitioned"), data.join("partitioned-changed"));
    let script = r#"
import os, shutil, sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]); n = t.num_rows; base, changed = sys.argv[2], sys.argv[3]
os.makedirs(base, exist_ok=True); os.makedirs(changed, exist_ok=True)
step = (n + 3) // 4
for k in range(4):
    part = t.slice(k * step, step)
    pq.write_table(part, f"{base}/part-{k}.parquet", row_group_size=65536)
    if k < 3:
        shutil.copy(f"{base}/part-{k}.parquet", f"{changed}/part-{k}.parquet")
        continue
    rows = np.random.default_rng(4).choice(part.num_rows, part.num_rows // 10, replace=False)
    for j in range(32):
        name = f"f{j}"; col = part.column(name).to_numpy().copy(); col[rows] += 0.5
        part = part.set_column(part.schema.get_field_index(name), name, pa.array(col))
    pq.write_table(part, f"{changed}/part-{k}.parquet", row_group_size=65536)
"#;
    let done = changed.join("part-3.parquet");
    derived_tables(
        data,
        "the partitioned tables",
        script,
        &[&base, &changed],
        &done,
    );
    (base, changed)
}

/// Reading and decoding the feature table (no model, no Redis) from a store that answers
/// each request after 20 ms and sends 80 MB/s per request, as an object store does
/// (object_store's `ThrottledStore` over the table in memory), with 2, 4 and 8 row groups in
/// flight: how far concurrent reads hide an object store's latency and per-request rate.
fn remote_reads(data: &Path, rounds: usize) {
    use millrace_crds::keys::{Keyspace, bucket_count};
    use millrace_crds::spec::{MissingFeaturePolicy, MissingFeatures};
    use millrace_scorer::batch::{budget::Budget, decode, digest, input::Input, shard, sizing};
    use object_store::ObjectStoreExt;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let timings = runtime.block_on(async {
        // In memory: the throttle needs a store that streams its bodies.
        let memory = object_store::memory::InMemory::new();
        let table = std::fs::read(data.join("features.parquet")).expect("table");
        memory
            .put(&"features.parquet".into(), table.into())
            .await
            .expect("put");
        let store = ThrottledStore::new(
            memory,
            ThrottleConfig {
                wait_get_per_call: Duration::from_millis(20),
                wait_get_per_byte: Duration::from_nanos(12),
                ..ThrottleConfig::default()
            },
        );
        let uri = "s3://simulated/features.parquet";
        let input = Input::open_in(Arc::new(store), "features.parquet".into(), uri)
            .await
            .expect("open");
        let inputs: Vec<String> = (0..32).map(|i| format!("f{i}")).collect();
        let mut columns = vec!["entity_id".to_string()];
        columns.extend(inputs.iter().cloned());
        let missing = MissingFeatures {
            policy: MissingFeaturePolicy::Fill,
            fill_value: 0.0,
        };
        let row_groups = input.row_groups();
        let rows: u64 = row_groups.iter().flatten().sum();
        let keyspace = Keyspace::new("bench/remote", "1");
        let plan = decode::DecodePlan {
            input: Arc::new(input),
            columns,
            id_column: "entity_id".into(),
            digest_seed: digest::seed("entity_id", &inputs, &missing),
            inputs,
            missing,
            batch_size: 8192,
            layout: Arc::new(keyspace.batch_layout("remote", bucket_count(rows))),
            keyspace,
            generation: "remote".into(),
            known: None,
            repair: None,
            absent: None,
            ttl_ms: 60_000,
            spool: decode::Spool {
                dir: std::env::temp_dir(),
                max_group_bytes: 64 << 20,
                scratch: Budget::new(None),
            },
            memory: Budget::new(Some(sizing::DEFAULT_DECODE_BYTES)),
        };
        let mut timings = Vec::new();
        for in_flight in [2, 4, 8] {
            let mut seconds = Vec::new();
            for _ in 0..rounds {
                let started = Instant::now();
                let units = shard::assign(&row_groups, 1, 0);
                let mut decoded = decode::start(plan.clone(), units, in_flight);
                let mut read = 0;
                while let Some(message) = decoded.recv().await {
                    if let decode::Decoded::Batch(batch) = message.expect("decodes") {
                        read += batch.rows;
                    }
                }
                assert_eq!(read, rows, "every row decoded");
                seconds.push(started.elapsed().as_secs_f64());
            }
            timings.push((in_flight, median(seconds.into_iter())));
        }
        timings
    });
    let line: Vec<String> = timings
        .iter()
        .map(|(in_flight, seconds)| format!("{seconds:.2} s with {in_flight} in flight"))
        .collect();
    println!(
        "reading and decoding the table from a store with 20 ms a request and 80 MB/s per request (simulated): {} (medians of {rounds})",
        line.join(", ")
    );
}

/// Runs `script` (pyarrow) with the feature table and `outputs` as arguments, unless
/// `done` (the last file it writes) exists: derived tables are cached beside the data.
fn derived_tables(data: &Path, what: &str, script: &str, outputs: &[&Path], done: &Path) {
    if done.exists() {
        return;
    }
    let status = Command::new(python())
        .args(["-c", script])
        .arg(data.join("features.parquet"))
        .args(outputs)
        .status()
        .expect("python");
    assert!(status.success(), "making {what} failed");
}

/// A wide table: 256Ki entities of 512 features in four row groups of about 190 MiB, full
/// runs within the default decoding memory (one group at a time, in record batches cut to
/// 4 MiB of features) and with room for two groups at once (`--decode-memory 1Gi`).
fn wide_input(work: &Path, url: &str, rounds: usize) {
    let (entities, features) = (262_144, 512);
    let data = data_of(entities, features);
    let mut cfg = scorer_config_of(&data, 0, features);
    cfg.key_prefix = "bench/wide".into();
    let config = write_config(work, "wide.json", &cfg);
    let run = |generation: &str, memory: Option<&str>| {
        let mut command = batch_command(&config, url, generation, "warn");
        if let Some(memory) = memory {
            command.args(["--decode-memory", memory]);
        }
        let (time, rss, _) = timed(command);
        // Its predictions go again (the serve section reads only the rounds' generation),
        // so Redis does not grow by a generation a run.
        let layout = cfg.keyspace().batch_layout(
            generation,
            millrace_crds::keys::bucket_count(entities as u64),
        );
        let keys: Vec<String> = (0..layout.buckets())
            .map(|b| layout.bucket_key(b))
            .collect();
        let mut conn = redis::Client::open(url)
            .expect("url")
            .get_connection()
            .expect("redis");
        for part in keys.chunks(1024) {
            let _: () = redis::cmd("UNLINK")
                .arg(part)
                .query(&mut conn)
                .expect("unlink");
        }
        (time, rss)
    };
    let (within, roomy): (Vec<_>, Vec<_>) = (1..=rounds)
        .map(|round| {
            (
                run(&format!("wide-{round}"), None),
                run(&format!("wide-roomy-{round}"), Some("1Gi")),
            )
        })
        .unzip();
    println!(
        "{features} features x {entities} entities (4 row groups of ~190 MiB): peak RSS {:.0} MiB within the default decoding memory ({:.2} s), {:.0} MiB with two groups at once ({:.2} s; medians of {rounds})",
        median_mib(&within),
        median_secs(&within),
        median_mib(&roomy),
        median_secs(&roomy),
    );
}

/// The feature table as one row group, as pandas and pyarrow write up to 1Mi rows.
fn one_group_copy(data: &Path) -> PathBuf {
    let out = data.join("one-row-group.parquet");
    let script = r#"
import sys, pyarrow.parquet as pq
pq.write_table(pq.read_table(sys.argv[1]), sys.argv[2], row_group_size=1 << 20)
"#;
    derived_tables(data, "the one-row-group table", script, &[&out], &out);
    out
}

/// Only the rows [`changed_copy`] changes, as it changes them (the same rows, in order):
/// what an incremental run must score and write.
fn changed_only_copy(data: &Path) -> PathBuf {
    let out = data.join("features-10pct-changed-only.parquet");
    let script = r#"
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]); n = t.num_rows
rows = np.sort(np.random.default_rng(3).choice(n, n // 10, replace=False))
t = t.take(pa.array(rows))
for j in range(32):
    name = f"f{j}"; col = t.column(name).to_numpy().copy(); col += 0.5
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(col))
pq.write_table(t, sys.argv[2], row_group_size=65536)
"#;
    derived_tables(data, "the changed rows' table", script, &[&out], &out);
    out
}

/// The feature table with 10% of its rows' features changed.
fn changed_copy(data: &Path) -> PathBuf {
    let out = data.join("features-10pct-changed.parquet");
    let script = r#"
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]); n = t.num_rows
rows = np.random.default_rng(3).choice(n, n // 10, replace=False)
for j in range(32):
    name = f"f{j}"; col = t.column(name).to_numpy().copy(); col[rows] += 0.5
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(col))
pq.write_table(t, sys.argv[2], row_group_size=65536)
"#;
    derived_tables(data, "the changed table", script, &[&out], &out);
    out
}

fn scorer_config(data: &Path, memory_entries: i64) -> ScorerConfig {
    scorer_config_of(data, memory_entries, 32)
}

/// [`scorer_config`] for a model of `features` inputs.
fn scorer_config_of(data: &Path, memory_entries: i64, features: usize) -> ScorerConfig {
    let inputs: Vec<String> = (0..features).map(|i| format!("f{i}")).collect();
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut cfg = support::config(&data.join("model.onnx"), &refs);
    cfg.key_prefix = "bench/hybrid".into();
    cfg.model.version = "1".into();
    cfg.cache.memory.max_entries = memory_entries;
    cfg.serving.latency_budget = "100ms".into();
    cfg.features.offline = Some(OfflineFeatures {
        uri: format!("file://{}", data.join("features.parquet").display()),
        format: Default::default(),
        id_column: "entity_id".into(),
        credentials_secret_ref: None,
    });
    cfg.batch = Some(BatchConfig {
        shards: 1,
        batch_size: 8192,
        incremental: false,
        rebuild_after: millrace_crds::spec::default_rebuild_after(),
        scratch_bytes: None,
    });
    cfg
}

fn write_config(dir: &Path, name: &str, cfg: &ScorerConfig) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(cfg).expect("json")).expect("write");
    path
}

fn start_scorer(config: &Path, redis_url: &str) -> (Process, u16) {
    let port = support::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_millrace-scorer"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--redis-url", redis_url])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("scorer");
    let process = Process(child);
    wait_http(port, "/readyz");
    (process, port)
}

fn start_baseline(data: &Path, redis_url: &str) -> (Process, u16) {
    let port = support::free_port();
    let child = Command::new(support::root().join(".venv/bin/uvicorn"))
        .args(["seed_serve:app", "--port", &port.to_string()])
        .args(["--log-level", "warning", "--no-access-log"])
        .current_dir(baseline_dir())
        .env("DATA_DIR", data)
        .env("REDIS_URL", redis_url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("uvicorn");
    let process = Process(child);
    wait_http(port, "/stats");
    (process, port)
}

fn main() {
    let seconds: u64 = env_or("MILLRACE_BENCH_SECONDS", 10);
    let batch_rounds: usize = env_or("MILLRACE_BENCH_BATCH_ROUNDS", 3).max(1);
    let entities: usize = env_or("MILLRACE_BENCH_ENTITIES", 1_000_000);
    assert!(
        baseline_dir().join("seed_serve.py").exists(),
        "the baseline is not at {} (set MILLRACE_BENCH_BASELINE)",
        baseline_dir().display()
    );
    let data = data(entities);
    let work = tempfile::tempdir().expect("tmp");
    let redis = RedisServer::start();
    let url = redis.url();

    println!("\n== Redis ceiling (redis-benchmark on this machine, now)");
    let set_ceiling = redis_benchmark(
        redis.port(),
        &["-t", "set", "-P", "64", "-n", "2000000", "-r", "1000000"],
    );
    let get_ceiling = redis_benchmark(
        redis.port(),
        &["-t", "get", "-c", "32", "-n", "300000", "-r", "1000000"],
    );
    println!(
        "pipelined SET (-P 64): {set_ceiling:>10.0}/s   GET (32 connections): {get_ceiling:>10.0}/s"
    );
    flushall(&url);

    println!("\n== Batch: {entities} entities x 32 features -> Redis");
    let baseline = (env_or("MILLRACE_BENCH_BATCH_BASELINE", 1) != 0).then(|| {
        let mut baseline_batch = Command::new(python());
        baseline_batch
            .arg(baseline_dir().join("seed_batch.py"))
            .arg(&data)
            .arg(&url);
        let memory_before = used_memory(&url);
        let (base_time, base_rss, text) = timed(baseline_batch);
        let base_memory = used_memory(&url).saturating_sub(memory_before);
        let base_rate = text
            .split_whitespace()
            .find_map(|w| {
                w.strip_prefix("rate=")?
                    .strip_suffix("/s")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(entities as f64 / base_time.as_secs_f64());
        (base_rate, base_time, base_rss, base_memory)
    });
    let cfg = scorer_config(&data, 0);
    let config = write_config(work.path(), "batch.json", &cfg);
    // Incremental: the same table with 10% of the entities' features changed.
    let changed = changed_copy(&data);
    let mut inc = cfg.clone();
    if let (Some(offline), Some(batch)) = (inc.features.offline.as_mut(), inc.batch.as_mut()) {
        offline.uri = format!("file://{}", changed.display());
        batch.incremental = true;
    }
    let inc_config = write_config(work.path(), "incremental.json", &inc);
    let mut conn = redis::Client::open(url.as_str())
        .expect("url")
        .get_connection()
        .expect("redis");
    // Every round's generation stays in Redis (the last one is what the serve section reads).
    let pointer = cfg.keyspace().serving_pointer();
    let mut changed_only = cfg.clone();
    changed_only.key_prefix = "bench/changed-only".into();
    if let Some(offline) = changed_only.features.offline.as_mut() {
        offline.uri = format!("file://{}", changed_only_copy(&data).display());
    }
    let changed_only_config = write_config(work.path(), "changed-only.json", &changed_only);
    let batch = BatchRun {
        full: &config,
        incremental: &inc_config,
        changed_only: Some(&changed_only_config),
        pointer: &pointer,
        url: &url,
    };
    let rounds: Vec<Round> = (1..=batch_rounds)
        .map(|round| batch.round(&format!("bench-{round}"), &mut conn))
        .collect();
    let our_seconds = median(rounds.iter().map(|r| r.full_time.as_secs_f64()));
    let our_time = Duration::from_secs_f64(our_seconds);
    let our_rss = rounds.iter().map(|r| r.full_rss).max().unwrap_or(0);
    let our_memory = median(rounds.iter().map(|r| r.memory as f64)) as u64;
    let our_rate = entities as f64 / our_seconds;
    println!(
        "{:<28}{:>14}{:>12}{:>16}{:>14}{:>20}",
        "", "predictions/s", "seconds", "% of SET ceil.", "peak RSS MiB", "Redis B/prediction"
    );
    let baseline_row = baseline
        .map(|(rate, time, rss, memory)| ("baseline (seed_batch.py)", rate, time, rss, memory));
    let our_row = (
        "millrace-scorer batch",
        our_rate,
        our_time,
        our_rss,
        our_memory,
    );
    for (name, rate, time, rss, memory) in baseline_row.into_iter().chain([our_row]) {
        println!(
            "{name:<28}{rate:>14.0}{:>12.1}{:>15.0}%{rss:>14}{:>20.0}",
            time.as_secs_f64(),
            100.0 * rate / set_ceiling,
            memory as f64 / entities as f64
        );
    }
    match baseline {
        Some((base_rate, _, _, base_memory)) => println!(
            "ratio: {:.1}x the baseline (target >= 5x), {:.0}% of the ceiling (target >= 40%), peak RSS {our_rss} MiB (target < 512); Redis memory {:.2}x the baseline's",
            our_rate / base_rate,
            100.0 * our_rate / set_ceiling,
            our_memory as f64 / base_memory.max(1) as f64
        ),
        None => println!(
            "(the baseline's batch job skipped: MILLRACE_BENCH_BATCH_BASELINE=0) {:.0}% of the ceiling (target >= 40%), peak RSS {our_rss} MiB (target < 512)",
            100.0 * our_rate / set_ceiling
        ),
    }

    let seconds_of = |times: &mut dyn Iterator<Item = Duration>| -> String {
        times
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "(millrace-scorer batch: the median of {batch_rounds} full runs: {} s)",
        seconds_of(&mut rounds.iter().map(|r| r.full_time))
    );
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.full_time.as_secs_f64() / r.inc_time.as_secs_f64())
        .collect();
    let field = |name: &str| last_log_field(&rounds, name);
    println!(
        "incremental, 10% changed: median {:.2} s of {} s (computed {}, carried {}, settled by the fingerprint index {}, row groups carried unread {}); {:.1}x faster than its round's full run (median; {:.1}-{:.1}x; target >= 5x), peak RSS {} MiB",
        median(rounds.iter().map(|r| r.inc_time.as_secs_f64())),
        seconds_of(&mut rounds.iter().map(|r| r.inc_time)),
        field("computed"),
        field("carried"),
        field("settled_by_index"),
        field("unread_groups"),
        median(ratios.iter().copied()),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        rounds.iter().map(|r| r.inc_rss).max().unwrap_or(0),
    );
    // Where the incremental run's time goes: its changed rows alone, run in full, against
    // what the target leaves for reading the table and deciding every other row.
    let changed_alone = median(
        rounds
            .iter()
            .filter_map(|r| r.changed_only_time)
            .map(|t| t.as_secs_f64()),
    );
    let rest = median(
        rounds
            .iter()
            .filter_map(|r| Some(r.inc_time.as_secs_f64() - r.changed_only_time?.as_secs_f64())),
    );
    println!(
        "  the changed rows alone, scored and written by a full run of their own: median {changed_alone:.2} s; 5x the full run leaves {:.2} s for reading the table and deciding the unchanged rows, which took {rest:.2} s (median)",
        our_seconds / 5.0 - changed_alone
    );
    // What no scheduling can beat: the incremental run's CPU, the job's and Redis's, spread
    // perfectly over every core of the machine they share.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (job_cpu, redis_cpu) = (
        median(rounds.iter().map(|r| r.inc_cpu.0)),
        median(rounds.iter().map(|r| r.inc_cpu.1)),
    );
    let floors: Vec<f64> = rounds
        .iter()
        .map(|r| r.full_time.as_secs_f64() / ((r.inc_cpu.0 + r.inc_cpu.1) / cores as f64))
        .collect();
    println!(
        "  its CPU: {job_cpu:.2} s in the job and {redis_cpu:.2} s in Redis (medians): on {cores} cores no schedule finishes it in under {:.2} s, at most {:.1}x faster than the full run ({:.1}-{:.1}x)",
        (job_cpu + redis_cpu) / cores as f64,
        median(floors.iter().copied()),
        floors.iter().copied().fold(f64::INFINITY, f64::min),
        floors.iter().copied().fold(0.0, f64::max),
    );

    // A table that changes by partition: one of four files rewritten. Its own key prefix, so
    // the serve section still reads the rounds' generation.
    let (parts, parts_changed) = partitioned_copies(&data);
    let mut part_cfg = cfg.clone();
    part_cfg.key_prefix = "bench/partitioned".into();
    if let Some(offline) = part_cfg.features.offline.as_mut() {
        offline.uri = format!("file://{}/", parts.display());
    }
    let part_config = write_config(work.path(), "partitioned.json", &part_cfg);
    if let (Some(offline), Some(batch)) =
        (part_cfg.features.offline.as_mut(), part_cfg.batch.as_mut())
    {
        offline.uri = format!("file://{}/", parts_changed.display());
        batch.incremental = true;
    }
    let part_inc_config = write_config(work.path(), "partitioned-incremental.json", &part_cfg);
    let pointer = part_cfg.keyspace().serving_pointer();
    let batch = BatchRun {
        full: &part_config,
        incremental: &part_inc_config,
        changed_only: None,
        pointer: &pointer,
        url: &url,
    };
    let part_rounds: Vec<Round> = (1..=batch_rounds)
        .map(|round| batch.round(&format!("part-{round}"), &mut conn))
        .collect();
    let field = |name: &str| last_log_field(&part_rounds, name);
    println!(
        "incremental, 1 of 4 files rewritten (10% of its rows changed): median {:.2} s against a {:.2} s full run of the same table (computed {}, carried {}, row groups carried unread {}); {:.1}x faster (median of {batch_rounds})",
        median(part_rounds.iter().map(|r| r.inc_time.as_secs_f64())),
        median(part_rounds.iter().map(|r| r.full_time.as_secs_f64())),
        field("computed"),
        field("carried"),
        field("unread_groups"),
        median(
            part_rounds
                .iter()
                .map(|r| r.full_time.as_secs_f64() / r.inc_time.as_secs_f64())
        ),
    );

    // Row groups of a million rows: held in memory whole, or spooled to disk (the default
    // above 64 MiB) and decoded a page at a time.
    let one_group = one_group_copy(&data);
    let mut group_cfg = cfg.clone();
    group_cfg.key_prefix = "bench/one-group".into();
    if let Some(offline) = group_cfg.features.offline.as_mut() {
        offline.uri = format!("file://{}", one_group.display());
    }
    let group_config = write_config(work.path(), "one-group.json", &group_cfg);
    let run_one_group = |generation: &str, max_group_mib: &str| {
        let mut command = batch_command(&group_config, &url, generation, "warn");
        command.args(["--max-group-mib", max_group_mib]);
        timed(command)
    };
    let (held, spooled): (Vec<_>, Vec<_>) = (1..=batch_rounds)
        .map(|round| {
            let held = run_one_group(&format!("held-{round}"), "100000");
            let spooled = run_one_group(&format!("spooled-{round}"), "64");
            ((held.0, held.1), (spooled.0, spooled.1))
        })
        .unzip();
    println!(
        "one row group of 1M rows (pyarrow's default size): peak RSS {:.0} MiB held in memory ({:.2} s), {:.0} MiB spooled to disk and decoded a page at a time ({:.2} s; medians of {batch_rounds})",
        median_mib(&held),
        median_secs(&held),
        median_mib(&spooled),
        median_secs(&spooled),
    );

    remote_reads(&data, batch_rounds);
    wide_input(work.path(), &url, batch_rounds);

    if std::env::var_os("MILLRACE_BENCH_BATCH_ONLY").is_some() {
        return;
    }
    println!("\n== Serve: wrk, 1 thread, 32 connections, {seconds} s per run, uniform random ids");
    let mut results: HashMap<(&str, &str), Load> = HashMap::new();
    let range = entities as u64;
    {
        let (_baseline, port) = start_baseline(&data, &url);
        // Redis-tier hits: every id has a batch prediction; its 10k-entry dict catches ~1%.
        let load = wrk(port, "/predict/", "user_", range, seconds);
        results.insert(("redis", "baseline"), load);
        // Memory-tier hits: 5,000 hot ids fit its dict; a warm-up run fills it.
        wrk(port, "/predict/", "user_", 5_000, 2);
        let load = wrk(port, "/predict/", "user_", 5_000, seconds);
        results.insert(("memory", "baseline"), load);
        // Real-time misses: ids with no prediction anywhere.
        let load = wrk(port, "/predict/", "new_b_", 100_000_000, seconds);
        results.insert(("realtime", "baseline"), load);
    }
    {
        let config = write_config(work.path(), "redis.json", &scorer_config(&data, 0));
        let (_scorer, port) = start_scorer(&config, &url);
        let load = wrk(port, "/v1/predictions/", "user_", range, seconds);
        results.insert(("redis", "millrace"), load);
    }
    {
        let config = write_config(work.path(), "memory.json", &scorer_config(&data, 100_000));
        let (_scorer, port) = start_scorer(&config, &url);
        wrk(port, "/v1/predictions/", "user_", 5_000, 2);
        let load = wrk(port, "/v1/predictions/", "user_", 5_000, seconds);
        results.insert(("memory", "millrace"), load);
        let load = wrk(port, "/v1/predictions/", "new_m_", 100_000_000, seconds);
        results.insert(("realtime", "millrace"), load);
    }
    println!(
        "{:<17}{:>11}{:>8}{:>8}{:>11}{:>8}{:>8}{:>9}{:>10}{:>8}",
        "tier",
        "base req/s",
        "p50 ms",
        "p99 ms",
        "mill req/s",
        "p50 ms",
        "p99 ms",
        "x req/s",
        "p99 frac",
        "target"
    );
    for (tier, label, target) in [
        ("redis", "redis hits", 20.0),
        ("memory", "memory hits", 30.0),
        ("realtime", "realtime misses", 10.0),
    ] {
        let b = results[&(tier, "baseline")];
        let m = results[&(tier, "millrace")];
        println!(
            "{label:<17}{:>11.0}{:>8.2}{:>8.2}{:>11.0}{:>8.2}{:>8.2}{:>8.1}x{:>10.3}{target:>7.0}x",
            b.rps,
            b.p50_ms,
            b.p99_ms,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.rps / b.rps,
            m.p99_ms / b.p99_ms
        );
        if b.errors + m.errors > 0 {
            println!(
                "  ({label}: {} baseline and {} millrace errors or non-2xx answers)",
                b.errors, m.errors
            );
        }
    }
    println!(
        "(p99 frac: Millrace's p99 over the baseline's; target <= 0.1. Redis GET ceiling: {get_ceiling:.0}/s)"
    );
}
