//! The binaries' command lines: help, JSON reports, clear errors.

mod common;

use std::process::Command;

#[test]
fn help_documents_every_option_and_subcommand() {
    let out = Command::new(common::iot_sim())
        .arg("--help")
        .output()
        .expect("run iot-sim");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--target",
        "--devices",
        "--connect-rate",
        "--keepalive",
        "--ping-interval",
        "--uplink-rate",
        "--payload-size",
        "--qos",
        "--subscribe",
        "--never-ack-fraction",
        "--late-ack-fraction",
        "--late-ack-delay",
        "--flap-fraction",
        "--takeover-fraction",
        "--duration",
        "--source-addrs",
        "--workers",
        "--report",
    ] {
        assert!(help.contains(option), "iot-sim --help lacks {option}");
    }
    let out = Command::new(common::iot_bench())
        .arg("--help")
        .output()
        .expect("run iot-bench");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "seed-heartbeat",
        "count-scan",
        "mosquitto-idle",
        "connect-storm",
        "steady-state",
        "presence",
        "api-reads",
        "downlinks",
        "failover",
        "ingest-idle",
    ] {
        assert!(help.contains(sub), "iot-bench --help lacks {sub}");
    }
}

#[tokio::test]
async fn iot_sim_prints_a_summary_and_writes_a_json_report() {
    let Some(broker) = common::mosquitto().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("report.json");
    let out = tokio::process::Command::new(common::iot_sim())
        .args(["--target", &broker.addr(), "-n", "20", "--duration", "1s"])
        .args(["--ping-interval", "100ms", "--workers", "2", "--quiet"])
        .arg("--report")
        .arg(&path)
        .output()
        .await
        .expect("run iot-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("connected once: 20/20"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report")).expect("json");
    assert_eq!(report["counts"]["initial_connected"], 20);
    assert_eq!(report["workers"], 2);
    assert!(report["latency"]["ping"]["count"].as_u64().expect("count") > 0);
    assert!(report["latency"]["ping"]["p99_ms"].as_f64().expect("p99") > 0.0);
    assert_eq!(report["config"]["duration"], "1s");
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    let out = Command::new(common::iot_sim())
        .args(["--target", "192.0.2.1:1883", "-n", "1", "--duration", "1s"])
        .output()
        .expect("run iot-sim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");

    let out = Command::new(common::iot_sim())
        .args(["--flap-fraction", "2"])
        .output()
        .expect("run iot-sim");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fraction"));

    let out = Command::new(common::iot_bench())
        .args(["seed-heartbeat", "--redis-url", "redis://10.1.1.1:6379/0"])
        .output()
        .expect("run iot-bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));

    // A scenario without the service binaries says where to get them.
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(common::iot_bench())
        .args(["connect-storm", "-n", "1", "--bin-dir"])
        .arg(dir.path())
        .output()
        .expect("run iot-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--bin-dir") && err.contains("cargo build"),
        "{err}"
    );
}
