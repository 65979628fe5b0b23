//! The loopback rule: load and fault tests target this machine only.
//!
//! Every target the tools are given (MQTT host:port, Redis URL) must resolve
//! to loopback addresses (127.0.0.0/8 or ::1); anything else is refused
//! before a single packet is sent.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};

/// Why a target was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not `host:port`, or the host does not resolve.
    #[error("cannot resolve target {target:?}: {reason} (expected host:port, e.g. 127.0.0.1:1883)")]
    Unresolvable {
        /// The target as given.
        target: String,
        /// The resolver's answer.
        reason: String,
    },
    /// Resolves to an address outside the loopback range.
    #[error(
        "target {target:?} resolves to {addr}, which is not a loopback address; load tests may only target 127.0.0.0/8 or ::1"
    )]
    NotLoopback {
        /// The target as given.
        target: String,
        /// The offending address.
        addr: IpAddr,
    },
    /// A Redis URL without a recognisable host.
    #[error("cannot read the host of Redis URL {0:?} (expected redis://127.0.0.1:6379/0)")]
    BadUrl(String),
}

/// Resolves `host:port` and checks that every address is loopback; returns
/// the first one.
pub fn resolve_loopback(target: &str) -> Result<SocketAddr, TargetError> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| TargetError::Unresolvable {
            target: target.to_owned(),
            reason: e.to_string(),
        })?
        .collect();
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(TargetError::NotLoopback {
            target: target.to_owned(),
            addr: bad.ip(),
        });
    }
    // Prefer IPv4: source addresses for spreading are 127.0.0.x.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| TargetError::Unresolvable {
            target: target.to_owned(),
            reason: "no address".to_owned(),
        })
}

/// Checks that a `redis://` (or `rediss://`) URL points at a loopback host.
pub fn check_redis_url(url: &str) -> Result<(), TargetError> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| TargetError::BadUrl(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    if host_port.is_empty() {
        return Err(TargetError::BadUrl(url.to_owned()));
    }
    let with_port = if host_port.starts_with('[') {
        if host_port.contains("]:") {
            host_port.to_owned()
        } else {
            format!("{host_port}:6379")
        }
    } else if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    };
    resolve_loopback(&with_port).map(|_| ())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_resolve() {
        assert_eq!(
            resolve_loopback("127.0.0.1:1883").expect("loopback").port(),
            1883
        );
        assert!(resolve_loopback("127.0.0.9:1").is_ok());
        assert!(resolve_loopback("[::1]:1883").is_ok());
        assert!(resolve_loopback("localhost:1883").is_ok());
    }

    #[test]
    fn other_addresses_are_refused() {
        assert!(matches!(
            resolve_loopback("10.0.0.1:1883"),
            Err(TargetError::NotLoopback { .. })
        ));
        assert!(matches!(
            resolve_loopback("192.168.1.1:1883"),
            Err(TargetError::NotLoopback { .. })
        ));
        assert!(matches!(
            resolve_loopback("no-port"),
            Err(TargetError::Unresolvable { .. })
        ));
    }

    #[test]
    fn redis_urls_are_checked() {
        assert!(check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_redis_url("redis://:pw@localhost/0").is_ok());
        assert!(check_redis_url("redis://127.0.0.1").is_ok());
        assert!(check_redis_url("redis://10.1.2.3:6379").is_err());
        assert!(check_redis_url("127.0.0.1:6379").is_err());
    }
}
