//! The projector's Redis function library (Lua, `src/lua/`) and the Rust
//! side of its calls: argument lists and the records they return.
//!
//! - `device`: merges one event into a device's view, or evaluates the view
//!   at `now` (keys: the view only, so it stays in the device's hash slot).
//! - `index`: the shard-level projection (online index, bound epochs,
//!   revisions, lifecycle, due, known, seen), all keys in the shard's slot.
//! - `due`: leases the devices of a shard whose evaluation is due.
//! - `conns`: an instance's connection set under the epoch rule (keys: the
//!   set and its marks, all in the instance's slot), see [`ConnOp`].
//!
//! A function library (Redis 7 `FUNCTION LOAD`, called with `FCALL`) rather
//! than scripts: the library's code runs once at load, so a call pays only
//! for its own work (an `EVALSHA` of the same code spent about 5 µs per call
//! re-creating its helpers). The library and function names carry a hash of
//! the code, so projectors of different versions can share one Redis. When
//! Redis has lost the library (restart, `FUNCTION FLUSH`) it is loaded again.
//!
//! The merge and the policy in `lua/view.lua` are the Lua twins of
//! [`iot_core::SessionView::apply`] and [`iot_core::Policy::evaluate`]; the
//! crate's tests check them against each other.

use iot_core::{Event, EventKind, PhyId, ServerId};
use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, Script, ServerErrorKind, Value};

use uuid::Uuid;

use crate::settings::Settings;

const LUA_FILES: [&str; 5] = [
    include_str!("lua/view.lua"),
    include_str!("lua/device.lua"),
    include_str!("lua/index.lua"),
    include_str!("lua/due.lua"),
    include_str!("lua/conns.lua"),
];

/// One heartbeat, as the projector applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat<'a> {
    /// The device.
    pub phy: &'a PhyId,
    /// Its connection.
    pub conn: Uuid,
    /// The instance holding it.
    pub server: &'a ServerId,
    /// The connection's epoch.
    pub epoch: u64,
    /// When, ms.
    pub ts_ms: i64,
}

impl<'a> Beat<'a> {
    /// Merges `other` (a heartbeat of the same device) into this one, so
    /// that applying the result does to a view what applying both does: the
    /// newest time, and the binding of the higher epoch (one epoch is one
    /// connection on one instance).
    pub fn absorb(&mut self, other: Beat<'a>) {
        let ts = self.ts_ms.max(other.ts_ms);
        if other.epoch > self.epoch {
            *self = other;
        }
        self.ts_ms = ts;
    }
}

/// Number of values in one record returned by the device functions.
pub const RECORD_LEN: usize = 19;

/// Number of values in one index update.
const INDEX_RECORD_LEN: usize = 10;

/// The function library: its code and the prefix of its function names.
#[derive(Debug, Clone)]
pub struct Scripts {
    code: String,
    prefix: String,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a function's reply could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from the {script} function: {detail}")]
pub struct ReplyError {
    /// Which function.
    pub script: &'static str,
    /// What was wrong.
    pub detail: String,
}

impl From<ReplyError> for RedisError {
    fn from(e: ReplyError) -> Self {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected function reply",
            e.to_string(),
        ))
    }
}

/// The one-letter event kind code used by the scripts.
pub fn kind_code(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::Connected { .. } => "c",
        EventKind::Heartbeat => "h",
        EventKind::Uplink { .. } => "u",
        EventKind::TcpDown { .. } => "t",
        EventKind::Disconnected => "d",
        EventKind::Ack { .. } => "a",
        EventKind::AckTimeout { .. } => "x",
    }
}

impl Scripts {
    /// Builds the library.
    pub fn new() -> Self {
        let body = LUA_FILES.join("\n");
        // Script::new computes the SHA1 of the code: a stable version tag.
        let hash = Script::new(&body).get_hash()[..12].to_owned();
        let name = format!("iotproj_{hash}");
        Self {
            code: format!("#!lua name={name}\nlocal FN = '{name}_'\n{body}"),
            prefix: format!("{name}_"),
        }
    }

    /// The library's code, as loaded.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Loads the library into Redis (`FUNCTION LOAD REPLACE`).
    pub async fn load<C: ConnectionLike>(&self, conn: &mut C) -> RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.code)
            .query_async::<()>(conn)
            .await
    }

    /// Runs `pipe` (function calls); when Redis has lost the library, loads
    /// it and runs the pipeline once more. Every call is idempotent, so
    /// running one twice is harmless.
    pub async fn query<C: ConnectionLike>(
        &self,
        conn: &mut C,
        pipe: &Pipeline,
    ) -> RedisResult<Vec<Value>> {
        match pipe.query_async::<Vec<Value>>(conn).await {
            Err(e) if is_noscript(&e) => {
                self.load(conn).await?;
                pipe.query_async(conn).await
            }
            other => other,
        }
    }

    fn common(cmd: &mut Cmd, s: &Settings, now_ms: i64) {
        let p = &s.policy;
        cmd.arg(now_ms)
            .arg(if p.enabled { "1" } else { "0" })
            .arg(p.heartbeat_timeout_ms)
            .arg(p.tcp_down_window_ms)
            .arg(p.ack_window_ms)
            // Display of f64 is the shortest string that reads back as the
            // same double, which is what Lua's tonumber does.
            .arg(format!("{}", p.tcp_down_penalty))
            .arg(format!("{}", p.ack_timeout_penalty))
            .arg(format!("{}", p.threshold))
            .arg(s.ttl_ms)
            .arg(s.ttl_ms - s.ttl_ms / 10);
    }

    fn fcall(&self, function: &str, keys: &[String]) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(format!("{}{function}", self.prefix))
            .arg(keys.len())
            .arg(keys);
        cmd
    }

    /// Merges `ev` into its device's view and evaluates the policy at
    /// `now_ms`. `force`: return the full record even when an uplink or ACK
    /// changed nothing outside the view (redelivered entries). `seen`: the
    /// device's score in its shard's seen set, folded into `last_seen`.
    pub fn device_event(
        &self,
        s: &Settings,
        now_ms: i64,
        ev: &Event,
        force: bool,
        seen: Option<i64>,
    ) -> Cmd {
        let mut cmd = self.fcall("device", &[s.keys.device(&ev.phy_id)]);
        Self::common(&mut cmd, s, now_ms);
        let reason = match &ev.kind {
            EventKind::TcpDown { reason } => reason.as_str(),
            _ => "",
        };
        cmd.arg("ev")
            .arg(ev.phy_id.as_str())
            .arg(kind_code(&ev.kind))
            .arg(ev.epoch)
            .arg(ev.conn_id.to_string())
            .arg(ev.server_id.as_str())
            .arg(ev.ts_ms)
            .arg(reason)
            .arg(if force { "1" } else { "0" })
            .arg(opt_ms(seen));
        cmd
    }

    /// Merges a heartbeat that may change more than `last_seen` (its device
    /// was not online at an epoch at least the heartbeat's) into its view,
    /// creating the view if needed, binding it if the epoch is higher, and
    /// evaluates the policy at `now_ms`; `seen`: the device's score in the
    /// seen set. Always returns the full record.
    pub fn device_beat(&self, s: &Settings, now_ms: i64, beat: &Beat<'_>, seen: i64) -> Cmd {
        let mut cmd = self.fcall("device", &[s.keys.device(beat.phy)]);
        Self::common(&mut cmd, s, now_ms);
        cmd.arg("ev")
            .arg(beat.phy.as_str())
            .arg("h")
            .arg(beat.epoch)
            .arg(beat.conn.to_string())
            .arg(beat.server.as_str())
            .arg(beat.ts_ms)
            .arg("")
            .arg("1")
            .arg(seen);
        cmd
    }

    /// Evaluates a device's view at `now_ms` without an event, after
    /// folding its seen score into `last_seen`.
    pub fn device_eval(&self, s: &Settings, now_ms: i64, phy: &PhyId, seen: Option<i64>) -> Cmd {
        let mut cmd = self.fcall("device", &[s.keys.device(phy)]);
        Self::common(&mut cmd, s, now_ms);
        cmd.arg("eval").arg(phy.as_str()).arg(opt_ms(seen));
        cmd
    }

    /// The Lua policy alone (touches no key; `any_key` only routes the call).
    pub fn device_policy(
        &self,
        s: &Settings,
        any_key: &str,
        input: &iot_core::PolicyInput,
        now_ms: i64,
    ) -> Cmd {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut cmd = self.fcall("device", &[any_key.to_owned()]);
        Self::common(&mut cmd, s, now_ms);
        cmd.arg("policy")
            .arg(opt(input.last_seen))
            .arg(opt(input.last_tcp_down))
            .arg(input.last_tcp_down_reason.map(|r| r.as_str()).unwrap_or(""))
            .arg(opt(input.last_ack_timeout))
            .arg(if input.disconnected { "1" } else { "0" });
        cmd
    }

    /// Applies index updates to one shard; `now_ms`: when the records were
    /// evaluated.
    pub fn index(
        &self,
        s: &Settings,
        shard: u16,
        quiet: bool,
        now_ms: i64,
        updates: &[IndexUpdate],
    ) -> Cmd {
        let k = &s.keys;
        let keys = [
            k.online(shard),
            k.presence_rev(shard),
            k.lifecycle(shard),
            k.due(shard),
            k.known(shard),
            k.seen(shard),
            k.bound(shard),
        ];
        let mut cmd = self.fcall("index", &keys);
        // '' for no cap: the archiver trims.
        cmd.arg(s.maxlen.get().map(|m| m.to_string()).unwrap_or_default())
            .arg(if quiet { "1" } else { "0" })
            .arg(now_ms)
            .arg(s.policy.heartbeat_timeout_ms);
        for u in updates {
            u.write_args(&mut cmd);
        }
        cmd
    }

    /// Leases up to `limit` due devices of a shard until `lease_until_ms`.
    pub fn due_claim(
        &self,
        s: &Settings,
        shard: u16,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> Cmd {
        let mut cmd = self.fcall("due", &[s.keys.due(shard), s.keys.seen(shard)]);
        cmd.arg(now_ms).arg(lease_until_ms).arg(limit);
        cmd
    }
}

/// One statement about a connection's membership in its instance's set
/// (see `lua/conns.lua`): the newest epoch wins, and at one epoch `Down`
/// wins over `Live`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConnOp {
    /// The view binds the connection at this epoch and it has not ended.
    Live {
        /// The connection.
        conn: String,
        /// Its epoch.
        epoch: u64,
    },
    /// The connection ended at this epoch, or a newer one took the device.
    Down {
        /// The connection.
        conn: String,
        /// Its epoch.
        epoch: u64,
    },
}

impl Scripts {
    /// Applies membership statements to one instance's connection set.
    /// `generation`: the caller's clock in generations of the marks (see
    /// [`crate::projection::marks_generation`]); `marks_ttl_ms`: how long a
    /// generation's marks live after it is created (three generations).
    pub fn conns(
        &self,
        s: &Settings,
        server: &ServerId,
        generation: i64,
        marks_ttl_ms: i64,
        ops: &[ConnOp],
    ) -> Cmd {
        let k = &s.keys;
        let keys = [
            k.server_conns(server),
            k.server_marks(server, generation - 1),
            k.server_marks(server, generation),
            k.server_marks(server, generation + 1),
        ];
        let mut cmd = self.fcall("conns", &keys);
        cmd.arg(marks_ttl_ms);
        for op in ops {
            match op {
                ConnOp::Live { conn, epoch } => cmd.arg("l").arg(conn).arg(*epoch),
                ConnOp::Down { conn, epoch } => cmd.arg("d").arg(conn).arg(*epoch),
            };
        }
        cmd
    }
}

fn opt_ms(v: Option<i64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// Reads a seen score as Redis returns it (a double, written as an integer
/// for whole milliseconds).
pub fn parse_score(v: &str) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.parse::<i64>().ok().or_else(|| {
        v.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f as i64)
    })
}

/// Reads the (phyID, seen score) pairs of the `due` function; a device
/// without a score has `None`.
pub fn parse_seen(v: Value) -> RedisResult<Vec<(String, Option<i64>)>> {
    let flat: Vec<Option<String>> = redis::FromRedisValue::from_redis_value(v)?;
    if !flat.len().is_multiple_of(2) {
        return Err(ReplyError {
            script: "due",
            detail: format!("{} values, not pairs", flat.len()),
        }
        .into());
    }
    Ok(flat
        .chunks(2)
        .filter_map(|c| {
            let phy = c[0].clone()?;
            Some((phy, c[1].as_deref().and_then(parse_score)))
        })
        .collect())
}

/// Whether `e` says the library (or a script) is not loaded.
pub fn is_noscript(e: &RedisError) -> bool {
    let text = e.to_string();
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || text.contains("NOSCRIPT")
        || text.contains("Function not found")
}

/// What a device script says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The view does not exist (evaluation only).
    Gone {
        /// The device.
        phy: String,
    },
    /// Only the connection key's TTL needs a refresh.
    TouchConn {
        /// The device.
        phy: String,
        /// Its bound connection.
        conn: String,
        /// The view's new expiry, ms (the caller's clock).
        expires_ms: i64,
    },
    /// The view was merged or evaluated: the shard index must follow.
    Settled(Record),
}

/// The state of a view after a script ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The device.
    pub phy: String,
    /// Projected online state.
    pub online: bool,
    /// Its revision.
    pub rev: u64,
    /// Lifecycle reason if the state flipped to this one (`connected`,
    /// `recovered` or the policy reason).
    pub lifecycle_reason: String,
    /// The online state flipped in this call.
    pub changed: bool,
    /// The policy reason.
    pub reason: String,
    /// When the device must be evaluated again (next change or expiry), ms.
    pub due_ms: i64,
    /// Newest timestamp in the view, ms.
    pub known_ms: i64,
    /// Bound epoch (0: none).
    pub epoch: u64,
    /// Bound connection.
    pub conn: Option<String>,
    /// Its instance.
    pub server: Option<String>,
    /// The bound connection has not ended.
    pub live: bool,
    /// The binding this call replaced.
    pub superseded: Option<Box<Superseded>>,
    /// The view's expiry moved to this (ms, the caller's clock): give the
    /// bound connection's key the same.
    pub conn_expires_ms: Option<i64>,
    /// When the online state last changed, ms.
    pub since: i64,
    /// The call merged an event through the full path (or replayed a
    /// redelivered one): maintain the instances' connection sets.
    pub binding: bool,
}

/// A binding that a newer epoch replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    /// Its connection.
    pub conn: String,
    /// Its instance.
    pub server: String,
    /// Its epoch.
    pub epoch: u64,
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Outcome {
    /// Parses the flattened records of one script reply.
    pub fn parse_all(script: &'static str, value: Value) -> Result<Vec<Outcome>, ReplyError> {
        let bad = |detail: String| ReplyError { script, detail };
        let items: Vec<String> = redis::FromRedisValue::from_redis_value(value)
            .map_err(|e| bad(format!("not a list of strings: {e}")))?;
        let mut out = Vec::new();
        let mut i = 0;
        while i < items.len() {
            if items.get(i + 1).map(String::as_str) == Some("g") {
                out.push(Outcome::Gone {
                    phy: items[i].clone(),
                });
                i += 2;
                continue;
            }
            let rec = items
                .get(i..i + RECORD_LEN)
                .ok_or_else(|| bad(format!("record at {i} of {} is short", items.len())))?;
            out.push(Self::parse_record(rec).map_err(bad)?);
            i += RECORD_LEN;
        }
        Ok(out)
    }

    fn parse_record(r: &[String]) -> Result<Outcome, String> {
        let num = |i: usize| -> Result<i64, String> {
            r[i].parse()
                .map_err(|_| format!("field {} is {:?}, not a number", i + 1, r[i]))
        };
        match r[1].as_str() {
            "n" => Ok(Outcome::TouchConn {
                phy: r[0].clone(),
                conn: r[10].clone(),
                expires_ms: num(15)?,
            }),
            "i" => Ok(Outcome::Settled(Record {
                phy: r[0].clone(),
                online: r[2] == "1",
                rev: u64::try_from(num(3)?).map_err(|_| "negative rev".to_owned())?,
                lifecycle_reason: r[4].clone(),
                changed: r[5] == "1",
                reason: r[6].clone(),
                due_ms: num(7)?,
                known_ms: num(8)?,
                epoch: u64::try_from(num(9)?).map_err(|_| "negative epoch".to_owned())?,
                conn: nonempty(&r[10]),
                server: nonempty(&r[11]),
                live: r[12] == "1",
                superseded: match nonempty(&r[13]) {
                    Some(conn) => Some(Box::new(Superseded {
                        conn,
                        server: r[14].clone(),
                        epoch: u64::try_from(num(18)?)
                            .map_err(|_| "negative superseded epoch".to_owned())?,
                    })),
                    None => None,
                },
                conn_expires_ms: if r[15].is_empty() {
                    None
                } else {
                    Some(num(15)?)
                },
                since: num(16)?,
                binding: r[17] == "1",
            })),
            other => Err(format!("unknown record status {other:?}")),
        }
    }
}

/// One update of a shard's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexUpdate {
    /// The device's state at a revision.
    State {
        /// Its record.
        record: Record,
        /// Remove the due lease taken by the due loop.
        lease: bool,
    },
    /// The device's view expired (found missing when evaluated at `now_ms`).
    Gone {
        /// The device.
        phy: String,
        /// The evaluation time.
        now_ms: i64,
        /// Remove the due lease.
        lease: bool,
    },
}

impl IndexUpdate {
    /// The device.
    pub fn phy(&self) -> &str {
        match self {
            Self::State { record, .. } => &record.phy,
            Self::Gone { phy, .. } => phy,
        }
    }

    fn write_args(&self, cmd: &mut Cmd) {
        let start = cmd.args_iter().count();
        match self {
            Self::State { record: r, lease } => {
                cmd.arg("u")
                    .arg(&r.phy)
                    .arg(if r.online { "1" } else { "0" })
                    .arg(r.rev)
                    .arg(&r.lifecycle_reason)
                    .arg(r.since)
                    .arg(r.epoch)
                    .arg(r.due_ms)
                    .arg(r.known_ms)
                    .arg(if *lease { "1" } else { "0" });
            }
            Self::Gone { phy, now_ms, lease } => {
                cmd.arg("g")
                    .arg(phy)
                    .arg("0")
                    .arg(*now_ms)
                    .arg("")
                    .arg(*now_ms)
                    // The view is gone, so its epoch is unknown: 0.
                    .arg("0")
                    .arg("")
                    .arg("")
                    .arg(if *lease { "1" } else { "0" });
            }
        }
        debug_assert_eq!(cmd.args_iter().count() - start, INDEX_RECORD_LEN);
    }
}

/// One online/offline flip applied to an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    /// The device.
    pub phy: String,
    /// The new state.
    pub online: bool,
    /// The lifecycle reason.
    pub reason: String,
}

/// Parses the reply of the index script.
pub fn parse_flips(value: Value) -> Result<Vec<Flip>, ReplyError> {
    let items: Vec<String> =
        redis::FromRedisValue::from_redis_value(value).map_err(|e| ReplyError {
            script: "index",
            detail: format!("not a list of strings: {e}"),
        })?;
    Ok(items
        .chunks_exact(3)
        .map(|c| Flip {
            phy: c[0].clone(),
            online: c[1] == "1",
            reason: c[2].clone(),
        })
        .collect())
}
