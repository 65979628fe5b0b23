//! Helpers shared by the loadtests integration tests.
#![allow(dead_code)]

use std::path::Path;

use loadtests::servers::{MOSQUITTO_BIN, MosquittoProcess};

/// A private Mosquitto, or `None` (with a note) where Debian's package is
/// not installed.
pub async fn mosquitto() -> Option<MosquittoProcess> {
    if !MosquittoProcess::available(Path::new(MOSQUITTO_BIN)) {
        eprintln!("SKIPPED: {MOSQUITTO_BIN} is not installed (apt-get install mosquitto)");
        return None;
    }
    loadtests::sim::raise_fd_limit();
    Some(
        MosquittoProcess::start(Path::new(MOSQUITTO_BIN))
            .await
            .expect("start a private mosquitto"),
    )
}

/// The iot-sim binary built for these tests.
pub fn iot_sim() -> &'static str {
    env!("CARGO_BIN_EXE_iot-sim")
}

/// The iot-bench binary built for these tests.
pub fn iot_bench() -> &'static str {
    env!("CARGO_BIN_EXE_iot-bench")
}

/// The directory holding `iot-ingest`, `iot-projector` and `iot-api` for
/// the scenario smoke tests.
///
/// Cargo builds only this package's binaries for its tests, so the service
/// binaries come from the same target directory, built by `cargo build
/// --bins -p ingest -p projector -p api` (run here: a no-op when they are
/// fresh, as after `cargo test --workspace`; the build lock is free while
/// tests run). `IOT_BIN_DIR` points the tests at other builds instead. If
/// the build fails (another crate of the workspace is mid-edit) and older
/// binaries exist, they are used with a warning.
pub fn service_bin_dir() -> std::path::PathBuf {
    use std::sync::OnceLock;
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("IOT_BIN_DIR") {
            return dir.into();
        }
        // target/<profile>/deps/<test> -> target/<profile>
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("loadtests sits in the workspace");
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--bins", "-p", "ingest", "-p", "projector", "-p", "api"])
            .current_dir(workspace);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build for the service binaries");
        let present = loadtests::stack::ServiceBins::in_dir(&profile_dir).is_some();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(15).collect();
            assert!(
                present,
                "cannot build the service binaries (cargo build --bins -p ingest -p projector -p api):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            eprintln!(
                "WARNING: cargo build --bins -p ingest -p projector -p api failed; the smoke tests use the binaries already in {}",
                profile_dir.display()
            );
        }
        assert!(present, "no service binaries in {}", profile_dir.display());
        profile_dir
    })
    .clone()
}
