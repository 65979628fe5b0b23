//! Topic names, topic filters and matching (MQTT 3.1.1 section 4.7).
//!
//! A topic *name* (PUBLISH, will topic) is a concrete path like
//! `devices/42/telemetry`; a topic *filter* (SUBSCRIBE, UNSUBSCRIBE) may use
//! `+` for exactly one level and a trailing `#` for any number of levels.

use crate::{Error, MqttStr, TopicError};

/// Checks a topic name: not empty, no `+` or `#`.
///
/// (UTF-8 validity, absence of U+0000 and the length limit are guaranteed by
/// [`MqttStr`].)
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter: not empty, `+` only as a whole level, `#` only as the
/// whole last level.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Whether the topic name `topic` matches the topic filter `filter`.
///
/// Both are assumed valid (see [`validate_topic_filter`] and
/// [`validate_topic_name`]); for invalid input the answer is unspecified but
/// the function never panics. Follows section 4.7: `a/#` also matches `a`,
/// `+` matches an empty level, and topics starting with `$` are not matched
/// by filters starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            _ => return false,
        }
    }
}

/// Validates a decoded topic name, keeping it in the error if it fails.
pub(crate) fn check_name(topic: MqttStr) -> Result<MqttStr, Error> {
    match validate_topic_name(topic.as_str()) {
        Ok(()) => Ok(topic),
        Err(reason) => Err(Error::InvalidTopicName { topic, reason }),
    }
}

/// Validates a decoded topic filter, keeping it in the error if it fails.
pub(crate) fn check_filter(filter: MqttStr) -> Result<MqttStr, Error> {
    match validate_topic_filter(filter.as_str()) {
        Ok(()) => Ok(filter),
        Err(reason) => Err(Error::InvalidTopicFilter { filter, reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "/", "a/b", "/a", "a//b", "$SYS/x", " ", "température"] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        for bad in ["+", "#", "a/+", "a/#", "a+b"] {
            assert_eq!(validate_topic_name(bad), Err(TopicError::Wildcard), "{bad}");
        }
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#", "+", "a", "a/#", "a/+", "+/+", "/+", "+/", "a/+/b/#", "//", "$SYS/#",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        for bad in ["a#", "#/a", "a/#/b", "a/b#", "##"] {
            assert_eq!(
                validate_topic_filter(bad),
                Err(TopicError::MisplacedMultiLevelWildcard),
                "{bad}"
            );
        }
        for bad in ["a+", "+a", "a/b+/c", "++"] {
            assert_eq!(
                validate_topic_filter(bad),
                Err(TopicError::MisplacedSingleLevelWildcard),
                "{bad}"
            );
        }
    }

    #[test]
    fn matching_follows_section_4_7() {
        let yes = [
            ("a/b", "a/b"),
            ("#", "a"),
            ("#", "a/b/c"),
            ("#", "/"),
            ("a/#", "a"),
            ("a/#", "a/b"),
            ("a/#", "a/b/c"),
            ("a/+", "a/b"),
            ("a/+", "a/"),
            ("+/+", "/finance"),
            ("/+", "/finance"),
            ("+", "finance"),
            ("a/+/c", "a/b/c"),
            ("$SYS/#", "$SYS/uptime"),
            ("$SYS/+", "$SYS/uptime"),
        ];
        for (filter, topic) in yes {
            assert!(matches(filter, topic), "{filter} should match {topic}");
        }
        let no = [
            ("a/b", "a"),
            ("a", "a/b"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("+", "/finance"),
            ("a/+/c", "a/b/d"),
            ("#", "$SYS/uptime"),
            ("+/uptime", "$SYS/uptime"),
            ("a/b", "A/b"),
        ];
        for (filter, topic) in no {
            assert!(!matches(filter, topic), "{filter} should not match {topic}");
        }
    }

    #[test]
    fn decoded_values_are_kept_in_errors() {
        let err = check_filter(MqttStr::from_static("a/b#")).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidTopicFilter {
                filter: MqttStr::from_static("a/b#"),
                reason: TopicError::MisplacedMultiLevelWildcard
            }
        );
        assert!(check_name(MqttStr::from_static("a/b")).is_ok());
    }
}
