//! Identifiers: the device's phyID and the instance's server id.
//!
//! Both end up inside Redis key names between `{` and `}` (a Redis Cluster
//! hash tag), inside Pub/Sub channel names and in URLs, so both are limited to
//! `[A-Za-z0-9._-]`. That rules out braces, colons, wildcards, spaces and
//! non-ASCII, which would otherwise break key parsing or cluster slotting.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted phyID (MQTT ClientId), in bytes.
pub const PHY_ID_MAX_LEN: usize = 64;

/// Longest accepted server id, in bytes. Kubernetes pod names fit (max 63).
pub const SERVER_ID_MAX_LEN: usize = 128;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is the empty string.
    #[error("{what} is empty; it must be 1 to {max} characters of [A-Za-z0-9._-]")]
    Empty {
        /// Which identifier ("phyID", "server id").
        what: &'static str,
        /// The maximum length.
        max: usize,
    },
    /// The identifier is longer than allowed.
    #[error("{what} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Which identifier.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The maximum length.
        max: usize,
    },
    /// The identifier holds a character outside `[A-Za-z0-9._-]`.
    #[error("{what} holds {ch:?} at byte {at}; only [A-Za-z0-9._-] is allowed")]
    BadChar {
        /// Which identifier.
        what: &'static str,
        /// The first offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
    /// The identifier is one of [`RESERVED_PHY_IDS`].
    #[error(
        "{what} {id:?} is reserved: the REST API could not address it (`/api/devices/online` is the online list; `.` and `..` are path segments)"
    )]
    Reserved {
        /// Which identifier.
        what: &'static str,
        /// The identifier.
        id: &'static str,
    },
}

/// phyIDs no device may have: `online` (`GET /api/devices/online` is the
/// online list, so the device's own routes could never be reached), and `.`
/// and `..` (HTTP clients fold them out of URL paths).
pub const RESERVED_PHY_IDS: [&str; 3] = ["online", ".", ".."];

fn validate(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what, max });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if let Some((at, ch)) = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar { what, ch, at });
    }
    Ok(())
}

/// A validated device identifier (the MQTT ClientId).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhyId(String);

impl PhyId {
    /// Validates `s` as a phyID: 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        validate("phyID", &s, PHY_ID_MAX_LEN)?;
        if let Some(id) = RESERVED_PHY_IDS.iter().find(|r| **r == s) {
            return Err(IdError::Reserved { what: "phyID", id });
        }
        Ok(Self(s))
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PhyId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<PhyId> for String {
    fn from(p: PhyId) -> String {
        p.0
    }
}

impl fmt::Display for PhyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for PhyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated instance identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerId(String);

impl ServerId {
    /// Validates `s` as a server id: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        validate("server id", &s, SERVER_ID_MAX_LEN)?;
        Ok(Self(s))
    }

    /// The seed's rule: `SERVER_ID` (given here as `configured`, from the
    /// environment or the config file) if set and non-empty, otherwise
    /// `iot-server-{hostname}-{uuid}`.
    ///
    /// Characters of the hostname outside `[A-Za-z0-9._-]` become `-`, so a
    /// generated id is always valid.
    pub fn resolve(configured: Option<&str>, hostname: &str) -> Result<Self, IdError> {
        match configured.map(str::trim) {
            Some(s) if !s.is_empty() => Self::new(s),
            _ => Ok(Self::generate(hostname, uuid::Uuid::new_v4())),
        }
    }

    /// `iot-server-{hostname}-{uuid}` with the hostname sanitised and cut so
    /// the result stays within [`SERVER_ID_MAX_LEN`].
    pub fn generate(hostname: &str, id: uuid::Uuid) -> Self {
        let mut host: String = hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if host.is_empty() {
            host.push_str("unknown");
        }
        // "iot-server-" (11) + "-" (1) + uuid (36) = 48.
        host.truncate(SERVER_ID_MAX_LEN - 48);
        Self(format!("iot-server-{host}-{id}"))
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ServerId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<ServerId> for String {
    fn from(s: ServerId) -> String {
        s.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ServerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// This machine's hostname, or `unknown` when it cannot be read.
pub fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phy_id_accepts_the_allowed_alphabet() {
        for ok in ["a", "dev-001", "A.b_c-9", &"x".repeat(64)] {
            assert!(PhyId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn phy_id_rejects_bad_input_with_a_reason() {
        assert!(matches!(PhyId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            PhyId::new("x".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
        for (bad, ch) in [
            ("a{b", '{'),
            ("a}b", '}'),
            ("a:b", ':'),
            ("a*b", '*'),
            ("a b", ' '),
            ("aé", 'é'),
            ("a/b", '/'),
            ("a#", '#'),
            ("a+", '+'),
        ] {
            match PhyId::new(bad) {
                Err(IdError::BadChar { ch: got, .. }) => assert_eq!(got, ch, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let msg = PhyId::new("a:b").unwrap_err().to_string();
        assert!(msg.contains("phyID") && msg.contains("':'"), "{msg}");
        for reserved in ["online", ".", ".."] {
            assert!(
                matches!(PhyId::new(reserved), Err(IdError::Reserved { .. })),
                "{reserved}"
            );
        }
        // Only the exact names: these are ordinary devices.
        for ok in ["Online", "online-1", "...", ".a"] {
            assert!(PhyId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn phy_id_deserialisation_validates() {
        let ok: Result<PhyId, _> = serde_json::from_str("\"dev-1\"");
        assert!(ok.is_ok());
        let bad: Result<PhyId, _> = serde_json::from_str("\"dev 1\"");
        assert!(bad.is_err());
    }

    #[test]
    fn server_id_prefers_the_configured_value() {
        let id = ServerId::resolve(Some("pod-7"), "host").unwrap();
        assert_eq!(id.as_str(), "pod-7");
    }

    #[test]
    fn server_id_is_generated_from_hostname_and_uuid() {
        for configured in [None, Some(""), Some("   ")] {
            let id = ServerId::resolve(configured, "node-a").unwrap();
            let rest = id.as_str().strip_prefix("iot-server-node-a-").unwrap();
            assert!(uuid::Uuid::parse_str(rest).is_ok(), "{id}");
        }
    }

    #[test]
    fn generated_server_id_is_always_valid() {
        let u = uuid::Uuid::nil();
        let id = ServerId::generate("weird host:name{x}", u);
        assert!(ServerId::new(id.as_str()).is_ok(), "{id}");
        assert!(id.as_str().starts_with("iot-server-weird-host-name-x--"));
        let long = ServerId::generate(&"h".repeat(500), u);
        assert!(long.as_str().len() <= SERVER_ID_MAX_LEN);
        assert!(ServerId::new(long.as_str()).is_ok());
        let empty = ServerId::generate("", u);
        assert!(empty.as_str().starts_with("iot-server-unknown-"));
    }

    #[test]
    fn configured_server_id_must_be_valid() {
        assert!(ServerId::resolve(Some("bad id"), "h").is_err());
    }
}
