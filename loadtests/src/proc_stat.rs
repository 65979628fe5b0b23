//! What a process costs, read from `/proc`: resident memory and CPU time;
//! and what the machine has left ([`SystemSnapshot`]).
//!
//! Used to measure a server under test from the outside (Mosquitto, an
//! ingest instance, redis-server) without its cooperation.

use std::time::Duration;

/// Why a process could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The `/proc` file could not be read (no such process?).
    #[error("cannot read {path}: {source} (is process {pid} running?)")]
    Read {
        /// The file.
        path: String,
        /// The process id.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file did not hold what Linux puts there.
    #[error("unexpected contents in {0}")]
    Parse(String),
}

fn read(pid: u32, file: &str) -> Result<String, ProcError> {
    let path = format!("/proc/{pid}/{file}");
    std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, pid, source })
}

/// Resident set size (`VmRSS`) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    parse_status_kib(&status, "VmRSS:")
        .ok_or_else(|| ProcError::Parse(format!("/proc/{pid}/status (VmRSS)")))
}

/// Peak resident set size (`VmHWM`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    parse_status_kib(&status, "VmHWM:")
        .ok_or_else(|| ProcError::Parse(format!("/proc/{pid}/status (VmHWM)")))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User plus system CPU time `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration, ProcError> {
    let stat = read(pid, "stat")?;
    let ticks =
        parse_stat_ticks(&stat).ok_or_else(|| ProcError::Parse(format!("/proc/{pid}/stat")))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_s()))
}

/// utime + stime from a `/proc/<pid>/stat` line (fields 14 and 15; the
/// command name in parentheses may contain spaces).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so utime (14) is index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_s() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

/// CPU time of this process so far.
pub fn own_cpu_time() -> Result<Duration, ProcError> {
    cpu_time(std::process::id())
}

/// The machine's memory and sockets at one moment (`/proc/meminfo`,
/// `/proc/net/sockstat`, `/proc/sys/fs/file-nr`): what a million
/// connections cost the kernel.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SystemSnapshot {
    /// MemAvailable, KiB.
    pub mem_available_kib: u64,
    /// Slab (kernel objects: sockets, inodes, ...), KiB.
    pub slab_kib: u64,
    /// TCP sockets in use (both ends of every loopback connection).
    pub tcp_inuse: u64,
    /// Memory of TCP socket buffers, KiB (sockstat `mem`, pages).
    pub tcp_mem_kib: u64,
    /// Open files of the whole machine.
    pub open_files: u64,
}

impl SystemSnapshot {
    /// Reads it now (fields that cannot be read stay 0).
    pub fn now() -> SystemSnapshot {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
        let file_nr = std::fs::read_to_string("/proc/sys/fs/file-nr").unwrap_or_default();
        let page_kib = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4, |p| u64::try_from(p / 1024).unwrap_or(4));
        let tcp = sockstat
            .lines()
            .find_map(|l| l.strip_prefix("TCP:"))
            .unwrap_or_default();
        let field = |name: &str| -> u64 {
            let mut it = tcp.split_whitespace();
            while let Some(k) = it.next() {
                if k == name {
                    return it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
            0
        };
        SystemSnapshot {
            mem_available_kib: parse_status_kib(&meminfo, "MemAvailable:").unwrap_or(0),
            slab_kib: parse_status_kib(&meminfo, "Slab:").unwrap_or(0),
            tcp_inuse: field("inuse"),
            tcp_mem_kib: field("mem") * page_kib,
            open_files: file_nr
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("rss") > 100);
        assert!(peak_rss_kib(me).expect("hwm") >= rss_kib(me).expect("rss") / 2);
        // Burn a little CPU so the counter moves past zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(me).is_ok());
        assert!(matches!(rss_kib(u32::MAX), Err(ProcError::Read { .. })));
    }

    #[test]
    fn reads_the_machine() {
        let s = SystemSnapshot::now();
        assert!(s.mem_available_kib > 0 && s.slab_kib > 0, "{s:?}");
        assert!(s.open_files > 0, "{s:?}");
    }

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(
            parse_status_kib("Name: x\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
    }
}
