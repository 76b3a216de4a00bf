//! One pooled HTTP client for every endpoint, and a single attempt on it.
//!
//! Keep-alive connections are pooled per host. Every connection goes through
//! the SSRF guard ([`super::guard`]): names are resolved once and every
//! address checked, IP literals are checked, and the socket connects only to
//! checked addresses. HTTPS goes through rustls with the webpki (Mozilla) trust
//! roots plus an optional extra CA bundle; in HTTPS-only mode the connector
//! refuses plain HTTP as well as the config. Redirects are never followed (the
//! legacy client does not follow them; a 3xx is classified as permanent). Each
//! attempt, from connect to the last byte of the response body, runs inside its
//! own budget; the response status, once it has arrived in time, decides the outcome.
//!
//! hyper's pool opens a connection for every request that finds none idle, so
//! a host's connections follow its requests in flight: up to the sum of the
//! in-flight caps of the endpoints on it. `delivery.max_connections_per_host`
//! caps those requests per host; an attempt waits for a free place before its
//! budget starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::guard::{self, GuardedConnector, GuardedResolver, Lookup, SystemLookup};
use super::outcome::{AttemptError, Response, parse_retry_after};
use super::sign::{self, Secrets};
use crate::config::DeliveryConfig;

type Pooled = Client<HttpsConnector<GuardedConnector<HttpConnector<GuardedResolver>>>, Full<Bytes>>;

/// The pooled client, with the per-host cap when one is set.
pub struct HttpClient {
    pooled: Pooled,
    hosts: Option<HostCap>,
}

/// A semaphore per host (scheme, userinfo, host, port: the URL up to its
/// path), made the first time the host is seen. Hosts come from the
/// configured endpoints, so the map stays small.
struct HostCap {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostCap {
    async fn enter(&self, url: &url::Url) -> OwnedSemaphorePermit {
        let host = &url[..url::Position::AfterPort];
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            match hosts.get(host) {
                Some(s) => s.clone(),
                None => hosts.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.per_host))).clone(),
            }
        };
        match semaphore.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                metrics::counter!(crate::telemetry::metrics::HOST_WAITS).increment(1);
                semaphore.acquire_owned().await.expect("a host's semaphore is never closed")
            }
        }
    }
}

pub const USER_AGENT_VALUE: &str = concat!("webhookd/", env!("CARGO_PKG_VERSION"));

/// The client, resolving names with the system resolver.
pub fn build(cfg: &DeliveryConfig) -> Result<HttpClient, rustls::Error> {
    build_with_lookup(cfg, Arc::new(SystemLookup))
}

/// The client, resolving names with `lookup` (tests script DNS answers).
pub fn build_with_lookup(cfg: &DeliveryConfig, lookup: Arc<dyn Lookup>) -> Result<HttpClient, rustls::Error> {
    let policy = Arc::new(cfg.network_policy());
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(policy.clone(), lookup));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.attempt_timeout));
    let tcp = GuardedConnector::new(http, policy);
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in &cfg.extra_ca.certs {
        roots.add(cert.clone())?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let https = if cfg.https_only { builder.https_only() } else { builder.https_or_http() };
    let pooled = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        // Responses are read and dropped (a status and a capped body): a
        // fixed 4 KiB read buffer instead of hyper's adaptive one, which
        // grows per connection. About 20-40 MiB less RSS at 1,600 connections
        // in the load benchmark.
        .http1_read_buf_exact_size(4096)
        .build(https.enable_http1().wrap_connector(tcp));
    let hosts = cfg.max_connections_per_host.map(|cap| HostCap { per_host: cap.get(), hosts: Mutex::default() });
    Ok(HttpClient { pooled, hosts })
}

/// Everything one attempt sends.
pub struct AttemptRequest<'a> {
    pub url: &'a url::Url,
    /// Sent as `authorization` (from credentials written in the endpoint URL).
    pub authorization: Option<&'a HeaderValue>,
    pub webhook_id: &'a str,
    pub body: Bytes,
    pub secrets: &'a Secrets,
    pub legacy_hmac_header: bool,
    pub budget: Duration,
    pub max_response_bytes: usize,
}

pub async fn attempt(client: &HttpClient, a: AttemptRequest<'_>) -> Result<Response, AttemptError> {
    // First, so the signature's timestamp is taken once the request can go.
    // Held until the response's body is read, so its connection is back in
    // the pool for the next request to this host.
    let _host = match &client.hosts {
        Some(cap) => Some(cap.enter(a.url).await),
        None => None,
    };
    let now = SystemTime::now();
    let ts = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut req = Request::post(a.url.as_str())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
        .header("webhook-id", a.webhook_id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sign::signature_header(a.secrets.active(ts), a.webhook_id, ts, &a.body));
    if a.legacy_hmac_header
        && let Some(current) = a.secrets.current()
    {
        req = req.header("x-hmac-signature", sign::legacy_signature(current, &a.body));
    }
    if let Some(auth) = a.authorization {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let req = req.body(Full::new(a.body)).map_err(|e| AttemptError::Refused(format!("bad request: {e}")))?;
    let deadline = tokio::time::Instant::now() + a.budget;
    let resp = match tokio::time::timeout_at(deadline, client.pooled.request(req)).await {
        Err(_) => return Err(AttemptError::Timeout(a.budget)),
        Ok(Err(e)) => {
            if let Some(refused) = guard::find_refusal(&e) {
                return Err(AttemptError::Destination(refused.to_string()));
            }
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

/// The error and its sources, joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    //! The guard inside the real client, over real loopback sockets: listeners
    //! count every connection they accept, so "refused" means "nothing connected".

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::config::Config;
    use crate::deliver::guard::Script;
    use crate::deliver::sign::{EndpointSecret, SigningSecret};

    /// A loopback HTTP server answering 204, counting accepted connections.
    async fn listener(addr: SocketAddr) -> Option<(SocketAddr, Arc<AtomicUsize>)> {
        answering(addr, 204, None).await
    }

    /// A loopback HTTP server answering `status` (with a `location`, if given).
    async fn answering(
        addr: SocketAddr,
        status: u16,
        location: Option<String>,
    ) -> Option<(SocketAddr, Arc<AtomicUsize>)> {
        let l = tokio::net::TcpListener::bind(addr).await.ok()?;
        let bound = l.local_addr().ok()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let location = location.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let mut resp = hyper::Response::builder().status(status);
                        if let Some(l) = &location {
                            resp = resp.header("location", l);
                        }
                        std::future::ready(resp.body(Full::new(Bytes::new())))
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        Some((bound, accepted))
    }

    fn delivery(toml: &str) -> DeliveryConfig {
        Config::from_toml_str(toml, Vec::new()).expect("valid").delivery
    }

    async fn send(client: &HttpClient, url: &str) -> Result<Response, AttemptError> {
        let url = url::Url::parse(url).expect("URL");
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let secrets = Secrets::new(vec![EndpointSecret { secret, expires_at: None }]);
        attempt(
            client,
            AttemptRequest {
                url: &url,
                authorization: None,
                webhook_id: "msg_1",
                body: Bytes::from_static(b"{}"),
                secrets: &secrets,
                legacy_hmac_header: false,
                budget: Duration::from_secs(5),
                max_response_bytes: 1024,
            },
        )
        .await
    }

    #[tokio::test]
    async fn hostile_urls_are_refused_before_anything_connects() {
        let (v4, v4_accepts) = listener("127.0.0.1:0".parse().expect("addr")).await.expect("bind 127.0.0.1");
        let p = v4.port();
        let v6 = listener(SocketAddr::new("::1".parse().expect("ip"), p)).await;
        let client = build(&delivery("")).expect("client");
        let mut urls: Vec<String> = [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "0x7f000001",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "localhost",
        ]
        .iter()
        .map(|h| format!("http://{h}:{p}/"))
        .collect();
        urls.push(format!("https://localhost:{p}/"));
        for url in &urls {
            match send(&client, url).await {
                Err(AttemptError::Destination(why)) => assert!(why.contains("loopback"), "{url}: {why}"),
                other => panic!("{url} was not refused: {other:?}"),
            }
        }
        assert_eq!(v4_accepts.load(Ordering::SeqCst), 0, "something connected to 127.0.0.1");
        if let Some((_, v6_accepts)) = v6 {
            assert_eq!(v6_accepts.load(Ordering::SeqCst), 0, "something connected to ::1");
        }
        // The same listener is reachable once loopback is allow-listed: the refusals above were the guard.
        let allowed = build(&delivery("[delivery]\nallow_networks = [\"127.0.0.0/8\"]\n")).expect("client");
        assert_eq!(send(&allowed, &format!("http://127.0.0.1:{p}/")).await.expect("delivered").status, 204);
        assert_eq!(v4_accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_name_with_any_bad_address_is_refused_and_connections_are_pinned_to_checked_addresses() {
        // 127.0.0.2 stands in for a public address (allow-listed), 127.0.0.3
        // for a private one: both are real loopback listeners on one port.
        let (good, good_accepts) = listener("127.0.0.2:0".parse().expect("addr")).await.expect("bind 127.0.0.2");
        let (_, bad_accepts) =
            listener(SocketAddr::new("127.0.0.3".parse().expect("ip"), good.port())).await.expect("bind 127.0.0.3");
        let cfg = delivery("[delivery]\nallow_networks = [\"127.0.0.2/32\"]\npool_max_idle_per_host = 0\n");
        let url = format!("http://hooks.test:{}/", good.port());

        // One answer, two addresses, one of them bad: refused, nothing connects.
        let mixed = Script::new(&[&["127.0.0.2", "127.0.0.3"]]);
        let client = build_with_lookup(&cfg, mixed.clone()).expect("client");
        assert!(matches!(send(&client, &url).await, Err(AttemptError::Destination(_))));
        assert_eq!((good_accepts.load(Ordering::SeqCst), bad_accepts.load(Ordering::SeqCst)), (0, 0));

        // Rebinding: good first, bad on every later lookup. The first connection
        // goes to the checked address; the next lookup is refused; no lookup
        // happens between check and connect.
        let rebind = Script::new(&[&["127.0.0.2"], &["127.0.0.3"]]);
        let client = build_with_lookup(&cfg, rebind.clone()).expect("client");
        assert_eq!(send(&client, &url).await.expect("delivered").status, 204);
        assert!(matches!(send(&client, &url).await, Err(AttemptError::Destination(_))));
        assert_eq!(rebind.calls.load(Ordering::SeqCst), 2, "one lookup per connection");
        assert_eq!((good_accepts.load(Ordering::SeqCst), bad_accepts.load(Ordering::SeqCst)), (1, 0));
    }

    #[tokio::test]
    async fn redirects_are_never_followed_even_to_allowed_addresses() {
        let (target, target_accepts) = listener("127.0.0.3:0".parse().expect("addr")).await.expect("bind 127.0.0.3");
        let location = format!("http://127.0.0.3:{}/", target.port());
        for status in [301, 302, 303, 307, 308] {
            let (from, _) = answering("127.0.0.2:0".parse().expect("addr"), status, Some(location.clone()))
                .await
                .expect("bind 127.0.0.2");
            let cfg = delivery("[delivery]\nallow_networks = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n");
            let r = send(&build(&cfg).expect("client"), &format!("http://127.0.0.2:{}/", from.port())).await;
            assert_eq!(r.expect("answered").status, status, "the 3xx itself is the answer");
        }
        assert_eq!(target_accepts.load(Ordering::SeqCst), 0, "a redirect was followed");
    }

    #[tokio::test]
    async fn https_only_refuses_plain_http_in_the_connector_too() {
        let (addr, accepts) = listener("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let cfg = delivery("[delivery]\nhttps_only = true\nallow_networks = [\"127.0.0.1/32\"]\n");
        let r = send(&build(&cfg).expect("client"), &format!("http://127.0.0.1:{}/", addr.port())).await;
        assert!(matches!(&r, Err(AttemptError::Connect(why)) if why.contains("unsupported scheme http")), "{r:?}");
        assert_eq!(accepts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_host_never_has_more_requests_in_flight_than_its_cap() {
        // The server takes 20 ms per request (its work, not a synchronisation)
        // and records how many it held at once, and on how many connections.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (active, most, accepted) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, m, c) = (active.clone(), most.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (a, m) = (a.clone(), m.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let (a, m) = (a.clone(), m.clone());
                        async move {
                            m.fetch_max(a.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            a.fetch_sub(1, Ordering::SeqCst);
                            hyper::Response::builder().status(204).body(Full::new(Bytes::new()))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        let run = |cap: &str| {
            let cfg = delivery(&format!("[delivery]\nallow_networks = [\"127.0.0.1/32\"]\n{cap}"));
            let client = Arc::new(build(&cfg).expect("client"));
            let url = format!("http://127.0.0.1:{}/", addr.port());
            let (most, accepted) = (most.clone(), accepted.clone());
            async move {
                most.store(0, Ordering::SeqCst);
                accepted.store(0, Ordering::SeqCst);
                let sends: Vec<_> = (0..40)
                    .map(|_| {
                        let (client, url) = (client.clone(), url.clone());
                        tokio::spawn(async move { send(&client, &url).await })
                    })
                    .collect();
                for sent in sends {
                    assert_eq!(sent.await.expect("task").expect("delivered").status, 204);
                }
                (most.load(Ordering::SeqCst), accepted.load(Ordering::SeqCst))
            }
        };
        let (capped, capped_connections) = run("max_connections_per_host = 4").await;
        assert_eq!(capped, 4, "40 requests to one host capped at 4 in flight");
        let (uncapped, uncapped_connections) = run("max_connections_per_host = 0").await;
        assert!(uncapped > 4, "without a cap the 40 overlap (at most {uncapped} did): the test shows nothing");
        eprintln!("connections opened: {capped_connections} capped, {uncapped_connections} without a cap");
        assert!(capped_connections < uncapped_connections);
    }

    #[tokio::test]
    async fn pooling_still_works_behind_the_guard() {
        let (addr, accepts) = listener("127.0.0.2:0".parse().expect("addr")).await.expect("bind 127.0.0.2");
        let lookup = Script::new(&[&["127.0.0.2"]]);
        let client = build_with_lookup(&delivery("[delivery]\nallow_networks = [\"127.0.0.2/32\"]\n"), lookup.clone())
            .expect("client");
        for _ in 0..5 {
            assert_eq!(send(&client, &format!("http://pooled.test:{}/", addr.port())).await.expect("ok").status, 204);
        }
        assert_eq!(lookup.calls.load(Ordering::SeqCst), 1, "one lookup for one pooled connection");
        assert_eq!(accepts.load(Ordering::SeqCst), 1, "five requests on one connection");
    }
}
