//! Admin key routes: create, list, get, PATCH, DELETE, auth failures and bad bodies.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{at, spawn_app, spawn_app_on, Backend, TestApp, ADMIN_PASSWORD};

async fn detail_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("error bodies are JSON");
    body["detail"]
        .as_str()
        .expect("error bodies carry a detail string")
        .to_string()
}

async fn get_key(app: &TestApp, username: &str, id: i64) -> reqwest::Response {
    app.admin(Method::GET, &format!("/users/{username}/apikeys/{id}"))
        .send()
        .await
        .unwrap()
}

async fn patch(app: &TestApp, username: &str, id: i64, body: &str) -> reqwest::Response {
    app.admin(Method::PATCH, &format!("/users/{username}/apikeys/{id}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[actix_web::test]
async fn create_without_body_assigns_an_id_and_opens_the_current_window() {
    let app = spawn_app().await;
    let response = app
        .admin(Method::POST, "/users/alice/apikeys")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let key: Value = response.json().await.unwrap();
    assert!(key["id"].as_i64().unwrap() >= 1);
    assert_eq!(key["username"], "alice");
    assert_eq!(key["description"], "");
    assert_eq!(key["created_at"], "2026-11-23T10:00:00Z");
    assert_eq!(key["token_quota_monthly"], Value::Null);
    assert_eq!(key["tokens_used_this_month"], 0);
    assert_eq!(key["quota_reset_at"], "2026-12-01T00:00:00Z");
}

#[actix_web::test]
async fn create_with_an_id_registers_it_and_a_second_time_is_409() {
    let app = spawn_app().await;
    let key = app
        .create_key(
            "alice",
            json!({"id": 42, "description": "gateway key", "token_quota_monthly": 5000}),
        )
        .await;
    assert_eq!(key["id"], 42);
    assert_eq!(key["description"], "gateway key");
    assert_eq!(key["token_quota_monthly"], 5000);

    let again = app
        .admin(Method::POST, "/users/bob/apikeys")
        .json(&json!({"id": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    assert!(detail_of(again).await.contains("42"));

    // Assigned ids must not collide with the registered one (it does not move the sequence:
    // assignment skips taken ids instead).
    let assigned = app.create_key("alice", json!({})).await;
    assert_ne!(assigned["id"], 42, "{assigned}");
    assert_eq!(get_key(&app, "alice", 42).await.status(), 200);
}

#[actix_web::test]
async fn create_validates_its_body() {
    let app = spawn_app().await;
    let zero_quota = app
        .create_key("alice", json!({"token_quota_monthly": 0}))
        .await;
    assert_eq!(zero_quota["token_quota_monthly"], Value::Null);

    for (body, status) in [
        (r#"{"token_quota_monthly": -1}"#, 422),
        (r#"{"token_quota_monthly": "lots"}"#, 422),
        (r#"{"token_quota_monthly": 1.5}"#, 422),
        (r#"{"id": 0}"#, 422),
        (r#"{"id": "x"}"#, 422),
        (r#"{"unknown_field": 1}"#, 422),
        (r#"{"description": "#, 400),
        (r#"not json"#, 400),
    ] {
        let response = app
            .admin(Method::POST, "/users/alice/apikeys")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "body {body}");
        assert!(!detail_of(response).await.is_empty());
    }
    let keys: Value = app.admin_get_json("/users/alice/apikeys").await;
    assert_eq!(
        keys.as_array().unwrap().len(),
        1,
        "no rejected body created a key"
    );
}

#[actix_web::test]
async fn list_shows_only_that_users_keys_in_id_order() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 7})).await;
    app.create_key("bob", json!({"id": 5})).await;
    app.create_key("alice", json!({"id": 3})).await;
    let keys: Value = app.admin_get_json("/users/alice/apikeys").await;
    let ids: Vec<i64> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 7]);
    let nobody: Value = app.admin_get_json("/users/carol/apikeys").await;
    assert_eq!(nobody, json!([]));
}

#[actix_web::test]
async fn get_finds_the_users_key_only() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 9, "token_quota_monthly": 100}))
        .await;
    let found = get_key(&app, "alice", 9).await;
    assert_eq!(found.status(), 200);
    let key: Value = found.json().await.unwrap();
    assert_eq!(key["token_quota_monthly"], 100);

    assert_eq!(get_key(&app, "bob", 9).await.status(), 404);
    let absent = get_key(&app, "alice", 10).await;
    assert_eq!(absent.status(), 404);
    assert!(detail_of(absent).await.contains("10"));

    // Above 2^53 (even beyond i64) is a well-formed id out of range: 422 (README, "Choices").
    for far_id in ["9007199254740993", "99999999999999999999999"] {
        let response = app
            .admin(Method::GET, &format!("/users/alice/apikeys/{far_id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "id {far_id}");
    }
    for bad_id in ["abc", "0", "-4"] {
        let response = app
            .admin(Method::GET, &format!("/users/alice/apikeys/{bad_id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "id {bad_id}");
        assert!(detail_of(response).await.contains("id"));
    }
}

#[actix_web::test]
async fn patch_changes_only_the_fields_given() {
    let app = spawn_app().await;
    app.create_key(
        "alice",
        json!({"id": 1, "description": "old", "token_quota_monthly": 500}),
    )
    .await;

    let response = patch(&app, "alice", 1, r#"{"description": "new"}"#).await;
    assert_eq!(response.status(), 200);
    let key: Value = response.json().await.unwrap();
    assert_eq!(key["description"], "new");
    assert_eq!(key["token_quota_monthly"], 500, "absent quota untouched");

    let key: Value = patch(&app, "alice", 1, r#"{"token_quota_monthly": 800}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(key["token_quota_monthly"], 800);
    assert_eq!(key["description"], "new", "absent description untouched");

    let key: Value = patch(&app, "alice", 1, r#"{"token_quota_monthly": 0}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        key["token_quota_monthly"],
        Value::Null,
        "0 clears the quota"
    );
    let stored: Value = get_key(&app, "alice", 1).await.json().await.unwrap();
    assert_eq!(stored["token_quota_monthly"], Value::Null);

    let unchanged: Value = patch(&app, "alice", 1, "{}").await.json().await.unwrap();
    assert_eq!(unchanged, stored, "an empty change changes nothing");
}

#[actix_web::test]
async fn patch_rejects_bad_bodies_and_changes_nothing() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 1, "token_quota_monthly": 500}))
        .await;
    for (body, status) in [
        (r#"{"token_quota_monthly": -1}"#, 422),
        (r#"{"token_quota_monthly": "5"}"#, 422),
        (r#"{"reset_usage": "yes"}"#, 422),
        (r#"{"description": 5}"#, 422),
        (r#"{"quota": 5}"#, 422),
        (r#"[1, 2]"#, 422),
        (r#"{"description": "x""#, 400),
        ("", 400),
    ] {
        let response = patch(&app, "alice", 1, body).await;
        assert_eq!(response.status(), status, "body {body:?}");
        assert!(!detail_of(response).await.is_empty());
    }
    let key: Value = get_key(&app, "alice", 1).await.json().await.unwrap();
    assert_eq!(key["token_quota_monthly"], 500);
    assert_eq!(
        patch(&app, "bob", 1, r#"{"description": "x"}"#)
            .await
            .status(),
        404
    );
    assert_eq!(
        patch(&app, "alice", 2, r#"{"description": "x"}"#)
            .await
            .status(),
        404
    );
}

#[actix_web::test]
async fn reset_usage_zeroes_the_counter_and_moves_the_window_to_next_month() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 1, "token_quota_monthly": 500}))
        .await;
    sea_orm::ConnectionTrait::execute_unprepared(
        &app.db,
        "UPDATE api_keys SET tokens_used_this_month = 321 WHERE id = 1",
    )
    .await
    .unwrap();
    app.clock.set(at("2026-12-31T23:59:59Z"));
    let key: Value = patch(&app, "alice", 1, r#"{"reset_usage": true}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(key["tokens_used_this_month"], 0);
    assert_eq!(key["quota_reset_at"], "2027-01-01T00:00:00Z");
    assert_eq!(key["token_quota_monthly"], 500);
}

#[actix_web::test]
async fn delete_removes_the_key() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 3})).await;
    let not_hers = app
        .admin(Method::DELETE, "/users/bob/apikeys/3")
        .send()
        .await
        .unwrap();
    assert_eq!(not_hers.status(), 404);
    let response = app
        .admin(Method::DELETE, "/users/alice/apikeys/3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"deleted": 3})
    );
    assert_eq!(get_key(&app, "alice", 3).await.status(), 404);
    let again = app
        .admin(Method::DELETE, "/users/alice/apikeys/3")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}

#[actix_web::test]
async fn every_admin_route_requires_the_admin_credentials() {
    let app = spawn_app().await;
    app.create_key("alice", json!({"id": 1})).await;
    let routes = [
        (Method::POST, "/users/alice/apikeys"),
        (Method::GET, "/users/alice/apikeys"),
        (Method::GET, "/users/alice/apikeys/1"),
        (Method::PATCH, "/users/alice/apikeys/1"),
        (Method::DELETE, "/users/alice/apikeys/1"),
    ];
    for (method, path) in routes {
        let anonymous = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            anonymous.status(),
            401,
            "{method} {path} without credentials"
        );
        assert!(anonymous.headers().contains_key("www-authenticate"));
        assert!(detail_of(anonymous).await.contains("admin"));

        let wrong_password = app
            .client
            .request(method.clone(), app.url(path))
            .basic_auth("admin", Some("not-the-password"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            wrong_password.status(),
            401,
            "{method} {path} with a wrong password"
        );

        let wrong_user = app
            .client
            .request(method.clone(), app.url(path))
            .basic_auth("root", Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong_user.status(), 401, "{method} {path} as another user");

        let bearer = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(ADMIN_PASSWORD)
            .send()
            .await
            .unwrap();
        assert_eq!(bearer.status(), 401, "{method} {path} with another scheme");
    }
    assert_eq!(
        get_key(&app, "alice", 1).await.status(),
        200,
        "nothing was deleted"
    );
}

#[actix_web::test]
async fn admin_routes_answer_503_without_a_configured_password() {
    let app = spawn_app_on(Backend::Postgres, |settings| settings.admin.password = None).await;
    let response = app
        .admin(Method::GET, "/users/alice/apikeys")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(detail_of(response).await.contains("QUOTA__ADMIN__PASSWORD"));
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "ops routes stay open");
}

#[actix_web::test]
async fn oversized_and_deeply_nested_bodies_are_refused() {
    let app = spawn_app().await;
    let huge = format!(
        r#"{{"description": "{}"}}"#,
        "x".repeat(app.settings.http.max_body_bytes)
    );
    let response = app
        .admin(Method::POST, "/users/alice/apikeys")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(detail_of(response).await.contains("larger"));

    for nested in [
        format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
        format!(
            r#"{{"description": {}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        ),
    ] {
        let response = app
            .admin(Method::POST, "/users/alice/apikeys")
            .header("content-type", "application/json")
            .body(nested)
            .send()
            .await
            .unwrap();
        assert!(
            [400, 422].contains(&response.status().as_u16()),
            "{}",
            response.status()
        );
        assert!(!detail_of(response).await.is_empty());
    }
    let keys: Value = app.admin_get_json("/users/alice/apikeys").await;
    assert_eq!(keys, json!([]), "nothing was created");
}

#[actix_web::test]
async fn odd_usernames_are_handled_without_errors() {
    let app = spawn_app().await;
    let sql = app
        .create_key("robert'); DROP TABLE api_keys;--", json!({"id": 11}))
        .await;
    assert_eq!(sql["username"], "robert'); DROP TABLE api_keys;--");
    let encoded = app.create_key("a%2Fb", json!({"id": 12})).await;
    assert_eq!(encoded["id"], 12);

    let too_long = "u".repeat(300);
    let response = app
        .admin(Method::POST, &format!("/users/{too_long}/apikeys"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert!(detail_of(response).await.contains("username"));
    assert_eq!(
        get_key(&app, "robert'); DROP TABLE api_keys;--", 11)
            .await
            .status(),
        200
    );
}

#[actix_web::test]
async fn admin_routes_work_on_sqlite() {
    let app = spawn_app_on(Backend::Sqlite, |_| {}).await;
    let key = app
        .create_key("alice", json!({"id": 5, "token_quota_monthly": 10}))
        .await;
    assert_eq!(key["quota_reset_at"], "2026-12-01T00:00:00Z");
    let assigned = app.create_key("alice", json!({})).await;
    assert!(assigned["id"].as_i64().unwrap() > 5);
    let dup = app
        .admin(Method::POST, "/users/alice/apikeys")
        .json(&json!({"id": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    let patched: Value = patch(&app, "alice", 5, r#"{"token_quota_monthly": 0}"#)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(patched["token_quota_monthly"], Value::Null);
    let deleted = app
        .admin(Method::DELETE, "/users/alice/apikeys/5")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(get_key(&app, "alice", 5).await.status(), 404);
}
