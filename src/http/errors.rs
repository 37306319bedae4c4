//! `ApiError`: every failure an HTTP handler can return, mapped to a status and a JSON `{"detail"}`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use sea_orm::DbErr;

use crate::actors::key_actor::KeyError;
use crate::owners::OwnerError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing or wrong admin credentials (HTTP Basic, user admin)")]
    Unauthorized,
    #[error("admin API disabled: set admin.password in config.toml or QUOTA__ADMIN__PASSWORD")]
    AdminDisabled,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request body not received within {} s", .0.as_secs())]
    RequestTimeout(std::time::Duration),
    /// The database could not answer; the client may retry.
    #[error("database unavailable, try again")]
    Database(#[from] DbErr),
    #[error("{0}")]
    Unavailable(String),
}

impl From<OwnerError> for ApiError {
    fn from(error: OwnerError) -> Self {
        match error {
            OwnerError::Database(error) => ApiError::Database(error),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(error: KeyError) -> Self {
        // Each says why the key's state is out of reach; the client may retry every one.
        match error {
            KeyError::Load(_) | KeyError::Database(_) | KeyError::ActorStopped { .. } => {
                ApiError::Unavailable(error.to_string())
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::AdminDisabled | ApiError::Database(_) | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Database(error) = self {
            tracing::error!(error = %error, "database error while serving a request");
        }
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, r#"Basic realm="quota-keeper""#));
        }
        response.json(serde_json::json!({ "detail": self.to_string() }))
    }
}

/// Builds the JSON error response for a status and text (used by extractor error handlers).
pub fn json_error(status: StatusCode, detail: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "detail": detail.to_string() }))
}
