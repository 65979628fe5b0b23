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
