//! Reading the ingest instances: the registry, the beats, liveness keys and
//! connection sets. Two round trips whatever the number of instances.

use std::collections::{BTreeMap, HashMap};

use iot_core::ServerId;
use iot_core::registry::InstanceInfo;

use crate::error::ApiError;
use crate::state::AppState;

/// One ingest instance as the API sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its id.
    pub server_id: ServerId,
    /// Its liveness key exists.
    pub alive: bool,
    /// Last beat, ms (from the beats set, else the registry entry).
    pub last_beat_ms: Option<i64>,
    /// Members of its connection set (SCARD).
    pub live_connections: u64,
    /// Its registry entry, if present and readable.
    pub info: Option<InstanceInfo>,
}

/// Every instance found in the registry or the beats set, ordered by id.
pub async fn list(state: &AppState) -> Result<Vec<Instance>, ApiError> {
    let mut conn = state.redis.get();
    let (beats, registry): (Vec<(String, f64)>, HashMap<String, String>) = redis::pipe()
        .cmd("ZRANGE")
        .arg(state.keys.server_beats())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .hgetall(state.keys.servers())
        .query_async(&mut conn)
        .await?;

    let mut found: BTreeMap<String, (Option<i64>, Option<InstanceInfo>)> = BTreeMap::new();
    for (id, score) in beats {
        found.entry(id).or_default().0 = Some(score as i64);
    }
    for (id, json) in registry {
        let info = match serde_json::from_str::<InstanceInfo>(&json) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(server_id = %id, error = %e, "unreadable registry entry");
                None
            }
        };
        found.entry(id).or_default().1 = info;
    }
    let mut ids = Vec::with_capacity(found.len());
    for (id, v) in found {
        match ServerId::new(id.as_str()) {
            Ok(sid) => ids.push((sid, v)),
            Err(e) => {
                tracing::warn!(server_id = %id, error = %e, "invalid server id in the registry; skipped")
            }
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }

    let mut pipe = redis::pipe();
    for (sid, _) in &ids {
        pipe.exists(state.keys.liveness(sid));
        pipe.scard(state.keys.server_conns(sid));
    }
    let replies: Vec<u64> = pipe.query_async(&mut conn).await?;
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(i, (server_id, (beat, info)))| Instance {
            alive: replies.get(2 * i).copied().unwrap_or(0) > 0,
            live_connections: replies.get(2 * i + 1).copied().unwrap_or(0),
            last_beat_ms: beat.or_else(|| info.as_ref().map(|i| i.last_beat_ms)),
            server_id,
            info,
        })
        .collect())
}
