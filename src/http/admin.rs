//! Admin key routes of SPEC §3: create, list, get, change and delete a user's API keys.

use actix_web::{web, HttpResponse};
use entity::api_keys::Model;
use serde::{Deserialize, Serialize};

use super::auth::Admin;
use super::body::{parse_json, present, read_body};
use super::errors::ApiError;
use super::AppState;
use crate::db::api_keys::{self, CreateKeyError, KeyChange, NewKey};
use crate::domain::quota::format_instant;

/// Longest accepted username, the width of the `username` column.
const MAX_USERNAME_CHARS: usize = 255;
/// Largest key id accepted from a client: 2^53, the largest integer JavaScript clients read
/// exactly from JSON (README, "Choices").
pub const MAX_KEY_ID: i64 = 1 << 53;

/// A key as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct KeyView {
    pub id: i64,
    pub username: String,
    pub description: String,
    pub created_at: String,
    pub token_quota_monthly: Option<i64>,
    pub tokens_used_this_month: i64,
    pub quota_reset_at: String,
}

impl From<Model> for KeyView {
    fn from(key: Model) -> Self {
        KeyView {
            id: key.id,
            username: key.username,
            description: key.description,
            created_at: format_instant(key.created_at),
            token_quota_monthly: key.token_quota_monthly,
            tokens_used_this_month: key.tokens_used_this_month,
            quota_reset_at: format_instant(key.quota_reset_at),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    id: Option<i64>,
    description: Option<String>,
    token_quota_monthly: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKeyBody {
    description: Option<String>,
    /// Absent: untouched; `0` or `null`: cleared (unlimited).
    #[serde(default, deserialize_with = "present")]
    token_quota_monthly: Option<Option<i64>>,
    reset_usage: Option<bool>,
}

/// A quota as given by an operator: ≥ 0, where 0 (or null) means unlimited.
fn quota_from_input(quota: Option<i64>) -> Result<Option<i64>, ApiError> {
    match quota {
        None | Some(0) => Ok(None),
        Some(q) if q < 0 => Err(ApiError::Unprocessable(format!(
            "token_quota_monthly must be >= 0 (0 clears the quota), got {q}"
        ))),
        Some(q) => Ok(Some(q)),
    }
}

/// Descriptions are free text, but without control characters (PostgreSQL refuses NUL).
fn checked_description(description: Option<String>) -> Result<Option<String>, ApiError> {
    match description {
        Some(text)
            if text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            Err(ApiError::Unprocessable(
                "description must not contain control characters".into(),
            ))
        }
        other => Ok(other),
    }
}

/// 1-255 printable characters. A path that was not UTF-8 once percent-decoded reaches here with
/// U+FFFD in place of the bad bytes (actix decodes lossily), so that character is refused too.
fn checked_username(username: &str) -> Result<(), ApiError> {
    let chars = username.chars().count();
    if chars == 0
        || chars > MAX_USERNAME_CHARS
        || username
            .chars()
            .any(|c| c.is_control() || c == char::REPLACEMENT_CHARACTER)
    {
        return Err(ApiError::Unprocessable(format!(
            "username must be 1-{MAX_USERNAME_CHARS} printable characters"
        )));
    }
    Ok(())
}

/// Parses the `{id}` path segment: not an integer ≥ 1 → 400, above [`MAX_KEY_ID`] → 422.
pub fn parse_key_id(raw: &str) -> Result<i64, ApiError> {
    let all_digits = !raw.is_empty() && raw.bytes().all(|byte| byte.is_ascii_digit());
    match raw.parse::<i64>() {
        Ok(id) if id >= 1 => checked_key_id(id),
        // Digits only, yet no i64: far above the range.
        Err(_) if all_digits => checked_key_id(i64::MAX),
        _ => Err(ApiError::BadRequest(format!(
            "API key id must be an integer >= 1, got {raw:?}"
        ))),
    }
}

/// A key id within `1..=MAX_KEY_ID`.
fn checked_key_id(id: i64) -> Result<i64, ApiError> {
    if (1..=MAX_KEY_ID).contains(&id) {
        Ok(id)
    } else {
        Err(ApiError::Unprocessable(format!(
            "API key id must be between 1 and {MAX_KEY_ID}, got {id}"
        )))
    }
}

fn not_found(username: &str, id: i64) -> ApiError {
    ApiError::NotFound(format!("user {username:?} has no API key {id}"))
}

pub async fn create_key(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let username = path.into_inner();
    checked_username(&username)?;
    let body: CreateKeyBody = parse_json(&read_body(payload, state.max_body_bytes).await?, true)?;
    if let Some(id) = body.id {
        checked_key_id(id)?;
    }
    let new_key = NewKey {
        id: body.id,
        username,
        description: checked_description(body.description)?.unwrap_or_default(),
        token_quota_monthly: quota_from_input(body.token_quota_monthly)?,
    };
    match api_keys::create_key(&state.db, new_key, state.clock.now()).await {
        Ok(key) => {
            // An actor (here or at the owner) may hold a negative entry for this id; the next
            // check must see the key.
            state.owners.created(key.id).await;
            tracing::info!(api_key_id = key.id, username = %key.username, "API key created");
            Ok(HttpResponse::Created().json(KeyView::from(key)))
        }
        Err(CreateKeyError::IdTaken(id)) => {
            Err(ApiError::Conflict(format!("API key {id} already exists")))
        }
        Err(CreateKeyError::Database(error)) => Err(error.into()),
    }
}

pub async fn list_keys(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    checked_username(&path)?;
    let keys = api_keys::list_user_keys(&state.db, &path).await?;
    Ok(HttpResponse::Ok().json(keys.into_iter().map(KeyView::from).collect::<Vec<_>>()))
}

pub async fn get_key(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (username, raw_id) = path.into_inner();
    checked_username(&username)?;
    let id = parse_key_id(&raw_id)?;
    match api_keys::find_user_key(&state.db, &username, id).await? {
        Some(key) => Ok(HttpResponse::Ok().json(KeyView::from(key))),
        None => Err(not_found(&username, id)),
    }
}

pub async fn patch_key(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (username, raw_id) = path.into_inner();
    checked_username(&username)?;
    let id = parse_key_id(&raw_id)?;
    let body: PatchKeyBody = parse_json(&read_body(payload, state.max_body_bytes).await?, false)?;
    let change = KeyChange {
        description: checked_description(body.description)?,
        token_quota_monthly: match body.token_quota_monthly {
            None => None,
            Some(quota) => Some(quota_from_input(quota)?),
        },
        reset_usage: body.reset_usage.unwrap_or(false),
    };
    // Through the key's owner: the next check, on any instance, sees the change.
    let now = state.clock.now();
    match state
        .owners
        .update(&state.db, id, &username, change, now)
        .await?
    {
        Some(key) => Ok(HttpResponse::Ok().json(KeyView::from(key))),
        None => Err(not_found(&username, id)),
    }
}

pub async fn delete_key(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (username, raw_id) = path.into_inner();
    checked_username(&username)?;
    let id = parse_key_id(&raw_id)?;
    if !state.owners.delete(&state.db, id, &username).await? {
        return Err(not_found(&username, id));
    }
    tracing::info!(api_key_id = id, username = %username, "API key deleted");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": id })))
}
