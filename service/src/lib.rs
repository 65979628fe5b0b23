//! iot-service (in progress)
