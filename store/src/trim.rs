//! Trimming the archived streams, and noticing entries trimmed before the
//! archive read them.
//!
//! With the archive on, the archiver is the only trimmer of the streams it
//! archives: it trims each one below the oldest entry some consumer group on
//! it has not processed yet ([`safe_trim_point`]). The point is computed
//! from a snapshot of every group (`XINFO GROUPS`) and, for groups with
//! pending entries, their oldest pending entry (`XPENDING`); a group that
//! acknowledged everything between the two reads still counts with the
//! entry after its last delivered one, never not at all.
//!
//! A writer that still caps a stream with `MAXLEN` (a service started
//! without `database.url` beside an archiving projector) can remove entries
//! the archive has not read. [`unread_removed`] finds them: the stream's
//! first entry lies beyond the archive group's position, and the stream has
//! lost more entries than the group ever read. The archiver counts them in
//! `iot_archive_entries_lost_total` and reports the `archive_gaps` check
//! degraded. Writers avoid it: every service that caps looks for the
//! [archive marker](archive_is_on) at start and then every
//! `iot_service::startup::ARCHIVER_POLL` (`Context::start`), and once it
//! has seen it writes without `MAXLEN` for the rest of its life. Only what
//! a writer trims before it notices a new archiver can still be lost.

use std::time::Duration;

use iot_core::keys::{ARCHIVER_GROUP, Keys};
use redis::aio::ConnectionLike;
use redis::streams::StreamInfoGroupsReply;

/// How long the archive marker lives without an archiver refreshing it.
pub const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One consumer group's progress on a stream (`XINFO GROUPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupProgress {
    /// The group.
    pub name: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// The last entry delivered to it.
    pub last_delivered_id: String,
    /// Its logical read counter (entries up to the last delivered one,
    /// counted from the first entry ever added), when Redis knows it.
    pub entries_read: Option<u64>,
}

/// A stream's size and history (`XINFO STREAM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamProgress {
    /// Entries ever added.
    pub entries_added: u64,
    /// Entries it holds now.
    pub length: u64,
    /// Its oldest entry, if it holds any.
    pub first_entry_id: Option<String>,
}

impl StreamProgress {
    /// Entries that have left the stream (trimmed or deleted).
    pub fn removed(&self) -> u64 {
        self.entries_added.saturating_sub(self.length)
    }
}

/// The id just after `id` (`ms-seq` -> `ms-(seq+1)`).
pub fn next_id(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    Some(match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

/// A stream id as a comparable pair; `None` if it is not `ms-seq`.
pub fn id_key(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Every group on `key` (none if the stream does not exist).
pub async fn group_progress<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<Vec<GroupProgress>> {
    let reply: redis::RedisResult<StreamInfoGroupsReply> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(conn)
        .await;
    let groups = match reply {
        Ok(r) => r.groups,
        Err(e) if is_no_such_key(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(groups
        .into_iter()
        .map(|g| GroupProgress {
            name: g.name,
            pending: g.pending as u64,
            last_delivered_id: g.last_delivered_id,
            entries_read: g.entries_read.map(|n| n as u64),
        })
        .collect())
}

fn is_no_such_key(e: &redis::RedisError) -> bool {
    e.to_string().to_ascii_lowercase().contains("no such key")
}

/// `key`'s size and history; `None` if the stream does not exist.
pub async fn stream_progress<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<Option<StreamProgress>> {
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(conn)
        .await;
    let value = match reply {
        Ok(v) => v,
        Err(e) if is_no_such_key(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let pairs: Vec<(String, redis::Value)> = match value {
        redis::Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
            .collect(),
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => redis::from_redis_value::<String>(k.clone())
                    .ok()
                    .map(|k| (k, v.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let number = |name: &str| {
        get(name)
            .and_then(|v| redis::from_redis_value::<u64>(v).ok())
            .unwrap_or(0)
    };
    // `first-entry` is `[id, [field, value, ...]]`, or nil when empty.
    let first_entry_id = get("first-entry").and_then(|v| match v {
        redis::Value::Array(parts) => parts
            .into_iter()
            .next()
            .and_then(|id| redis::from_redis_value::<String>(id).ok()),
        _ => None,
    });
    Ok(Some(StreamProgress {
        entries_added: number("entries-added"),
        length: number("length"),
        first_entry_id,
    }))
}

/// The oldest entry of `key` that some group in `groups` (a snapshot) may
/// still have to process: its oldest pending entry, or the entry after its
/// last delivered one. `None`: nothing may be trimmed (no groups, or an id
/// that does not parse).
///
/// A group that had pending entries in the snapshot but has acknowledged
/// them all by the time `XPENDING` runs counts with the entry after its
/// last delivered one (it has processed everything up to there); skipping
/// it would let the other groups' progress trim entries it never read.
pub async fn safe_trim_point<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    groups: &[GroupProgress],
) -> redis::RedisResult<Option<String>> {
    let mut safe: Option<(String, (u64, u64))> = None;
    for g in groups {
        let oldest_pending = if g.pending > 0 {
            let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(key)
                .arg(&g.name)
                .arg("-")
                .arg("+")
                .arg(1)
                .query_async(conn)
                .await?;
            pending.into_iter().next().map(|p| p.0)
        } else {
            None
        };
        let candidate = match oldest_pending {
            Some(id) => Some(id),
            // No pending entries (or all acknowledged since the snapshot).
            None => next_id(&g.last_delivered_id),
        };
        let Some((candidate, order)) = candidate.and_then(|c| id_key(&c).map(|k| (c, k))) else {
            tracing::warn!(stream = key, group = %g.name, last_delivered = %g.last_delivered_id,
                "cannot tell how far a consumer group got; not trimming the stream");
            return Ok(None);
        };
        if safe.as_ref().is_none_or(|(_, s)| order < *s) {
            safe = Some((candidate, order));
        }
    }
    Ok(safe.map(|(id, _)| id))
}

/// Trims `key` below [`safe_trim_point`] of `groups` (`XTRIM MINID ~`:
/// whole radix tree nodes only, never past the point); returns how many
/// entries went.
pub async fn trim_below<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    groups: &[GroupProgress],
) -> redis::RedisResult<u64> {
    let Some(safe) = safe_trim_point(conn, key, groups).await? else {
        return Ok(0);
    };
    redis::cmd("XTRIM")
        .arg(key)
        .arg("MINID")
        .arg("~")
        .arg(&safe)
        .query_async(conn)
        .await
}

/// How many entries left `stream` before `group` read them: when the
/// stream's oldest entry lies beyond the group's last delivered one, every
/// removed entry the group's read counter does not cover. `Some(0)` when
/// the group's position is inside the stream; `None` when Redis does not
/// know the group's read counter (nothing can be told).
pub fn unread_removed(stream: &StreamProgress, group: &GroupProgress) -> Option<u64> {
    let delivered = id_key(&group.last_delivered_id)?;
    if let Some(first) = stream.first_entry_id.as_deref().and_then(id_key)
        && first <= delivered
    {
        return Some(0);
    }
    let read = match group.entries_read {
        Some(n) => n,
        // Never read anything: nothing of what left the stream was read.
        None if delivered == (0, 0) => 0,
        None => return None,
    };
    Some(stream.removed().saturating_sub(read))
}

/// The archive group's entry in `groups`.
pub fn archiver_group(groups: &[GroupProgress]) -> Option<&GroupProgress> {
    groups.iter().find(|g| g.name == ARCHIVER_GROUP)
}

/// Records that the archive is on ([`Keys::archive_marker`]), for
/// [`MARKER_TTL`].
pub async fn mark_archive_on<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &Keys,
) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(keys.archive_marker())
        .arg(ARCHIVER_GROUP)
        .arg("PX")
        .arg(MARKER_TTL.as_millis() as u64)
        .query_async(conn)
        .await
}

/// Whether an archiver has marked the archive on within [`MARKER_TTL`]:
/// a stream writer that finds it must not cap the archived streams with
/// `MAXLEN`, whatever its own `database.url` says.
pub async fn archive_is_on<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &Keys,
) -> redis::RedisResult<bool> {
    let v: Option<String> = redis::cmd("GET")
        .arg(keys.archive_marker())
        .query_async(conn)
        .await?;
    Ok(v.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(last: &str, read: Option<u64>) -> GroupProgress {
        GroupProgress {
            name: ARCHIVER_GROUP.into(),
            pending: 0,
            last_delivered_id: last.into(),
            entries_read: read,
        }
    }

    fn stream(added: u64, length: u64, first: Option<&str>) -> StreamProgress {
        StreamProgress {
            entries_added: added,
            length,
            first_entry_id: first.map(str::to_owned),
        }
    }

    #[test]
    fn next_id_steps_past_an_entry() {
        assert_eq!(next_id("5-0").as_deref(), Some("5-1"));
        assert_eq!(next_id("0-0").as_deref(), Some("0-1"));
        assert_eq!(next_id(&format!("7-{}", u64::MAX)).as_deref(), Some("8-0"));
        assert_eq!(next_id("garbage"), None);
        assert!(id_key("10-0") > id_key("9-5"));
        assert_eq!(id_key("10"), None);
    }

    #[test]
    fn unread_removed_counts_only_what_the_group_never_read() {
        // Trimmed by the archiver itself: the group read all 10 that left.
        assert_eq!(
            unread_removed(&stream(20, 10, Some("11-0")), &group("10-0", Some(10))),
            Some(0)
        );
        // Position inside the stream.
        assert_eq!(
            unread_removed(&stream(20, 15, Some("6-0")), &group("10-0", Some(10))),
            Some(0)
        );
        // A writer's MAXLEN removed entries 11..=14 before the group read them.
        assert_eq!(
            unread_removed(&stream(20, 6, Some("15-0")), &group("10-0", Some(10))),
            Some(4)
        );
        // Everything gone, the group read 3 of 8.
        assert_eq!(
            unread_removed(&stream(8, 0, None), &group("3-0", Some(3))),
            Some(5)
        );
        // A group that never read.
        assert_eq!(
            unread_removed(&stream(8, 2, Some("7-0")), &group("0-0", None)),
            Some(6)
        );
        // Unknown read counter past the start: cannot tell.
        assert_eq!(
            unread_removed(&stream(8, 2, Some("7-0")), &group("3-0", None)),
            None
        );
    }
}
