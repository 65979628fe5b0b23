//! The opaque paging cursors.
//!
//! Every cursor is base64url (no padding) of a versioned text such as
//! `v1.{shard}.{phyID}`; clients pass `next_cursor` back unchanged. A cursor
//! that does not decode is a 400 `invalid_cursor`.
//!
//! - [`Cursor`]: `GET /api/devices/online`, below.
//! - [`RegistryCursor`]: `GET /api/devices`, after a phyID.
//! - [`event_cursor`]: `GET /api/devices/{phyID}/events`, a position in the
//!   archive (time, stream, entry id, position inside the entry).
//! - [`SessionCursor`]: `GET /api/devices/{phyID}/sessions`, below an epoch.
//! - [`TimeCursor`]: the command lists, a creation time and a command id.
//!
//! # The online list
//!
//! The online index is one sorted set per shard, ordered by phyID. A page
//! walks the shards in order and each shard by phyID, so a position is a
//! shard and the last phyID returned from it (or none: the shard's start).
//! On the wire it is opaque: base64url of `v1.{shard}.{phyID}`. A set that
//! does not change while a client pages is listed exactly once, with no
//! duplicates; a device that changes state meanwhile may or may not appear.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iot_core::PhyId;
use iot_store::archive::EventCursor;
use uuid::Uuid;

use crate::error::ApiError;

/// Longest cursor accepted, in characters.
const MAX_CURSOR_LEN: usize = 600;

fn invalid(s: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_cursor",
        format!(
            "cursor {s:.80} is not valid ({why}); pass next_cursor of the previous page unchanged, or omit it for the first page"
        ),
    )
}

/// `base64url("{tag}.{part}.{part}...")`.
fn encode_parts(tag: &str, parts: &[&str]) -> String {
    let mut text = tag.to_owned();
    for p in parts {
        text.push('.');
        text.push_str(p);
    }
    URL_SAFE_NO_PAD.encode(text)
}

/// The `n` parts of a cursor made by [`encode_parts`] with `tag`; the last
/// part may hold dots.
fn decode_parts(s: &str, tag: &str, n: usize) -> Result<Vec<String>, ApiError> {
    if s.len() > MAX_CURSOR_LEN {
        return Err(invalid(s, "too long"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| invalid(s, "not base64url"))?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(s, "not text"))?;
    let rest = text
        .strip_prefix(tag)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| invalid(s, "not a cursor of this route"))?;
    let parts: Vec<String> = rest.splitn(n, '.').map(str::to_owned).collect();
    if parts.len() != n {
        return Err(invalid(s, "too few parts"));
    }
    Ok(parts)
}

/// `GET /api/devices`: the next page starts after this phyID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCursor {
    /// The last phyID shown.
    pub after: PhyId,
}

impl RegistryCursor {
    const TAG: &'static str = "d1";

    /// The opaque form.
    pub fn encode(&self) -> String {
        encode_parts(Self::TAG, &[self.after.as_str()])
    }

    /// Reads a client's cursor.
    pub fn decode(s: &str) -> Result<Self, ApiError> {
        let parts = decode_parts(s, Self::TAG, 1)?;
        let after = PhyId::new(parts[0].as_str()).map_err(|_| invalid(s, "bad phyID"))?;
        Ok(Self { after })
    }
}

/// The opaque form of an archive position (`GET /api/devices/{phyID}/events`).
pub fn event_cursor(c: &EventCursor) -> String {
    encode_parts(
        "e1",
        &[
            &c.ts_us.to_string(),
            &c.seq.to_string(),
            &c.entry_id,
            &c.stream,
        ],
    )
}

/// Reads a client's [`event_cursor`].
pub fn decode_event_cursor(s: &str) -> Result<EventCursor, ApiError> {
    let p = decode_parts(s, "e1", 4)?;
    let entry_ok = p[2]
        .split_once('-')
        .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
    if !entry_ok || p[3].is_empty() {
        return Err(invalid(s, "bad entry"));
    }
    Ok(EventCursor {
        ts_us: p[0].parse().map_err(|_| invalid(s, "bad time"))?,
        seq: p[1].parse().map_err(|_| invalid(s, "bad position"))?,
        entry_id: p[2].clone(),
        stream: p[3].clone(),
    })
}

/// `GET /api/devices/{phyID}/sessions`: the next page holds epochs below this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCursor {
    /// The last epoch shown.
    pub before_epoch: i64,
}

impl SessionCursor {
    const TAG: &'static str = "s1";

    /// The opaque form.
    pub fn encode(&self) -> String {
        encode_parts(Self::TAG, &[&self.before_epoch.to_string()])
    }

    /// Reads a client's cursor.
    pub fn decode(s: &str) -> Result<Self, ApiError> {
        let parts = decode_parts(s, Self::TAG, 1)?;
        Ok(Self {
            before_epoch: parts[0].parse().map_err(|_| invalid(s, "bad epoch"))?,
        })
    }
}

/// The command lists (newest first): the last command shown, by creation
/// time (in the source's unit: ms in Redis, µs in PostgreSQL) and id. The
/// tag keeps the two lists' cursors apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeCursor {
    /// Its creation time.
    pub at: i64,
    /// Its id.
    pub id: Uuid,
}

impl TimeCursor {
    /// The opaque form, for the list `tag`.
    pub fn encode(&self, tag: &str) -> String {
        encode_parts(tag, &[&self.at.to_string(), &self.id.to_string()])
    }

    /// Reads a client's cursor of the list `tag`.
    pub fn decode(s: &str, tag: &str) -> Result<Self, ApiError> {
        let parts = decode_parts(s, tag, 2)?;
        Ok(Self {
            at: parts[0].parse().map_err(|_| invalid(s, "bad time"))?,
            id: Uuid::parse_str(&parts[1]).map_err(|_| invalid(s, "bad id"))?,
        })
    }
}

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The shard to read next.
    pub shard: u16,
    /// Start after this phyID; `None`: from the shard's first member.
    pub after: Option<PhyId>,
}

impl Cursor {
    /// The first page.
    pub fn start() -> Self {
        Self {
            shard: 0,
            after: None,
        }
    }

    /// The opaque form.
    pub fn encode(&self) -> String {
        let after = self.after.as_ref().map_or("", PhyId::as_str);
        URL_SAFE_NO_PAD.encode(format!("v1.{}.{after}", self.shard))
    }

    /// Reads a cursor given by a client, for a deployment with `shards`
    /// shards.
    pub fn decode(s: &str, shards: u16) -> Result<Self, ApiError> {
        let bad = |why: &str| invalid(s, why);
        if s.len() > 200 {
            return Err(bad("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad("not base64url"))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not text"))?;
        let rest = text
            .strip_prefix("v1.")
            .ok_or_else(|| bad("unknown version"))?;
        let (shard, after) = rest.split_once('.').ok_or_else(|| bad("no shard"))?;
        let shard: u16 = shard.parse().map_err(|_| bad("bad shard"))?;
        if shard >= shards {
            return Err(bad("shard out of range; did streams.shards change?"));
        }
        let after = if after.is_empty() {
            None
        } else {
            Some(PhyId::new(after).map_err(|_| bad("bad phyID"))?)
        };
        Ok(Self { shard, after })
    }

    /// The ZRANGE BYLEX lower bound: exclusive after the last phyID.
    pub fn lex_min(&self) -> String {
        self.after
            .as_ref()
            .map_or_else(|| "-".to_owned(), |p| format!("({p}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips() {
        for c in [
            Cursor::start(),
            Cursor {
                shard: 15,
                after: Some(PhyId::new("dev-9.x_y").unwrap()),
            },
        ] {
            assert_eq!(Cursor::decode(&c.encode(), 16).unwrap(), c);
        }
        assert_eq!(Cursor::start().lex_min(), "-");
        let c = Cursor {
            shard: 1,
            after: Some(PhyId::new("a").unwrap()),
        };
        assert_eq!(c.lex_min(), "(a");
    }

    #[test]
    fn junk_is_invalid_cursor() {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for bad in [
            "".to_owned(),
            "!!!".to_owned(),
            "x".repeat(500),
            enc("v2.1.a"),
            enc("v1.a.b"),
            enc("v1.16.a"),
            enc("v1.1.a b"),
            enc("v1.1"),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            let e = Cursor::decode(&bad, 16).unwrap_err();
            assert_eq!(e.code(), "invalid_cursor", "{bad}");
            assert!(e.to_string().len() < 400);
        }
    }

    #[test]
    fn other_cursors_round_trip() {
        let r = RegistryCursor {
            after: PhyId::new("dev.1").unwrap(),
        };
        assert_eq!(RegistryCursor::decode(&r.encode()).unwrap(), r);
        let e = EventCursor {
            ts_us: 1_714_564_800_123_000,
            stream: "t1:stream:events:{3}.x".into(),
            entry_id: "1714564800123-7".into(),
            seq: 4,
        };
        assert_eq!(decode_event_cursor(&event_cursor(&e)).unwrap(), e);
        let s = SessionCursor { before_epoch: 42 };
        assert_eq!(SessionCursor::decode(&s.encode()).unwrap(), s);
        let t = TimeCursor {
            at: 5,
            id: Uuid::from_u128(9),
        };
        assert_eq!(TimeCursor::decode(&t.encode("c1"), "c1").unwrap(), t);
    }

    #[test]
    fn cursors_of_other_routes_and_junk_are_refused() {
        let t = TimeCursor {
            at: 5,
            id: Uuid::from_u128(9),
        }
        .encode("c1");
        assert_eq!(
            TimeCursor::decode(&t, "l1").unwrap_err().code(),
            "invalid_cursor"
        );
        assert!(SessionCursor::decode(&t).is_err());
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for bad in [
            enc("e1.1.2.3"),
            enc("e1.x.0.1-0.s"),
            enc("e1.1.0.nope.s"),
            enc("s1.x"),
            enc("d1.a b"),
            enc("c1.1"),
            "x".repeat(700),
        ] {
            let failed = decode_event_cursor(&bad).is_err()
                && SessionCursor::decode(&bad).is_err()
                && RegistryCursor::decode(&bad).is_err()
                && TimeCursor::decode(&bad, "c1").is_err();
            assert!(failed, "{bad}");
        }
    }
}
