//! The device registry: who may connect, with which secret.
//!
//! A device's secret is 32 random bytes, base64url-encoded, returned once at
//! registration; the table keeps only its SHA-256. The MQTT username is the
//! phyID and the password is the secret.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use iot_core::PhyId;
use rand::RngCore as _;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::Row as _;
use sqlx::postgres::PgRow;

use crate::{Store, StoreError};

/// A registered device (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// The phyID (MQTT ClientId and username).
    pub phy_id: String,
    /// Disabled devices are refused at CONNECT and disconnected.
    pub enabled: bool,
    /// Free-form string labels.
    pub labels: Map<String, Value>,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The answer of a credential check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// Known, enabled, and the secret matches.
    Valid,
    /// Known, but the secret does not match.
    WrongSecret,
    /// Known and disabled.
    Disabled,
    /// Not registered.
    Unknown,
}

/// Filters of [`Store::list_devices`].
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// Only enabled (true) or disabled (false) devices.
    pub enabled: Option<bool>,
    /// Only phyIDs starting with this.
    pub prefix: Option<String>,
    /// Only devices having every one of these labels with these values.
    pub labels: Map<String, Value>,
}

/// A new random secret: 32 bytes, base64url without padding (43 characters).
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a secret.
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn device_from_row(row: &PgRow) -> Result<Device, sqlx::Error> {
    let labels: Value = row.try_get("labels")?;
    Ok(Device {
        phy_id: row.try_get("phy_id")?,
        enabled: row.try_get("enabled")?,
        labels: match labels {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

const COLUMNS: &str = "phy_id, enabled, labels, created_at, updated_at";

impl Store {
    /// Registers `phy` and returns the device and its secret (shown once).
    /// [`StoreError::Conflict`] if it is registered already.
    pub async fn register_device(
        &self,
        phy: &PhyId,
        labels: Map<String, Value>,
        enabled: bool,
    ) -> Result<(Device, String), StoreError> {
        let secret = generate_secret();
        let hash = hash_secret(secret.as_bytes());
        let row = sqlx::query(
            "INSERT INTO devices (phy_id, secret_hash, enabled, labels) VALUES ($1, $2, $3, $4)
             ON CONFLICT (phy_id) DO NOTHING
             RETURNING phy_id, enabled, labels, created_at, updated_at",
        )
        .bind(phy.as_str())
        .bind(&hash[..])
        .bind(enabled)
        .bind(Value::Object(labels))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok((device_from_row(&row)?, secret)),
            None => Err(StoreError::Conflict),
        }
    }

    /// One device, if registered.
    pub async fn device(&self, phy: &PhyId) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM devices WHERE phy_id = $1"
        )))
        .bind(phy.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from_row).transpose()?)
    }

    /// Devices in phyID order after `after`, at most `limit`.
    pub async fn list_devices(
        &self,
        filter: &DeviceFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Device>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM devices
             WHERE ($1::text IS NULL OR phy_id > $1)
               AND ($2::boolean IS NULL OR enabled = $2)
               AND ($3::text IS NULL OR starts_with(phy_id, $3))
               AND labels @> $4
             ORDER BY phy_id LIMIT $5"
        )))
        .bind(after)
        .bind(filter.enabled)
        .bind(filter.prefix.as_deref())
        .bind(Value::Object(filter.labels.clone()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(device_from_row).collect::<Result<_, _>>()?)
    }

    /// Changes `enabled` and/or replaces the labels. [`StoreError::NotFound`]
    /// if the device is not registered.
    pub async fn update_device(
        &self,
        phy: &PhyId,
        enabled: Option<bool>,
        labels: Option<Map<String, Value>>,
    ) -> Result<Device, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE devices SET enabled = COALESCE($2, enabled), labels = COALESCE($3, labels),
                    updated_at = now()
             WHERE phy_id = $1 RETURNING {COLUMNS}"
        )))
        .bind(phy.as_str())
        .bind(enabled)
        .bind(labels.map(Value::Object))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(device_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    /// Removes a device; `false` if it was not registered.
    pub async fn delete_device(&self, phy: &PhyId) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM devices WHERE phy_id = $1")
            .bind(phy.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Which of `phys` are registered and enabled (for re-checking the
    /// devices an ingest holds: the others were disabled or deleted since
    /// they connected). One query per call; callers batch (a few hundred
    /// phyIDs per call).
    pub async fn enabled_devices(
        &self,
        phys: &[PhyId],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if phys.is_empty() {
            return Ok(Default::default());
        }
        let ids: Vec<&str> = phys.iter().map(PhyId::as_str).collect();
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT phy_id FROM devices WHERE phy_id = ANY($1) AND enabled")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Checks a device's credentials.
    pub async fn check_credentials(
        &self,
        phy: &PhyId,
        secret: &[u8],
    ) -> Result<Credential, StoreError> {
        let row: Option<(Vec<u8>, bool)> =
            sqlx::query_as("SELECT secret_hash, enabled FROM devices WHERE phy_id = $1")
                .bind(phy.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            None => Credential::Unknown,
            Some((hash, enabled)) => {
                if !constant_time_eq(&hash, &hash_secret(secret)) {
                    Credential::WrongSecret
                } else if !enabled {
                    Credential::Disabled
                } else {
                    Credential::Valid
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_url_safe() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
