//! The `iot-ingest` binary keeps the start-up contract (see
//! [`iot_test_support::check_service_binary`]).

#[test]
fn binary_starts_serves_health_and_stops_on_sigterm() {
    iot_test_support::check_service_binary(env!("CARGO_BIN_EXE_iot-ingest"));
}
