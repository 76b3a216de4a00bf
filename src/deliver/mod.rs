//! Delivery: one worker per endpoint, each with its own rate limit and
//! in-flight cap, taking that endpoint's ready deliveries from its feed (new
//! ones, handed over in memory by the store's writer) or, when it has fallen
//! behind, reading them from the store.
//!
//! Isolation comes from the shape: a worker only ever waits on its own
//! endpoint's limiter and semaphore, attempts run as their own tasks, and the
//! Kafka source never waits on delivery at all (it is done once the delivery
//! is in the outbox). A worker holds at most one small batch in memory; the
//! rest of a backlog stays in RocksDB.
//!
//! Per attempt: sign → send within the budget → [`outcome::classify`] →
//! retry policy → one store write that settles it: delivered (not waited
//! for; the writer keeps it until written), wait, or dead.

pub mod client;
pub mod guard;
pub mod outcome;
pub mod sign;

use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dead_letter::{self, DeadLetters, DeliveryFailure};
use crate::retry::{RetryDecision, RetryPolicy};
use crate::route::Endpoint;
use crate::store::{Feed, Next, ReadyItem, Store, Take, now_ms};
use client::{AttemptRequest, HttpClient};
use outcome::{AttemptError, Outcome, classify};

/// How long a dead letter that could not be produced waits before the next try.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(10);
/// Most parked retries one recall moves. Small, because many endpoints may
/// recover at once and the writer holds their chunks together in one batch:
/// 100 endpoints × 128 × 1 KiB is 13 MiB.
const RECALL_CHUNK: usize = 128;
/// Pause after a failed store call before trying again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// What every endpoint worker shares.
pub struct Deliverer {
    pub store: Store,
    pub client: HttpClient,
    pub dead_letters: DeadLetters,
    pub policy: RetryPolicy,
    pub max_response_bytes: usize,
    /// Attempt tasks, so shutdown can wait for them.
    pub attempts: TaskTracker,
    /// Cancelled when the shutdown grace period is over: attempts still under
    /// way are abandoned and stay in the outbox.
    pub abort: CancellationToken,
}

impl Deliverer {
    /// Runs one endpoint's worker until `shutdown`.
    pub async fn run_endpoint(self: Arc<Self>, ep: Arc<Endpoint>, shutdown: CancellationToken) {
        let feed = self.store.wakeups().endpoint(ep.id());
        let rl = &ep.config.rate_limit;
        let limiter = RateLimiter::direct(Quota::per_second(rl.per_second).allow_burst(rl.burst));
        let in_flight = Arc::new(Semaphore::new(ep.config.max_in_flight.get()));
        let batch = ep.config.max_in_flight.get().clamp(16, 256);
        // The highest sequence number taken; ready deliveries come in sequence order.
        let mut cursor: Option<u64> = None;
        // Reading the store until caught up, rather than taking from the feed.
        let mut reading = false;
        let mut recall = Recall::new(self.policy.base(), self.policy.cap());
        loop {
            let (items, scanned_to) = if reading {
                match self.store.load_ready(ep.id(), cursor, batch).await {
                    Ok((items, None)) if items.is_empty() => {
                        reading = false;
                        continue;
                    }
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::error!(endpoint = ep.id(), error = %e, "cannot load ready deliveries");
                        if sleep_or_cancel(STORE_RETRY, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                match feed.take(batch) {
                    Take::Items(items) => (items, None),
                    Take::Behind => {
                        reading = true;
                        continue;
                    }
                    Take::Empty => {
                        if self.idle(&ep, &feed, &mut recall, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            };
            for item in items {
                if cursor.is_some_and(|c| item.seq <= c) {
                    continue; // Already taken from the store.
                }
                let permit = tokio::select! {
                    p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = shutdown.cancelled() => return,
                };
                cursor = Some(item.seq);
                let needs_http = ep.is_enabled() && item.delivery.dead_letter_reason.is_none();
                if needs_http && limiter.check().is_err() {
                    ep.metrics.rate_limited.increment(1);
                    tokio::select! {
                        _ = limiter.until_ready() => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                let (this, ep) = (self.clone(), ep.clone());
                // Status, outcome and duration are filled in when the attempt ends.
                let span = tracing::info_span!("attempt", endpoint = ep.id(), event_id = %item.delivery.event_id,
                    webhook_id = %item.delivery.webhook_id, attempt = item.delivery.attempts + 1,
                    status = tracing::field::Empty, outcome = tracing::field::Empty,
                    duration_ms = tracing::field::Empty);
                self.attempts.spawn(
                    async move {
                        this.settle(ep, item, permit).await;
                    }
                    .instrument(span),
                );
            }
            cursor = cursor.max(scanned_to);
        }
    }

    /// A worker with nothing to take: if its endpoint recovered, brings one
    /// chunk of parked retries forward; otherwise waits for the feed (or for
    /// the next recall's time). True once `shutdown` is cancelled.
    async fn idle(&self, ep: &Endpoint, feed: &Feed, recall: &mut Recall, shutdown: &CancellationToken) -> bool {
        if recall.active && ep.is_failing() {
            recall.stop(ep);
        }
        let wanted = recall.active || ep.recall_wanted();
        if wanted && (recall.active || Instant::now() >= recall.not_before) {
            if !recall.active && ep.take_recall() {
                recall.start(Instant::now());
            }
            return match self.store.recall(ep.id(), RECALL_CHUNK).await {
                Ok((moved, more)) => {
                    recall.moved(ep, moved, more);
                    false
                }
                Err(e) => {
                    tracing::error!(endpoint = ep.id(), error = %e, "cannot bring parked retries forward");
                    sleep_or_cancel(STORE_RETRY, shutdown).await
                }
            };
        }
        let until = tokio::time::Instant::from_std(recall.not_before);
        tokio::select! {
            _ = feed.notified() => false,
            _ = tokio::time::sleep_until(until), if wanted => false,
            _ = shutdown.cancelled() => true,
        }
    }

    /// Attempts one delivery (or finishes dead-lettering it) and records the
    /// result. The endpoint's in-flight `slot` is released once the result is
    /// written: a delivered one's by the store's writer.
    async fn settle(&self, ep: Arc<Endpoint>, item: ReadyItem, slot: OwnedSemaphorePermit) {
        let metrics = &ep.metrics;
        let ReadyItem { key, delivery: mut d, .. } = item;
        let next = if let Some(reason) = d.dead_letter_reason.take() {
            self.dead_letter(d, DeliveryFailure::parse(&reason)).await
        } else if ep.is_removed() {
            self.dead_letter(d, DeliveryFailure::EndpointRemoved).await
        } else if !ep.is_enabled() {
            self.dead_letter(d, DeliveryFailure::EndpointDisabled).await
        } else {
            let started_ms = now_ms();
            d.attempts += 1;
            if d.first_attempt_ms == 0 {
                d.first_attempt_ms = started_ms;
            }
            d.last_attempt_ms = started_ms;
            let gauge = &metrics.in_flight;
            gauge.increment(1.0);
            let started = Instant::now();
            let request = AttemptRequest {
                url: &ep.config.url,
                authorization: ep.config.authorization.as_ref(),
                webhook_id: &d.webhook_id,
                body: d.payload.clone(),
                secrets: &ep.config.secrets,
                legacy_hmac_header: ep.config.legacy_hmac_header,
                budget: ep.config.attempt_timeout,
                max_response_bytes: self.max_response_bytes,
            };
            let result = tokio::select! {
                r = client::attempt(&self.client, request) => r,
                _ = self.abort.cancelled() => {
                    gauge.decrement(1.0);
                    tracing::info!("attempt abandoned at shutdown; it stays in the outbox");
                    return;
                }
            };
            gauge.decrement(1.0);
            let elapsed = started.elapsed();
            metrics.attempt_duration.record(elapsed.as_secs_f64());
            let outcome = classify(&result);
            metrics.delivery(outcome.as_str()).increment(1);
            if outcome == Outcome::Delivered && d.event_time_ms > 0 {
                metrics.delivery_latency.record((now_ms() - d.event_time_ms).max(0) as f64 / 1000.0);
            }
            match &result {
                Ok(r) => {
                    d.last_status = r.status;
                    d.last_error.clear();
                }
                Err(e) => {
                    d.last_status = 0;
                    d.last_error = e.to_string();
                }
            }
            log_attempt(&result, outcome, elapsed);
            match outcome {
                Outcome::Delivered => {
                    if ep.note_delivered() {
                        self.store.wakeups().endpoint(ep.id()).wake();
                    }
                    // Not waited for while the store is healthy: the writer
                    // keeps it, and the slot, until it is written.
                    let mut slot = Some(slot);
                    while let Err(e) = self.store.delivered(key.clone(), &mut slot).await {
                        tracing::error!(error = %e, "cannot record the delivery as done; retrying");
                        if sleep_or_cancel(STORE_RETRY, &self.abort).await {
                            return;
                        }
                    }
                    return;
                }
                Outcome::Retry { retry_after } => {
                    let age = Duration::from_millis((now_ms() - d.first_attempt_ms).max(0) as u64);
                    // A delay the receiver asked for is kept, recovery or not.
                    let recall = retry_after.is_none();
                    ep.note_failed(recall);
                    match self.policy.decide_now(d.attempts, age, retry_after) {
                        RetryDecision::After(delay) => {
                            metrics.retries_scheduled.increment(1);
                            let due_ms = now_ms() + delay.as_millis() as i64;
                            Some(Next::Wait { due_ms, delivery: d, recall })
                        }
                        RetryDecision::Exhausted => self.dead_letter(d, DeliveryFailure::Exhausted).await,
                    }
                }
                Outcome::DeadLetter => {
                    let why = match result {
                        Err(AttemptError::Refused(_)) => DeliveryFailure::Refused,
                        Err(AttemptError::Destination(_)) => DeliveryFailure::DestinationRefused,
                        _ => DeliveryFailure::Rejected,
                    };
                    self.dead_letter(d, why).await
                }
                Outcome::Gone => {
                    self.disable(&ep).await;
                    self.dead_letter(d, DeliveryFailure::Gone).await
                }
            }
        };
        // None: shutdown's grace ran out while dead-lettering; it stays in the outbox.
        let Some(next) = next else { return };
        while let Err(e) = self.store.finish(key.clone(), next.clone()).await {
            tracing::error!(error = %e, "cannot record the attempt's result; retrying");
            if sleep_or_cancel(STORE_RETRY, &self.abort).await {
                return;
            }
        }
    }

    /// Produces the dead letter; if the topic cannot take it now, parks the
    /// delivery in the retry schedule marked to be dead-lettered later. None
    /// if shutdown's grace period ran out first.
    async fn dead_letter(&self, mut d: crate::store::Delivery, why: DeliveryFailure) -> Option<Next> {
        let record = dead_letter::delivery_record(&d, why, now_ms());
        let sent = tokio::select! {
            r = self.dead_letters.send(&d.event_id, why.as_str(), &record) => r,
            _ = self.abort.cancelled() => return None,
        };
        Some(match sent {
            Ok(()) => {
                tracing::warn!(endpoint = %d.endpoint_id, event_id = %d.event_id, reason = why.as_str(),
                    attempts = d.attempts, last_status = d.last_status, last_error = %d.last_error, "dead-lettered");
                Next::Dead { record }
            }
            Err(e) => {
                tracing::error!(error = %e, reason = why.as_str(), "cannot produce dead letter; will try again");
                d.dead_letter_reason = Some(why.as_str().to_owned());
                Next::Wait { due_ms: now_ms() + DEAD_LETTER_RETRY.as_millis() as i64, delivery: d, recall: false }
            }
        })
    }

    async fn disable(&self, ep: &Endpoint) {
        if !ep.set_enabled(false) {
            return;
        }
        tracing::warn!(endpoint = ep.id(), "endpoint answered 410 Gone: disabled");
        let state = serde_json::json!({ "disabled": true, "reason": "gone", "status": 410, "at_ms": now_ms() });
        while let Err(e) = self.store.set_endpoint_disabled(ep.id(), Some(state.clone())).await {
            tracing::error!(error = %e, "cannot persist disabled endpoint; retrying");
            if sleep_or_cancel(STORE_RETRY, &self.abort).await {
                return;
            }
        }
    }
}

/// An endpoint worker's recall of parked retries once its endpoint answered
/// 2xx after an outage ([`Endpoint::note_delivered`]).
///
/// A recalled retry that fails is parked again, and a flapping endpoint could
/// recall it again at once: so recalls start at least a gap apart, and the
/// gap doubles with each one, from the retry base to its cap (reset after a
/// cap's time without one). A recalled retry thus gets extra attempts no
/// faster than its own backoff would give them. A recall also stops when the
/// endpoint is failing again.
#[derive(Debug)]
struct Recall {
    /// Under way: more may be parked.
    active: bool,
    /// Moved by this recall so far.
    moved: usize,
    /// When the next recall may start, and the gap after that one.
    not_before: Instant,
    gap: Duration,
    last_start: Option<Instant>,
    base: Duration,
    cap: Duration,
}

impl Recall {
    fn new(base: Duration, cap: Duration) -> Recall {
        Recall { active: false, moved: 0, not_before: Instant::now(), gap: base, last_start: None, base, cap }
    }

    fn start(&mut self, now: Instant) {
        if self.last_start.is_some_and(|t| now.duration_since(t) > self.cap) {
            self.gap = self.base;
        }
        self.active = true;
        self.last_start = Some(now);
        self.not_before = now + self.gap;
        self.gap = (self.gap * 2).min(self.cap);
    }

    fn moved(&mut self, ep: &Endpoint, moved: usize, more: bool) {
        self.moved += moved;
        ep.metrics.retries_recalled.increment(moved as u64);
        if !more {
            if self.moved > 0 {
                tracing::info!(
                    endpoint = ep.id(),
                    recalled = self.moved,
                    "endpoint recovered: parked retries brought forward"
                );
            }
            self.active = false;
            self.moved = 0;
        }
    }

    fn stop(&mut self, ep: &Endpoint) {
        tracing::info!(
            endpoint = ep.id(),
            recalled = self.moved,
            "endpoint failing again while parked retries were brought forward: recall stopped"
        );
        self.active = false;
        self.moved = 0;
    }
}

/// Fills in the attempt's span and logs it: every attempt at `debug`, failed ones at `info`.
fn log_attempt(result: &Result<outcome::Response, AttemptError>, outcome: Outcome, elapsed: Duration) {
    let ms = elapsed.as_secs_f64() * 1000.0;
    let span = tracing::Span::current();
    span.record("outcome", outcome.as_str());
    span.record("duration_ms", ms);
    if let Ok(r) = result {
        span.record("status", r.status);
    }
    match result {
        Ok(r) => tracing::debug!(status = r.status, outcome = outcome.as_str(), duration_ms = ms, "attempt finished"),
        Err(e) => {
            tracing::info!(error = %e, outcome = outcome.as_str(), duration_ms = ms, "attempt failed")
        }
    }
}

/// Sleeps for `d`; true if `token` was cancelled first.
pub(crate) async fn sleep_or_cancel(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = token.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recalls_start_a_doubling_gap_apart_until_a_quiet_cap() {
        let (base, cap) = (Duration::from_secs(5), Duration::from_secs(60));
        let mut r = Recall::new(base, cap);
        let t0 = Instant::now();
        let mut at = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            r.start(at);
            gaps.push((r.not_before - at).as_secs());
            at = r.not_before;
            r.active = false;
        }
        assert_eq!(gaps, [5, 10, 20, 40, 60, 60]);
        let quiet = at + cap + Duration::from_secs(1);
        r.start(quiet);
        assert_eq!(r.not_before - quiet, base, "a cap's time without a recall resets the gap");
    }
}
