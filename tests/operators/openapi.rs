//! `GET /openapi.json`: every route of `src/http/mod.rs` is documented, and real responses of every
//! route, successes and errors, validate against the documented schemas, which are made closed
//! (no undocumented field) for the comparison.

use std::collections::BTreeSet;

use quota_keeper::settings::UnknownKeyPolicy;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_on, Backend, TestApp, ADMIN_PASSWORD};

/// `(path template, method)` of every route in the route table, read from its source.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source = include_str!("../../src/http/mod.rs");
    let table = &source[source
        .find("pub fn routes")
        .expect("src/http/mod.rs has fn routes")..];
    let table = &table[..table.find("\n}\n").expect("fn routes ends")];
    let mut routes = BTreeSet::new();
    let mut resource: Option<String> = None;
    // Each `web::resource("P")` opens a resource; `.route("P", web::m()…)` is a route on its own;
    // `.route(web::m()…)` belongs to the open resource.
    let mut rest = table;
    while let Some(at) = rest.find("web::") {
        rest = &rest[at + "web::".len()..];
        let word: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
        let before = &table[..table.len() - rest.len() - "web::".len()];
        if word == "resource" {
            resource = rest.split('"').nth(1).map(str::to_string);
        } else if ["get", "post", "patch", "delete", "put"].contains(&word.as_str()) {
            let own_path = before
                .trim_end()
                .strip_suffix(',')
                .and_then(|head| head.trim_end().strip_suffix('"'))
                .and_then(|head| {
                    head.rsplit_once(".route(\"")
                        .map(|(_, path)| path.to_string())
                });
            let path = own_path
                .or_else(|| resource.clone())
                .expect("a route names its path or belongs to a resource");
            routes.insert((path, word));
        }
    }
    assert!(routes.len() >= 11, "parsed too few routes: {routes:?}");
    routes
}

/// The document's schemas under `$defs`, every object closed to undocumented fields.
fn closed_definitions(document: &Value) -> Value {
    fn close(value: &mut Value) {
        match value {
            Value::Object(object) => {
                if object.contains_key("properties") && !object.contains_key("additionalProperties")
                {
                    object.insert("additionalProperties".into(), Value::Bool(false));
                }
                object.values_mut().for_each(close);
            }
            Value::Array(items) => items.iter_mut().for_each(close),
            _ => {}
        }
    }
    let mut schemas = document["components"]["schemas"].clone();
    close(&mut schemas);
    schemas
}

/// Checks responses against the document and remembers which routes were exercised.
struct Validator {
    document: Value,
    definitions: Value,
    exercised: BTreeSet<(String, String)>,
}

impl Validator {
    fn new(document: Value) -> Validator {
        Validator {
            definitions: closed_definitions(&document),
            document,
            exercised: BTreeSet::new(),
        }
    }

    /// Sends `request` for the route `(template, method)` and validates the response; returns its body.
    async fn check(
        &mut self,
        template: &str,
        request: reqwest::RequestBuilder,
        expected: u16,
    ) -> Value {
        let built = request.build().expect("a valid request");
        let method = built.method().as_str().to_lowercase();
        let response = reqwest::Client::new()
            .execute(built)
            .await
            .expect("the app answers");
        let status = response.status();
        assert_eq!(status.as_u16(), expected, "{method} {template}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .expect("an ASCII content type")
            .to_string();
        let text = response.text().await.expect("a body");
        let documented = &self.document["paths"][template][&method]["responses"][status.as_str()];
        assert!(
            documented.is_object(),
            "{method} {template} answered {status}, which the document does not list"
        );
        let (media, schema) = documented["content"]
            .as_object()
            .and_then(|content| content.iter().next())
            .unwrap_or_else(|| panic!("{method} {template} {status}: no documented content"));
        assert!(
            content_type.starts_with(media.as_str()),
            "{method} {template} {status}: {content_type} is not the documented {media}"
        );
        self.exercised
            .insert((template.to_string(), method.clone()));
        if media != "application/json" {
            return Value::String(text);
        }
        let body: Value = serde_json::from_str(&text).expect("a JSON body");
        let Some(schema) = schema.get("schema") else {
            return body;
        };
        let rooted = serde_json::to_string(schema)
            .expect("a schema serializes")
            .replace("#/components/schemas/", "#/$defs/");
        let mut root: Value = serde_json::from_str(&rooted).expect("still JSON");
        root["$defs"] = serde_json::from_str(
            &serde_json::to_string(&self.definitions)
                .expect("schemas serialize")
                .replace("#/components/schemas/", "#/$defs/"),
        )
        .expect("still JSON");
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|error| panic!("{method} {template} {status}: bad schema: {error}"));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|error| format!("{error} at {}", error.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: {body} does not match the document \
             (describe new fields in src/http/openapi.rs): {errors:?}"
        );
        body
    }
}

/// A body with every property of an object schema: integers 5, strings "x", booleans false.
fn sample_of(schema: &Value) -> Value {
    let properties = schema["properties"]
        .as_object()
        .expect("a request body schema has properties");
    let body = properties
        .iter()
        .map(|(name, property)| {
            let types = match &property["type"] {
                Value::Array(types) => types.clone(),
                single => vec![single.clone()],
            };
            let sample = if types.contains(&json!("integer")) {
                json!(5)
            } else if types.contains(&json!("boolean")) {
                json!(false)
            } else {
                json!("x")
            };
            (name.clone(), sample)
        })
        .collect();
    Value::Object(body)
}

fn admin(app: &TestApp, method: Method, path: &str) -> reqwest::RequestBuilder {
    app.admin(method, path)
}

#[actix_web::test]
async fn every_route_is_documented_and_real_responses_match_the_document() {
    let app = spawn_app().await;
    let document: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("the app answers")
        .json()
        .await
        .expect("the document is JSON");
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));
    let routes = routes_in_source();
    for (path, method) in &routes {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} is routed in src/http/mod.rs but missing from /openapi.json"
        );
    }

    let mut v = Validator::new(document);
    let get = |path: &str| app.client.get(app.url(path));
    v.check("/healthz", get("/healthz"), 200).await;
    v.check("/readyz", get("/readyz"), 200).await;
    v.check("/metrics", get("/metrics"), 200).await;
    v.check("/openapi.json", get("/openapi.json"), 200).await;

    let keys = "/users/{username}/apikeys";
    let key = "/users/{username}/apikeys/{id}";
    let created = admin(&app, Method::POST, "/users/alice/apikeys")
        .json(&json!({"id": 42, "description": "gateway", "token_quota_monthly": 1000}));
    v.check(keys, created, 201).await;
    let unlimited = admin(&app, Method::POST, "/users/alice/apikeys");
    v.check(keys, unlimited, 201).await;
    let taken = admin(&app, Method::POST, "/users/alice/apikeys").json(&json!({"id": 42}));
    v.check(keys, taken, 409).await;
    let unknown_field =
        admin(&app, Method::POST, "/users/alice/apikeys").json(&json!({"quota": 1}));
    v.check(keys, unknown_field, 422).await;
    let malformed = admin(&app, Method::POST, "/users/alice/apikeys").body("{");
    v.check(keys, malformed, 400).await;
    let too_large = admin(&app, Method::POST, "/users/alice/apikeys")
        .body(format!("{{\"description\": \"{}\"}}", "x".repeat(20_000)));
    v.check(keys, too_large, 413).await;
    let anonymous = app.client.get(app.url("/users/alice/apikeys"));
    v.check(keys, anonymous, 401).await;
    v.check(keys, admin(&app, Method::GET, "/users/alice/apikeys"), 200)
        .await;

    v.check(
        key,
        admin(&app, Method::GET, "/users/alice/apikeys/42"),
        200,
    )
    .await;
    v.check(key, admin(&app, Method::GET, "/users/bob/apikeys/42"), 404)
        .await;
    v.check(key, admin(&app, Method::GET, "/users/alice/apikeys/x"), 400)
        .await;
    let patched = admin(&app, Method::PATCH, "/users/alice/apikeys/42")
        .json(&json!({"description": "renamed", "reset_usage": true}));
    v.check(key, patched, 200).await;
    let negative = admin(&app, Method::PATCH, "/users/alice/apikeys/42")
        .json(&json!({"token_quota_monthly": -1}));
    v.check(key, negative, 422).await;
    let elsewhere =
        admin(&app, Method::PATCH, "/users/bob/apikeys/42").json(&json!({"description": "x"}));
    v.check(key, elsewhere, 404).await;

    let check = "/keys/{id}/check";
    v.check(check, admin(&app, Method::POST, "/keys/42/check"), 200)
        .await;
    let over = admin(&app, Method::POST, "/keys/42/check").json(&json!({"tokens": 1001}));
    let denied = v.check(check, over, 429).await;
    assert_eq!(denied["allowed"], false);
    let unknown = admin(&app, Method::POST, "/keys/999/check");
    assert_eq!(v.check(check, unknown, 200).await["known"], false);
    let bad_body = admin(&app, Method::POST, "/keys/42/check").json(&json!({"tokens": "many"}));
    v.check(check, bad_body, 400).await;
    v.check(check, admin(&app, Method::POST, "/keys/0/check"), 400)
        .await;

    // Every documented request field is accepted (the bodies refuse unknown fields with 422).
    let schemas = v.document["components"]["schemas"].clone();
    let every_field = |schema: &str| sample_of(&schemas[schema]);
    let full_create =
        admin(&app, Method::POST, "/users/carol/apikeys").json(&every_field("CreateKeyRequest"));
    v.check(keys, full_create, 201).await;
    let full_patch =
        admin(&app, Method::PATCH, "/users/carol/apikeys/5").json(&every_field("PatchKeyRequest"));
    v.check(key, full_patch, 200).await;
    let full_check = admin(&app, Method::POST, "/keys/5/check").json(&every_field("CheckEstimate"));
    let held = v.check(check, full_check, 200).await;
    assert_eq!(
        held["reservation"]["tokens"], 5,
        "a hold is granted: {held}"
    );

    let reservations = "/keys/{id}/reservations";
    let listed = v
        .check(
            reservations,
            admin(&app, Method::GET, "/keys/5/reservations"),
            200,
        )
        .await;
    assert_eq!(listed[0]["id"], "x");
    v.check(
        reservations,
        admin(&app, Method::GET, "/keys/999/reservations"),
        404,
    )
    .await;

    let usage = "/keys/{id}/usage";
    v.check(usage, admin(&app, Method::GET, "/keys/42/usage"), 200)
        .await;
    v.check(usage, admin(&app, Method::GET, "/keys/999/usage"), 404)
        .await;

    v.check(
        key,
        admin(&app, Method::DELETE, "/users/alice/apikeys/42"),
        200,
    )
    .await;
    v.check(
        key,
        admin(&app, Method::DELETE, "/users/alice/apikeys/42"),
        404,
    )
    .await;

    // Other configurations: unknown keys denied, admin disabled.
    let denying = spawn_app_on(Backend::Sqlite, |settings| {
        settings.check.unknown_key = UnknownKeyPolicy::Deny;
    })
    .await;
    let unknown_denied = denying
        .client
        .post(denying.url("/keys/7/check"))
        .basic_auth("admin", Some(ADMIN_PASSWORD));
    v.check(check, unknown_denied, 404).await;
    let disabled = spawn_app_on(Backend::Sqlite, |settings| settings.admin.password = None).await;
    let refused = disabled.client.get(disabled.url("/keys/1/usage"));
    v.check(usage, refused, StatusCode::SERVICE_UNAVAILABLE.as_u16())
        .await;

    // Not ready: the database is gone (as in the ops tests).
    let gone = app
        .settings
        .database
        .url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let postgres = sea_orm::Database::connect(crate::common::POSTGRES_ADMIN_URL)
        .await
        .expect("PostgreSQL is up");
    sea_orm::ConnectionTrait::execute_unprepared(
        &postgres,
        &format!("DROP DATABASE {gone} WITH (FORCE)"),
    )
    .await
    .expect("the test database can be dropped");
    v.check("/readyz", get("/readyz"), 503).await;

    assert_eq!(v.exercised, routes, "every route is exercised by this test");
}
