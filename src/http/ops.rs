//! Ops routes: liveness, readiness (database and broker) and Prometheus metrics.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::readiness::BrokerState;

const DATABASE_PING_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// 200 when the database answers and the broker is consumed; else 503 naming what fails.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mut failing = Vec::new();
    let database = match tokio::time::timeout(DATABASE_PING_TIMEOUT, state.db.ping()).await {
        Ok(Ok(())) => match state.readiness.database_error() {
            None => "ok".to_string(),
            Some(error) => {
                failing.push("database");
                format!("last commit failed: {error}")
            }
        },
        Ok(Err(error)) => {
            failing.push("database");
            error.to_string()
        }
        Err(_) => {
            failing.push("database");
            "no answer within 2 s".to_string()
        }
    };
    let broker = match state.readiness.broker() {
        BrokerState::NotConfigured => "not configured".to_string(),
        BrokerState::Consuming => "ok".to_string(),
        BrokerState::Down(reason) => {
            failing.push("broker");
            reason
        }
    };
    let mut body = json!({
        "status": if failing.is_empty() { "ready" } else { "not ready" },
        "failing": failing,
        "database": database,
        "broker": broker,
    });
    if let Some(ownership) = &state.ownership {
        body["instance"] = ownership.instance().into();
        body["owned_shards"] = ownership.owned().into();
    }
    if failing.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
