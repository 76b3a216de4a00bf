//! Backpressure from the outbox to the consumer.
//!
//! While Kafka holds a backlog the consumer reads faster than the endpoints
//! are served, and without a bound the outbox's ready queue would take in the
//! whole backlog: safe, since it is durable, but every delivery beyond what the
//! workers' feeds hold in memory is read back from RocksDB, flushed and
//! compacted. So the consumer waits while the workers have [`HIGH`] or more
//! ready deliveries that they will deliver within [`MAX_PAUSE`].
//!
//! A slow or failing endpoint must not make the consumer wait, or it would
//! delay the events of every other endpoint. So each endpoint counts only what
//! it would deliver within [`MAX_PAUSE`] at its own pace of deliveries (2xx):
//! `min(ready, pace × 0.5 s)`. An endpoint that delivers little counts for
//! little, whatever it holds, and one that fails fast (refused, 4xx, 5xx)
//! counts for nothing; one alone must deliver 8,192 a second to make the
//! consumer wait.
//! The store's writer keeps each endpoint's ready count and pace
//! ([`Backlog`]) and publishes the sum ([`Drainable`]); the consumer reads it
//! ([`IntakeGate`]) and never waits longer than [`MAX_PAUSE`] at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The consumer waits while the workers will deliver this many ready
/// deliveries within [`MAX_PAUSE`]: half of what their feeds hold in memory,
/// so the batches already on their way to the store (4 of 512 events by
/// default) still fit there.
pub const HIGH: i64 = (super::feed::TOTAL / 2) as i64;
/// The horizon of what counts, and the longest the consumer waits at a time.
pub const MAX_PAUSE: Duration = Duration::from_millis(500);
/// How often the writer measures each endpoint's pace (at a commit, so only
/// while something happens).
pub(super) const SWEEP: Duration = Duration::from_millis(20);
/// A sum older than this is not used: the workers may have stopped.
const FRESH: Duration = Duration::from_millis(100);

/// Each endpoint's share of the ready queue, kept by the store's writer (on
/// its thread alone) from the groups it commits.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    endpoints: HashMap<Box<[u8]>, Share>,
    swept: Option<Instant>,
}

#[derive(Debug, Default)]
struct Share {
    ready: i64,
    /// Delivered since the last sweep.
    delivered: u64,
    /// Delivered per second, smoothed over sweeps.
    per_s: f64,
}

/// One group's changes to the endpoints' shares (endpoint id → ready delta,
/// delivered), applied once it commits. The default keeps nothing: without
/// backpressure the writer does no work for it.
#[derive(Debug, Default)]
pub(super) struct Changes(Option<HashMap<Vec<u8>, (i64, u64)>>);

impl Changes {
    /// Changes that are kept (backpressure on).
    pub(super) fn kept() -> Changes {
        Changes(Some(HashMap::new()))
    }

    pub(super) fn add(&mut self, endpoint: &[u8], ready: i64, delivered: u64) {
        let Some(map) = &mut self.0 else { return };
        match map.get_mut(endpoint) {
            Some(c) => *c = (c.0 + ready, c.1 + delivered),
            None => {
                map.insert(endpoint.to_vec(), (ready, delivered));
            }
        }
    }

    /// A ready key's endpoint (the key is `endpoint \0 seq`).
    pub(super) fn endpoint_of(ready_key: &[u8]) -> &[u8] {
        &ready_key[..ready_key.len().saturating_sub(9)]
    }
}

impl Backlog {
    /// Starts from the ready deliveries stored per endpoint.
    pub(super) fn new(ready: HashMap<Vec<u8>, i64>) -> Backlog {
        let endpoints = ready.into_iter().map(|(k, n)| (k.into(), Share { ready: n, ..Share::default() })).collect();
        Backlog { endpoints, swept: None }
    }

    pub(super) fn apply(&mut self, changes: &mut Changes) {
        for (endpoint, (ready, delivered)) in changes.0.iter_mut().flat_map(|m| m.drain()) {
            let share = self.endpoints.entry(endpoint.into()).or_default();
            share.ready = (share.ready + ready).max(0);
            share.delivered += delivered;
        }
    }

    /// Once per [`SWEEP`]: measures each endpoint's pace and returns the sum of
    /// `min(ready, pace × MAX_PAUSE)`. Endpoints with nothing ready and no
    /// pace are forgotten.
    pub(super) fn sweep(&mut self, now: Instant) -> Option<i64> {
        let Some(since) = self.swept else {
            self.swept = Some(now);
            self.endpoints.values_mut().for_each(|s| s.delivered = 0);
            return None;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < SWEEP {
            return None;
        }
        self.swept = Some(now);
        let (secs, horizon) = (elapsed.as_secs_f64(), MAX_PAUSE.as_secs_f64());
        // Deliveries complete in bursts (a batch's outcomes commit together):
        // half the last window, half the windows before. After a long quiet
        // spell the old pace means nothing.
        let keep = if elapsed >= MAX_PAUSE { 0.0 } else { 0.5 };
        let mut sum = 0.0;
        self.endpoints.retain(|_, s| {
            s.per_s = keep * s.per_s + (1.0 - keep) * (s.delivered as f64 / secs);
            s.delivered = 0;
            sum += (s.ready as f64).min(s.per_s * horizon);
            s.ready > 0 || s.per_s >= 1.0
        });
        Some(sum as i64)
    }
}

/// The sum the writer last published, and when.
#[derive(Debug, Default)]
pub struct Drainable {
    last: Mutex<Option<(i64, Instant)>>,
    /// Woken when the sum falls below [`HIGH`].
    room: Notify,
}

impl Drainable {
    pub(super) fn publish(&self, sum: i64, now: Instant) {
        let before = self.last.lock().unwrap_or_else(|p| p.into_inner()).replace((sum, now));
        if sum < HIGH && before.is_none_or(|(b, _)| b >= HIGH) {
            self.room.notify_waiters();
        }
    }

    /// The sum last published.
    #[cfg(test)]
    pub(super) fn last_sum(&self) -> Option<i64> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).map(|(sum, _)| sum)
    }

    /// Whether the consumer should wait at `now`.
    fn holds(&self, now: Instant) -> bool {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|(sum, at)| sum >= HIGH && now.saturating_duration_since(at) <= FRESH)
    }
}

/// Where the consumer waits before it hands a batch to the store.
#[derive(Debug)]
pub struct IntakeGate {
    drainable: Arc<Drainable>,
}

impl IntakeGate {
    pub(super) fn new(drainable: Arc<Drainable>) -> IntakeGate {
        IntakeGate { drainable }
    }

    /// Waits while the consumer should; returns how long it waited.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Duration {
        let start = Instant::now();
        let mut waiting = false;
        loop {
            // Registered before the sum is read, so a fall below HIGH in
            // between still wakes this wait.
            let room = self.drainable.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            let now = Instant::now();
            if !self.drainable.holds(now) || now - start >= MAX_PAUSE || shutdown.is_cancelled() {
                return if waiting { start.elapsed() } else { Duration::ZERO };
            }
            waiting = true;
            tokio::select! {
                _ = room => {}
                _ = tokio::time::sleep(SWEEP) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Ten slow endpoints with 500 ready each and a fast one with `fast_ready`.
    fn backlog(fast_ready: i64) -> Backlog {
        let mut ready: HashMap<Vec<u8>, i64> = (0..10).map(|i| (format!("slow{i}").into_bytes(), 500)).collect();
        ready.insert(b"fast".to_vec(), fast_ready);
        Backlog::new(ready)
    }

    /// `n` delivered by each of `endpoints` (one group's outcomes).
    fn deliver(b: &mut Backlog, endpoints: &[&str], n: i64) {
        let mut c = Changes::kept();
        for e in endpoints {
            c.add(e.as_bytes(), -n, n as u64);
        }
        b.apply(&mut c);
    }

    #[test]
    fn each_endpoint_counts_what_it_would_deliver_within_the_pause_at_its_own_pace() {
        let t0 = Instant::now();
        let mut b = backlog(20_000);
        assert_eq!(b.sweep(t0), None, "the first sweep starts the window");
        // In 20 ms the fast endpoint delivers 400 (20,000 a second), the slow ones nothing.
        deliver(&mut b, &["fast"], 400);
        assert_eq!(b.sweep(t0 + 10 * MS), None, "less than a sweep's interval");
        let sum = b.sweep(t0 + SWEEP).expect("swept");
        // Smoothed: half of 20,000/s; 0.5 s of 10,000/s is 5,000 of the 19,600 ready.
        assert_eq!(sum, 5_000, "the slow endpoints' 5,000 ready count for nothing");
        deliver(&mut b, &["fast"], 400);
        assert_eq!(b.sweep(t0 + 2 * SWEEP), Some(7_500), "the pace settles: 15,000/s");
        // The slow endpoints deliver one each in the next 20 ms: 50/s each, 25 each.
        deliver(&mut b, &["fast", "slow0", "slow1", "slow2", "slow3", "slow4"], 1);
        deliver(&mut b, &["slow5", "slow6", "slow7", "slow8", "slow9"], 1);
        let sum = b.sweep(t0 + 3 * SWEEP).expect("swept");
        // fast: (15,000 + 50) / 2 = 7,525/s → 3,762.5; each slow one (0 + 50) / 2 = 25/s → 12.5.
        assert_eq!(sum, 3_887, "the slow endpoints count for what they deliver, not for what they hold");
    }

    #[test]
    fn a_queue_smaller_than_its_pace_counts_whole_and_idle_endpoints_are_forgotten() {
        let t0 = Instant::now();
        let mut b = Backlog::new(HashMap::from([(b"a".to_vec(), 100)]));
        b.sweep(t0);
        deliver(&mut b, &["a"], 100);
        assert_eq!(b.sweep(t0 + SWEEP), Some(0), "nothing left ready counts for nothing, whatever the pace");
        assert_eq!(b.endpoints.len(), 1, "kept while it has a pace");
        // A long quiet spell: the old pace is dropped, and so is the endpoint.
        assert_eq!(b.sweep(t0 + SWEEP + MAX_PAUSE), Some(0));
        assert!(b.endpoints.is_empty());
        // Deleting what was stored before a restart never drives a count below 0.
        let mut c = Changes::kept();
        c.add(b"a", -5, 5);
        b.apply(&mut c);
        assert_eq!(b.endpoints[&b"a"[..]].ready, 0);
    }

    #[test]
    fn the_endpoint_of_a_ready_key() {
        assert_eq!(Changes::endpoint_of(&super::super::ready_key("ep-1", 42)), b"ep-1");
    }

    #[test]
    fn the_consumer_holds_only_for_a_fresh_sum_of_high_or_more_and_is_woken_below() {
        use std::future::Future;
        let d = Drainable::default();
        let t0 = Instant::now();
        assert!(!d.holds(t0), "nothing published");
        d.publish(HIGH, t0);
        assert!(d.holds(t0 + FRESH));
        assert!(!d.holds(t0 + FRESH + MS), "a stale sum: the workers may have stopped");
        let room = d.room.notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        d.publish(HIGH + 1, t0);
        assert!(room.as_mut().poll(&mut cx).is_pending(), "still at HIGH or above: no wake-up");
        d.publish(HIGH - 1, t0);
        assert!(!d.holds(t0));
        assert!(room.as_mut().poll(&mut cx).is_ready(), "below HIGH: woken");
    }

    #[tokio::test]
    async fn the_consumer_waits_until_the_sum_falls_below_high() {
        let d = Arc::new(Drainable::default());
        let gate = IntakeGate::new(d.clone());
        d.publish(HIGH + 1_000, Instant::now());
        // The writer's sweeps: 500 fewer every 20 ms.
        let writer = tokio::spawn({
            let d = d.clone();
            async move {
                for sum in [HIGH + 500, HIGH, HIGH - 500] {
                    tokio::time::sleep(SWEEP).await;
                    d.publish(sum, Instant::now());
                }
            }
        });
        let waited = gate.admit(&CancellationToken::new()).await;
        assert!(!d.holds(Instant::now()), "the consumer went on while it should wait");
        assert!(waited >= 2 * SWEEP && waited < MAX_PAUSE, "waited {waited:?}");
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn the_consumer_waits_no_longer_than_the_pause_and_not_at_all_below_high_or_at_shutdown() {
        let d = Arc::new(Drainable::default());
        let gate = IntakeGate::new(d.clone());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO, "nothing published");
        d.publish(HIGH - 1, Instant::now());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO);
        d.publish(HIGH, Instant::now());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(gate.admit(&shutdown).await, Duration::ZERO);
        // A sum kept fresh at HIGH: the wait ends at the bound.
        let writer = tokio::spawn({
            let d = d.clone();
            async move {
                for _ in 0..40 {
                    d.publish(HIGH, Instant::now());
                    tokio::time::sleep(SWEEP).await;
                }
            }
        });
        let waited = gate.admit(&CancellationToken::new()).await;
        assert!(waited >= MAX_PAUSE && waited < 2 * MAX_PAUSE, "waited {waited:?}");
        writer.abort();
    }
}
