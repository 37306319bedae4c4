//! HTTP interface: shared state, route table, and JSON bodies for every error.

pub mod admin;
pub mod auth;
pub mod body;
pub mod check;
pub mod errors;
pub mod openapi;
pub mod ops;
pub mod usage;

use std::sync::Arc;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::header;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::web;
use metrics_exporter_prometheus::PrometheusHandle;
use sea_orm::DatabaseConnection;
use secrecy::SecretString;

use crate::actors::registry::KeyRegistry;
use crate::amqp::ownership::Ownership;
use crate::clock::SharedClock;
use crate::owners::Owners;
use crate::readiness::Readiness;

/// What every handler can reach.
pub struct AppState {
    pub db: DatabaseConnection,
    pub clock: SharedClock,
    /// `None` disables the admin routes (503).
    pub admin_password: Option<SecretString>,
    pub max_body_bytes: usize,
    pub metrics: PrometheusHandle,
    pub readiness: Arc<Readiness>,
    pub registry: KeyRegistry,
    /// Answers from each key's owner (this instance or another).
    pub owners: Owners,
    /// The shards this instance owns; `None` without a broker.
    pub ownership: Option<Arc<Ownership>>,
}

/// The route table of SPEC §3.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/openapi.json", web::get().to(openapi::serve_document))
        .service(
            web::resource("/users/{username}/apikeys")
                .route(web::post().to(admin::create_key))
                .route(web::get().to(admin::list_keys)),
        )
        .service(
            web::resource("/users/{username}/apikeys/{id}")
                .route(web::get().to(admin::get_key))
                .route(web::patch().to(admin::patch_key))
                .route(web::delete().to(admin::delete_key)),
        )
        .route("/keys/{id}/check", web::post().to(check::check_key))
        .route("/keys/{id}/usage", web::get().to(usage::key_usage))
        .service(
            web::resource("/keys/{id}/reservations").route(web::get().to(check::key_reservations)),
        );
}

/// Gives every error response that is not JSON yet (unknown route, wrong method, …) a `{"detail"}` body.
pub fn json_error_bodies<B: MessageBody + 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new()
        .default_handler_client(json_detail_for_plain_errors)
        .default_handler_server(json_detail_for_plain_errors)
}

fn json_detail_for_plain_errors<B: MessageBody + 'static>(
    response: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(
            response.map_into_left_body(),
        ));
    }
    let status = response.status();
    let (request, _) = response.into_parts();
    let detail = status.canonical_reason().unwrap_or("error").to_string();
    let new_response = errors::json_error(status, detail).map_into_boxed_body();
    let response: ServiceResponse<EitherBody<B, BoxBody>> =
        ServiceResponse::new(request, new_response).map_into_right_body();
    Ok(ErrorHandlerResponse::Response(response))
}
