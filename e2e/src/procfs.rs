//! CPU time from `/proc/<pid>/stat`, for the benchmarks: a process's own, and that of its
//! children it has waited for. Linux only, like the rest of the local control plane.

/// Clock ticks per second of `/proc/<pid>/stat`'s times: the kernel's `USER_HZ`, 100 on
/// every Linux architecture the project runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// The sum of the fields of `/proc/<pid>/stat` at `indexes`, counted from the first field
/// after the command name (which is in parentheses and may hold spaces), in seconds; 0 when
/// the file cannot be read.
fn stat_seconds(pid: &str, indexes: [usize; 2]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = indexes
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / TICKS_PER_SECOND
}

/// User and system CPU seconds process `pid` has used (`utime` and `stime`).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(&pid.to_string(), [11, 12])
}

/// User and system CPU seconds used by this process's children that it has waited for
/// (`cutime` and `cstime`): read before and after running a child to its end, the
/// difference is the child's.
pub fn children_cpu_seconds() -> f64 {
    stat_seconds("self", [13, 14])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_its_children_counted_after_a_wait() {
        let busy = std::time::Instant::now();
        let mut x = 0u64;
        while busy.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1, "keeps the loop");
        assert!(cpu_seconds(std::process::id()) > 0.0);
        let before = children_cpu_seconds();
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(status.success());
        assert!(
            children_cpu_seconds() > before,
            "a waited-for child's CPU is counted"
        );
    }
}
