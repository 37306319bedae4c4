//! `Admin` extractor: HTTP Basic `admin:<admin.password>`, compared in constant time.

use secrecy::ExposeSecret;
use std::future::{ready, Ready};

use actix_web::http::header::{HeaderValue, AUTHORIZATION};
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use actix_web_httpauth::headers::authorization::{Basic, Scheme};
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::AppState;

const ADMIN_USER: &str = "admin";

/// Proof that the request carries the admin credentials.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Admin, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Admin, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Unavailable("application state missing".into()))?;
    let Some(expected) = state
        .admin_password
        .as_ref()
        .map(ExposeSecret::expose_secret)
    else {
        return Err(ApiError::AdminDisabled);
    };
    let basic = basic_credentials(req).ok_or(ApiError::Unauthorized)?;
    let user_matches = basic.user_id().as_bytes().ct_eq(ADMIN_USER.as_bytes());
    let password_matches = basic
        .password()
        .unwrap_or_default()
        .as_bytes()
        .ct_eq(expected.as_bytes());
    if bool::from(user_matches & password_matches) {
        Ok(Admin)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The Basic credentials of the request. The scheme name is case-insensitive (RFC 9110 §11.1),
/// while the parser used here only knows `Basic`, so the scheme is normalized first.
fn basic_credentials(req: &HttpRequest) -> Option<Basic> {
    let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = header.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let normalized = HeaderValue::from_str(&format!("Basic {}", credentials.trim())).ok()?;
    Basic::parse(&normalized).ok()
}
