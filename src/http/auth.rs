//! `Admin` extractor: HTTP Basic `admin:<admin.password>`, compared in constant time.

use std::future::{ready, Ready};

use actix_web::http::header::Header;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use actix_web_httpauth::headers::authorization::{Authorization, Basic};
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
    let Some(expected) = state.admin_password.as_deref() else {
        return Err(ApiError::AdminDisabled);
    };
    let credentials = Authorization::<Basic>::parse(req).map_err(|_| ApiError::Unauthorized)?;
    let basic = credentials.as_ref();
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
