//! The device registry in PostgreSQL: who may connect (ingest auth mode
//! `registry`: MQTT username = phyID, password = the secret).
//!
//! `POST /api/devices` registers a device and returns its secret, once (only
//! its SHA-256 is stored); `GET /api/devices` lists them a page at a time;
//! `PATCH /api/devices/{phyID}` enables, disables or relabels one;
//! `DELETE /api/devices/{phyID}` removes it. Writes need a write token (a
//! read token is 403). Without `database.url` these routes answer 503
//! `database_not_configured`; while PostgreSQL is away, 503
//! `database_unavailable`.
//!
//! After a disable or a delete the api publishes a
//! [`Revocation`](iot_core::control::Revocation) on Redis
//! ([`Keys::auth_revocations`](iot_core::Keys::auth_revocations)): every
//! ingest in mode `registry` drops the device's cached verdicts and closes
//! its connection at once. Publishing is best effort (the change is in
//! PostgreSQL already); an ingest that misses it finds the change at its
//! next re-check, within its credential cache TTL.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use iot_core::PhyId;
use iot_service::Status;
use iot_store::StoreError;
use iot_store::devices::{Device, DeviceFilter};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::cursor::RegistryCursor;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{DevicePath, NoParams, StrictJson, StrictQuery};
use crate::labels;
use crate::params;
use crate::state::AppState;
use crate::timestamp::rfc3339_dt;

/// Longest the presence answer waits for the registry entry it adds.
pub const PRESENCE_LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);

fn yes() -> bool {
    true
}

/// A device to register.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The device's phyID (its MQTT ClientId and username): 1 to 64
    /// characters of `[A-Za-z0-9._-]`.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// String labels: at most 32; keys 1 to 64 characters of
    /// `[A-Za-z0-9._/-]`, values at most 256 bytes. Default none.
    #[serde(default)]
    #[schema(example = json!({"site": "berlin", "model": "t1000"}))]
    pub labels: BTreeMap<String, String>,
    /// Whether it may connect. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// Changes to a registered device; at least one field.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// Enable or disable it (a disabled device is refused at CONNECT and
    /// disconnected by the ingests at once).
    pub enabled: Option<bool>,
    /// Replaces all its labels (same rules as at registration).
    #[schema(example = json!({"site": "hamburg"}))]
    pub labels: Option<BTreeMap<String, String>>,
}

/// A registered device (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisteredDevice {
    /// The phyID.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// Whether it may connect.
    pub enabled: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Registered at, RFC 3339.
    pub created_at: String,
    /// Last changed at, RFC 3339.
    pub updated_at: String,
}

/// A new registration: the device and its secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    /// The device.
    #[serde(flatten)]
    pub device: RegisteredDevice,
    /// The MQTT password of the device: 43 characters of base64url. Shown
    /// only in this answer; only its SHA-256 is stored, so a lost secret
    /// means deleting and registering the device again.
    pub secret: String,
}

/// A page of registered devices.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisteredDeviceList {
    /// Ordered by phyID.
    pub devices: Vec<RegisteredDevice>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

/// What the presence answer (`GET /api/devices/{phyID}`) adds for a
/// registered device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegistryInfo {
    /// Whether it may connect.
    pub enabled: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Registered at, RFC 3339.
    pub created_at: String,
}

/// `GET /api/devices`: filters and paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RegistryParams {
    /// Devices per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
    /// Only enabled (`true`) or disabled (`false`) devices.
    pub enabled: Option<bool>,
    /// Only phyIDs starting with this (characters of `[A-Za-z0-9._-]`).
    #[param(example = "dev-")]
    pub prefix: Option<String>,
    /// Only devices with all these labels: `key:value` pairs separated by
    /// commas, such as `site:berlin,model:t1000` (a value holding a comma
    /// cannot be filtered on).
    #[param(example = "site:berlin")]
    pub labels: Option<String>,
}

impl From<&Device> for RegisteredDevice {
    fn from(d: &Device) -> Self {
        Self {
            phy_id: d.phy_id.clone(),
            enabled: d.enabled,
            labels: labels::to_strings(&d.labels),
            created_at: rfc3339_dt(&d.created_at),
            updated_at: rfc3339_dt(&d.updated_at),
        }
    }
}

/// Tells every ingest that `phy` may no longer connect (see the module
/// doc); logs, never fails the request.
async fn announce_revocation(state: &AppState, phy: &PhyId, why: &str) {
    let message = iot_core::control::Revocation {
        phy_id: phy.clone(),
        why: why.to_owned(),
    };
    let mut conn = state.redis.get();
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(state.keys.auth_revocations()).arg(message.encode());
    let publish = cmd.query_async::<u64>(&mut conn);
    match tokio::time::timeout(state.redis_timeout, publish).await {
        Ok(Ok(listeners)) => {
            tracing::debug!(phy_id = %phy, why, listeners, "revocation announced to the ingests");
        }
        Ok(Err(e)) => {
            tracing::warn!(phy_id = %phy, why, error = %e,
                "cannot announce the revocation; ingests close the device at their next re-check");
        }
        Err(_) => {
            tracing::warn!(phy_id = %phy, why,
                "announcing the revocation timed out; ingests close the device at their next re-check");
        }
    }
}

fn not_registered(phy: &PhyId) -> ApiError {
    ApiError::NotFound {
        code: "device_not_registered",
        message: format!("device {phy} is not registered; POST /api/devices registers it"),
    }
}

/// Registers a device and returns its secret, this once.
///
/// The secret is 32 random bytes (base64url) and is the device's MQTT
/// password (its username is the phyID); only its SHA-256 is stored. Needs
/// a write token.
#[utoipa::path(post, path = "/api/devices", operation_id = "register_device", tag = "registry",
    request_body = RegisterRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered; the secret is in this answer only", body = Registration,
         headers(("Location" = String, description = "/api/devices/{phyID}"))),
        (status = 400, description = "Invalid body, phyID or labels", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "A read token: this route needs a write token", body = ErrorBody),
        (status = 409, description = "The phyID is registered already", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<AppState>,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
    StrictJson(req): StrictJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let phy = PhyId::new(req.phy_id)
        .map_err(|e| ApiError::bad_request("invalid_phy_id", e.to_string()))?;
    let labels = labels::validate(req.labels)?;
    let store = state.store()?;
    let (device, secret) = state
        .db(async {
            store
                .register_device(&phy, labels, req.enabled)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict => ApiError::Conflict {
                        code: "device_exists",
                        message: format!(
                            "device {phy} is registered already; DELETE it first to issue a new secret"
                        ),
                    },
                    e => e.into(),
                })
        })
        .await?;
    tracing::info!(phy_id = %phy, enabled = device.enabled, "device registered");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/devices/{phy}"))],
        Json(Registration {
            device: RegisteredDevice::from(&device),
            secret,
        }),
    )
        .into_response())
}

/// Registered devices by phyID, a page at a time, optionally filtered.
#[utoipa::path(get, path = "/api/devices", operation_id = "list_registered_devices", tag = "registry",
    params(RegistryParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of registered devices", body = RegisteredDeviceList),
        (status = 400, description = "Invalid limit, cursor, prefix, labels or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<RegistryParams>,
) -> Result<Json<RegisteredDeviceList>, ApiError> {
    let limit = params::limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(RegistryCursor::decode)
        .transpose()?;
    let prefix = match q.prefix {
        None => None,
        Some(p) => {
            if p.is_empty()
                || p.len() > iot_core::ids::PHY_ID_MAX_LEN
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("prefix={p:.80} must be 1 to 64 characters of [A-Za-z0-9._-]"),
                ));
            }
            Some(p)
        }
    };
    let filter = DeviceFilter {
        enabled: q.enabled,
        prefix,
        labels: q
            .labels
            .as_deref()
            .map(labels::parse_filter)
            .transpose()?
            .unwrap_or_default(),
    };
    let store = state.store()?;
    let mut devices = state
        .db(async {
            Ok(store
                .list_devices(
                    &filter,
                    after.as_ref().map(|c| c.after.as_str()),
                    limit as i64 + 1,
                )
                .await?)
        })
        .await?;
    let more = devices.len() > limit;
    devices.truncate(limit);
    let next_cursor = more
        .then(|| devices.last())
        .flatten()
        .and_then(|d| PhyId::new(d.phy_id.as_str()).ok())
        .map(|after| RegistryCursor { after }.encode());
    Ok(Json(RegisteredDeviceList {
        devices: devices.iter().map(RegisteredDevice::from).collect(),
        next_cursor,
    }))
}

/// Enables or disables a registered device and/or replaces its labels.
/// Needs a write token.
#[utoipa::path(patch, path = "/api/devices/{phyID}", operation_id = "update_registered_device", tag = "registry",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
    ),
    request_body = DevicePatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The device after the change", body = RegisteredDevice),
        (status = 400, description = "Invalid phyID, an empty or invalid body, or invalid labels", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "A read token: this route needs a write token", body = ErrorBody),
        (status = 404, description = "The device is not registered", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
    StrictJson(patch): StrictJson<DevicePatch>,
) -> Result<Json<RegisteredDevice>, ApiError> {
    if patch.enabled.is_none() && patch.labels.is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "nothing to change: give enabled and/or labels",
        ));
    }
    let labels = patch.labels.map(labels::validate).transpose()?;
    let store = state.store()?;
    let device = state
        .db(async {
            store
                .update_device(&phy, patch.enabled, labels)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => not_registered(&phy),
                    e => e.into(),
                })
        })
        .await?;
    tracing::info!(phy_id = %phy, enabled = device.enabled, "registered device changed");
    if patch.enabled == Some(false) {
        announce_revocation(&state, &phy, "disabled").await;
    }
    Ok(Json(RegisteredDevice::from(&device)))
}

/// Removes a device from the registry: with auth mode `registry` it can no
/// longer connect (and is disconnected by the ingests at once). Its
/// history stays. Needs a write token.
#[utoipa::path(delete, path = "/api/devices/{phyID}", operation_id = "delete_registered_device", tag = "registry",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Invalid phyID or a parameter was given", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "A read token: this route needs a write token", body = ErrorBody),
        (status = 404, description = "The device is not registered", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    let store = state.store()?;
    let removed = state
        .db(async { Ok(store.delete_device(&phy).await?) })
        .await?;
    if !removed {
        return Err(not_registered(&phy));
    }
    tracing::info!(phy_id = %phy, "device removed from the registry");
    announce_revocation(&state, &phy, "deleted").await;
    Ok(StatusCode::NO_CONTENT)
}

/// The registry entry for the presence answer: `None` without a database,
/// while the `database` check is not ok, after
/// [`PRESENCE_LOOKUP_TIMEOUT`], or on any error — the presence answer never
/// fails or waits because of PostgreSQL.
pub async fn presence_lookup(state: &AppState, phy: &PhyId) -> Option<RegistryInfo> {
    let store = state.db.as_ref()?;
    if state.health.status_of(crate::database::HEALTH_CHECK) != Some(Status::Ok) {
        return None;
    }
    match tokio::time::timeout(PRESENCE_LOOKUP_TIMEOUT, store.device(phy)).await {
        Ok(Ok(d)) => d.map(|d| RegistryInfo {
            enabled: d.enabled,
            labels: labels::to_strings(&d.labels),
            created_at: rfc3339_dt(&d.created_at),
        }),
        Ok(Err(e)) => {
            tracing::debug!(phy_id = %phy, error = %e, "registry lookup for the presence answer failed");
            None
        }
        Err(_) => {
            tracing::debug!(phy_id = %phy, "registry lookup for the presence answer timed out");
            None
        }
    }
}
