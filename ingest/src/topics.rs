//! Device topic rules: a device publishes only under `devices/{phyID}/up/`
//! and subscribes only inside `devices/{phyID}/down/`.
//!
//! The ingest is a device gateway, not a general broker: these rules are
//! what keeps one device from reading or writing another's traffic.

use iot_core::PhyId;
use iot_mqtt::QoS;

/// First level of every device topic.
pub const ROOT: &str = "devices";
/// Level after the phyID for device-to-server messages.
pub const UP: &str = "up";
/// Level after the phyID for server-to-device messages.
pub const DOWN: &str = "down";

/// Why a PUBLISH topic is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    /// The topic names another device.
    #[error("the topic belongs to another device")]
    OtherDevice,
    /// The topic is the device's own but not under `up/` (or nothing follows `up/`).
    #[error("devices may publish only to devices/{{phyID}}/up/<name>")]
    NotUplink,
}

impl PublishRefusal {
    /// Metric label.
    pub fn kind(self) -> &'static str {
        match self {
            Self::OtherDevice => "publish_other_device",
            Self::NotUplink => "publish_outside_up",
        }
    }
}

/// The topic of a downlink command: `devices/{phy}/down/{name}`.
pub fn down_topic(phy: &PhyId, name: &str) -> String {
    format!("{ROOT}/{phy}/{DOWN}/{name}")
}

/// Splits `devices/{phy}/{dir}/{rest}`; `None` if the shape differs.
fn split_device_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (phy, rest) = rest.split_once('/')?;
    let (dir, rest) = rest.split_once('/').unwrap_or((rest, ""));
    Some((phy, dir, rest))
}

/// Checks that `topic` is `devices/{phy}/up/<at least one level>`.
///
/// A topic under another device's tree is [`PublishRefusal::OtherDevice`]
/// even when it is not an uplink topic there, so the log says what the
/// device tried.
pub fn check_publish(phy: &PhyId, topic: &str) -> Result<(), PublishRefusal> {
    match split_device_topic(topic) {
        Some((p, _, _)) if p != phy.as_str() => Err(PublishRefusal::OtherDevice),
        Some((_, UP, rest)) if !rest.is_empty() => Ok(()),
        _ => Err(PublishRefusal::NotUplink),
    }
}

/// The part of an accepted SUBSCRIBE filter after `devices/{phy}/down/`,
/// such as `#`, `+` or `reboot`; `None` if the filter reaches outside the
/// device's downlink tree (another device, a wildcard in place of the
/// phyID or of `down`, or nothing after `down/`).
///
/// `filter` has already been validated as an MQTT topic filter by the codec.
pub fn down_filter<'a>(phy: &PhyId, filter: &'a str) -> Option<&'a str> {
    match split_device_topic(filter) {
        Some((p, DOWN, rest)) if p == phy.as_str() && !rest.is_empty() => Some(rest),
        _ => None,
    }
}

/// The downlink filters a connection subscribed to, relative to
/// `devices/{phy}/down/`, with their granted QoS.
///
/// Kept compact (an empty list allocates nothing; most devices hold one
/// filter). Downlinks (a later issue) ask [`Subscriptions::granted`] whether a
/// device listens on `devices/{phy}/down/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// Boxed so that a connection pays one pointer until it subscribes.
    #[allow(
        clippy::box_collection,
        reason = "one pointer instead of a 24-byte Vec in every idle connection's task"
    )]
    filters: Option<Box<Vec<Filter>>>,
}

/// A downlink filter relative to `devices/{phy}/down/`, with its granted QoS.
type Filter = (Box<str>, QoS);

/// Most downlink filters one connection may hold: enough for any device's
/// command names, and a bound on what a connection's SUBSCRIBEs can make
/// the ingest keep and match.
pub const MAX_FILTERS: usize = 32;

impl Subscriptions {
    /// Records `relative` (as returned by [`down_filter`]) with `qos`,
    /// replacing an identical filter (MQTT-3.8.4-3). Returns `false`, and
    /// records nothing, for a new filter when [`MAX_FILTERS`] are held.
    pub fn add(&mut self, relative: &str, qos: QoS) -> bool {
        let filters = self.filters.get_or_insert_with(Box::default);
        if let Some(existing) = filters.iter_mut().find(|(f, _)| &**f == relative) {
            existing.1 = qos;
            return true;
        }
        if filters.len() >= MAX_FILTERS {
            return false;
        }
        filters.push((relative.into(), qos));
        true
    }

    fn iter(&self) -> impl Iterator<Item = &Filter> {
        self.filters.iter().flat_map(|f| f.iter())
    }

    /// Removes the filter given in full (`devices/{phy}/down/...`), if held.
    pub fn remove(&mut self, phy: &PhyId, filter: &str) {
        if let (Some(relative), Some(filters)) = (down_filter(phy, filter), &mut self.filters) {
            filters.retain(|(f, _)| &**f != relative);
            if filters.is_empty() {
                self.filters = None;
            }
        }
    }

    /// The highest QoS granted for a downlink named `name` (the part after
    /// `devices/{phy}/down/`), or `None` if no filter matches it.
    pub fn granted(&self, name: &str) -> Option<QoS> {
        self.iter()
            .filter(|(f, _)| iot_mqtt::topic::matches(f, name))
            .map(|(_, q)| *q)
            .max()
    }

    /// Number of filters held.
    pub fn len(&self) -> usize {
        self.filters.as_ref().map_or(0, |f| f.len())
    }

    /// Whether no filter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phy() -> PhyId {
        PhyId::new("dev-1").expect("valid")
    }

    #[test]
    fn publish_only_to_own_up_tree() {
        for ok in [
            "devices/dev-1/up/temp",
            "devices/dev-1/up/a/b",
            "devices/dev-1/up//x",
        ] {
            assert_eq!(check_publish(&phy(), ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("devices/dev-2/up/temp", PublishRefusal::OtherDevice),
            ("devices/dev-10/up/temp", PublishRefusal::OtherDevice),
            ("devices/dev/up/temp", PublishRefusal::OtherDevice),
            ("devices/dev-2/down/x", PublishRefusal::OtherDevice),
            ("devices/dev-1/up/", PublishRefusal::NotUplink),
            ("devices/dev-1/up", PublishRefusal::NotUplink),
            ("devices/dev-1/down/x", PublishRefusal::NotUplink),
            ("devices/dev-1", PublishRefusal::NotUplink),
            ("other/dev-1/up/x", PublishRefusal::NotUplink),
            ("devices", PublishRefusal::NotUplink),
            ("/devices/dev-1/up/x", PublishRefusal::NotUplink),
        ] {
            assert_eq!(check_publish(&phy(), bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn a_connection_holds_at_most_max_filters() {
        let mut subs = Subscriptions::default();
        for i in 0..MAX_FILTERS {
            assert!(subs.add(&format!("cmd{i}"), QoS::AtLeastOnce));
        }
        assert!(!subs.add("one-too-many", QoS::AtLeastOnce));
        assert_eq!(subs.len(), MAX_FILTERS);
        assert_eq!(subs.granted("one-too-many"), None);
        // Replacing a held filter is still allowed.
        assert!(subs.add("cmd0", QoS::AtMostOnce));
        assert_eq!(subs.granted("cmd0"), Some(QoS::AtMostOnce));
    }

    #[test]
    fn subscribe_only_inside_own_down_tree() {
        for (ok, rel) in [
            ("devices/dev-1/down/#", "#"),
            ("devices/dev-1/down/+", "+"),
            ("devices/dev-1/down/reboot", "reboot"),
            ("devices/dev-1/down/a/+/b", "a/+/b"),
        ] {
            assert_eq!(down_filter(&phy(), ok), Some(rel), "{ok}");
        }
        for bad in [
            "devices/dev-2/down/#",
            "devices/+/down/#",
            "devices/#",
            "devices/dev-1/#",
            "devices/dev-1/+/#",
            "devices/dev-1/up/#",
            "devices/dev-1/down",
            "devices/dev-1/down/",
            "#",
            "+/dev-1/down/#",
        ] {
            assert_eq!(down_filter(&phy(), bad), None, "{bad}");
        }
    }

    #[test]
    fn downlink_topics_fall_under_the_down_filters() {
        let t = down_topic(&phy(), "reboot");
        assert_eq!(t, "devices/dev-1/down/reboot");
        assert_eq!(down_filter(&phy(), "devices/dev-1/down/#"), Some("#"));
        assert!(iot_mqtt::topic::matches("devices/dev-1/down/#", &t));
    }

    #[test]
    fn subscriptions_answer_which_downlinks_a_device_wants() {
        let mut s = Subscriptions::default();
        assert!(s.is_empty());
        assert_eq!(s.granted("reboot"), None);
        s.add("reboot", QoS::AtMostOnce);
        s.add("reboot", QoS::AtLeastOnce);
        assert_eq!(s.len(), 1);
        assert_eq!(s.granted("reboot"), Some(QoS::AtLeastOnce));
        assert_eq!(s.granted("config"), None);
        s.add("#", QoS::AtMostOnce);
        assert_eq!(s.granted("config"), Some(QoS::AtMostOnce));
        assert_eq!(s.granted("reboot"), Some(QoS::AtLeastOnce));
        s.remove(&phy(), "devices/dev-1/down/reboot");
        assert_eq!(s.granted("reboot"), Some(QoS::AtMostOnce));
        s.remove(&phy(), "devices/dev-2/down/#");
        assert_eq!(s.len(), 1);
        s.remove(&phy(), "devices/dev-1/down/#");
        assert!(s.is_empty());
    }
}
