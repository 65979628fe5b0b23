//! Load tests and benchmarks for the IoT session server.
//!
//! Two binaries:
//! - `iot-sim`, the device simulator: N devices over MQTT (the project's
//!   codec on raw sockets), spread over 127.0.0.x source addresses and
//!   worker processes, with flapping, takeovers and downlink acknowledgement
//!   behaviours, a JSON report with hdrhistogram percentiles, and the
//!   ground truth of what each device really did.
//! - `iot-bench`, the baselines and scenarios, each one bounded command.
//!   A scenario starts the system under test for itself (private Redis,
//!   ingest processes, projector, api from `--bin-dir`), drives it with the
//!   simulator and compares what the api says with the ground truth.
//!
//! # Layout
//!
//! - `sim/`: the simulator.
//!   - `config.rs`: [`sim::SimConfig`], every option (clap + serde).
//!   - `roles.rs`: which devices flap, take over or withhold acks (pure).
//!   - `device.rs`: one device's MQTT session on a raw socket.
//!   - `engine.rs`: spawns a process's devices at the connect rate.
//!   - `worker.rs`: worker processes and their JSON-lines protocol.
//!   - `stats.rs`: counters, histograms and [`sim::Progress`].
//!   - `report.rs`: [`sim::SimReport`], its merge and summary.
//!   - `truth.rs`: [`sim::GroundTruth`], what devices really did.
//!   - `mod.rs`: [`sim::start`] and [`sim::SimHandle`].
//! - `baseline/`: the comparisons, one per file (`seed_heartbeat.rs`,
//!   `count_scan.rs`, `idle_connections.rs`), the seed's session record
//!   (`seed_session.rs`), the Redis they use (`redis_target.rs`) and a
//!   minimal RESP client (`resp.rs`).
//! - `scenario/`: the scenarios, one per file (`connect_storm.rs`,
//!   `steady_state.rs`, `presence.rs`, `api_reads.rs`, `downlinks.rs`,
//!   `failover.rs`, `ingest_idle.rs`), the heartbeat-to-view probes
//!   (`probe.rs`), the HTTP load generator (`load_gen.rs`) and what they
//!   share (`mod.rs`).
//! - `stack/`: the system under test: [`stack::Stack`] (`mod.rs`: Redis,
//!   ingests, projector, api, and CPU/memory windows), one service process
//!   (`service.rs`), where the binaries are (`binaries.rs`), a minimal
//!   HTTP/1.1 client (`http.rs`) and the api's answers (`api.rs`).
//! - `servers/`: private redis-server and Mosquitto processes.
//! - `bench_cli.rs`: the `iot-bench` subcommands.
//! - `bench_report.rs`: the report envelope (machine, date, command).
//! - `histogram.rs`: latency histograms and percentile summaries.
//! - `proc_stat.rs`: a process's memory and CPU time from /proc.
//! - `loopback.rs`: the rule that only loopback targets are load-tested.
//! - `rng.rs`: a small deterministic random generator.

pub mod baseline;
pub mod bench_cli;
pub mod bench_report;
pub mod histogram;
pub mod loopback;
pub mod proc_stat;
pub mod rng;
pub mod scenario;
pub mod servers;
pub mod sim;
pub mod stack;
