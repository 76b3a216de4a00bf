//! The admin listener: `/metrics`, `/healthz` (liveness), `/readyz`, and the
//! management API ([`crate::manage`], behind its API key).
//!
//! It binds loopback unless `admin.listen` says otherwise. Without the key it
//! serves nothing secret: metric labels are endpoint ids and reasons, never
//! URLs or keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::telemetry::metrics as m;

/// What readiness is made of. The source sets `kafka`, the dead-letter
/// producer `dead_letters`; the store reports its own health.
#[derive(Debug)]
pub struct Health {
    pub kafka: AtomicBool,
    /// The consumer group has given us our partitions (possibly none) at least once.
    pub assigned: AtomicBool,
    /// False while dead letters cannot be produced (their messages then hold
    /// their partitions' commits, or wait in the retry schedule).
    pub dead_letters: AtomicBool,
    pub started: AtomicBool,
    pub stopping: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            kafka: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            dead_letters: AtomicBool::new(true),
            started: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Whether every readiness check passes.
    pub fn is_ready(&self, store: &Store) -> bool {
        self.checks(store).iter().all(|(_, ok)| *ok)
    }

    /// Each readiness check and whether it passes.
    pub fn checks(&self, store: &Store) -> Vec<(&'static str, bool)> {
        vec![
            ("kafka", self.kafka.load(Ordering::Acquire)),
            ("store", store.is_healthy()),
            ("partitions_assigned", self.assigned.load(Ordering::Acquire)),
            ("dead_letter_topic", self.dead_letters.load(Ordering::Acquire)),
            ("started", self.started.load(Ordering::Acquire)),
            ("not_stopping", !self.stopping.load(Ordering::Acquire)),
        ]
    }
}

#[derive(Clone)]
struct AdminState {
    prom: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
}

/// Binds the admin listener; returns its bound address and the serving future.
/// `api` is served alongside (the management API).
pub async fn bind(
    addr: SocketAddr,
    prom: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    api: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        // Deliberate in a pod (the kubelet and Prometheus must reach it); a
        // surprise anywhere else. It serves no secrets, but it does show the
        // endpoint ids and traffic.
        tracing::warn!(admin = %local, "the admin listener is reachable from other hosts (admin.listen)");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { prom, health, store })
        .merge(api);
    let serve = async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    };
    Ok((local, serve))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    // Gauges read at scrape time rather than kept up to date.
    ::metrics::gauge!(m::READY).set(if s.health.is_ready(&s.store) { 1.0 } else { 0.0 });
    if let Some(size) = s.store.size_bytes() {
        ::metrics::gauge!(m::STORE_SIZE).set(size as f64);
    }
    if let Some(size) = s.store.wal_bytes() {
        ::metrics::gauge!(m::STORE_WAL).set(size as f64);
    }
    for (kind, bytes) in s.store.memory_bytes().into_iter().flatten() {
        ::metrics::gauge!(m::STORE_MEMORY, "kind" => kind).set(bytes as f64);
    }
    m::refresh_allocator();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.prom.render()).into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let checks = s.health.checks(&s.store);
    let ready = checks.iter().all(|(_, ok)| *ok);
    let body = serde_json::json!({
        "ready": ready,
        "checks": checks.iter().map(|(k, ok)| (k.to_string(), serde_json::Value::Bool(*ok))).collect::<serde_json::Map<_, _>>(),
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body)).into_response()
}
