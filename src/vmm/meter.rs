//! What one running VM has used so far, read from the parts that know: the
//! kernel's accounting of its QEMU process (`/proc/<pid>/stat` and
//! `/proc/<pid>/status`) and QEMU's own block accounting (QMP
//! `query-blockstats`, on the supervisor's connection).
//!
//! Why `/proc/<pid>` and not the VM's cgroup: the per-VM cgroup carries only
//! the memory and pids controllers (no `cpu.stat` there, and none at all on
//! a v1 host or with `--vm-cgroups off`), and its `memory.current` also
//! charges the page cache of the VM's disk I/O, which is not resident
//! memory. QEMU runs as one process (`-sandbox spawn=deny` forbids fork), so
//! its /proc entry is the whole VM: `utime + stime` sums every thread (vCPUs,
//! I/O workers), `VmRSS` is the guest RAM it touched plus QEMU itself.
//!
//! Only reads; never signals and never changes a VM.

use std::path::Path;

use serde::Deserialize;

/// Cumulative counters of one VM's QEMU since it started (they restart at
/// zero with a new QEMU).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmCounters {
    /// User plus system CPU time of every QEMU thread.
    pub cpu_seconds: f64,
    /// Resident memory of the QEMU process.
    pub rss_bytes: u64,
    /// Bytes the guest read and wrote through all its drives.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
}

/// CPU seconds and resident bytes of `pid`, from `/proc`.
pub fn process_usage(proc_dir: &Path) -> std::io::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(proc_dir.join("stat"))?;
    let status = std::fs::read_to_string(proc_dir.join("status"))?;
    let ticks = parse_cpu_ticks(&stat).ok_or_else(|| bad_data("stat has no utime/stime"))?;
    let rss = parse_rss_bytes(&status).ok_or_else(|| bad_data("status has no VmRSS"))?;
    Ok((ticks as f64 / clock_ticks_per_second(), rss))
}

fn bad_data(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// `USER_HZ`: the unit of `/proc/<pid>/stat`'s and `/proc/stat`'s times
/// (100 on every Linux this runs on; asked anyway).
pub fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// `utime + stime` (fields 14 and 15). The command name (field 2) is in
/// parentheses and may hold spaces and parentheses, so fields are counted
/// from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so utime (14) is 11, stime 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:  1234 kB` in bytes. A zombie has no VmRSS line.
fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The part of a `query-blockstats` entry we read; the generated type of
/// the qapi crate requires fields that QEMU versions add and drop, and a
/// reply that does not decode would lose the whole sample.
#[derive(Debug, Deserialize)]
pub(super) struct BlockStats {
    stats: BlockDeviceStats,
}

#[derive(Debug, Deserialize)]
struct BlockDeviceStats {
    #[serde(default)]
    rd_bytes: u64,
    #[serde(default)]
    wr_bytes: u64,
}

/// Read and written bytes summed over the guest's drives (each top-level
/// entry is one drive as the guest sees it; its backing files are not
/// counted again).
pub(super) fn sum_blockstats(stats: &[BlockStats]) -> (u64, u64) {
    stats.iter().fold((0, 0), |(r, w), s| {
        (
            r.saturating_add(s.stats.rd_bytes),
            w.saturating_add(s.stats.wr_bytes),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 75 0 0 20 0 5 0 99 1 1 \n";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (qemu) S 1"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tqemu\nVmPeak:\t 9 kB\nVmRSS:\t  123456 kB\nThreads:\t5\n";
        assert_eq!(parse_rss_bytes(status), Some(123_456 * 1024));
        assert_eq!(parse_rss_bytes("Name:\tzombie\nState:\tZ (zombie)\n"), None);
    }

    #[test]
    fn our_own_process_has_cpu_time_and_memory() {
        // Burn a little CPU so the count cannot be zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let (cpu, rss) = process_usage(Path::new("/proc/self")).unwrap();
        assert!(cpu > 0.0, "{cpu}");
        assert!(rss > 1024 * 1024, "{rss}");
    }

    #[test]
    fn blockstats_sum_the_drives_and_tolerate_missing_fields() {
        let reply = serde_json::json!([
            {"device": "", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
             "stats": {"rd_bytes": 1000, "wr_bytes": 24, "rd_operations": 3},
             "backing": {"stats": {"rd_bytes": 999999, "wr_bytes": 0}}},
            {"device": "cd", "stats": {"rd_bytes": 10}},
        ]);
        let stats: Vec<BlockStats> = serde_json::from_value(reply).unwrap();
        assert_eq!(sum_blockstats(&stats), (1010, 24));
    }
}
