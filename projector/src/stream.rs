//! Stream entries as the projector reads them (XREADGROUP, XAUTOCLAIM,
//! XRANGE), and their decoding into events.

use std::collections::HashMap;

use iot_core::event::ENTRY_FIELD;
use iot_core::{Entry, Event};
use redis::Value;

use crate::settings::MAX_EVENT_VALUE;

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The bytes of field `e`.
    Bytes(Vec<u8>),
    /// Fields, but no `e`.
    Missing,
    /// The entry was deleted (or trimmed) after it was delivered.
    Deleted,
}

/// One entry of one event shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The shard.
    pub shard: u16,
    /// The entry id (`ms-seq`).
    pub id: String,
    /// Its content.
    pub payload: Payload,
}

impl StreamEntry {
    /// Milliseconds part of the id (0 if it does not parse).
    pub fn id_ms(&self) -> i64 {
        id_ms(&self.id)
    }
}

/// Milliseconds part of a stream id (0 if it does not parse).
pub fn id_ms(id: &str) -> i64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// Parses a list of `[id, [field, value, ...]]` (XRANGE, the claimed part of
/// XAUTOCLAIM, one stream of XREADGROUP).
pub fn parse_entries(shard: u16, list: Value) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    for entry in items(list) {
        let mut parts = items(entry).into_iter();
        let Some(id) = parts.next().as_ref().and_then(as_string) else {
            continue;
        };
        let payload = match parts.next() {
            None | Some(Value::Nil) => Payload::Deleted,
            Some(fields) => {
                let fields = items(fields);
                let mut found = Payload::Missing;
                for pair in fields.chunks(2) {
                    if let [k, Value::BulkString(v)] = pair
                        && as_string(k).as_deref() == Some(ENTRY_FIELD)
                    {
                        found = Payload::Bytes(v.clone());
                    }
                }
                found
            }
        };
        out.push(StreamEntry { shard, id, payload });
    }
    out
}

/// Parses an XREADGROUP reply over several streams; `shards` maps each
/// stream key to its shard.
pub fn parse_read(reply: Value, shards: &HashMap<String, u16>) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    let streams: Vec<(Value, Value)> = match reply {
        Value::Map(m) => m,
        other => items(other)
            .into_iter()
            .filter_map(|s| {
                let mut it = items(s).into_iter();
                Some((it.next()?, it.next()?))
            })
            .collect(),
    };
    for (key, entries) in streams {
        if let Some(shard) = as_string(&key).and_then(|k| shards.get(&k).copied()) {
            out.extend(parse_entries(shard, entries));
        }
    }
    out
}

/// Parses an XAUTOCLAIM reply: the next cursor and the claimed entries
/// (entries deleted meanwhile are dropped from the PEL by Redis 7).
pub fn parse_autoclaim(shard: u16, reply: Value) -> (String, Vec<StreamEntry>) {
    let mut it = items(reply).into_iter();
    let next = it
        .next()
        .as_ref()
        .and_then(as_string)
        .unwrap_or_else(|| "0-0".to_owned());
    let claimed = it
        .next()
        .map(|v| parse_entries(shard, v))
        .unwrap_or_default();
    (next, claimed)
}

/// Why an entry's content cannot be projected.
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    /// The entry has no `e` field.
    #[error("stream entry has no field {ENTRY_FIELD:?}")]
    MissingField,
    /// The bytes do not decode.
    #[error(transparent)]
    Decode(#[from] iot_core::event::DecodeError),
}

/// Decodes an entry's payload; `Ok(None)` for a deleted entry.
pub fn decode(payload: &Payload) -> Result<Option<Entry>, BadEntry> {
    match payload {
        Payload::Bytes(b) => Ok(Some(Entry::decode(b)?)),
        Payload::Missing => Err(BadEntry::MissingField),
        Payload::Deleted => Ok(None),
    }
}

/// Whether the event's timestamp and epoch are in the range the scripts
/// compare exactly (|ts| and epoch at most 2^52).
pub fn in_range(ts_ms: i64, epoch: u64) -> bool {
    ts_ms.unsigned_abs() <= MAX_EVENT_VALUE as u64 && epoch <= MAX_EVENT_VALUE as u64
}

/// Whether an event passes [`in_range`].
pub fn event_in_range(ev: &Event) -> bool {
    in_range(ev.ts_ms, ev.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_read_replies_with_deleted_and_foreign_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("stream:events:{1}"),
            Value::Array(vec![
                Value::Array(vec![bulk("5-0"), Value::Array(vec![bulk("e"), bulk("xy")])]),
                Value::Array(vec![bulk("6-0"), Value::Nil]),
                Value::Array(vec![bulk("7-1"), Value::Array(vec![bulk("x"), bulk("1")])]),
            ]),
        ])]);
        let shards = HashMap::from([("stream:events:{1}".to_owned(), 1u16)]);
        let got = parse_read(reply, &shards);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].payload, Payload::Bytes(b"xy".to_vec()));
        assert_eq!(got[0].shard, 1);
        assert_eq!(got[1].payload, Payload::Deleted);
        assert_eq!(got[2].payload, Payload::Missing);
        assert_eq!(got[2].id_ms(), 7);
        assert!(parse_read(Value::Nil, &shards).is_empty());
    }

    #[test]
    fn bad_payloads_are_errors_not_panics() {
        assert!(matches!(
            decode(&Payload::Missing),
            Err(BadEntry::MissingField)
        ));
        assert!(decode(&Payload::Bytes(vec![1, 0xc1])).is_err());
        assert!(decode(&Payload::Bytes(vec![])).is_err());
        assert!(
            decode(&Payload::Deleted)
                .expect("deleted is fine")
                .is_none()
        );
    }

    #[test]
    fn range_guard() {
        assert!(in_range(1_700_000_000_000, 7));
        assert!(in_range(-5, 0));
        assert!(!in_range(i64::MAX, 1));
        assert!(!in_range(0, u64::MAX));
    }
}
