//! Reading what the projector maintains: device views, the online and known
//! indexes, and the lag record. Thin I/O; every decision is in the caller.
//!
//! Each function makes as few round trips as it can: a device answer is one
//! pipeline (view, seen score and lag); a page of the online list is at most
//! three (the counts with the cursor's shard, later shards, the listed
//! devices' fields and seen scores).

use std::collections::HashMap;

use iot_core::keys::shard_of;
use iot_core::registry::Lag;
use iot_core::view::field;
use iot_core::{PhyId, SessionView};
use redis::{FromRedisValue, Value};

use crate::cursor::Cursor;
use crate::error::ApiError;
use crate::state::AppState;

/// What the projector wrote beside the merge fields of a view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projected {
    /// `online`: `Some(true)` for `1`, `Some(false)` for `0`, `None` when absent.
    pub online: Option<bool>,
    /// `reason`, a policy reason name.
    pub reason: Option<String>,
    /// `since`: ms of the last online change.
    pub since: Option<i64>,
    /// `rev`: revision of the projected state.
    pub rev: Option<u64>,
}

/// A device's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The merged session view.
    pub view: SessionView,
    /// The projection's fields.
    pub projected: Projected,
}

fn conv<T: FromRedisValue>(v: Value, what: &str) -> Result<T, ApiError> {
    T::from_redis_value(v)
        .map_err(|e| ApiError::Internal(format!("unexpected Redis reply for {what}: {e}")))
}

fn nonempty(f: &HashMap<String, String>, k: &str) -> Option<String> {
    f.get(k).filter(|v| !v.is_empty()).cloned()
}

impl Projected {
    fn from_fields(f: &HashMap<String, String>) -> Self {
        Self {
            online: nonempty(f, field::ONLINE).and_then(|v| match v.as_str() {
                "1" => Some(true),
                "0" => Some(false),
                _ => None,
            }),
            reason: nonempty(f, field::REASON),
            since: nonempty(f, field::SINCE).and_then(|v| v.parse().ok()),
            rev: nonempty(f, field::REV).and_then(|v| v.parse().ok()),
        }
    }
}

/// The view of `phy` (`None`: no view) and the lag record, in one round
/// trip. `last_seen` is the larger of the view's field and the device's
/// score in its shard's seen set (where the projector keeps the heartbeats
/// of online devices).
pub async fn device(state: &AppState, phy: &PhyId) -> Result<(Option<Device>, Lag), ApiError> {
    let mut conn = state.redis.get();
    let (fields, seen, lag): (
        HashMap<String, String>,
        Option<f64>,
        HashMap<String, String>,
    ) = redis::pipe()
        .hgetall(state.keys.device(phy))
        .zscore(
            state.keys.seen(shard_of(phy.as_str(), state.shards)),
            phy.as_str(),
        )
        .hgetall(state.keys.projector_lag())
        .query_async(&mut conn)
        .await?;
    let lag = Lag::from_fields(&lag);
    if fields.is_empty() {
        return Ok((None, lag));
    }
    let mut view = SessionView::from_fields(&fields)
        .map_err(|e| ApiError::Internal(format!("the stored view of {phy} is corrupt: {e}")))?;
    view.fold_seen(seen.filter(|t| t.is_finite()).map(|t| t as i64));
    Ok((
        Some(Device {
            view,
            projected: Projected::from_fields(&fields),
        }),
        lag,
    ))
}

/// One device of a page of the online list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    /// The device.
    pub phy_id: PhyId,
    /// Instance holding its connection.
    pub server_id: Option<String>,
    /// Its connection.
    pub conn_id: Option<String>,
    /// Online since, ms.
    pub since: Option<i64>,
    /// Newest sign of life, ms.
    pub last_seen: Option<i64>,
    /// Reason of the projected state.
    pub reason: Option<String>,
}

/// A page of the online list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlinePage {
    /// Online devices over all shards (sum of ZCARD).
    pub count: u64,
    /// The page.
    pub devices: Vec<OnlineEntry>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<Cursor>,
}

fn zrange(key: String, cursor: &Cursor, n: usize) -> redis::Cmd {
    let mut c = redis::cmd("ZRANGE");
    c.arg(key)
        .arg(cursor.lex_min())
        .arg("+")
        .arg("BYLEX")
        .arg("LIMIT")
        .arg(0)
        .arg(n);
    c
}

/// Moves up to `need` valid phyIDs of `members` into `out`. Returns whether
/// the shard has more than `need` (so the page ends inside it) and the last
/// phyID taken.
fn take(
    members: Vec<String>,
    need: usize,
    shard: u16,
    out: &mut Vec<PhyId>,
) -> (bool, Option<PhyId>) {
    let more = members.len() > need;
    let mut last = None;
    for m in members.into_iter().take(need) {
        match PhyId::new(m) {
            Ok(p) => {
                last = Some(p.clone());
                out.push(p);
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "online index holds an invalid phyID; skipped");
            }
        }
    }
    (more, last)
}

/// Up to `limit` online devices from `cursor` on, with the total count.
///
/// Round trip 1 reads every shard's count and the cursor's shard; the
/// counts then tell which later shards hold members, so round trip 2 reads
/// just enough of them to fill the page and to know whether more follow
/// (a last page is marked by `next == None` without an extra empty page).
pub async fn online_page(
    state: &AppState,
    cursor: Cursor,
    limit: usize,
) -> Result<OnlinePage, ApiError> {
    let mut conn = state.redis.get();
    let shards = state.shards;

    let mut pipe = redis::pipe();
    for s in 0..shards {
        pipe.zcard(state.keys.online(s));
    }
    pipe.add_command(zrange(state.keys.online(cursor.shard), &cursor, limit + 1));
    let mut replies: Vec<Value> = pipe.query_async(&mut conn).await?;
    let first = replies
        .pop()
        .ok_or_else(|| ApiError::Internal("empty pipeline reply".into()))?;
    let cards = replies
        .into_iter()
        .map(|v| conv::<u64>(v, "ZCARD"))
        .collect::<Result<Vec<u64>, _>>()?;
    let count = cards.iter().sum();
    let first: Vec<String> = conv(first, "ZRANGE")?;

    let mut phys: Vec<PhyId> = Vec::with_capacity(limit);
    let (more, last) = take(first, limit, cursor.shard, &mut phys);
    if more {
        let next = Some(Cursor {
            shard: cursor.shard,
            after: last.or(cursor.after),
        });
        return finish(state, &mut conn, count, phys, next).await;
    }

    // Later shards that hold members, in order.
    let later: Vec<u16> = (cursor.shard + 1..shards)
        .filter(|&s| cards.get(usize::from(s)).copied().unwrap_or(0) > 0)
        .collect();
    let at = |s: u16| Cursor {
        shard: s,
        after: None,
    };
    let remaining = limit - phys.len();
    // Enough shards to fill the page and see one more member.
    let mut planned = 0;
    let mut sum = 0u64;
    while planned < later.len() && sum <= remaining as u64 && remaining > 0 {
        sum += cards[usize::from(later[planned])];
        planned += 1;
    }
    let mut next = later.get(planned).copied().map(at);
    if planned > 0 {
        let mut pipe = redis::pipe();
        for &s in &later[..planned] {
            pipe.add_command(zrange(state.keys.online(s), &at(s), remaining + 1));
        }
        let ranges: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
        for (i, members) in ranges.into_iter().enumerate() {
            let s = later[i];
            let (more, last) = take(members, limit - phys.len(), s, &mut phys);
            if more {
                next = Some(Cursor {
                    shard: s,
                    after: last,
                });
                break;
            }
            if phys.len() == limit {
                next = later.get(i + 1).copied().map(at);
                break;
            }
        }
    }
    finish(state, &mut conn, count, phys, next).await
}

/// Reads the listed devices' fields (one round trip) and builds the page.
async fn finish(
    state: &AppState,
    conn: &mut redis::aio::ConnectionManager,
    count: u64,
    phys: Vec<PhyId>,
    next: Option<Cursor>,
) -> Result<OnlinePage, ApiError> {
    // Last round trip: the listed devices' fields.
    let wanted = [
        field::SERVER_ID,
        field::CONN_ID,
        field::SINCE,
        field::LAST_SEEN,
        field::REASON,
    ];
    let mut devices = Vec::with_capacity(phys.len());
    if !phys.is_empty() {
        let mut pipe = redis::pipe();
        for p in &phys {
            pipe.cmd("HMGET").arg(state.keys.device(p)).arg(&wanted[..]);
        }
        // The seen scores (one ZMSCORE per shard, in order of first use).
        let mut by_shard: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, p) in phys.iter().enumerate() {
            let shard = shard_of(p.as_str(), state.shards);
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, list)) => list.push(i),
                None => by_shard.push((shard, vec![i])),
            }
        }
        for (shard, list) in &by_shard {
            pipe.cmd("ZMSCORE")
                .arg(state.keys.seen(*shard))
                .arg(list.iter().map(|&i| phys[i].as_str()).collect::<Vec<_>>());
        }
        let mut replies: Vec<Value> = pipe.query_async(conn).await?;
        let seen_replies = replies.split_off(phys.len());
        let mut seen: Vec<Option<i64>> = vec![None; phys.len()];
        for ((_, list), reply) in by_shard.iter().zip(seen_replies) {
            let scores: Vec<Option<f64>> = conv(reply, "ZMSCORE")?;
            for (&i, score) in list.iter().zip(scores) {
                seen[i] = score.filter(|t| t.is_finite()).map(|t| t as i64);
            }
        }
        for ((phy_id, reply), seen) in phys.into_iter().zip(replies).zip(seen) {
            let row: Vec<Option<String>> = conv(reply, "HMGET")?;
            let get = |i: usize| row.get(i).cloned().flatten().filter(|v| !v.is_empty());
            let stored: Option<i64> = get(3).and_then(|v| v.parse().ok());
            devices.push(OnlineEntry {
                phy_id,
                server_id: get(0),
                conn_id: get(1),
                since: get(2).and_then(|v| v.parse().ok()),
                last_seen: stored.max(seen),
                reason: get(4),
            });
        }
    }
    Ok(OnlinePage {
        count,
        devices,
        next,
    })
}

/// The projectors' lag record (zeros when none was published).
pub async fn lag(state: &AppState) -> Result<Lag, ApiError> {
    let mut conn = state.redis.get();
    let f: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(state.keys.projector_lag())
        .query_async(&mut conn)
        .await?;
    Ok(Lag::from_fields(&f))
}

/// Sum of ZCARD over the shards of the online and the known index, in one
/// round trip: `(online, known)`.
pub async fn counts(state: &AppState) -> Result<(u64, u64), ApiError> {
    let mut conn = state.redis.get();
    let mut pipe = redis::pipe();
    for s in 0..state.shards {
        pipe.zcard(state.keys.online(s));
    }
    for s in 0..state.shards {
        pipe.zcard(state.keys.known(s));
    }
    let cards: Vec<u64> = pipe.query_async(&mut conn).await?;
    let (online, known) = cards.split_at(cards.len().min(usize::from(state.shards)));
    Ok((online.iter().sum(), known.iter().sum()))
}
