//! Where the service binaries under test are.
//!
//! The scenarios measure release builds of `iot-ingest`, `iot-projector`
//! and `iot-api` from any directory (`--bin-dir`, or `IOT_BIN_DIR`), so
//! that a stable build can be measured while the workspace changes. Without
//! either, they are looked for beside the running executable, and one level
//! up (test binaries live in `target/*/deps`).

use std::path::{Path, PathBuf};

use anyhow::bail;

/// The ingest binary's name.
pub const INGEST: &str = "iot-ingest";
/// The projector binary's name.
pub const PROJECTOR: &str = "iot-projector";
/// The api binary's name.
pub const API: &str = "iot-api";

/// The three service binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBins {
    /// `iot-ingest`.
    pub ingest: PathBuf,
    /// `iot-projector`.
    pub projector: PathBuf,
    /// `iot-api`.
    pub api: PathBuf,
}

impl ServiceBins {
    /// The binaries in `dir`, if all three are there.
    pub fn in_dir(dir: &Path) -> Option<ServiceBins> {
        let bins = ServiceBins {
            ingest: dir.join(INGEST),
            projector: dir.join(PROJECTOR),
            api: dir.join(API),
        };
        bins.all().iter().all(|p| p.is_file()).then_some(bins)
    }

    /// `dir` if given (all three must be there), else beside the running
    /// executable or one level up.
    pub fn locate(dir: Option<&Path>) -> anyhow::Result<ServiceBins> {
        if let Some(dir) = dir {
            return match Self::in_dir(dir) {
                Some(b) => Ok(b),
                None => bail!(
                    "{} does not hold {INGEST}, {PROJECTOR} and {API}; build them (cargo build --release --bins) and pass their directory with --bin-dir or IOT_BIN_DIR",
                    dir.display()
                ),
            };
        }
        let me = std::env::current_exe()?;
        let here = me.parent().unwrap_or(Path::new("."));
        for candidate in [here.to_path_buf(), here.join("..")] {
            if let Some(b) = Self::in_dir(&candidate) {
                return Ok(b);
            }
        }
        bail!(
            "cannot find {INGEST}, {PROJECTOR} and {API} beside {}; build them (cargo build --release --bins) and pass their directory with --bin-dir or IOT_BIN_DIR",
            me.display()
        )
    }

    /// The three paths.
    pub fn all(&self) -> [&Path; 3] {
        [&self.ingest, &self.projector, &self.api]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_must_hold_all_three() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(ServiceBins::in_dir(dir.path()), None);
        let err = ServiceBins::locate(Some(dir.path())).expect_err("empty dir");
        assert!(err.to_string().contains("--bin-dir"), "{err}");
        for name in [INGEST, PROJECTOR, API] {
            std::fs::write(dir.path().join(name), b"").expect("touch");
        }
        let bins = ServiceBins::locate(Some(dir.path())).expect("all three");
        assert_eq!(bins.api, dir.path().join(API));
    }
}
