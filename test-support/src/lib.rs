//! iot-test-support (in progress)
