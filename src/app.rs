//! Wiring: builds every stage from the config, runs them, and owns shutdown.
//!
//! Shutdown is a value passed in (a [`CancellationToken`]): when it fires,
//! the source stops fetching, writes its last batch and commits what is
//! settled; endpoint workers stop starting attempts; attempts under way get
//! the grace period to finish and are otherwise left in the outbox (they are
//! resumed, with the same `webhook-id`, at the next start); then the store is
//! closed and the Kafka clients are let go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, KafkaProperties};
use crate::dead_letter::DeadLetters;
use crate::deliver::{Deliverer, client};
use crate::route::{Endpoint, Registry};
use crate::schedule;
use crate::source::embedded::EmbeddedBroker;
use crate::source::{Source, kafka_config};
use crate::store::{Store, StoreError, StoreOptions};
use crate::telemetry::admin::{self, Health};
use crate::telemetry::metrics;

/// How long closing the Kafka consumer may take before it is abandoned
/// (librdkafka's close has been seen to hang; rust-rdkafka issue #509).
const CONSUMER_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("Kafka: {0}")]
    Kafka(KafkaError),
    #[error("admin listener on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("TLS client setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<KafkaError> for AppError {
    /// rust-rdkafka prints a refused property's value, which may be a password:
    /// keep the key, drop the value (and librdkafka's description, which can quote it).
    fn from(e: KafkaError) -> Self {
        AppError::Kafka(match e {
            KafkaError::ClientConfig(code, desc, key, _) => {
                let desc = if KafkaProperties::is_secret(&key) { "invalid value".to_owned() } else { desc };
                KafkaError::ClientConfig(code, desc, key, "<redacted>".to_owned())
            }
            other => other,
        })
    }
}

/// A running webhookd.
pub struct Started {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub admin_addr: SocketAddr,
    /// The Kafka bootstrap servers in use (the embedded broker's, if it runs).
    pub bootstrap: String,
    main: JoinHandle<Result<(), AppError>>,
}

impl Started {
    /// Waits until shutdown has completed: offsets committed, store closed.
    pub async fn wait(self) -> Result<(), AppError> {
        self.main.await.map_err(|e| AppError::Task(e.to_string()))?
    }
}

/// Runs webhookd until `shutdown` fires and everything has stopped.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AppError> {
    start(config, shutdown).await?.wait().await
}

/// Starts every stage and returns once webhookd is running.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Started, AppError> {
    let prom = metrics::install();
    let embedded = if config.source.brokers.is_empty() {
        let mut topics = config.source.topics.clone();
        topics.push(config.source.dead_letter_topic.clone());
        let broker = EmbeddedBroker::start(&topics, config.source.embedded_partitions.get() as i32)?;
        tracing::warn!(
            bootstrap = broker.bootstrap_servers(),
            topics = ?topics,
            "no brokers configured: started the embedded Kafka-protocol broker (librdkafka mock cluster) on loopback. \
             It KEEPS NOTHING: its topics and offsets vanish when webhookd stops, and each partition holds at most \
             5 MiB, dropping its oldest records even if unread. Publish to it with any Kafka client, \
             e.g. `kcat -P -b {} -t {}`",
            broker.bootstrap_servers(),
            config.source.topics[0],
        );
        Some(broker)
    } else {
        None
    };
    let bootstrap =
        embedded.as_ref().map_or_else(|| config.source.brokers.join(","), |b| b.bootstrap_servers().to_owned());

    let store_path = config.store.path.clone();
    let opts = StoreOptions {
        dedup_window: config.store.dedup_window,
        sync_writes: config.store.sync_writes,
        backpressure: config.source.backpressure,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path, opts))
        .await
        .map_err(|e| AppError::Task(e.to_string()))??;

    let registry = Registry::from_configs(&config.endpoints, config.admin.endpoint_label_limit);
    // Known endpoints are registered before anything is written, so only
    // deliveries for endpoints missing from the config are reported as orphans.
    let orphans = store.wakeups().orphans();
    for ep in registry.snapshot().all() {
        store.wakeups().endpoint(ep.id());
    }
    for (id, state) in store.disabled_endpoints().await? {
        if let Some(ep) = registry.get(&id) {
            ep.set_enabled(false);
            tracing::warn!(endpoint = %id, %state, "endpoint is disabled (state kept in the store)");
        }
    }
    let kafka = kafka_config(&config.source, &bootstrap);
    let health = Arc::new(Health::default());
    let dead_letters = DeadLetters::new(&kafka, &config.source.dead_letter_topic, health.clone())?;
    let source =
        Source::new(&config.source, &bootstrap, store.clone(), registry.clone(), dead_letters.clone(), health.clone())?;
    let api = crate::manage::router(store.clone(), registry.clone(), config.admin.api_key.as_ref());
    let (admin_addr, admin_serve) =
        admin::bind(config.admin.listen, prom, health.clone(), store.clone(), api, shutdown.clone())
            .await
            .map_err(|source| AppError::Admin { addr: config.admin.listen, source })?;

    let deliverer = Arc::new(Deliverer {
        store: store.clone(),
        client: client::build(&config.delivery)?,
        dead_letters,
        policy: config.retry.clone(),
        max_response_bytes: config.delivery.max_response_bytes,
        attempts: TaskTracker::new(),
        abort: CancellationToken::new(),
    });
    let workers = TaskTracker::new();
    let table = registry.snapshot();
    for ep in table.all() {
        workers.spawn(deliverer.clone().run_endpoint(ep.clone(), shutdown.clone()));
    }
    // Deliveries for endpoints no longer configured are dead-lettered, not left stuck.
    for id in store.ready_endpoints().await? {
        if table.get(&id).is_none() {
            spawn_removed(&workers, &deliverer, &id, &shutdown);
        }
    }
    workers.spawn(adopt_orphans(orphans, workers.clone(), deliverer.clone(), shutdown.clone()));
    workers.close();
    let scheduler = tokio::spawn(schedule::run(store.clone(), shutdown.clone()));
    let source_task = tokio::spawn(source.run(shutdown.clone()));
    let admin_task = tokio::spawn(admin_serve);
    health.started.store(true, Ordering::Release);
    tracing::info!(admin = %admin_addr, bootstrap = %bootstrap, topics = ?config.source.topics,
        endpoints = config.endpoints.len(), store = %config.store.path.display(), "webhookd running");

    let grace = config.delivery.shutdown_grace;
    let main = tokio::spawn(async move {
        let mut source_task = source_task;
        // The source only ends early if it failed: then everything stops, cleanly.
        let early = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            ended = &mut source_task => Some(ended),
        };
        let failure = match &early {
            Some(Err(e)) => Some(format!("the Kafka source failed: {e}")),
            Some(Ok(_)) if !shutdown.is_cancelled() => Some("the Kafka source stopped unexpectedly".to_owned()),
            _ => None,
        };
        if let Some(f) = &failure {
            tracing::error!(error = %f, "shutting down");
            shutdown.cancel();
        }
        health.stopping.store(true, Ordering::Release);
        tracing::info!(grace = ?grace, "shutting down: no new fetches; finishing attempts under way");
        let consumer = match early {
            Some(ended) => ended.ok(),
            None => source_task.await.ok(),
        };
        workers.wait().await;
        let _ = scheduler.await;
        deliverer.attempts.close();
        if tokio::time::timeout(grace, deliverer.attempts.wait()).await.is_err() {
            tracing::warn!(
                abandoned = deliverer.attempts.len(),
                "grace period over: abandoning attempts; they stay in the outbox and resume at the next start"
            );
            deliverer.abort.cancel();
            deliverer.attempts.wait().await;
        }
        deliverer.dead_letters.flush(Duration::from_secs(5));
        drop(deliverer);
        store.close().await;
        drop(store);
        if let Some(consumer) = consumer {
            // On a plain thread: a close that hangs must not hold the runtime's shutdown.
            let (done, closed) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                drop(consumer);
                let _ = done.send(());
            });
            if tokio::time::timeout(CONSUMER_CLOSE_TIMEOUT, closed).await.is_err() {
                tracing::warn!("the Kafka consumer did not close in time; leaving it");
            }
        }
        let _ = admin_task.await;
        drop(embedded);
        match failure {
            Some(f) => Err(AppError::Task(f)),
            None => {
                tracing::info!("webhookd stopped");
                Ok(())
            }
        }
    });
    Ok(Started { admin_addr, bootstrap, main })
}

fn spawn_removed(workers: &TaskTracker, deliverer: &Arc<Deliverer>, id: &str, shutdown: &CancellationToken) {
    tracing::warn!(
        endpoint = id,
        "deliveries for an endpoint that is not configured: dead-lettering them (endpoint_removed)"
    );
    // Registered before the worker runs, so the store does not report it twice.
    deliverer.store.wakeups().endpoint(id);
    workers.spawn(deliverer.clone().run_endpoint(Arc::new(Endpoint::removed(id)), shutdown.clone()));
}

/// Starts a worker for each endpoint the store reports deliveries for but the
/// config does not have (retries that come due after the endpoint was removed).
async fn adopt_orphans(
    mut orphans: tokio::sync::mpsc::UnboundedReceiver<String>,
    workers: TaskTracker,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            id = orphans.recv() => match id {
                Some(id) => spawn_removed(&workers, &deliverer, &id, &shutdown),
                None => return,
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaConfRes;

    use super::*;

    #[test]
    fn refused_kafka_properties_never_show_their_values() {
        let desc = "Invalid value \"hunter2\" for configuration property \"sasl.password\"".to_owned();
        let e = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            desc,
            "sasl.password".into(),
            "hunter2".into(),
        );
        let shown = AppError::from(e).to_string();
        assert!(shown.contains("sasl.password") && !shown.contains("hunter2"), "{shown}");
    }
}
