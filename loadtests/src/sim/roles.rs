//! Which devices misbehave, and how: a pure function of the seed, the
//! device index and the configured fractions.
//!
//! Each behaviour draws from its own hash, so the fractions are independent
//! (a device can flap and also never ack), and the same device keeps its
//! role across runs with the same seed, whichever worker runs it.

use serde::{Deserialize, Serialize};

use crate::rng::unit_hash;
use crate::sim::config::SimConfig;

const SALT_ACK: u64 = 0xa11c;
const SALT_FLAP: u64 = 0xf1a9;
const SALT_TAKEOVER: u64 = 0x7a6e;

/// How a device answers QoS 1 downlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckMode {
    /// PUBACK at once.
    Ack,
    /// PUBACK after the configured delay.
    Late,
    /// Never PUBACK.
    Never,
}

/// The behaviour of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Downlink acknowledgement.
    pub ack: AckMode,
    /// Drops and reconnects at random intervals.
    pub flaps: bool,
    /// Takes its own session over from a second connection at random
    /// intervals.
    pub takes_over: bool,
}

impl Role {
    /// The role of device `index` under `config`.
    pub fn of(config: &SimConfig, index: u32) -> Role {
        let draw = |salt| unit_hash(config.seed, u64::from(index), salt);
        let a = draw(SALT_ACK);
        let ack = if a < config.never_ack_fraction {
            AckMode::Never
        } else if a < config.never_ack_fraction + config.late_ack_fraction {
            AckMode::Late
        } else {
            AckMode::Ack
        };
        Role {
            ack,
            flaps: draw(SALT_FLAP) < config.flap_fraction,
            takes_over: draw(SALT_TAKEOVER) < config.takeover_fraction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            never_ack_fraction: 0.1,
            late_ack_fraction: 0.2,
            flap_fraction: 0.3,
            takeover_fraction: 0.05,
            ..SimConfig::default()
        }
    }

    #[test]
    fn fractions_are_respected_over_many_devices() {
        let c = config();
        let roles: Vec<Role> = (0..20_000).map(|i| Role::of(&c, i)).collect();
        let share = |f: &dyn Fn(&Role) -> bool| {
            roles.iter().filter(|r| f(r)).count() as f64 / roles.len() as f64
        };
        assert!((share(&|r| r.ack == AckMode::Never) - 0.1).abs() < 0.01);
        assert!((share(&|r| r.ack == AckMode::Late) - 0.2).abs() < 0.015);
        assert!((share(&|r| r.flaps) - 0.3).abs() < 0.015);
        assert!((share(&|r| r.takes_over) - 0.05).abs() < 0.01);
    }

    #[test]
    fn roles_are_deterministic_and_default_to_well_behaved() {
        let c = config();
        assert!((0..100).all(|i| Role::of(&c, i) == Role::of(&c, i)));
        let plain = SimConfig::default();
        assert!((0..1000).all(|i| Role::of(&plain, i)
            == Role {
                ack: AckMode::Ack,
                flaps: false,
                takes_over: false
            }));
    }

    #[test]
    fn fraction_one_selects_everyone() {
        let c = SimConfig {
            flap_fraction: 1.0,
            never_ack_fraction: 1.0,
            ..SimConfig::default()
        };
        assert!((0..1000).all(|i| {
            let r = Role::of(&c, i);
            r.flaps && r.ack == AckMode::Never
        }));
    }
}
