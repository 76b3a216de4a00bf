//! The Kafka source: consume, decode, route, and write each batch to the
//! outbox; commit offsets only up to what is settled.
//!
//! Messages are gathered into batches (whatever the consumer already holds, up
//! to `batch_max`; with a nonzero `batch_linger`, for up to that long after the
//! first), routed against one snapshot of the endpoints, and written
//! in one atomic store call with their dedup keys. A message is settled when
//! that write returns, or, for a message that cannot be decoded, when its dead
//! letter is acknowledged. [`offsets::Offsets`] turns settlements into the
//! offsets that may be committed; they are committed every `commit_interval`,
//! when partitions are revoked, and at shutdown.

pub mod embedded;
pub mod offsets;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SourceConfig;
use crate::dead_letter::{self, DeadLetters};
use crate::deliver::sleep_or_cancel;
use crate::event::{self, Event, InvalidEvent, RawMessage, SourcePos};
use crate::route::Registry;
use crate::store::{Delivery, Intake, IntakeGate, NewEvent, Store, now_ms};
use crate::telemetry::admin::Health;
use crate::telemetry::metrics as m;
use offsets::{Offsets, Tp};

/// Batches being written to the store at once; more waits (backpressure).
const BATCHES_IN_FLIGHT: usize = 4;
/// Invalid messages being dead-lettered at once; more waits.
const DEAD_LETTERS_IN_FLIGHT: usize = 256;
/// How long shutdown waits for batches and dead letters under way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often librdkafka reports statistics (the consumer lag gauges), unless
/// `source.kafka` sets `statistics.interval.ms`.
const STATS_INTERVAL_MS: &str = "5000";
/// librdkafka's default is 500 ms: a broker that does not answer a fetch as
/// soon as data arrives (tansu, the mock cluster) then adds up to that to every
/// event's latency (measured: p50 191 ms at 9,300 events/s on tansu). Kafka
/// answers early anyway; idle, this costs a few more fetch requests. Vector's
/// Kafka source uses the same 100 ms. `source.kafka` can set it.
const FETCH_WAIT_MAX_MS: &str = "100";
/// Messages prefetched ahead of the consumer, at most (librdkafka: 64 MiB):
/// 8 MiB is about 200 ms of 1 KiB events at full speed. Measured with 100
/// endpoints: peak RSS 262 → 234 MiB against 32 MiB, throughput unchanged.
const PREFETCH_KBYTES: &str = "8192";
/// Most bytes one fetch returns per partition (librdkafka: 1 MiB). A fetch
/// response's buffer lives until the last of its messages is freed, so
/// smaller responses keep less memory pinned behind a few unconsumed
/// messages (a heap profile showed 17 MB of them). A larger first message is
/// still returned whole.
const PARTITION_FETCH_BYTES: &str = "262144";
/// How long librdkafka holds off fetching once the prefetch is full
/// (default 1000 ms). With 8 MiB and the default, the consumer idled most of
/// each second: 15,300 events/s instead of 35,400.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// webhookd's own librdkafka consumer defaults; `source.kafka` overrides each.
pub const CONSUMER_DEFAULTS: [(&str, &str); 5] = [
    ("statistics.interval.ms", STATS_INTERVAL_MS),
    ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS),
    ("queued.max.messages.kbytes", PREFETCH_KBYTES),
    ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
    ("max.partition.fetch.bytes", PARTITION_FETCH_BYTES),
];

/// librdkafka settings shared by the consumer and the dead-letter producer.
pub fn kafka_config(cfg: &SourceConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("client.id", "webhookd");
    for (k, v) in &cfg.kafka {
        c.set(k, v);
    }
    c
}

pub struct ConsumerCtx {
    offsets: Arc<Mutex<Offsets>>,
    health: Arc<Health>,
}

fn lag_gauge(topic: &str, partition: i32) -> metrics::Gauge {
    metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.to_owned(), "partition" => partition.to_string())
}

fn lock(o: &Mutex<Offsets>) -> std::sync::MutexGuard<'_, Offsets> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

fn tp_list(items: &[(Tp, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in items {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

/// Whether a librdkafka log line is an offset reset forced by an error:
/// "TOPIC [P]: offset reset (at POSITION, broker B) to …: REASON: ERROR".
/// Resets for want of a committed offset are debug lines and never match.
fn is_forced_offset_reset(fac: &str, log_message: &str) -> bool {
    fac == "OFFSET" && log_message.contains("]: offset reset (at ")
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if is_forced_offset_reset(fac, log_message) {
            // The broker no longer has the position webhookd was at (most
            // often retention deleted events nobody had read yet): librdkafka
            // resumes at the oldest offset still there (auto.offset.reset =
            // earliest). What was deleted cannot be delivered.
            metrics::counter!(m::CONSUMER_OFFSET_RESETS).increment(1);
            tracing::error!(
                target: "librdkafka",
                fac,
                "a partition's position is gone from the broker; consuming from the oldest offset it still has. \
                 Events that retention deleted before webhookd read them are lost: {log_message}"
            );
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }

    /// Consumer lag of the partitions we own. librdkafka counts it from the
    /// committed offset, which here only moves past settled events, so it is
    /// the backlog not yet safely in the outbox. Unknown (-1) until the
    /// partition has a committed offset.
    fn stats(&self, stats: Statistics) {
        let o = lock(&self.offsets);
        for (topic, t) in &stats.topics {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 && o.owns(&(topic.clone(), partition)) {
                    lag_gauge(topic, partition).set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is settled for the partitions we lose, and forget them:
            // anything still unsettled will be consumed again by the next owner.
            let commit: Vec<(Tp, i64)> = {
                let mut o = lock(&self.offsets);
                tpl.elements()
                    .iter()
                    .filter_map(|e| {
                        let tp = (e.topic().to_owned(), e.partition());
                        o.revoke(&tp).map(|off| (tp, off))
                    })
                    .collect()
            };
            for e in tpl.elements() {
                // The new owner reports it now; a sum over instances stays right.
                lag_gauge(e.topic(), e.partition()).set(0.0);
            }
            metrics::gauge!(m::PARTITIONS_ASSIGNED).set(lock(&self.offsets).assigned() as f64);
            tracing::info!(partitions = tpl.count(), commits = commit.len(), "partitions revoked");
            if !commit.is_empty() {
                let result = consumer.commit(&tp_list(&commit), CommitMode::Sync);
                record_commit(&result);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut o = lock(&self.offsets);
            for e in tpl.elements() {
                o.assign((e.topic().to_owned(), e.partition()));
            }
            metrics::gauge!(m::PARTITIONS_ASSIGNED).set(o.assigned() as f64);
            // An empty assignment counts: the group has placed us (there may be
            // more instances than partitions).
            self.health.assigned.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

fn record_commit(result: &KafkaResult<()>) {
    match result {
        Ok(()) => metrics::counter!(m::OFFSET_COMMITS, "result" => "ok").increment(1),
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            metrics::counter!(m::OFFSET_COMMITS, "result" => "error").increment(1);
            tracing::warn!(error = %e, "offset commit failed; it will be retried");
        }
    }
}

pub type KafkaConsumer = StreamConsumer<ConsumerCtx>;

/// Commits the settled offsets that moved, synchronously, and records the result.
fn commit_now(consumer: &KafkaConsumer, offsets: &Mutex<Offsets>) {
    let items = lock(offsets).to_commit();
    if items.is_empty() {
        return;
    }
    let result = consumer.commit(&tp_list(&items), CommitMode::Sync);
    record_commit(&result);
    if result.is_ok() {
        let mut o = lock(offsets);
        for (tp, off) in &items {
            o.committed(tp, *off);
        }
    }
}

pub struct Source {
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Mutex<Offsets>>,
    store: Store,
    registry: Registry,
    dead_letters: DeadLetters,
    cfg: SourceConfig,
    health: Arc<Health>,
    /// A periodic commit is under way.
    committing: Arc<std::sync::atomic::AtomicBool>,
    /// Backpressure (`source.backpressure`): holds a batch while the endpoint
    /// workers catch up.
    gate: Option<IntakeGate>,
}

impl Source {
    pub fn new(
        cfg: &SourceConfig,
        bootstrap: &str,
        store: Store,
        registry: Registry,
        dead_letters: DeadLetters,
        health: Arc<Health>,
    ) -> Result<Source, KafkaError> {
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        let mut client = kafka_config(cfg, bootstrap);
        for (key, value) in CONSUMER_DEFAULTS {
            if !cfg.kafka.0.contains_key(key) {
                client.set(key, value);
            }
        }
        // librdkafka drops log lines above the level rust-rdkafka derives from
        // the log filter; the offset resets counted in `log` are warnings, so
        // they must get through even with `log.level = "error"`.
        if matches!(
            client.log_level,
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error
        ) {
            client.set_log_level(RDKafkaLogLevel::Warning);
        }
        let consumer: KafkaConsumer = client
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
            .create_with_context(ConsumerCtx { offsets: offsets.clone(), health: health.clone() })?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Source {
            consumer: Arc::new(consumer),
            offsets,
            committing: Arc::default(),
            gate: cfg.backpressure.then(|| store.intake_gate()),
            store,
            registry,
            dead_letters,
            cfg: cfg.clone(),
            health,
        })
    }

    /// Consumes until `shutdown`, then drains and commits what is settled.
    /// Returns the consumer so the caller can close it under a timeout.
    pub async fn run(self, shutdown: CancellationToken) -> Arc<KafkaConsumer> {
        let probe = tokio::spawn(probe(
            self.consumer.clone(),
            self.cfg.topics[0].clone(),
            self.health.clone(),
            shutdown.clone(),
        ));
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        let dead_letter_slots = Arc::new(Semaphore::new(DEAD_LETTERS_IN_FLIGHT));
        let tasks = TaskTracker::new();
        let mut batch: Vec<(Event, u64)> = Vec::with_capacity(self.cfg.batch_max.get());
        let mut deadline: Option<Instant> = None;
        let mut commit_tick = tokio::time::interval(self.cfg.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = commit_tick.tick() => self.commit_in_background(),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    deadline = None;
                    self.flush(&mut batch, &slots, &tasks, &shutdown).await;
                }
                msg = self.consumer.recv() => match msg {
                    Ok(msg) => {
                        self.take(&msg, &mut batch, &tasks, &dead_letter_slots, &shutdown).await;
                        drop(msg);
                        // What the consumer already holds joins the batch at once.
                        let mut drained = false;
                        while batch.len() < self.cfg.batch_max.get() {
                            match held_message(&self.consumer) {
                                Some(Ok(msg)) => self.take(&msg, &mut batch, &tasks, &dead_letter_slots, &shutdown).await,
                                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                                None => {
                                    drained = true;
                                    break;
                                }
                            }
                        }
                        let full = batch.len() >= self.cfg.batch_max.get();
                        if full || (drained && self.cfg.batch_linger.is_zero()) {
                            deadline = None;
                            self.flush(&mut batch, &slots, &tasks, &shutdown).await;
                        } else if deadline.is_none() && !batch.is_empty() {
                            deadline = Some(Instant::now() + self.cfg.batch_linger);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "consumer error"),
                },
            }
        }
        self.flush(&mut batch, &slots, &tasks, &shutdown).await;
        tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait()).await.is_err() {
            tracing::warn!("some messages were not settled at shutdown; they will be consumed again");
        }
        commit_now(&self.consumer, &self.offsets);
        let _ = probe.await;
        tracing::info!(unsettled = lock(&self.offsets).unsettled(), "source stopped");
        self.consumer
    }

    /// The periodic commit: synchronous (so its result is known and counted)
    /// on the blocking pool, so the consumer loop never waits for the
    /// coordinator; a tick while the last commit is still out is skipped.
    /// (librdkafka hands a manual commit's result only to its caller: with
    /// rust-rdkafka's event API a context's commit callback sees automatic
    /// commits alone, which webhookd turns off. Asynchronous commits went
    /// uncounted.)
    fn commit_in_background(&self) {
        if self.committing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let (consumer, offsets, committing) = (self.consumer.clone(), self.offsets.clone(), self.committing.clone());
        tokio::task::spawn_blocking(move || {
            commit_now(&consumer, &offsets);
            committing.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Decodes one message into the batch, or dead-letters it.
    async fn take(
        &self,
        msg: &BorrowedMessage<'_>,
        batch: &mut Vec<(Event, u64)>,
        tasks: &TaskTracker,
        dead_letter_slots: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) {
        metrics::counter!(m::EVENTS_CONSUMED).increment(1);
        let tp = (msg.topic().to_owned(), msg.partition());
        let generation = lock(&self.offsets).received(&tp, msg.offset());
        let pos = SourcePos { topic: tp.0.clone(), partition: tp.1, offset: msg.offset() };
        let env = &self.cfg.envelope;
        let headers =
            if env.id_header.is_some() || env.type_header.is_some() { read_headers(msg) } else { Ok(Vec::new()) };
        let decoded = headers.and_then(|headers| {
            let raw = RawMessage {
                value: msg.payload(),
                headers,
                kafka_time_ms: msg.timestamp().to_millis(),
                source: pos.clone(),
            };
            event::decode(raw, env, self.cfg.max_event_bytes.get(), now_ms())
        });
        let invalid = match decoded {
            Ok(ev) => return batch.push((ev, generation)),
            Err(invalid) => invalid,
        };
        metrics::counter!(m::EVENTS_INVALID, "reason" => invalid.reason()).increment(1);
        tracing::warn!(topic = %pos.topic, partition = pos.partition, offset = pos.offset,
            reason = invalid.reason(), detail = %invalid, "invalid event: dead-lettering it");
        let record = dead_letter::invalid_record(&pos, msg.payload(), &invalid, now_ms());
        let key = msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map_or_else(|| format!("{}/{}/{}", pos.topic, pos.partition, pos.offset), str::to_owned);
        // Bounded: a flood of bad messages while the dead-letter topic is
        // unreachable holds the consumer instead of piling up tasks.
        let permit = dead_letter_slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (dlq, offsets, shutdown) = (self.dead_letters.clone(), self.offsets.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _permit = permit;
            loop {
                match dlq.send(&key, invalid.reason(), &record).await {
                    Ok(()) => {
                        lock(&offsets).settled(&tp, generation, pos.offset);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, offset = pos.offset, "cannot dead-letter invalid event; retrying");
                        if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Routes the batch and writes it to the store in the background, once
    /// the endpoint workers have caught up when `source.backpressure` is on.
    async fn flush(
        &self,
        batch: &mut Vec<(Event, u64)>,
        slots: &Arc<Semaphore>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        if batch.is_empty() {
            return;
        }
        if let Some(gate) = &self.gate {
            let waited = gate.admit(shutdown).await;
            if !waited.is_zero() {
                metrics::histogram!(m::INTAKE_WAIT).record(waited.as_secs_f64());
            }
        }
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let table = self.registry.snapshot();
        let mut settle = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (ev, generation) in batch.drain(..) {
            let deliveries = table
                .route(&ev.event_type, ev.location_id.as_deref())
                .iter()
                .map(|ep| Delivery::new(&ev, ep.id()))
                .collect();
            settle.push(((ev.source.topic, ev.source.partition), generation, ev.source.offset));
            events.push(NewEvent { event_id: ev.id, deliveries });
        }
        let events = Arc::new(events);
        let (store, offsets, shutdown) = (self.store.clone(), self.offsets.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _permit = permit;
            loop {
                match store.intake(events.clone()).await {
                    Ok(results) => {
                        let dups = results.iter().filter(|r| **r == Intake::Duplicate).count();
                        if dups > 0 {
                            metrics::counter!(m::EVENTS_DUPLICATE).increment(dups as u64);
                        }
                        let mut o = lock(&offsets);
                        for (tp, generation, offset) in &settle {
                            o.settled(tp, *generation, *offset);
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, events = events.len(), "cannot write events to the store; consumption is held until it can");
                        if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The next message if the consumer already holds one; `None` without waiting
/// if it holds none. (The stream's waker slot is released when the poll's
/// future is dropped.)
fn held_message(consumer: &KafkaConsumer) -> Option<KafkaResult<BorrowedMessage<'_>>> {
    let mut next = std::pin::pin!(consumer.recv());
    match next.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(result) => Some(result),
        std::task::Poll::Pending => None,
    }
}

/// The message's headers. rdkafka's accessors panic on a header key that is
/// not UTF-8; such a message is dead-lettered instead of stopping the consumer.
fn read_headers<'m>(msg: &'m BorrowedMessage<'_>) -> Result<event::Headers<'m>, InvalidEvent> {
    let Some(h) = msg.headers() else { return Ok(Vec::new()) };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.iter().map(|h| (h.key, h.value)).collect()))
        .map_err(|_| InvalidEvent::BadHeader("(a header key that is not UTF-8)".into()))
}

/// Keeps `health.kafka` true while the cluster answers metadata requests.
async fn probe(consumer: Arc<KafkaConsumer>, topic: String, health: Arc<Health>, shutdown: CancellationToken) {
    loop {
        let c = consumer.clone();
        let t = topic.clone();
        let ok = tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), Duration::from_secs(3)).is_ok())
            .await
            .unwrap_or(false);
        if health.kafka.swap(ok, std::sync::atomic::Ordering::AcqRel) != ok {
            if ok {
                tracing::info!("Kafka reachable");
            } else {
                tracing::warn!("Kafka unreachable: not ready");
            }
        }
        if sleep_or_cancel(PROBE_INTERVAL, &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_offset_resets_forced_by_an_error_match() {
        // As librdkafka 2.12 logged it when the mock broker had dropped the position.
        let forced = "[thrd:main]: load-661138a6da2c2 [0]: offset reset (at offset 3071 (leader epoch 0), broker 1) \
                      to cached BEGINNING offset offset 5684 (leader epoch -1): fetch failed due to requested offset \
                      not available on the broker: Broker: Offset out of range";
        assert!(is_forced_offset_reset("OFFSET", forced));
        assert!(!is_forced_offset_reset("FETCH", forced), "another facility");
        assert!(!is_forced_offset_reset("OFFSET", "[thrd:main]: t [0]: committed offset 12 is stored"));
    }
}
