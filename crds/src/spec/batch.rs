//! `spec.batch`: the scheduled precompute that scores every entity into Redis.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A cron schedule: five fields, or one of the `@` macros CronJobs accept.
pub const CRON_PATTERN: &str =
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$";

/// The batch precompute, run as a CronJob of Indexed Jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// When to run, in cron syntax (`0 2 * * *`) or a macro (`@daily`).
    #[schemars(
        length(min = 1, max = 128),
        regex(
            pattern = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"
        )
    )]
    pub schedule: String,

    /// IANA time zone of the schedule. Default: UTC.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,

    /// Parallel shards; each scores a disjoint part of the offline table (1-1000). Changing
    /// it applies from the next run. Default: 1.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 1000))]
    pub shards: i32,

    /// Rows per ONNX run and per Redis pipeline (1-1048576); a wide table's are cut to hold
    /// at most 4 MiB of features (2,048 rows of 512 features), so memory does not grow with
    /// the model's inputs. Default: 4096.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub batch_size: i32,

    /// Pause scheduled runs; a manual run (the millrace.dev/run-batch annotation) still
    /// works. Default: false.
    #[serde(default)]
    pub suspend: bool,

    /// Only recompute entities whose features changed since the last run, carrying the
    /// other predictions forward. Default: false.
    #[serde(default)]
    pub incremental: bool,

    /// How old the published generation may grow under incremental runs: the first run
    /// after its full run is this old is a full run again, scoring every entity into a new
    /// generation. Incremental runs carry what did not change, so this is what bounds how
    /// long a carried prediction goes without being recomputed, and how long an entity gone
    /// from the input is still served where a run could not remove it (the table laid out
    /// anew). `0s`: never. Default: 168h.
    #[serde(default = "default_rebuild_after")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub rebuild_after: String,

    /// A run that cannot start within this many seconds of its time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<i64>,

    /// A run still going after this many seconds fails (and publishes nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Retries per shard before the run fails (0-10). Default: 2.
    #[serde(default = "default_backoff_limit_per_index")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit_per_index: i32,

    /// Finished runs kept for inspection, successful and failed each (0-20). Default: 3.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub history_limit: i32,

    /// Run batch shards on `nodePool` (with its GPUs) instead of ordinary nodes.
    /// Default: false: the batch is throughput work that CPU nodes do cheaply.
    #[serde(default)]
    pub use_node_pool: bool,

    /// Resources of each batch pod. A shard decodes row groups within a third of its memory
    /// limit (256 MiB without one): a table whose row groups are wider than that is decoded
    /// one group at a time rather than run out of memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Local disk each batch pod may use for row groups too large to hold in memory (over
    /// 64 MiB of compressed columns; pandas and pyarrow write a million rows to a group),
    /// which a shard streams to a file under `/tmp` and decodes from there, one group per
    /// decoder. Set, the pod's `/tmp` is limited to it, the pod requests it as ephemeral
    /// storage (so it is scheduled where the disk is), and a shard spools no more than it
    /// at once (its decoders wait their turn), failing at start, with the file and row
    /// group named, if one group alone needs more. An integer with an optional suffix:
    /// `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024) or `k`, `M`, `G`, `T` (of 1000). Default:
    /// unset (no limit, no request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,15}(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub scratch_size: Option<String>,
}

/// The bytes of a quantity such as [`BatchSpec::scratch_size`] (or the scorer's
/// `--decode-memory`): an integer with an optional binary (`Ki`, `Mi`, `Gi`, `Ti`) or
/// decimal (`k`, `M`, `G`, `T`) suffix; `None` for anything else.
pub fn quantity_bytes(size: &str) -> Option<u64> {
    let digits = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (number, suffix) = size.split_at(digits);
    let scale: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(scale)
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

fn default_shards() -> i32 {
    1
}

fn default_batch_size() -> i32 {
    4096
}

/// A week: the price of one full run a week for bounded staleness of what incremental runs
/// carry.
pub fn default_rebuild_after() -> String {
    "168h".to_string()
}

fn default_backoff_limit_per_index() -> i32 {
    2
}

fn default_history_limit() -> i32 {
    3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_sizes_read_as_kubernetes_quantities() {
        assert_eq!(quantity_bytes("512"), Some(512));
        assert_eq!(quantity_bytes("4Gi"), Some(4 << 30));
        assert_eq!(quantity_bytes("10G"), Some(10_000_000_000));
        assert_eq!(quantity_bytes("1Ki"), Some(1024));
        for bad in ["", "Gi", "4GB", "1.5Gi", "-1", "4 Gi"] {
            assert_eq!(quantity_bytes(bad), None, "{bad:?}");
        }
        assert_eq!(quantity_bytes("999999999999999Ti"), None, "overflow");
    }
}
