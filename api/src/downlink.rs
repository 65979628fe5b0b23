//! Downlink commands in Redis beyond what `iot-downlink` offers the api: a
//! device's command index with creation times (so its pages are exact), and
//! waiting for a command's fate. Thin I/O; the rules are in `iot-downlink`.

use std::time::Duration;

use iot_core::PhyId;
use iot_downlink::Command;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// How often `wait` looks at the record.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The topic a command travels on: `devices/{phyID}/down/{name}`.
pub fn topic(phy: &PhyId, name: &str) -> String {
    format!("devices/{phy}/down/{name}")
}

/// The largest payload a QoS 1 PUBLISH of `name` to `phy` can carry when a
/// packet's remaining length is at most `max_packet_size` (the topic with
/// its 2-byte length, and the 2-byte packet id, come first).
pub fn max_payload(max_packet_size: usize, phy: &PhyId, name: &str) -> usize {
    max_packet_size.saturating_sub(2 + topic(phy, name).len() + 2)
}

/// Up to `n` of `phy`'s commands created at or before `at_most_ms`, newest
/// first, as (creation ms, id).
pub async fn device_index(
    state: &AppState,
    phy: &PhyId,
    at_most_ms: i64,
    n: usize,
) -> Result<Vec<(i64, Uuid)>, ApiError> {
    let max = if at_most_ms == i64::MAX {
        "+inf".to_owned()
    } else {
        at_most_ms.to_string()
    };
    let rows: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(state.commands.keys().device_commands(phy))
        .arg(max)
        .arg("-inf")
        .arg("BYSCORE")
        .arg("REV")
        .arg("LIMIT")
        .arg(0)
        .arg(n)
        .arg("WITHSCORES")
        .query_async(&mut state.redis.get())
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, score)| Some((score as i64, Uuid::parse_str(&id).ok()?)))
        .collect())
}

/// Polls `cmd`'s record every [`POLL_INTERVAL`] until it reaches a terminal
/// state or `wait` passes; returns the newest state seen. A Redis error
/// ends the wait early (the command exists; its caller learns its id and
/// can look again).
pub async fn wait_for_fate(state: &AppState, mut cmd: Command, wait: Duration) -> Command {
    let deadline = tokio::time::Instant::now() + wait;
    while !cmd.status.is_terminal() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        let read = state
            .redis(async { Ok(state.commands.get(&cmd.id).await?) })
            .await;
        match read {
            Ok(Some(c)) => cmd = c,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(id = %cmd.id, error = %e, "cannot read the command while waiting; answering with its last known state");
                break;
            }
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_room_leaves_space_for_topic_and_packet_id() {
        let p = PhyId::new("dev-1").expect("phy");
        assert_eq!(topic(&p, "reboot"), "devices/dev-1/down/reboot");
        // 2 + 25 + 2 bytes of variable header.
        assert_eq!(max_payload(1000, &p, "reboot"), 971);
        assert_eq!(max_payload(10, &p, "reboot"), 0);
    }
}
