//! Timestamps in the API: milliseconds inside, RFC 3339 (UTC, millisecond
//! precision) on the wire, and the `now` query parameter.

use chrono::{DateTime, SecondsFormat, Utc};

/// Latest instant the API accepts or prints: 9999-12-31T23:59:59.999Z.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// `ms` as RFC 3339 (`2024-05-01T12:00:00.000Z`); `None` outside years
/// 1970..=9999 (negative or absurd values never reach a client as junk).
pub fn rfc3339(ms: i64) -> Option<String> {
    if !(0..=MAX_MS).contains(&ms) {
        return None;
    }
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// [`rfc3339`] of an optional value.
pub fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.and_then(rfc3339)
}

/// Parses the `now` query parameter: integer milliseconds since the Unix
/// epoch, or RFC 3339. A `+` in a query string decodes to a space, so
/// `2024-05-01T12:00:00 02:00` is read as `+02:00`.
pub fn parse_now(s: &str) -> Result<i64, String> {
    parse_instant("now", s)
}

/// [`rfc3339`] of a stored time (PostgreSQL's `timestamptz`), at
/// millisecond precision.
pub fn rfc3339_dt(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses the instant query parameter `name` the way [`parse_now`] does,
/// naming `name` in errors.
pub fn parse_instant(name: &str, s: &str) -> Result<i64, String> {
    let t = s.trim();
    let ms = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<i64>()
            .map_err(|_| format!("{name}={t:.40} is too large; give milliseconds up to {MAX_MS}"))?
    } else {
        let parsed = DateTime::parse_from_rfc3339(t)
            .or_else(|e| DateTime::parse_from_rfc3339(&t.replace(' ', "+")).map_err(|_| e))
            .map_err(|e| {
                format!(
                    "{name}={t:.40} is neither milliseconds since the Unix epoch nor RFC 3339 ({e}); \
                     write it like 1714564800000 or 2024-05-01T12:00:00Z"
                )
            })?;
        parsed.timestamp_millis()
    };
    if !(0..=MAX_MS).contains(&ms) {
        return Err(format!(
            "{name}={t:.40} is outside 1970-01-01T00:00:00Z..9999-12-31T23:59:59.999Z"
        ));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_714_564_800_123).unwrap(),
            "2024-05-01T12:00:00.123Z"
        );
        assert_eq!(rfc3339(-1), None);
        assert_eq!(rfc3339(MAX_MS + 1), None);
        assert_eq!(rfc3339_opt(None), None);
    }

    #[test]
    fn parses_now_in_both_forms() {
        assert_eq!(parse_now("1714564800123").unwrap(), 1_714_564_800_123);
        assert_eq!(
            parse_now("2024-05-01T12:00:00.123Z").unwrap(),
            1_714_564_800_123
        );
        assert_eq!(
            parse_now("2024-05-01T14:00:00+02:00").unwrap(),
            1_714_564_800_000
        );
        // `+` decoded to a space by form decoding.
        assert_eq!(
            parse_now("2024-05-01T14:00:00 02:00").unwrap(),
            1_714_564_800_000
        );
    }

    #[test]
    fn rejects_bad_now_with_a_reason() {
        for bad in [
            "",
            "yesterday",
            "-5",
            "1e3",
            "99999999999999999999",
            "253402300800000",
        ] {
            let e = parse_now(bad).unwrap_err();
            assert!(e.contains("now="), "{bad}: {e}");
        }
        assert!(parse_now(&"9".repeat(5000)).unwrap_err().len() < 300);
    }
}
