//! `GET /openapi.json`: the OpenAPI 3.1 document of the HTTP API, generated with utoipa.
//!
//! The operations are described here, one documentation stub per route of [`super::routes`], so
//! the handlers stay as they are; the key and check bodies are the handlers' own types
//! (`KeyView`, `CheckReply`), the bodies the handlers build with `json!` are described by the
//! types below. A test compares the route table with this document and validates real responses
//! of every route against it, so the two cannot drift apart unnoticed.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use utoipa::openapi::schema::{AnyOfBuilder, Ref, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::admin::KeyView;
use crate::domain::check::{CheckReply, CheckReplyBody};
use crate::domain::reservation::Reservation;

/// The name of the HTTP Basic scheme of the admin routes in the document (the stubs' `security`
/// repeat it as a literal: the attribute takes no constant).
const ADMIN_AUTH: &str = "admin_basic";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "quota-keeper",
        description = "Monthly token quota per API key: ops and admin routes (SPEC §3). \
                       Checks and usage events also travel over RabbitMQ (SPEC §2)."
    ),
    paths(
        healthz,
        readyz,
        metrics,
        openapi_json,
        create_key,
        list_keys,
        get_key,
        patch_key,
        delete_key,
        check_key,
        key_usage,
        key_reservations
    ),
    modifiers(&AdminBasicAuth),
    tags(
        (name = "ops", description = "Liveness, readiness, metrics; no credentials"),
        (name = "admin", description = "Keys, usage and checks; HTTP Basic admin:<admin.password>")
    )
)]
pub struct ApiDoc;

/// Adds the HTTP Basic security scheme the admin operations refer to.
struct AdminBasicAuth;

impl Modify for AdminBasicAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_AUTH,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("an OpenAPI document of plain structs always serializes")
    })
}

pub async fn serve_document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

/// Every error answer: `{"detail": "…"}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    pub detail: String,
}

/// `GET /healthz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz`, 200 and 503 alike.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    /// The failing dependencies: `database`, `broker`.
    pub failing: Vec<String>,
    /// `ok`, or why the database is not ready.
    pub database: String,
    /// `ok`, `not configured`, or why the broker is not consumed.
    pub broker: String,
    /// This process's id among the instances sharing the broker (absent without a broker).
    pub instance: Option<String>,
    /// The shard queues this instance consumes actively, whose keys it owns (absent without a broker).
    pub owned_shards: Option<Vec<u16>>,
}

/// `DELETE /users/{username}/apikeys/{id}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Deleted {
    /// The deleted key id.
    pub deleted: i64,
}

/// `GET /keys/{id}/usage`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct KeyUsage {
    pub api_key_id: i64,
    pub current: CurrentWindow,
    /// Closed windows, newest first.
    pub history: Vec<ClosedWindow>,
}

/// The current window as the key's owner sees it (committed plus consumed tokens).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CurrentWindow {
    /// RFC 3339 UTC.
    pub period_start: String,
    /// RFC 3339 UTC: the next reset.
    pub period_end: String,
    pub tokens: i64,
    /// `null`: unlimited.
    pub token_quota_monthly: Option<i64>,
    /// `null`: unlimited.
    pub remaining: Option<i64>,
}

/// One closed window of the usage history.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ClosedWindow {
    pub period_start: String,
    pub period_end: String,
    pub tokens: i64,
}

/// `POST /users/{username}/apikeys`; every field optional, unknown fields refused (422).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CreateKeyRequest {
    /// A key id owned by a gateway (≥ 1); assigned when absent. 409 if taken.
    pub id: Option<i64>,
    pub description: Option<String>,
    /// ≥ 0; 0 or `null` means unlimited.
    pub token_quota_monthly: Option<i64>,
}

/// `PATCH /users/{username}/apikeys/{id}`; absent fields are untouched, unknown ones refused (422).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PatchKeyRequest {
    pub description: Option<String>,
    /// ≥ 0; 0 or `null` clears the quota (unlimited); negative → 422.
    pub token_quota_monthly: Option<i64>,
    /// `true`: the counter goes to 0 and the window restarts at the 1st of next month.
    pub reset_usage: Option<bool>,
}

/// `POST /keys/{id}/check`; the body is optional.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CheckEstimate {
    /// Tokens the coming request is expected to use (≥ 0).
    pub tokens: Option<i64>,
    /// Hold this many tokens (1-10^12) if allowed; the check is decided on it. Needs `reservation_id`.
    pub reserve: Option<i64>,
    /// 1-128 characters, unique per key: the hold's idempotency key.
    pub reservation_id: Option<String>,
    /// 1-86400, default 900: the hold is released after this long unless settled.
    pub ttl_secs: Option<i64>,
}

// Documentation stubs, one per route: the handlers are in `ops`, `admin`, `check` and `usage`.

#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "The process runs", body = Health)))]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Database and broker ready", body = Readiness),
    (status = 503, description = "Not ready; `failing` names what", body = Readiness)))]
#[allow(dead_code)]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "Prometheus text format; every family present from the start",
     body = String, content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "This document", content_type = "application/json")))]
#[allow(dead_code)]
fn openapi_json() {}

#[utoipa::path(post, path = "/users/{username}/apikeys", tag = "admin",
    security(("admin_basic" = [])),
    params(("username" = String, Path, description = "1-255 printable characters")),
    request_body(content = Option<CreateKeyRequest>, description = "Optional"),
    responses(
        (status = 201, description = "The new key", body = KeyView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 409, description = "The id exists", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid field, username or unknown field", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn create_key() {}

#[utoipa::path(get, path = "/users/{username}/apikeys", tag = "admin",
    security(("admin_basic" = [])),
    params(("username" = String, Path)),
    responses(
        (status = 200, description = "The user's keys", body = Vec<KeyView>),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn list_keys() {}

#[utoipa::path(get, path = "/users/{username}/apikeys/{id}", tag = "admin",
    security(("admin_basic" = [])),
    params(("username" = String, Path), ("id" = i64, Path, description = "Key id ≥ 1")),
    responses(
        (status = 200, description = "The key (committed counter)", body = KeyView),
        (status = 400, description = "Invalid key id", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "Absent or not this user's", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn get_key() {}

#[utoipa::path(patch, path = "/users/{username}/apikeys/{id}", tag = "admin",
    security(("admin_basic" = [])),
    params(("username" = String, Path), ("id" = i64, Path, description = "Key id ≥ 1")),
    request_body(content = PatchKeyRequest),
    responses(
        (status = 200, description = "The key after the change", body = KeyView),
        (status = 400, description = "Invalid key id or malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "Absent or not this user's", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid or unknown field", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn patch_key() {}

#[utoipa::path(delete, path = "/users/{username}/apikeys/{id}", tag = "admin",
    security(("admin_basic" = [])),
    params(("username" = String, Path), ("id" = i64, Path, description = "Key id ≥ 1")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Invalid key id", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "Absent or not this user's", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn delete_key() {}

#[utoipa::path(post, path = "/keys/{id}/check", tag = "admin",
    security(("admin_basic" = [])),
    params(("id" = i64, Path, description = "Key id ≥ 1")),
    request_body(content = Option<CheckEstimate>, description = "Optional"),
    responses(
        (status = 200, description = "Allowed (also an unknown key under `allow`)", body = CheckReply),
        (status = 429, description = "Quota reached", body = CheckReply),
        (status = 404, description = "Unknown key under `check.unknown_key = deny`", body = CheckReply),
        (status = 400, description = "Invalid key id (`detail`) or malformed body (a check reply)",
         body = CheckReplyOrError),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Admin disabled or the key's state unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn check_key() {}

#[utoipa::path(get, path = "/keys/{id}/usage", tag = "admin",
    security(("admin_basic" = [])),
    params(("id" = i64, Path, description = "Key id ≥ 1")),
    responses(
        (status = 200, description = "Current window and history, newest first", body = KeyUsage),
        (status = 400, description = "Invalid key id", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "Admin disabled or database unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn key_usage() {}

#[utoipa::path(get, path = "/keys/{id}/reservations", tag = "admin",
    security(("admin_basic" = [])),
    params(("id" = i64, Path, description = "Key id ≥ 1")),
    responses(
        (status = 200, description = "The key's live holds, as its owner holds them", body = Vec<Reservation>),
        (status = 400, description = "Invalid key id", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "Admin disabled or the owner unavailable", body = ErrorBody)))]
#[allow(dead_code)]
fn key_reservations() {}

/// A check reply is documented as it travels.
impl PartialSchema for CheckReply {
    fn schema() -> RefOr<Schema> {
        CheckReplyBody::schema()
    }
}

impl ToSchema for CheckReply {
    fn name() -> std::borrow::Cow<'static, str> {
        CheckReplyBody::name()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        CheckReplyBody::schemas(schemas);
    }
}

/// A 400 of the check route: a bad path id gives `{"detail"}`, a malformed body a check reply.
/// Described by hand as `anyOf` (a derived untagged enum would be `oneOf`, and a check reply
/// carries a `detail` too).
pub struct CheckReplyOrError;

impl utoipa::PartialSchema for CheckReplyOrError {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(Ref::from_schema_name(CheckReply::name()))
            .item(Ref::from_schema_name(ErrorBody::name()))
            .into()
    }
}

impl ToSchema for CheckReplyOrError {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((CheckReply::name().into_owned(), CheckReply::schema()));
        CheckReply::schemas(schemas);
        schemas.push((ErrorBody::name().into_owned(), ErrorBody::schema()));
        ErrorBody::schemas(schemas);
    }
}
