//! The credential cache of mode `registry`: per device, the last verdict of
//! PostgreSQL for a password, keyed by a salted hash of the password (the
//! plain secret is never kept).
//!
//! A device keeps two slots, so that a stranger's wrong guesses cannot push
//! out a device's good entry:
//!
//! - `valid`: the password last found valid. Fresh for the TTL (answers
//!   without the database); after that kept, stale, for a day, and used
//!   only while the database cannot answer (devices keep connecting through
//!   an outage).
//! - `refused`: the last refusal (wrong secret, disabled, unknown), fresh
//!   for `min(TTL, 5 s)`: long enough to absorb a storm of retries, short
//!   enough that a device registered or enabled right after a refusal is
//!   not kept out for long. "Unknown device" holds for any password.
//!
//! Pure: the caller brings the time and the lock.

use std::collections::HashMap;
use std::time::Duration;

use iot_core::PhyId;
use iot_store::devices::Credential;
use tokio::time::Instant;

/// A salted hash of a password.
pub type Key = [u8; 32];

/// Longest a refusal is cached.
pub const REFUSED_TTL_MAX: Duration = Duration::from_secs(5);
/// How long a valid entry is kept (stale) for outages.
pub const KEEP_VALID: Duration = Duration::from_secs(24 * 3600);

/// PostgreSQL's answer for a device and password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Registered, enabled, the secret matches.
    Valid,
    /// Registered, the secret does not match.
    WrongSecret,
    /// Registered and disabled.
    Disabled,
    /// Not registered.
    Unknown,
}

impl From<Credential> for Verdict {
    fn from(c: Credential) -> Self {
        match c {
            Credential::Valid => Self::Valid,
            Credential::WrongSecret => Self::WrongSecret,
            Credential::Disabled => Self::Disabled,
            Credential::Unknown => Self::Unknown,
        }
    }
}

impl Verdict {
    /// The label of `iot_ingest_auth_failures_total` for a refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::WrongSecret => "wrong_secret",
            Self::Disabled => "disabled",
            Self::Unknown => "unknown_device",
        }
    }
}

/// What the cache knows about a device and password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A fresh verdict: answer with it.
    Fresh(Verdict),
    /// The password was valid, but not recently: ask PostgreSQL, and accept
    /// the device if PostgreSQL cannot answer.
    Stale,
    /// Nothing known: ask PostgreSQL.
    Miss,
}

#[derive(Debug, Default)]
struct Entry {
    valid: Option<(Key, Instant)>,
    refused: Option<(Key, Verdict, Instant)>,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    entries: HashMap<PhyId, Entry>,
    ttl: Duration,
    refused_ttl: Duration,
}

impl Cache {
    /// Verdicts fresh for `ttl` (refusals for at most [`REFUSED_TTL_MAX`]).
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            refused_ttl: ttl.min(REFUSED_TTL_MAX),
        }
    }

    /// What is known about `phy` with password `key` at `now`.
    pub fn lookup(&self, phy: &PhyId, key: &Key, now: Instant) -> Lookup {
        let Some(e) = self.entries.get(phy) else {
            return Lookup::Miss;
        };
        if let Some((k, at)) = &e.valid
            && k == key
        {
            return if now < *at + self.ttl {
                Lookup::Fresh(Verdict::Valid)
            } else {
                Lookup::Stale
            };
        }
        if let Some((k, verdict, at)) = &e.refused
            && (k == key || *verdict == Verdict::Unknown)
            && now < *at + self.refused_ttl
        {
            return Lookup::Fresh(*verdict);
        }
        Lookup::Miss
    }

    /// Records PostgreSQL's `verdict` for `phy` with password `key`.
    pub fn record(&mut self, phy: &PhyId, key: Key, verdict: Verdict, now: Instant) {
        let e = self.entries.entry(phy.clone()).or_default();
        match verdict {
            Verdict::Valid => {
                e.valid = Some((key, now));
                e.refused = None;
            }
            // Another password may still be the valid one.
            Verdict::WrongSecret => e.refused = Some((key, verdict, now)),
            // The device itself is refused, whatever the password.
            Verdict::Disabled | Verdict::Unknown => {
                e.valid = None;
                e.refused = Some((key, verdict, now));
            }
        }
    }

    /// Forgets `phy` (disabled or deleted).
    pub fn forget(&mut self, phy: &PhyId) {
        self.entries.remove(phy);
    }

    /// Drops what can no longer answer anything: refusals past their TTL,
    /// valid entries older than [`KEEP_VALID`].
    pub fn prune(&mut self, now: Instant) {
        let refused_ttl = self.refused_ttl;
        self.entries.retain(|_, e| {
            if e.valid.is_some_and(|(_, at)| now >= at + KEEP_VALID) {
                e.valid = None;
            }
            if e.refused.is_some_and(|(_, _, at)| now >= at + refused_ttl) {
                e.refused = None;
            }
            e.valid.is_some() || e.refused.is_some()
        });
    }

    /// Devices with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn phy(s: &str) -> PhyId {
        PhyId::new(s).expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn valid_answers_for_the_ttl_then_is_stale() {
        let mut c = Cache::new(TTL);
        let (good, bad) = ([1; 32], [2; 32]);
        assert_eq!(c.lookup(&phy("d"), &good, Instant::now()), Lookup::Miss);
        c.record(&phy("d"), good, Verdict::Valid, Instant::now());
        assert_eq!(
            c.lookup(&phy("d"), &good, Instant::now()),
            Lookup::Fresh(Verdict::Valid)
        );
        assert_eq!(c.lookup(&phy("d"), &bad, Instant::now()), Lookup::Miss);
        assert_eq!(c.lookup(&phy("e"), &good, Instant::now()), Lookup::Miss);
        tokio::time::advance(TTL).await;
        assert_eq!(c.lookup(&phy("d"), &good, Instant::now()), Lookup::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_guesses_do_not_push_out_the_valid_entry() {
        let mut c = Cache::new(TTL);
        let (good, bad) = ([1; 32], [2; 32]);
        c.record(&phy("d"), good, Verdict::Valid, Instant::now());
        c.record(&phy("d"), bad, Verdict::WrongSecret, Instant::now());
        assert_eq!(
            c.lookup(&phy("d"), &bad, Instant::now()),
            Lookup::Fresh(Verdict::WrongSecret)
        );
        assert_eq!(
            c.lookup(&phy("d"), &good, Instant::now()),
            Lookup::Fresh(Verdict::Valid)
        );
        tokio::time::advance(REFUSED_TTL_MAX).await;
        assert_eq!(
            c.lookup(&phy("d"), &bad, Instant::now()),
            Lookup::Miss,
            "refusals are cached briefly"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_and_unknown_devices_lose_their_valid_entry() {
        let mut c = Cache::new(TTL);
        let (good, other) = ([1; 32], [3; 32]);
        c.record(&phy("d"), good, Verdict::Valid, Instant::now());
        c.record(&phy("d"), good, Verdict::Disabled, Instant::now());
        assert_eq!(
            c.lookup(&phy("d"), &good, Instant::now()),
            Lookup::Fresh(Verdict::Disabled)
        );
        assert_eq!(c.lookup(&phy("d"), &other, Instant::now()), Lookup::Miss);
        tokio::time::advance(REFUSED_TTL_MAX).await;
        assert_eq!(
            c.lookup(&phy("d"), &good, Instant::now()),
            Lookup::Miss,
            "not even stale: a disabled device is not let in through an outage"
        );
        c.record(&phy("u"), good, Verdict::Unknown, Instant::now());
        assert_eq!(
            c.lookup(&phy("u"), &other, Instant::now()),
            Lookup::Fresh(Verdict::Unknown),
            "unknown whatever the password"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forget_and_prune() {
        let mut c = Cache::new(TTL);
        c.record(&phy("a"), [1; 32], Verdict::Valid, Instant::now());
        c.record(&phy("b"), [1; 32], Verdict::Unknown, Instant::now());
        c.record(&phy("c"), [1; 32], Verdict::Valid, Instant::now());
        c.forget(&phy("c"));
        assert_eq!(c.lookup(&phy("c"), &[1; 32], Instant::now()), Lookup::Miss);
        assert_eq!(c.len(), 2);
        tokio::time::advance(REFUSED_TTL_MAX).await;
        c.prune(Instant::now());
        assert_eq!(c.len(), 1, "the refusal is gone, the valid entry stays");
        tokio::time::advance(KEEP_VALID).await;
        c.prune(Instant::now());
        assert!(c.is_empty());
    }
}
