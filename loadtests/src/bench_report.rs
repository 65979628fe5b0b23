//! The envelope every benchmark report shares: which benchmark, when, on
//! what machine, with which command; and writing reports as JSON.
//!
//! BENCHMARKS.md quotes these fields, so every figure there can be traced
//! to a command, a date and a CPU.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The machine a benchmark ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Cores available to this process.
    pub cores: usize,
    /// Total memory in MiB (/proc/meminfo).
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Hard open-file limit per process.
    pub open_files_hard_limit: u64,
    /// 1, 5 and 15 minute load averages when the report was made: other
    /// work on the machine shows here (a quiet 2-core machine is below 1).
    pub load_average: Vec<f64>,
}

impl Machine {
    /// Reads this machine's description (fields it cannot read stay empty).
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            open_files_hard_limit: rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(_, hard)| hard)
                .unwrap_or(0),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect(),
        }
    }

    /// `Intel(R) Xeon(R) Processor, 2 cores, 24105 MiB, Linux 6.1, ...`.
    pub fn line(&self) -> String {
        format!(
            "{}, {} cores, {} MiB, Linux {}, open files {}, load {:?}",
            self.cpu_model,
            self.cores,
            self.memory_mib,
            self.kernel,
            self.open_files_hard_limit,
            self.load_average
        )
    }
}

/// A benchmark's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport<T> {
    /// Benchmark name (the `iot-bench` subcommand).
    pub bench: String,
    /// When it ran, RFC 3339 UTC.
    pub date: String,
    /// Where it ran.
    pub machine: Machine,
    /// The command line that produced it.
    pub command: String,
    /// The figures.
    pub results: T,
}

impl<T> BenchReport<T> {
    /// Wraps `results` of `bench`, stamped now, with this process's command
    /// line.
    pub fn new(bench: &str, results: T) -> Self {
        Self {
            bench: bench.to_owned(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: Machine::this(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            results,
        }
    }
}

/// Writes `value` as pretty JSON to `path` (`-`: stdout).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    if path == Path::new("-") {
        println!("{json}");
        return Ok(());
    }
    std::fs::write(path, json + "\n")
        .with_context(|| format!("cannot write the report to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_this_machine() {
        let m = Machine::this();
        assert!(m.cores >= 1);
        assert!(m.memory_mib > 0);
        assert!(!m.kernel.is_empty());
        assert_eq!(m.load_average.len(), 3);
        assert!(m.line().contains("cores"));
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("r.json");
        let r = BenchReport::new("demo", vec![1, 2, 3]);
        write_json(&path, &r).expect("write");
        let back: BenchReport<Vec<u32>> =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back, r);
        assert!(write_json(Path::new("/nonexistent/dir/r.json"), &r).is_err());
    }
}
