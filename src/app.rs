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

use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::deliver::{Deliverer, client};
use crate::route::Registry;
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
    Kafka(#[from] KafkaError),
    #[error("admin listener on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("internal task failed: {0}")]
    Task(String),
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
        let broker =
            EmbeddedBroker::start(&topics, config.source.embedded_partitions.get() as i32)?;
        tracing::warn!(
            bootstrap = broker.bootstrap_servers(),
            topics = ?topics,
            "no brokers configured: started the embedded Kafka-protocol broker (librdkafka mock cluster) on loopback. \
             It KEEPS NOTHING: its topics and offsets vanish when webhookd stops. Publish to it with any Kafka client, \
             e.g. `kcat -P -b {} -t {}`",
            broker.bootstrap_servers(),
            config.source.topics[0],
        );
        Some(broker)
    } else {
        None
    };
    let bootstrap = embedded.as_ref().map_or_else(
        || config.source.brokers.join(","),
        |b| b.bootstrap_servers().to_owned(),
    );

    let store_path = config.store.path.clone();
    let opts = StoreOptions {
        dedup_window: config.store.dedup_window,
        sync_writes: config.store.sync_writes,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path, opts))
        .await
        .map_err(|e| AppError::Task(e.to_string()))??;

    let registry = Registry::from_configs(&config.endpoints);
    for (id, state) in store.disabled_endpoints().await? {
        if let Some(ep) = registry.get(&id) {
            ep.set_enabled(false);
            tracing::warn!(endpoint = %id, %state, "endpoint is disabled (state kept in the store)");
        }
    }
    let kafka = kafka_config(&config.source, &bootstrap);
    let dead_letters = DeadLetters::new(&kafka, &config.source.dead_letter_topic)?;
    let health = Arc::new(Health::default());
    let source = Source::new(
        &config.source,
        &bootstrap,
        store.clone(),
        registry.clone(),
        dead_letters.clone(),
        health.clone(),
    )?;
    let (admin_addr, admin_serve) = admin::bind(
        config.admin.listen,
        prom,
        health.clone(),
        store.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| AppError::Admin {
        addr: config.admin.listen,
        source,
    })?;

    let deliverer = Arc::new(Deliverer {
        store: store.clone(),
        client: client::build(&config.delivery),
        dead_letters,
        policy: config.retry.clone(),
        max_response_bytes: config.delivery.max_response_bytes,
        attempts: TaskTracker::new(),
        abort: CancellationToken::new(),
    });
    let workers = TaskTracker::new();
    for ep in registry.snapshot().all() {
        workers.spawn(deliverer.clone().run_endpoint(ep.clone(), shutdown.clone()));
    }
    workers.close();
    let scheduler = tokio::spawn(schedule::run(store.clone(), shutdown.clone()));
    let source_task = tokio::spawn(source.run(shutdown.clone()));
    let admin_task = tokio::spawn(admin_serve);
    health.started.store(true, Ordering::Release);
    tracing::info!(admin = %admin_addr, bootstrap = %bootstrap, topics = ?config.source.topics,
        endpoints = config.endpoints.len(), store = %config.store.path.display(), "webhookd running");

    let grace = config.delivery.shutdown_grace;
    let main = tokio::spawn(async move {
        shutdown.cancelled().await;
        health.stopping.store(true, Ordering::Release);
        tracing::info!(grace = ?grace, "shutting down: no new fetches; finishing attempts under way");
        let consumer = source_task
            .await
            .map_err(|e| AppError::Task(e.to_string()))?;
        workers.wait().await;
        let _ = scheduler.await;
        deliverer.attempts.close();
        if tokio::time::timeout(grace, deliverer.attempts.wait())
            .await
            .is_err()
        {
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
        let closed = tokio::time::timeout(
            CONSUMER_CLOSE_TIMEOUT,
            tokio::task::spawn_blocking(move || drop(consumer)),
        )
        .await;
        if closed.is_err() {
            tracing::warn!("the Kafka consumer did not close in time; leaving it");
        }
        let _ = admin_task.await;
        drop(embedded);
        tracing::info!("webhookd stopped");
        Ok(())
    });
    Ok(Started {
        admin_addr,
        bootstrap,
        main,
    })
}
