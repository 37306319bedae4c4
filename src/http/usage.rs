//! `GET /keys/{id}/usage`: the current window (as the key's actor sees it) and the history, newest first.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::admin::parse_key_id;
use super::auth::Admin;
use super::errors::ApiError;
use super::AppState;
use crate::db::rollover::usage_history;
use crate::domain::quota::format_instant;
use crate::domain::window::window_ending_at;

pub async fn key_usage(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_key_id(&path)?;
    let Some(current) = state.owners.describe(id).await? else {
        return Err(ApiError::NotFound(format!("no API key {id}")));
    };
    let window = window_ending_at(current.reset_at);
    let history: Vec<_> = usage_history(&state.db, id)
        .await?
        .into_iter()
        .map(|row| {
            json!({
                "period_start": format_instant(row.period_start),
                "period_end": format_instant(row.period_end),
                "tokens": row.tokens,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "api_key_id": id,
        "current": {
            "period_start": format_instant(window.start),
            "period_end": format_instant(window.end),
            "tokens": current.used,
            "token_quota_monthly": current.quota,
            "remaining": current.decide(None).remaining,
        },
        "history": history,
    })))
}
