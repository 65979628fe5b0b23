//! Device authentication at CONNECT.
//!
//! Mode `open` (development) accepts every device whose client id is a valid
//! phyID, whatever its credentials. Mode `registry` (username = phyID,
//! password = the device secret, checked against PostgreSQL and cached)
//! needs the device registry of the PostgreSQL issue; until that code
//! exists, an ingest configured for it refuses to start with a clear message
//! rather than let every device in.

use std::future::Future;
use std::pin::Pin;

use iot_core::config::{AuthMode, MqttConfig};

use crate::protocol::Hello;

/// The outcome of a credential check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The device may connect.
    Allow,
    /// The device may not connect (CONNACK 5, not authorized); the reason
    /// is logged, never sent to the device.
    Deny(String),
}

/// Checks a device's credentials.
pub trait Authenticator: Send + Sync + 'static {
    /// Decides whether the device of `hello` may connect.
    fn authenticate<'a>(
        &'a self,
        hello: &'a Hello,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>>;

    /// The mode's name, for the start-up log.
    fn name(&self) -> &'static str;
}

/// Mode `open`: every valid phyID may connect.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Authenticator for Open {
    fn authenticate<'a>(
        &'a self,
        _hello: &'a Hello,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(std::future::ready(Decision::Allow))
    }

    fn name(&self) -> &'static str {
        "open"
    }
}

/// Why the configured authentication cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// `mqtt.auth: registry` without the registry code.
    #[error(
        "mqtt.auth is \"registry\", which checks device credentials against the PostgreSQL device registry; this iot-ingest does not include the registry yet (it comes with the PostgreSQL registry issue). Set mqtt.auth: open (IOT_MQTT_AUTH=open) for development"
    )]
    RegistryUnavailable,
}

/// The authenticator for `mqtt.auth`.
pub fn from_config(cfg: &MqttConfig) -> Result<Box<dyn Authenticator>, AuthConfigError> {
    match cfg.auth {
        AuthMode::Open => Ok(Box::new(Open)),
        AuthMode::Registry => Err(AuthConfigError::RegistryUnavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn open_allows_any_valid_device() {
        let hello = Hello {
            phy: iot_core::PhyId::new("d").expect("valid"),
            keepalive_secs: 0,
            keepalive: Duration::from_secs(1),
            username: Some("someone".into()),
            password: Some(bytes::Bytes::from_static(b"anything")),
        };
        let auth = from_config(&MqttConfig::default()).expect("open is the default");
        assert_eq!(auth.name(), "open");
        assert_eq!(auth.authenticate(&hello).await, Decision::Allow);
    }

    #[test]
    fn registry_mode_refuses_to_start_with_a_clear_message() {
        let cfg = MqttConfig {
            auth: AuthMode::Registry,
            ..MqttConfig::default()
        };
        let err = from_config(&cfg).err().expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("mqtt.auth") && msg.contains("IOT_MQTT_AUTH=open"),
            "{msg}"
        );
    }
}
