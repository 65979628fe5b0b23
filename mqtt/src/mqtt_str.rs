//! `MqttStr`: an MQTT UTF-8 string backed by `Bytes`.

use std::fmt;

use bytes::Bytes;

use crate::Error;

/// An MQTT "UTF-8 encoded string": valid UTF-8, no U+0000, at most 65,535
/// bytes.
///
/// Decoded strings are slices of the received frame (no copy). The invariants
/// are checked once, when the value is built, so encoding never fails on it.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// The longest string a 2-byte length prefix can express.
    pub const MAX_LEN: usize = u16::MAX as usize;

    /// Wraps a string literal without copying.
    ///
    /// # Panics
    ///
    /// If `s` is longer than [`MqttStr::MAX_LEN`] or contains U+0000. In a
    /// `const` context that is a compile error.
    pub const fn from_static(s: &'static str) -> Self {
        let bytes = s.as_bytes();
        assert!(
            bytes.len() <= Self::MAX_LEN,
            "MQTT string longer than 65535 bytes"
        );
        let mut i = 0;
        while i < bytes.len() {
            assert!(bytes[i] != 0, "MQTT string contains U+0000");
            i += 1;
        }
        MqttStr(Bytes::from_static(bytes))
    }

    /// Validates `bytes` as an MQTT string without copying.
    ///
    /// `field` names the string in the error (for example `"client identifier"`).
    pub fn from_bytes(bytes: Bytes, field: &'static str) -> Result<Self, Error> {
        if bytes.len() > Self::MAX_LEN {
            return Err(Error::StringTooLong(bytes.len()));
        }
        if std::str::from_utf8(&bytes).is_err() {
            return Err(Error::InvalidUtf8 { field });
        }
        // UTF-8 encodes U+0000 only as the byte 0 (overlong forms are invalid).
        if bytes.contains(&0) {
            return Err(Error::NullCharacter { field });
        }
        Ok(MqttStr(bytes))
    }

    /// The string.
    ///
    /// Checks UTF-8 again (cheap for the short strings MQTT carries) because
    /// the crate forbids `unsafe`; the check cannot fail.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The raw UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying `Bytes`, e.g. to forward a topic without copying.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<String> for MqttStr {
    type Error = Error;

    /// Takes ownership of the string's buffer (no copy).
    fn try_from(s: String) -> Result<Self, Error> {
        MqttStr::from_bytes(Bytes::from(s), "string")
    }
}

impl TryFrom<&str> for MqttStr {
    type Error = Error;

    /// Copies the string.
    fn try_from(s: &str) -> Result<Self, Error> {
        MqttStr::from_bytes(Bytes::copy_from_slice(s.as_bytes()), "string")
    }
}

impl TryFrom<Bytes> for MqttStr {
    type Error = Error;

    fn try_from(bytes: Bytes) -> Result<Self, Error> {
        MqttStr::from_bytes(bytes, "string")
    }
}

impl From<MqttStr> for Bytes {
    fn from(s: MqttStr) -> Bytes {
        s.0
    }
}

impl PartialEq<str> for MqttStr {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for MqttStr {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_utf8() {
        let s = MqttStr::try_from("température/°C").unwrap();
        assert_eq!(s.as_str(), "température/°C");
        assert_eq!(s, "température/°C");
        assert_eq!(format!("{s:?}"), "\"température/°C\"");
    }

    #[test]
    fn rejects_invalid_utf8_null_and_long() {
        assert_eq!(
            MqttStr::from_bytes(Bytes::from_static(b"a\xffb"), "client identifier"),
            Err(Error::InvalidUtf8 {
                field: "client identifier"
            })
        );
        assert_eq!(
            MqttStr::try_from("a\0b"),
            Err(Error::NullCharacter { field: "string" })
        );
        assert_eq!(
            MqttStr::try_from("x".repeat(65_536)),
            Err(Error::StringTooLong(65_536))
        );
        assert!(MqttStr::try_from("x".repeat(65_535)).is_ok());
    }

    #[test]
    fn from_static_is_const() {
        const TOPIC: MqttStr = MqttStr::from_static("a/b");
        assert_eq!(TOPIC.len(), 3);
    }

    #[test]
    #[should_panic(expected = "U+0000")]
    fn from_static_rejects_null() {
        let _ = MqttStr::from_static("a\0");
    }
}
