//! `POST /keys/{id}/check`: the quota answer of SPEC §2.2 over HTTP (200, 429 or 404), holds
//! included (SPEC §2.3); `GET /keys/{id}/reservations`: the key's live holds, from its owner.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use super::admin::parse_key_id;
use super::auth::Admin;
use super::body::read_body;
use super::errors::ApiError;
use super::AppState;
use crate::domain::check::{decode_check_body, CheckReply};
use crate::domain::outcome::CheckOutcome;

pub async fn check_key(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = parse_key_id(&path)?;
    let body = read_body(payload, state.max_body_bytes).await?;
    let reply = match decode_check_body(&body) {
        Ok(ask) => state.owners.check(id, ask).await?,
        Err(rejection) => CheckReply::malformed(Some(id), &rejection),
    };
    Ok(HttpResponse::build(http_status(reply.outcome)).json(reply))
}

/// The HTTP status of a check's answer: the reply's `status` (SPEC §2.2), as a status line.
fn http_status(outcome: CheckOutcome) -> StatusCode {
    match outcome {
        CheckOutcome::Allowed | CheckOutcome::UnknownKey { allowed: true } => StatusCode::OK,
        CheckOutcome::QuotaReached => StatusCode::TOO_MANY_REQUESTS,
        CheckOutcome::UnknownKey { allowed: false } => StatusCode::NOT_FOUND,
        CheckOutcome::Malformed => StatusCode::BAD_REQUEST,
        CheckOutcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

pub async fn key_reservations(
    _admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_key_id(&path)?;
    match state.owners.reservations(id).await? {
        Some(reservations) => Ok(HttpResponse::Ok().json(reservations)),
        None => Err(ApiError::NotFound(format!("no API key {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_status_is_the_replys_status() {
        for outcome in CheckOutcome::ALL {
            assert_eq!(
                http_status(outcome).as_u16(),
                outcome.wire_status(),
                "{outcome:?}"
            );
        }
    }
}
