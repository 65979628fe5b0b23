//! Durations in config files: `5s`, `500ms`, `5m`, `1h30m`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

/// Parses a duration written with units, such as `5s`, `500ms`, `5m`, `1h30m`.
/// A bare number is refused: `30` could mean seconds or milliseconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; write a number with a unit, like 5s, 500ms or 5m".into());
    }
    if t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "duration {t:?} has no unit; write it like {t}s, {t}ms or {t}m"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {t:?} ({e}); write a number with a unit, like 5s, 500ms or 5m")
    })
}

/// Formats a duration the way [`parse`] reads it (`5m`, `1h 30m`, `500ms`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// serde `with` module for `std::time::Duration` fields.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// serde `with` module for `std::time::Duration` fields.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => parse(&s).map_err(D::Error::custom),
        Raw::Number(n) => Err(D::Error::custom(format!(
            "duration {n} has no unit; write it like \"{n}s\", \"{n}ms\" or \"{n}m\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse(" 2h ").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn refuses_bare_numbers_and_garbage() {
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("").is_err());
        assert!(parse("5 parsecs").unwrap_err().contains("invalid duration"));
        assert!(parse("-5s").is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(500),
            Duration::from_secs(300),
            Duration::from_secs(5400),
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}
