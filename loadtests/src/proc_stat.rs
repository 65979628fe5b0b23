//! What a process costs, read from `/proc`: resident memory and CPU time.
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
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(
            parse_status_kib("Name: x\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
    }
}
