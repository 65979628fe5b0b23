//! Dead letters of the archive: stream entries PostgreSQL rejected (or that
//! do not decode), kept with the error instead of stalling the archive.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::Row as _;

use crate::{Store, StoreError};

/// An entry the archive could not store.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stream key.
    pub stream: String,
    /// Stream entry id.
    pub entry_id: String,
    /// The entry's fields, each value base64 ([`fields_json`]).
    pub fields: Value,
    /// Why it could not be stored.
    pub error: String,
}

/// A recorded dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterRecord {
    /// Stream key.
    pub stream: String,
    /// Stream entry id.
    pub entry_id: String,
    /// Field name -> base64 of its value.
    pub fields: Value,
    /// Why it could not be stored.
    pub error: String,
    /// When it was recorded (last time, if it was seen again).
    pub failed_at: DateTime<Utc>,
}

/// Text PostgreSQL accepts: NUL characters replaced.
pub fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// Field name -> base64 of the value, for a dead letter (always valid
/// jsonb, whatever bytes the entry holds).
pub fn fields_json<'a>(fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (pg_text(k), Value::String(b64.encode(v))))
            .collect::<Map<String, Value>>(),
    )
}

impl Store {
    /// Records dead letters; one seen again keeps its row with the newest
    /// error and time.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<u64, StoreError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "INSERT INTO archive_dead_letters (stream, entry_id, fields, error)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[])
             ON CONFLICT (stream, entry_id) DO UPDATE
               SET error = EXCLUDED.error, failed_at = now()",
        )
        .bind(
            letters
                .iter()
                .map(|l| pg_text(&l.stream))
                .collect::<Vec<_>>(),
        )
        .bind(
            letters
                .iter()
                .map(|l| pg_text(&l.entry_id))
                .collect::<Vec<_>>(),
        )
        .bind(letters.iter().map(|l| l.fields.clone()).collect::<Vec<_>>())
        .bind(
            letters
                .iter()
                .map(|l| pg_text(&l.error))
                .collect::<Vec<_>>(),
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The newest dead letters, at most `limit`.
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream, entry_id, fields, error, failed_at FROM archive_dead_letters
             ORDER BY failed_at DESC, stream, entry_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetterRecord {
                    stream: r.try_get("stream")?,
                    entry_id: r.try_get("entry_id")?,
                    fields: r.try_get("fields")?,
                    error: r.try_get("error")?,
                    failed_at: r.try_get("failed_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_base64_and_text_loses_its_nuls() {
        let v = fields_json([("e", b"\x00\xff".as_slice()), ("a\0b", b"x".as_slice())]);
        assert_eq!(v["e"], "AP8=");
        assert_eq!(v["a\u{fffd}b"], "eA==");
        assert_eq!(pg_text("a\0b"), "a\u{fffd}b");
    }
}
