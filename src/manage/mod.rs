//! The management API, served on the admin listener under `/api/v1`, and the
//! `webhookd dead-letters` / `webhookd endpoints` commands that call it.
//!
//! Every request needs `Authorization: Bearer <admin.api_key>`; without a
//! configured key the API is off. Errors are JSON: `{"error": "..."}`, naming
//! the parameter at fault.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/dead-letters` | list (`endpoint`, `reason`, `since`, `until`, `after`, `limit`) |
//! | POST | `/api/v1/dead-letters/replay` | `{"ids": [...]}`: back to the outbox, once each |
//! | GET | `/api/v1/endpoints` | endpoints and their state |
//! | POST | `/api/v1/endpoints/{id}/enable` | re-enable an endpoint (e.g. after 410 Gone) |

pub mod cli;

use std::collections::HashMap;
use std::str::FromStr;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::ApiKey;
use crate::dead_letter::replay_delivery;
use crate::route::Registry;
use crate::store::{DeadId, DeadQuery, Store, now_ms};
use crate::telemetry::metrics as m;

/// Largest page of a listing, and most ids in one replay request.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

#[derive(Clone)]
struct Api {
    store: Store,
    registry: Registry,
    /// SHA-256 of the key: compared digest to digest, so the time a wrong
    /// key takes to refuse says nothing about the key.
    key_digest: Option<[u8; 32]>,
}

/// The `/api/v1` routes.
pub fn router(store: Store, registry: Registry, api_key: Option<&ApiKey>) -> Router {
    let api = Api { store, registry, key_digest: api_key.map(|k| Sha256::digest(k.0.as_bytes()).into()) };
    Router::new()
        .route("/api/v1/dead-letters", get(list_dead_letters))
        .route("/api/v1/dead-letters/replay", post(replay))
        .route("/api/v1/endpoints", get(list_endpoints))
        .route("/api/v1/endpoints/{id}/enable", post(enable_endpoint))
        .route_layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(json!({ "error": msg.into() }))).into_response()
}

async fn authorize(State(api): State<Api>, req: Request, next: Next) -> Response {
    let Some(want) = api.key_digest else {
        return error(StatusCode::FORBIDDEN, "the management API is off: set admin.api_key to turn it on");
    };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let ok = given.and_then(bearer_token).is_some_and(|k| <[u8; 32]>::from(Sha256::digest(k.as_bytes())) == want);
    if ok {
        return next.run(req).await;
    }
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        if given.is_none() { "missing Authorization: Bearer <api key>" } else { "wrong API key" },
    );
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is
/// case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn parse_time(name: &str, v: &str) -> Result<i64, String> {
    OffsetDateTime::parse(v, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| format!("{name}: expected an RFC 3339 time such as 2026-11-23T10:00:00Z, got {v:?}"))
}

/// The listing's parameters, or what is wrong with them.
fn query_from(params: &HashMap<String, String>) -> Result<DeadQuery, String> {
    const KNOWN: [&str; 6] = ["endpoint", "reason", "since", "until", "after", "limit"];
    if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown parameter {unknown:?} (known: {})", KNOWN.join(", ")));
    }
    let limit = match params.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(format!("limit: expected 1 to {MAX_PAGE}, got {v:?}")),
        },
    };
    Ok(DeadQuery {
        endpoint: params.get("endpoint").cloned(),
        reason: params.get("reason").cloned(),
        since_ms: params.get("since").map(|v| parse_time("since", v)).transpose()?,
        until_ms: params.get("until").map(|v| parse_time("until", v)).transpose()?,
        after: params.get("after").map(|v| DeadId::from_str(v).map_err(|e| format!("after: {e}"))).transpose()?,
        limit,
    })
}

/// One listed dead letter: its id and the record exactly as stored.
#[derive(serde::Serialize)]
struct Listed {
    id: String,
    record: Box<RawValue>,
}

async fn list_dead_letters(State(api): State<Api>, Query(params): Query<HashMap<String, String>>) -> Response {
    let q = match query_from(&params) {
        Ok(q) => q,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let limit = q.limit;
    let page = match api.store.dead_letters(q).await {
        Ok(page) => page,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let next = (page.len() == limit).then(|| page.last().map(|(id, _)| id.to_string())).flatten();
    let items: Vec<Listed> = page
        .into_iter()
        .filter_map(|(id, raw)| {
            let record = RawValue::from_string(String::from_utf8(raw).ok()?).ok()?;
            Some(Listed { id: id.to_string(), record })
        })
        .collect();
    axum::Json(json!({ "dead_letters": items, "next": next })).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    ids: Vec<String>,
}

async fn replay(
    State(api): State<Api>,
    body: Result<axum::Json<ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let ids = match body {
        Ok(axum::Json(r)) => r.ids,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("expected {{\"ids\": [\"<id>\", ...]}}: {}", e.body_text()));
        }
    };
    if ids.is_empty() || ids.len() > MAX_PAGE {
        return error(StatusCode::BAD_REQUEST, format!("ids: give 1 to {MAX_PAGE} dead-letter ids"));
    }
    let mut parsed = Vec::with_capacity(ids.len());
    for id in &ids {
        match DeadId::from_str(id) {
            Ok(d) => parsed.push(d),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("ids: {e}")),
        }
    }
    let records = match api.store.dead_letters_by_id(parsed.clone()).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let table = api.registry.snapshot();
    let now = now_ms();
    let mut skipped = Vec::new();
    let mut todo = Vec::new();
    for (id, record) in parsed.into_iter().zip(records) {
        let Some(record) = record else {
            skipped.push(json!({ "id": id.to_string(), "why": "no such dead letter (already replayed?)" }));
            continue;
        };
        let why = match replay_delivery(&record, now) {
            Err(why) => why,
            Ok(d) => match table.get(&d.endpoint_id) {
                None => format!("endpoint {:?} is not configured", d.endpoint_id),
                Some(ep) if !ep.is_enabled() => {
                    format!("endpoint {:?} is disabled: enable it first (webhookd endpoints enable)", d.endpoint_id)
                }
                Some(_) => {
                    todo.push((id, d));
                    continue;
                }
            },
        };
        skipped.push(json!({ "id": id.to_string(), "why": why }));
    }
    let ids: Vec<DeadId> = todo.iter().map(|(id, _)| *id).collect();
    let moved = match api.store.replay(todo).await {
        Ok(moved) => moved,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let mut replayed = Vec::new();
    for (id, moved) in ids.into_iter().zip(moved) {
        if moved {
            replayed.push(id.to_string());
        } else {
            skipped.push(json!({ "id": id.to_string(), "why": "already replayed" }));
        }
    }
    metrics::counter!(m::DEAD_LETTERS_REPLAYED).increment(replayed.len() as u64);
    tracing::info!(replayed = replayed.len(), skipped = skipped.len(), "dead letters replayed");
    axum::Json(json!({ "replayed": replayed, "skipped": skipped })).into_response()
}

async fn list_endpoints(State(api): State<Api>) -> Response {
    let states = match api.store.disabled_endpoints().await {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let table = api.registry.snapshot();
    let list: Vec<Value> = table
        .all()
        .iter()
        .map(|ep| {
            json!({
                "id": ep.id(),
                "enabled": ep.is_enabled(),
                "enabled_in_config": ep.config.enabled,
                "disabled": states.get(ep.id()),
            })
        })
        .collect();
    axum::Json(json!({ "endpoints": list })).into_response()
}

async fn enable_endpoint(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let Some(ep) = api.registry.get(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no endpoint {id:?} in the configuration"));
    };
    if !ep.config.enabled {
        return error(
            StatusCode::CONFLICT,
            format!("endpoint {id:?} is disabled in the configuration; change it there"),
        );
    }
    // Store first: once it says enabled, a restart agrees.
    if let Err(e) = api.store.set_endpoint_disabled(&id, None).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}"));
    }
    let changed = ep.set_enabled(true);
    if changed {
        tracing::warn!(endpoint = %id, "endpoint re-enabled through the management API");
    }
    axum::Json(json!({ "id": id, "enabled": true, "changed": changed })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_required() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
