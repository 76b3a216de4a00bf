//! The operator commands: a small client of the management API of a running
//! webhookd (the store is that process's; RocksDB admits one writer).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use url::Url;

use super::MAX_PAGE;
use crate::deliver::client::error_chain;

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the API is and how to get in.
#[derive(Debug, Clone)]
pub struct Target {
    /// The admin listener, e.g. `http://127.0.0.1:9090`.
    pub admin: Url,
    pub api_key: String,
}

/// Which dead letters a command means.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub endpoint: Option<String>,
    pub reason: Option<String>,
    /// RFC 3339, or a duration meaning that long ago (`2h`, `7d`).
    pub since: Option<String>,
    pub until: Option<String>,
    /// At most this many (all that match if None).
    pub limit: Option<usize>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.endpoint.is_none() && self.reason.is_none() && self.since.is_none() && self.until.is_none()
    }
}

/// A command's failure, said in one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin listener at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
}

/// `2h` → two hours ago; an RFC 3339 time as it is.
fn absolute_time(flag: &str, v: &str, now: OffsetDateTime) -> Result<String, CliError> {
    if OffsetDateTime::parse(v, &Rfc3339).is_ok() {
        return Ok(v.to_owned());
    }
    let ago = humantime::parse_duration(v).map_err(|_| {
        CliError::Usage(format!(
            "--{flag}: expected an RFC 3339 time (2026-11-23T10:00:00Z) or a duration ago (2h), got {v:?}"
        ))
    })?;
    let t = now - ago;
    t.format(&Rfc3339).map_err(|e| CliError::Usage(format!("--{flag}: {e}")))
}

struct Api {
    target: Target,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(target: Target) -> Result<Api, CliError> {
        if target.admin.scheme() != "http" {
            return Err(CliError::Usage(format!("--admin: expected an http:// URL, got {}", target.admin)));
        }
        if target.api_key.trim().is_empty() {
            return Err(CliError::Usage("no API key: pass --api-key or set WEBHOOKD_API_KEY".into()));
        }
        Ok(Api { target, client: Client::builder(TokioExecutor::new()).build_http() })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let mut url = self.target.admin.join(path).map_err(|e| CliError::Usage(format!("--admin: {e}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header("authorization", format!("Bearer {}", self.target.api_key.trim()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let unreachable = |why: String| CliError::Unreachable { url: self.target.admin.to_string(), why };
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer in {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        let v: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
        if !status.is_success() {
            let message = v["error"].as_str().map_or_else(|| v.to_string(), str::to_owned);
            return Err(CliError::Api { status: status.as_u16(), message });
        }
        Ok(v)
    }

    /// Every dead letter matching `f`, page by page, up to its limit.
    async fn dead_letters(
        &self,
        f: &Filter,
        now: OffsetDateTime,
        mut each: impl FnMut(&Value),
    ) -> Result<usize, CliError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(e) = &f.endpoint {
            query.push(("endpoint", e.clone()));
        }
        if let Some(r) = &f.reason {
            query.push(("reason", r.clone()));
        }
        if let Some(s) = &f.since {
            query.push(("since", absolute_time("since", s, now)?));
        }
        if let Some(u) = &f.until {
            query.push(("until", absolute_time("until", u, now)?));
        }
        let mut seen = 0;
        let mut after: Option<String> = None;
        loop {
            let want = f.limit.map_or(MAX_PAGE, |l| (l - seen).min(MAX_PAGE));
            if want == 0 {
                return Ok(seen);
            }
            let mut q = query.clone();
            q.push(("limit", want.to_string()));
            if let Some(a) = &after {
                q.push(("after", a.clone()));
            }
            let page = self.call(Method::GET, "/api/v1/dead-letters", &q, None).await?;
            for item in page["dead_letters"].as_array().into_iter().flatten() {
                each(item);
                seen += 1;
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return Ok(seen),
            }
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `webhookd dead-letters list`: a table, or one JSON object per line.
pub async fn list(target: Target, f: Filter, json_lines: bool) -> Result<(), CliError> {
    let api = Api::new(target)?;
    if !json_lines {
        println!(
            "{:<22} {:<20} {:<16} {:<20} {:>8} {:<8} EVENT",
            "ID", "DEAD-LETTERED", "ENDPOINT", "REASON", "ATTEMPTS", "LAST"
        );
    }
    let n = api
        .dead_letters(&f, OffsetDateTime::now_utc(), |item| {
            let r = &item["record"];
            if json_lines {
                println!("{}", json!({ "id": item["id"], "record": r }));
            } else {
                let last = if r["last_status"].is_null() { "error".into() } else { text(&r["last_status"]) };
                println!(
                    "{:<22} {:<20} {:<16} {:<20} {:>8} {:<8} {}",
                    text(&item["id"]),
                    text(&r["dead_lettered_at"]),
                    text(&r["endpoint_id"]),
                    text(&r["reason"]),
                    text(&r["attempts"]),
                    if r["endpoint_id"].is_null() { "-".into() } else { last },
                    text(&r["event_id"]),
                );
            }
        })
        .await?;
    if !json_lines {
        eprintln!("{n} dead letter{}", if n == 1 { "" } else { "s" });
    }
    Ok(())
}

/// `webhookd dead-letters replay`: the named ids, or every match of a filter.
pub async fn replay(target: Target, ids: Vec<String>, f: Filter, dry_run: bool) -> Result<(), CliError> {
    if ids.is_empty() && f.is_empty() {
        return Err(CliError::Usage(
            "say what to replay: --id (repeatable), or at least one of --endpoint, --reason, --since, --until".into(),
        ));
    }
    if !ids.is_empty() && !f.is_empty() {
        return Err(CliError::Usage("give either --id or filters, not both".into()));
    }
    let api = Api::new(target)?;
    let ids = if ids.is_empty() {
        let mut found = Vec::new();
        api.dead_letters(&f, OffsetDateTime::now_utc(), |item| found.extend(item["id"].as_str().map(str::to_owned)))
            .await?;
        found
    } else {
        ids
    };
    if dry_run {
        for id in &ids {
            println!("would replay {id}");
        }
        eprintln!("{} dead letter{} would be replayed (dry run)", ids.len(), if ids.len() == 1 { "" } else { "s" });
        return Ok(());
    }
    let (mut replayed, mut skipped) = (0, 0);
    for chunk in ids.chunks(MAX_PAGE) {
        let r = api.call(Method::POST, "/api/v1/dead-letters/replay", &[], Some(json!({ "ids": chunk }))).await?;
        for id in r["replayed"].as_array().into_iter().flatten() {
            println!("replayed {}", text(id));
            replayed += 1;
        }
        for s in r["skipped"].as_array().into_iter().flatten() {
            println!("skipped  {}: {}", text(&s["id"]), text(&s["why"]));
            skipped += 1;
        }
    }
    eprintln!("{replayed} replayed, {skipped} skipped");
    Ok(())
}

/// `webhookd endpoints list`.
pub async fn endpoints(target: Target) -> Result<(), CliError> {
    let api = Api::new(target)?;
    let r = api.call(Method::GET, "/api/v1/endpoints", &[], None).await?;
    println!("{:<24} {:<8} WHY DISABLED", "ENDPOINT", "STATE");
    for ep in r["endpoints"].as_array().into_iter().flatten() {
        let state = if ep["enabled"].as_bool() == Some(true) { "enabled" } else { "disabled" };
        let why = if ep["enabled_in_config"].as_bool() == Some(false) {
            "enabled = false in the configuration".to_owned()
        } else if ep["disabled"].is_null() {
            String::new()
        } else {
            format!("{} (status {})", text(&ep["disabled"]["reason"]), text(&ep["disabled"]["status"]))
        };
        println!("{:<24} {:<8} {why}", text(&ep["id"]), state);
    }
    Ok(())
}

/// `webhookd endpoints enable ID`.
pub async fn enable(target: Target, id: &str) -> Result<(), CliError> {
    if !crate::config::valid_endpoint_id(id) {
        return Err(CliError::Usage(format!("{id:?} is not an endpoint id (1-64 of A-Z a-z 0-9 . _ -)")));
    }
    let api = Api::new(target)?;
    let r = api.call(Method::POST, &format!("/api/v1/endpoints/{id}/enable"), &[], None).await?;
    if r["changed"].as_bool() == Some(true) {
        println!("endpoint {id} enabled");
    } else {
        println!("endpoint {id} was already enabled");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = OffsetDateTime::parse("2026-11-23T12:00:00Z", &Rfc3339).expect("time");
        assert_eq!(absolute_time("since", "2h", now).expect("ago"), "2026-11-23T10:00:00Z");
        assert_eq!(absolute_time("since", "2026-01-01T00:00:00Z", now).expect("as is"), "2026-01-01T00:00:00Z");
        let err = absolute_time("until", "yesterday", now).expect_err("refused").to_string();
        assert!(err.contains("--until") && err.contains("yesterday"), "{err}");
    }
}
