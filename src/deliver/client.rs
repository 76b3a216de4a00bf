//! One pooled HTTP client for every endpoint, and a single attempt on it.
//!
//! Keep-alive connections are pooled per host; HTTPS goes through rustls with
//! the webpki trust roots. Redirects are never followed (the legacy client
//! does not follow them; a 3xx is classified as permanent). Each attempt,
//! from connect to the last byte of the response body, runs inside its own
//! budget; the response status, once it has arrived in time, decides the outcome.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::outcome::{AttemptError, Response, parse_retry_after};
use super::sign::{self, SigningSecret};
use crate::config::DeliveryConfig;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub const USER_AGENT_VALUE: &str = concat!("webhookd/", env!("CARGO_PKG_VERSION"));

pub fn build(cfg: &DeliveryConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.attempt_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .build(https)
}

/// Everything one attempt sends.
pub struct AttemptRequest<'a> {
    pub url: &'a url::Url,
    pub webhook_id: &'a str,
    pub body: Bytes,
    pub secrets: &'a [SigningSecret],
    pub legacy_hmac_header: bool,
    pub budget: Duration,
    pub max_response_bytes: usize,
}

pub async fn attempt(client: &HttpClient, a: AttemptRequest<'_>) -> Result<Response, AttemptError> {
    let now = SystemTime::now();
    let ts = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut req = Request::post(a.url.as_str())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
        .header("webhook-id", a.webhook_id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sign::signature_header(a.secrets, a.webhook_id, ts, &a.body));
    if a.legacy_hmac_header
        && let Some(first) = a.secrets.first()
    {
        req = req.header("x-hmac-signature", sign::legacy_signature(first, &a.body));
    }
    let req = req.body(Full::new(a.body)).map_err(|e| AttemptError::Refused(format!("bad request: {e}")))?;
    let deadline = tokio::time::Instant::now() + a.budget;
    let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
        Err(_) => return Err(AttemptError::Timeout(a.budget)),
        Ok(Err(e)) => {
            let detail = error_chain(&e);
            return Err(if e.is_connect() { AttemptError::Connect(detail) } else { AttemptError::Io(detail) });
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // The status decides the outcome: a receiver that answered 2xx has the
    // event, and retrying it would deliver it twice. The body is read and
    // discarded within what is left of the budget, so the connection can be
    // reused; one that is too slow, too large or broken only costs the connection.
    let max = a.max_response_bytes;
    let mut body = resp.into_body();
    let drain = async move {
        let mut read = 0usize;
        while read <= max {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
    Ok(Response { status, retry_after })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
