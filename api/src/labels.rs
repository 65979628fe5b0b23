//! Device labels: free-form string pairs kept with a registered device.
//!
//! Rules: at most [`MAX_LABELS`] per device; a key is 1 to
//! [`KEY_MAX_LEN`] characters of `[A-Za-z0-9._/-]`; a value is a string of
//! at most [`VALUE_MAX_LEN`] bytes. `GET /api/devices?labels=k:v,k2:v2`
//! filters on them (every pair must match): keys cannot hold `:` or `,`, and
//! a filter cannot name a value that holds `,`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most labels per device.
pub const MAX_LABELS: usize = 32;
/// Longest label key.
pub const KEY_MAX_LEN: usize = 64;
/// Longest label value, in bytes.
pub const VALUE_MAX_LEN: usize = 256;

fn bad(message: String) -> ApiError {
    ApiError::bad_request("invalid_labels", message)
}

fn check_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.len() > KEY_MAX_LEN {
        return Err(bad(format!(
            "label key {k:.80?} must be 1 to {KEY_MAX_LEN} characters"
        )));
    }
    if let Some(c) = k
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        return Err(bad(format!(
            "label key {k:.80?} holds {c:?}; only [A-Za-z0-9._/-] is allowed"
        )));
    }
    Ok(())
}

/// Checks labels from a request body and turns them into the stored form.
pub fn validate(labels: BTreeMap<String, String>) -> Result<Map<String, Value>, ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(bad(format!(
            "{} labels given; at most {MAX_LABELS} are allowed",
            labels.len()
        )));
    }
    let mut out = Map::new();
    for (k, v) in labels {
        check_key(&k)?;
        if v.len() > VALUE_MAX_LEN {
            return Err(bad(format!(
                "the value of label {k} is {} bytes; at most {VALUE_MAX_LEN} are allowed",
                v.len()
            )));
        }
        out.insert(k, Value::String(v));
    }
    Ok(out)
}

/// Parses the `labels` filter: `k:v` pairs separated by commas.
pub fn parse_filter(s: &str) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    for pair in s.split(',') {
        let (k, v) = pair.split_once(':').ok_or_else(|| {
            bad(format!(
                "labels filter {pair:.80?} is not key:value; write labels=k:v,k2:v2"
            ))
        })?;
        check_key(k)?;
        if out
            .insert(k.to_owned(), Value::String(v.to_owned()))
            .is_some()
        {
            return Err(bad(format!("labels filter names key {k} twice")));
        }
    }
    if out.len() > MAX_LABELS {
        return Err(bad(format!(
            "labels filter has {} pairs; at most {MAX_LABELS} are allowed",
            out.len()
        )));
    }
    Ok(out)
}

/// The stored labels as strings (a value that is not a string, written by
/// another tool, is shown as its JSON text).
pub fn to_strings(labels: &Map<String, Value>) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn valid_labels_are_kept() {
        let m = validate(map(&[("site", "berlin: hall 2"), ("k8s.io/zone", "")])).unwrap();
        assert_eq!(m["site"], "berlin: hall 2");
        assert_eq!(
            to_strings(&m),
            map(&[("site", "berlin: hall 2"), ("k8s.io/zone", "")])
        );
    }

    #[test]
    fn bad_labels_are_invalid_labels() {
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        for bad in [
            map(&[("", "v")]),
            map(&[("a b", "v")]),
            map(&[("a:b", "v")]),
            map(&[(&"k".repeat(65), "v")]),
            map(&[("k", &"v".repeat(257))]),
            many,
        ] {
            assert_eq!(validate(bad).unwrap_err().code(), "invalid_labels");
        }
    }

    #[test]
    fn filters_parse() {
        let f = parse_filter("env:prod,site:berlin: hall 2,empty:").unwrap();
        assert_eq!(f["env"], "prod");
        assert_eq!(f["site"], "berlin: hall 2");
        assert_eq!(f["empty"], "");
        for bad in ["", "env", "env:a,env:b", ":v", "a b:v"] {
            assert_eq!(
                parse_filter(bad).unwrap_err().code(),
                "invalid_labels",
                "{bad}"
            );
        }
    }
}
