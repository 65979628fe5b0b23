//! Command records in Redis: create, change state atomically, read, list,
//! the offline queue and the deadline set.
//!
//! A record is the hash `command:{id}` with its change log `command:{id}:log`
//! (same hash slot); state changes go through one Lua script that refuses to
//! leave a terminal state, refuses a verdict from a connection the command
//! is no longer dispatched to (stale), and checks guards such as "not
//! forwarded yet", so concurrent reporters (the owning ingest, an old owner,
//! the sweeper) cannot overwrite each other's verdict. Each change gets its
//! place in the log (`seq`, from 1) in the same script.
//!
//! Every change is also appended to `stream:commands`, which the archiver
//! writes to the PostgreSQL command log keyed by (command id, `seq`), so a
//! change appended twice is stored once and two changes in one millisecond
//! stay two. The append is a second step after the script, not part of it:
//! `stream:commands` is one stream for all commands, in a hash slot of its
//! own, while a command's keys are tagged with its id (see
//! [`iot_core::Keys`]); one script touching both would break on Redis
//! Cluster. The gap: a process that dies between the two steps leaves that
//! change in the record's log (and `GET /api/commands/{id}`) but not in the
//! PostgreSQL command log. The counts of open commands and the deadline
//! removal of a terminal change share that second step.
//!
//! Expiries that cover several commands (a device's offline queue and its
//! command history) only ever grow: a short-lived command never shortens
//! the life of a longer-lived one queued or listed before it.
//!
//! # Deadlines: nothing open is left unwatched
//!
//! The sweeper only finds commands through `commands:deadline`, a key of
//! its own (its hash slot differs from a command's and a queue's, so no
//! script can write a deadline together with them on Redis Cluster).
//! Instead, every step writes the deadline *before* the step that needs it,
//! so that a process that dies (or a future that is dropped) between two
//! steps leaves a deadline behind, never a command without one:
//!
//! - a new dispatched or queued command gets its deadline before its record
//!   is written (the sweeper waits [`CREATE_GRACE`] for the record of a
//!   deadline without one, then forgets the deadline);
//! - a command gets its deadline ([`Settings::check_at`]) before its id is
//!   put into a device's queue (enqueue, park, requeue), and the sweeper
//!   then checks that it is there;
//! - a drain pushes the deadline of the ids it is about to take to
//!   [`Settings::check_at`] before it takes them out of the queue
//!   ([`CommandStore::take_queued`]); a connection that holds them for long
//!   (the inflight limit) pushes it again while it lives. If the drain's
//!   instance dies before the commands are `sent`, the sweeper finds them
//!   `queued` but in no queue, and puts them back (see
//!   [`crate::sweeper`]).
//!
//! The sweeper itself only moves a deadline it has leased if nobody else
//! has set one since ([`CommandStore::reschedule`]): a drain's deadline is
//! never overwritten by a sweeper that looked at the command a moment
//! before the drain took it.

use std::collections::HashMap;
use std::time::Duration;

use iot_core::config::{Config, DownlinkConfig, StreamCap, StreamsConfig};
use iot_core::{Keys, PhyId};
use iot_service::RedisPool;
use redis::Script;
use uuid::Uuid;

use crate::command::{Change, Command, Status, field};

/// Downlink settings (from the `downlink` config section).
#[derive(Debug, Clone)]
pub struct Settings {
    /// PUBACK deadline (a retransmission at half of it).
    pub ack_timeout: Duration,
    /// Offline queue cap per device.
    pub queue_max: u32,
    /// Default time-to-live.
    pub default_ttl: Duration,
    /// Record retention after the ttl.
    pub retention: Duration,
    /// Unacknowledged commands per device.
    pub max_inflight: u32,
    /// `MAXLEN ~` of `stream:commands`, read at each write; none when the
    /// archive is on or an archiver has been seen (the archiver trims the
    /// stream below what it has stored).
    pub stream_maxlen: StreamCap,
}

impl From<&DownlinkConfig> for Settings {
    /// The `downlink` section alone: `stream:commands` capped at the
    /// default `streams.maxlen` (use [`Settings::from_config`] in services).
    fn from(c: &DownlinkConfig) -> Self {
        Self {
            ack_timeout: c.ack_timeout,
            queue_max: c.queue_max,
            default_ttl: c.queue_ttl,
            retention: c.retention,
            max_inflight: c.max_inflight,
            stream_maxlen: StreamCap::fixed(Some(StreamsConfig::default().maxlen)),
        }
    }
}

impl Settings {
    /// The `downlink` section, with `stream:commands` trimmed as the event
    /// streams are: by `streams.maxlen` without the archive until an
    /// archiver is seen, by the archiver with it.
    pub fn from_config(config: &Config) -> Self {
        Self {
            stream_maxlen: config.stream_cap(),
            ..Self::from(&config.downlink)
        }
    }

    /// How long after its last change a dispatched or sent command may go
    /// unresolved before the sweeper looks for its owner: two ACK timeouts
    /// (send + retransmission) plus a margin for the Pub/Sub hop.
    pub fn stuck_after(&self) -> Duration {
        self.ack_timeout * 2 + Duration::from_secs(2)
    }

    /// When the sweeper checks on a command that is about to enter a
    /// device's queue, or to leave it for delivery: [`stuck_after`]
    /// from `now` (it should be in the queue, or `sent`, by then), or its
    /// expiry if that comes first.
    ///
    /// [`stuck_after`]: Self::stuck_after
    pub fn check_at(&self, expires_at_ms: i64, now: i64) -> i64 {
        expires_at_ms.min(now.saturating_add(ms(self.stuck_after())))
    }
}

/// How long the sweeper keeps a deadline whose command record does not
/// exist (yet): its submit writes the deadline first and the record a
/// moment later. Past this age (from the id, a UUID v7) the deadline is
/// forgotten: the submit stopped before it wrote the record, or the record
/// expired.
pub const CREATE_GRACE: Duration = Duration::from_secs(60);

/// Commands in each non-terminal state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpenCounts {
    /// Waiting in the offline queues of devices (the sum of their depths).
    pub queued: u64,
    /// Published to an owner instance, not yet sent to the device.
    pub dispatched: u64,
    /// Sent to the device, waiting for its PUBACK.
    pub sent: u64,
}

/// A state change to apply.
#[derive(Debug, Clone)]
pub struct Transition {
    /// New status.
    pub to: Status,
    /// Allowed current statuses; empty: any non-terminal one.
    pub from: Vec<Status>,
    /// Reason (failure reason or note).
    pub reason: Option<String>,
    /// Detail for the log (instance and epoch, ...).
    pub detail: Option<String>,
    /// The connection deciding (instance, epoch): while the command is
    /// dispatched or sent, it must be dispatched to that instance with
    /// that epoch or an older one of the device, else the change is
    /// refused as stale.
    pub by: Option<(String, u64)>,
    /// Fields that must have these values (`""`: missing) for the change.
    pub guards: Vec<(&'static str, String)>,
    /// Extra fields to set.
    pub set: Vec<(&'static str, String)>,
}

/// Why a transition was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such record (expired, or never created).
    Unknown,
    /// Its fate is decided already.
    Terminal,
    /// Not in one of the allowed statuses.
    NotAllowed,
    /// From a connection the command is no longer dispatched to.
    Stale,
    /// A guard did not hold (it was forwarded already, moved on, ...).
    Guard,
}

impl Refusal {
    /// snake_case name (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Terminal => "terminal",
            Self::NotAllowed => "not_allowed",
            Self::Stale => "stale",
            Self::Guard => "guard",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "unknown" => Self::Unknown,
            "terminal" => Self::Terminal,
            "stale" => Self::Stale,
            "guard" => Self::Guard,
            _ => Self::NotAllowed,
        }
    }
}

/// What became of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Made: the status before, and the change's place in the log.
    Applied {
        /// The status before the change.
        prev: Status,
        /// The change's place in the command's log, from 1.
        seq: u64,
    },
    /// Not made, and why.
    Refused(Refusal),
}

impl Outcome {
    /// The status before, if the change was made.
    pub fn applied(self) -> Option<Status> {
        match self {
            Self::Applied { prev, .. } => Some(prev),
            Self::Refused(_) => None,
        }
    }
}

impl Transition {
    /// To `to` from any non-terminal status.
    pub fn to(to: Status) -> Self {
        Self {
            to,
            from: Vec::new(),
            reason: None,
            detail: None,
            by: None,
            guards: Vec::new(),
            set: Vec::new(),
        }
    }

    /// Decided by the connection of `server` with `epoch` (see
    /// [`Transition::by`]).
    pub fn by(mut self, server: impl Into<String>, epoch: u64) -> Self {
        self.by = Some((server.into(), epoch));
        self
    }

    /// Only while `field` has `value` (`""`: while it is missing).
    pub fn guard(mut self, field: &'static str, value: impl ToString) -> Self {
        self.guards.push((field, value.to_string()));
        self
    }

    /// Only from these statuses.
    pub fn from(mut self, from: &[Status]) -> Self {
        self.from = from.to_vec();
        self
    }

    /// With a reason.
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }

    /// With a detail.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    /// Setting a field too.
    pub fn set(mut self, field: &'static str, value: impl ToString) -> Self {
        self.set.push((field, value.to_string()));
        self
    }
}

/// Command records, queues and deadlines in Redis.
#[derive(Clone)]
pub struct CommandStore {
    redis: RedisPool,
    keys: Keys,
    settings: Settings,
    transition: Script,
    lease: Script,
    enqueue: Script,
    requeue: Script,
    take: Script,
    restore: Script,
    reschedule: Script,
}

impl std::fmt::Debug for CommandStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandStore")
            .field("keys", &self.keys)
            .field("settings", &self.settings)
            .finish()
    }
}

/// A command to create.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// The device.
    pub phy_id: PhyId,
    /// Topic level after `devices/{phyID}/down/` (validated).
    pub name: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Time-to-live; `None`: `downlink.queue_ttl`.
    pub ttl: Option<Duration>,
    /// Wait in the offline queue if the device is not connected.
    pub queue_if_offline: bool,
}

/// A record's fields as HGETALL returns them (binary-safe).
type Fields = HashMap<String, Vec<u8>>;

fn ms(d: Duration) -> i64 {
    iot_core::config::millis(d)
}

impl CommandStore {
    /// A store over `redis` with `keys` and `settings`.
    pub fn new(redis: RedisPool, keys: Keys, settings: Settings) -> Self {
        Self {
            redis,
            keys,
            settings,
            transition: Script::new(include_str!("lua/transition.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            enqueue: Script::new(include_str!("lua/enqueue.lua")),
            requeue: Script::new(include_str!("lua/requeue.lua")),
            take: Script::new(include_str!("lua/take.lua")),
            restore: Script::new(include_str!("lua/restore.lua")),
            reschedule: Script::new(include_str!("lua/reschedule.lua")),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The key schema.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The Redis pool.
    pub fn redis(&self) -> &RedisPool {
        &self.redis
    }

    fn record_ttl_ms(&self, expires_at_ms: i64, now: i64) -> i64 {
        (expires_at_ms - now).max(0) + ms(self.settings.retention)
    }

    /// When a command created at `now` expires.
    pub fn expires_at(&self, new: &NewCommand, now: i64) -> i64 {
        now.saturating_add(ms(new.ttl.unwrap_or(self.settings.default_ttl)))
    }

    /// Writes a new record with its first status and returns it.
    ///
    /// Two steps: the record with its log (atomic), then the device's
    /// history, `stream:commands` and the open counts. An error in the
    /// second step is logged, not returned: the record exists, and its
    /// caller must learn its id (see the module doc for that gap).
    pub async fn create(
        &self,
        id: Uuid,
        new: &NewCommand,
        status: Status,
        reason: Option<&str>,
        placement: Option<(&str, u64)>,
        now: i64,
    ) -> redis::RedisResult<Command> {
        let expires_at_ms = self.expires_at(new, now);
        let record = self.keys.command(&id);
        let log = self.keys.command_log(&id);
        let keep = self.record_ttl_ms(expires_at_ms, now);
        let detail = placement
            .map(|(s, e)| format!("{s} epoch {e}"))
            .unwrap_or_default();
        let change = Change {
            seq: 1,
            status,
            at_ms: now,
            reason: reason.unwrap_or_default().to_owned(),
            detail: detail.clone(),
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut hset = redis::cmd("HSET");
        hset.arg(&record)
            .arg(field::ID)
            .arg(id.to_string())
            .arg(field::PHY_ID)
            .arg(new.phy_id.as_str())
            .arg(field::NAME)
            .arg(&new.name)
            .arg(field::PAYLOAD)
            .arg(&new.payload)
            .arg(field::STATUS)
            .arg(status.as_str())
            .arg(field::REASON)
            .arg(reason.unwrap_or_default())
            .arg(field::CREATED_AT)
            .arg(now)
            .arg(field::UPDATED_AT)
            .arg(now)
            .arg(field::EXPIRES_AT)
            .arg(expires_at_ms)
            .arg(field::QUEUE_IF_OFFLINE)
            .arg(if new.queue_if_offline { "1" } else { "0" })
            .arg(field::HOPS)
            .arg(0)
            .arg(field::ATTEMPTS)
            .arg(0);
        if let Some((server, epoch)) = placement {
            hset.arg(field::SERVER_ID)
                .arg(server)
                .arg(field::EPOCH)
                .arg(epoch);
        }
        pipe.add_command(hset).ignore();
        pipe.cmd("RPUSH")
            .arg(&log)
            .arg(serde_json::to_string(&change).unwrap_or_default())
            .ignore();
        pipe.cmd("PEXPIRE").arg(&record).arg(keep).ignore();
        pipe.cmd("PEXPIRE").arg(&log).arg(keep).ignore();
        pipe.query_async::<()>(&mut self.redis.get()).await?;

        // History per device (newest last), and the archive's change stream.
        let mut pipe = redis::pipe();
        let history = self.keys.device_commands(&new.phy_id);
        pipe.cmd("ZADD")
            .arg(&history)
            .arg(now)
            .arg(id.to_string())
            .ignore();
        // Keep the newest 1000 per device.
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(&history)
            .arg(0)
            .arg(-1001)
            .ignore();
        // The set lists older commands too: extend its life, never shorten
        // it (NX sets it on a fresh set, GT only lengthens it; Redis 7.0).
        pipe.cmd("PEXPIRE")
            .arg(&history)
            .arg(keep)
            .arg("NX")
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&history)
            .arg(keep)
            .arg("GT")
            .ignore();
        let expires = expires_at_ms.to_string();
        let created = [
            ("phy_id", new.phy_id.as_str().as_bytes()),
            ("name", new.name.as_bytes()),
            ("payload", new.payload.as_slice()),
            ("expires_at", expires.as_bytes()),
        ];
        self.log_change(
            &mut pipe,
            &id,
            1,
            status,
            reason.unwrap_or_default(),
            &detail,
            now,
            &created,
        );
        self.count_open(&mut pipe, None, status);
        if let Err(e) = pipe.query_async::<()>(&mut self.redis.get()).await {
            tracing::warn!(command_id = %id, phy_id = %new.phy_id, error = %e,
                "command created, but its device history, change stream entry and open count were not written");
        }
        if status.is_terminal() {
            crate::metrics::terminal(status, None);
        }
        Ok(Command {
            id,
            phy_id: new.phy_id.clone(),
            name: new.name.clone(),
            payload: new.payload.clone(),
            status,
            reason: reason.map(str::to_owned),
            created_at_ms: now,
            updated_at_ms: now,
            expires_at_ms,
            queue_if_offline: new.queue_if_offline,
            server_id: placement.map(|(s, _)| s.to_owned()),
            epoch: placement.map(|(_, e)| e),
            hops: 0,
            attempts: 0,
            sent_at_ms: None,
            acked_at_ms: None,
        })
    }

    /// Applies `t` to command `id` at `now`. Returns the previous status if
    /// the change was made, `None` if it was not (see
    /// [`transition_checked`](Self::transition_checked) for why).
    pub async fn transition(
        &self,
        id: &Uuid,
        t: &Transition,
        now: i64,
    ) -> redis::RedisResult<Option<Status>> {
        Ok(self.transition_checked(id, t, now).await?.applied())
    }

    /// Applies `t` to command `id` at `now`: whether it was made, and if
    /// not, why (unknown command, terminal already, not in one of `t.from`,
    /// stale, a guard).
    pub async fn transition_checked(
        &self,
        id: &Uuid,
        t: &Transition,
        now: i64,
    ) -> redis::RedisResult<Outcome> {
        let from = if t.from.is_empty() {
            "*".to_owned()
        } else {
            t.from
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (by_server, by_epoch) = t.by.as_ref().map_or(("", 0), |(s, e)| (s.as_str(), *e));
        let mut inv = self.transition.prepare_invoke();
        inv.key(self.keys.command(id))
            .key(self.keys.command_log(id))
            .arg(t.to.as_str())
            .arg(from)
            .arg(now)
            .arg(t.reason.as_deref().unwrap_or_default())
            .arg(t.detail.as_deref().unwrap_or_default())
            .arg(by_server)
            .arg(by_epoch)
            .arg(t.guards.len());
        for (k, v) in &t.guards {
            inv.arg(*k).arg(v);
        }
        for (k, v) in &t.set {
            inv.arg(*k).arg(v);
        }
        let (made, what, seq): (i64, String, u64) = inv.invoke_async(&mut self.redis.get()).await?;
        if made != 1 {
            return Ok(Outcome::Refused(Refusal::parse(&what)));
        }
        let Some(prev) = Status::parse(&what) else {
            return Ok(Outcome::Refused(Refusal::NotAllowed));
        };
        let mut pipe = redis::pipe();
        self.log_change(
            &mut pipe,
            id,
            seq,
            t.to,
            t.reason.as_deref().unwrap_or_default(),
            t.detail.as_deref().unwrap_or_default(),
            now,
            &[],
        );
        self.count_open(&mut pipe, Some(prev), t.to);
        if t.to.is_terminal() {
            pipe.cmd("ZREM")
                .arg(self.keys.command_deadlines())
                .arg(id.to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.redis.get()).await?;
        if t.to.is_terminal() {
            // Ids are UUID v7: their timestamp is the creation time.
            let roundtrip = (t.to == Status::Acked)
                .then(|| id.get_timestamp())
                .flatten()
                .map(|ts| {
                    let (secs, nanos) = ts.to_unix();
                    let created = secs as i64 * 1000 + i64::from(nanos / 1_000_000);
                    Duration::from_millis(now.saturating_sub(created).max(0) as u64)
                });
            crate::metrics::terminal(t.to, roundtrip);
        }
        Ok(Outcome::Applied { prev, seq })
    }

    /// Moves one command from `from` to `to` in the counts of open
    /// commands. Like the change stream, this follows the state change in a
    /// second step: a crash between the two leaves a count off by one.
    fn count_open(&self, pipe: &mut redis::Pipeline, from: Option<Status>, to: Status) {
        let key = self.keys.commands_open();
        if let Some(from) = from.filter(|s| !s.is_terminal()) {
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(from.as_str())
                .arg(-1)
                .ignore();
        }
        if !to.is_terminal() {
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(to.as_str())
                .arg(1)
                .ignore();
        }
    }

    /// How many commands are in each non-terminal state, deployment-wide:
    /// `queued` is the depth of all offline queues together.
    pub async fn open_counts(&self) -> redis::RedisResult<OpenCounts> {
        let counts: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.commands_open())
            .query_async(&mut self.redis.get())
            .await?;
        let get = |s: Status| counts.get(s.as_str()).copied().unwrap_or(0).max(0) as u64;
        Ok(OpenCounts {
            queued: get(Status::Queued),
            dispatched: get(Status::Dispatched),
            sent: get(Status::Sent),
        })
    }

    /// Appends a state change to `stream:commands` (what the archiver
    /// writes to the PostgreSQL command log, keyed by id and `seq`);
    /// `extra` carries the creating change's device, name, payload and
    /// expiry.
    #[allow(clippy::too_many_arguments)]
    fn log_change(
        &self,
        pipe: &mut redis::Pipeline,
        id: &Uuid,
        seq: u64,
        status: Status,
        reason: &str,
        detail: &str,
        now: i64,
        extra: &[(&str, &[u8])],
    ) {
        let cmd = pipe.cmd("XADD").arg(self.keys.command_events());
        if let Some(maxlen) = self.settings.stream_maxlen.get() {
            cmd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        cmd.arg("*").arg("id").arg(id.to_string());
        for (k, v) in extra {
            cmd.arg(*k).arg(*v);
        }
        cmd.arg("seq")
            .arg(seq)
            .arg("status")
            .arg(status.as_str())
            .arg("reason")
            .arg(reason)
            .arg("detail")
            .arg(detail)
            .arg("at_ms")
            .arg(now)
            .ignore();
    }

    /// One record, if it still exists.
    pub async fn get(&self, id: &Uuid) -> redis::RedisResult<Option<Command>> {
        let f: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(self.keys.command(id))
            .query_async(&mut self.redis.get())
            .await?;
        Ok(Command::from_fields(&f))
    }

    /// A record and its change log.
    pub async fn get_with_history(
        &self,
        id: &Uuid,
    ) -> redis::RedisResult<Option<(Command, Vec<Change>)>> {
        let (f, log): (HashMap<String, Vec<u8>>, Vec<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.keys.command(id))
            .cmd("LRANGE")
            .arg(self.keys.command_log(id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis.get())
            .await?;
        Ok(Command::from_fields(&f).map(|c| {
            let changes = log
                .iter()
                .filter_map(|l| serde_json::from_str::<Change>(l).ok())
                .collect();
            (c, changes)
        }))
    }

    /// Several records (missing ones skipped), in the order of `ids`.
    pub async fn get_many(&self, ids: &[Uuid]) -> redis::RedisResult<Vec<Command>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.keys.command(id));
        }
        let all: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(&mut self.redis.get()).await?;
        Ok(all.iter().filter_map(Command::from_fields).collect())
    }

    /// Several records with their change logs (missing ones skipped), in
    /// the order of `ids`.
    pub async fn get_many_with_history(
        &self,
        ids: &[Uuid],
    ) -> redis::RedisResult<Vec<(Command, Vec<Change>)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.keys.command(id));
            pipe.cmd("LRANGE")
                .arg(self.keys.command_log(id))
                .arg(0)
                .arg(-1);
        }
        let all: Vec<(Fields, Vec<String>)> = pipe.query_async(&mut self.redis.get()).await?;
        Ok(all
            .iter()
            .filter_map(|(f, log)| {
                let changes = log
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Change>(l).ok())
                    .collect();
                Some((Command::from_fields(f)?, changes))
            })
            .collect())
    }

    /// A device's commands, newest first, created before `before_ms`.
    pub async fn list_for_device(
        &self,
        phy: &PhyId,
        before_ms: Option<i64>,
        limit: usize,
    ) -> redis::RedisResult<Vec<Command>> {
        let max = before_ms.map_or("+inf".to_owned(), |b| format!("({b}"));
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.device_commands(phy))
            .arg(max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.redis.get())
            .await?;
        let ids: Vec<Uuid> = ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect();
        self.get_many(&ids).await
    }

    /// Appends `id` to the device's offline queue; `false` if it is full.
    pub async fn enqueue(
        &self,
        phy: &PhyId,
        id: &Uuid,
        expires_at_ms: i64,
        now: i64,
    ) -> redis::RedisResult<bool> {
        let added: i64 = self
            .enqueue
            .key(self.keys.downlink_queue(phy))
            .arg(id.to_string())
            .arg(self.settings.queue_max)
            .arg(self.record_ttl_ms(expires_at_ms, now))
            .invoke_async(&mut self.redis.get())
            .await?;
        Ok(added == 1)
    }

    /// Puts commands back at the head of the device's queue, keeping their
    /// order (used when a connection closes with commands not yet
    /// acknowledged); `items` are `(id, expires_at_ms)`, oldest first. The
    /// queue's expiry grows to cover the longest-lived of them.
    pub async fn requeue_front(
        &self,
        phy: &PhyId,
        items: &[(Uuid, i64)],
        now: i64,
    ) -> redis::RedisResult<()> {
        let Some(last) = items.iter().map(|(_, e)| *e).max() else {
            return Ok(());
        };
        let mut inv = self.requeue.prepare_invoke();
        inv.key(self.keys.downlink_queue(phy))
            .arg(self.record_ttl_ms(last, now));
        for (id, _) in items {
            inv.arg(id.to_string());
        }
        inv.invoke_async::<i64>(&mut self.redis.get()).await?;
        Ok(())
    }

    /// Takes up to `n` ids from the head of the device's queue and returns
    /// their records (ids whose record is gone are dropped).
    ///
    /// Their sweeper deadlines move to [`Settings::check_at`] *before* they
    /// leave the queue: until they are `sent` their status stays `queued`,
    /// and if the taker dies with them (SIGKILL, a Redis error or timeout
    /// half-way) the sweeper finds them `queued` in no queue and puts them
    /// back. Three steps: peek the head, push the deadlines, take exactly
    /// the peeked ids that are still there (a concurrent drain may have
    /// taken some; an id put in front meanwhile stays for the next drain).
    pub async fn take_queued(&self, phy: &PhyId, n: usize) -> redis::RedisResult<Vec<Command>> {
        let queue = self.keys.downlink_queue(phy);
        let peeked: Vec<String> = redis::cmd("LRANGE")
            .arg(&queue)
            .arg(0)
            .arg(n.max(1) - 1)
            .query_async(&mut self.redis.get())
            .await?;
        let mut ids: Vec<String> = Vec::with_capacity(peeked.len());
        for id in peeked {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let now = iot_core::time::now_ms();
        let look = now.saturating_add(ms(self.settings.stuck_after()));
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(self.keys.command_deadlines());
        for id in &ids {
            zadd.arg(look).arg(id);
        }
        zadd.query_async::<()>(&mut self.redis.get()).await?;
        let mut take = self.take.prepare_invoke();
        take.key(&queue);
        for id in &ids {
            take.arg(id);
        }
        let taken: Vec<String> = take.invoke_async(&mut self.redis.get()).await?;
        let taken: Vec<Uuid> = taken
            .iter()
            .filter_map(|s| Uuid::parse_str(s).ok())
            .collect();
        self.get_many(&taken).await
    }

    /// Whether `id` is in the device's queue.
    pub async fn in_queue(&self, phy: &PhyId, id: &Uuid) -> redis::RedisResult<bool> {
        let at: Option<i64> = redis::cmd("LPOS")
            .arg(self.keys.downlink_queue(phy))
            .arg(id.to_string())
            .query_async(&mut self.redis.get())
            .await?;
        Ok(at.is_some())
    }

    /// Puts `id` back into the device's queue, in creation order among the
    /// ids there, unless it is there already (the queue cap is not
    /// applied: it was accepted before). Returns whether it was put back.
    pub async fn restore(
        &self,
        phy: &PhyId,
        id: &Uuid,
        expires_at_ms: i64,
        now: i64,
    ) -> redis::RedisResult<bool> {
        let added: i64 = self
            .restore
            .key(self.keys.downlink_queue(phy))
            .arg(id.to_string())
            .arg(self.record_ttl_ms(expires_at_ms, now))
            .invoke_async(&mut self.redis.get())
            .await?;
        Ok(added == 1)
    }

    /// Removes `id` from the device's queue (when it expired there);
    /// returns whether it was there (a drain may have taken it first).
    pub async fn dequeue(&self, phy: &PhyId, id: &Uuid) -> redis::RedisResult<bool> {
        redis::cmd("LREM")
            .arg(self.keys.downlink_queue(phy))
            .arg(0)
            .arg(id.to_string())
            .query_async::<u64>(&mut self.redis.get())
            .await
            .map(|n| n > 0)
    }

    /// Length of the device's queue.
    pub async fn queue_len(&self, phy: &PhyId) -> redis::RedisResult<u64> {
        redis::cmd("LLEN")
            .arg(self.keys.downlink_queue(phy))
            .query_async(&mut self.redis.get())
            .await
    }

    /// (Re)sets when the sweeper looks at `id` next.
    pub async fn set_deadline(&self, id: &Uuid, at_ms: i64) -> redis::RedisResult<()> {
        redis::cmd("ZADD")
            .arg(self.keys.command_deadlines())
            .arg(at_ms)
            .arg(id.to_string())
            .query_async(&mut self.redis.get())
            .await
    }

    /// Leases up to `n` due ids: their deadline moves to `lease_until`
    /// (plus half a millisecond: every other writer writes whole ms, so a
    /// lease's score is one nobody else writes; see [`reschedule`]).
    ///
    /// [`reschedule`]: Self::reschedule
    pub async fn lease_due(
        &self,
        now: i64,
        n: usize,
        lease_until: i64,
    ) -> redis::RedisResult<Vec<Uuid>> {
        let ids: Vec<String> = self
            .lease
            .key(self.keys.command_deadlines())
            .arg(now)
            .arg(n)
            .arg(lease_score(lease_until))
            .invoke_async(&mut self.redis.get())
            .await?;
        Ok(ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
    }

    /// Moves the deadline of `id`, leased by [`lease_due`] until
    /// `lease_until`, to `at_ms`, unless someone has set or removed its
    /// deadline since the lease (theirs is newer knowledge). Returns
    /// whether it moved.
    ///
    /// [`lease_due`]: Self::lease_due
    pub async fn reschedule(
        &self,
        id: &Uuid,
        lease_until: i64,
        at_ms: i64,
    ) -> redis::RedisResult<bool> {
        let moved: i64 = self
            .reschedule
            .key(self.keys.command_deadlines())
            .arg(id.to_string())
            .arg(lease_score(lease_until))
            .arg(at_ms)
            .invoke_async(&mut self.redis.get())
            .await?;
        Ok(moved == 1)
    }

    /// When the sweeper looks at `id` next, if it has a deadline.
    pub async fn deadline(&self, id: &Uuid) -> redis::RedisResult<Option<f64>> {
        redis::cmd("ZSCORE")
            .arg(self.keys.command_deadlines())
            .arg(id.to_string())
            .query_async(&mut self.redis.get())
            .await
    }

    /// Forgets a deadline.
    pub async fn clear_deadline(&self, id: &Uuid) -> redis::RedisResult<()> {
        redis::cmd("ZREM")
            .arg(self.keys.command_deadlines())
            .arg(id.to_string())
            .query_async(&mut self.redis.get())
            .await
    }
}

/// The score of a lease until `lease_until` ms (see
/// [`CommandStore::lease_due`]).
fn lease_score(lease_until: i64) -> String {
    format!("{lease_until}.5")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stream_is_capped_only_without_the_archive() {
        let mut c = Config::default();
        c.streams.maxlen = 5_000;
        let s = Settings::from_config(&c);
        assert_eq!(s.stream_maxlen.get(), Some(5_000));
        c.streams.archiver_seen.set();
        assert_eq!(s.stream_maxlen.get(), None, "an archiver seen later");
        c.streams.archiver_seen = iot_core::config::ArchiverSeen::new(false);
        c.database.url = "postgres://postgres@127.0.0.1/test".into();
        let s = Settings::from_config(&c);
        assert_eq!(s.stream_maxlen.get(), None, "the archiver trims");
        assert_eq!(s.queue_max, c.downlink.queue_max);
    }
}
