//! Backpressure from the outbox to the consumer.
//!
//! While Kafka holds a backlog the consumer reads faster than the endpoints
//! are served, and without a bound the outbox's ready queue would take in the
//! whole backlog: safe, since it is durable, but every delivery beyond what the
//! workers' feeds hold in memory is read back from RocksDB, flushed and
//! compacted. So the consumer waits while the machine is behind: all three of
//! - the workers have [`HIGH`] or more ready deliveries that they will
//!   deliver within [`MAX_PAUSE`], each endpoint counting only what it would
//!   deliver in that time at its own pace of deliveries (2xx):
//!   `min(ready, pace × 0.5 s)`. An endpoint that delivers little counts for
//!   little, whatever it holds, and one that fails fast (refused, 4xx, 5xx)
//!   counts for nothing; one alone must deliver 8,192 a second to count
//!   enough;
//! - no endpoint seen within [`REMEMBER`] has run dry: one that has would
//!   find its next events in Kafka, behind the wait. This is what keeps many
//!   slow endpoints that deliver a lot together (100 answering in 100 ms
//!   count 8,000) from holding a fast one up;
//! - the runtime's workers were busy at least [`SATURATED`] of the last
//!   window: otherwise the deliveries wait on their endpoints, not on this
//!   machine, and holding Kafka back gains nothing.
//!
//! The store's writer keeps each endpoint's ready count and pace
//! ([`Backlog`]) and publishes what it found ([`Drainable`]); the consumer
//! reads it and the workers' busy share ([`IntakeGate`]) and never waits
//! longer than [`MAX_PAUSE`] at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::RuntimeMetrics;
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
/// How long an endpoint that ran dry keeps the consumer from waiting after
/// its last ready delivery: one with an event at least this often is never
/// held up behind the others.
pub const REMEMBER: Duration = Duration::from_secs(10);

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
    /// Its ready count reached 0 since the last sweep.
    ran_dry: bool,
    /// Time since its count last changed.
    idle: Duration,
}

/// What a sweep found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    /// The sum of `min(ready, pace × MAX_PAUSE)`.
    pub drainable: i64,
    /// Endpoints seen within [`REMEMBER`] that have nothing ready, or had
    /// nothing ready at some moment since the last sweep: their next events
    /// are in Kafka, so the consumer must not wait.
    pub dry: usize,
}

impl Reading {
    /// Whether the consumer should wait, on this reading alone.
    fn holds(self) -> bool {
        self.drainable >= HIGH && self.dry == 0
    }
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
            share.ran_dry |= share.ready == 0;
            share.idle = Duration::ZERO;
        }
    }

    /// Once per [`SWEEP`]: measures each endpoint's pace and returns the sum of
    /// `min(ready, pace × MAX_PAUSE)` and how many endpoints ran dry.
    /// Endpoints with nothing ready and no change for [`REMEMBER`] are
    /// forgotten.
    pub(super) fn sweep(&mut self, now: Instant) -> Option<Reading> {
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
        let (mut sum, mut dry) = (0.0, 0);
        self.endpoints.retain(|_, s| {
            s.per_s = keep * s.per_s + (1.0 - keep) * (s.delivered as f64 / secs);
            s.delivered = 0;
            sum += (s.ready as f64).min(s.per_s * horizon);
            s.idle += elapsed;
            let remembered = s.ready > 0 || s.idle < REMEMBER;
            dry += usize::from(remembered && (s.ran_dry || s.ready == 0));
            s.ran_dry = false;
            remembered
        });
        Some(Reading { drainable: sum as i64, dry })
    }
}

/// The reading the writer last published, and when.
#[derive(Debug, Default)]
pub struct Drainable {
    last: Mutex<Option<(Reading, Instant)>>,
    /// Woken when a reading no longer holds the consumer.
    room: Notify,
}

impl Drainable {
    pub(super) fn publish(&self, reading: Reading, now: Instant) {
        let before = self.last.lock().unwrap_or_else(|p| p.into_inner()).replace((reading, now));
        if !reading.holds() && before.is_none_or(|(b, _)| b.holds()) {
            self.room.notify_waiters();
        }
    }

    /// The reading last published.
    #[cfg(test)]
    pub(super) fn last_reading(&self) -> Option<Reading> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).map(|(r, _)| r)
    }

    /// Whether the consumer should wait at `now`, as far as the outbox goes.
    fn holds(&self, now: Instant) -> bool {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|(r, at)| r.holds() && now.saturating_duration_since(at) <= FRESH)
    }
}

/// The consumer waits only while the runtime's workers were busy at least
/// this share of the time: below it, the ready deliveries wait on their
/// endpoints (their answers, their in-flight caps), not on this machine, and
/// holding Kafka back would gain nothing.
pub const SATURATED: f64 = 0.9;
/// The window over which the workers' busy share is measured.
const BUSY_WINDOW: Duration = Duration::from_millis(100);

/// The runtime's workers' share of time spent running tasks (not parked).
#[derive(Debug)]
struct Busy {
    metrics: RuntimeMetrics,
    last: Mutex<Sample>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// All workers' busy time so far.
    busy: Duration,
    /// The busy share over the last whole window.
    share: f64,
}

impl Sample {
    /// The sample after `busy` at `at`: a new share once a window has passed.
    fn next(self, at: Instant, busy: Duration, workers: usize) -> Sample {
        let elapsed = at.saturating_duration_since(self.at);
        if elapsed < BUSY_WINDOW {
            return self;
        }
        let worked = busy.saturating_sub(self.busy).as_secs_f64();
        Sample { at, busy, share: (worked / (elapsed.as_secs_f64() * workers.max(1) as f64)).min(1.0) }
    }
}

impl Busy {
    fn new(metrics: RuntimeMetrics) -> Busy {
        let busy = Self::total(&metrics);
        Busy { metrics, last: Mutex::new(Sample { at: Instant::now(), busy, share: 0.0 }) }
    }

    fn total(metrics: &RuntimeMetrics) -> Duration {
        (0..metrics.num_workers()).map(|w| metrics.worker_total_busy_duration(w)).sum()
    }

    /// The busy share over the last whole window before `now`.
    fn share(&self, now: Instant) -> f64 {
        let busy = Self::total(&self.metrics);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = last.next(now, busy, self.metrics.num_workers());
        last.share
    }
}

/// Where the consumer waits before it hands a batch to the store.
#[derive(Debug)]
pub struct IntakeGate {
    drainable: Arc<Drainable>,
    /// `None` only in tests of the outbox's side alone.
    busy: Option<Busy>,
}

impl IntakeGate {
    /// A gate that also asks how busy the runtime of `metrics` is.
    pub(super) fn new(drainable: Arc<Drainable>, metrics: RuntimeMetrics) -> IntakeGate {
        IntakeGate { drainable, busy: Some(Busy::new(metrics)) }
    }

    /// Whether the consumer should wait at `now`: the outbox holds enough
    /// that the workers will deliver, nobody has run dry, and the workers are
    /// busy.
    fn holds(&self, now: Instant) -> bool {
        // Sampled at every check, so the share is over the last window, not
        // over the time since the outbox last held enough.
        let saturated = self.busy.as_ref().is_none_or(|b| b.share(now) >= SATURATED);
        saturated && self.drainable.holds(now)
    }

    /// Waits while the consumer should; returns how long it waited.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Duration {
        let start = Instant::now();
        let mut waiting = false;
        loop {
            // Registered before the reading is checked, so a change in
            // between still wakes this wait.
            let room = self.drainable.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            let now = Instant::now();
            if !self.holds(now) || now - start >= MAX_PAUSE || shutdown.is_cancelled() {
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

    /// A gate that asks only the outbox, not the runtime.
    fn outbox_only(drainable: Arc<Drainable>) -> IntakeGate {
        IntakeGate { drainable, busy: None }
    }

    fn reading(drainable: i64) -> Reading {
        Reading { drainable, dry: 0 }
    }

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
        let sum = b.sweep(t0 + SWEEP).expect("swept").drainable;
        // Smoothed: half of 20,000/s; 0.5 s of 10,000/s is 5,000 of the 19,600 ready.
        assert_eq!(sum, 5_000, "the slow endpoints' 5,000 ready count for nothing");
        deliver(&mut b, &["fast"], 400);
        assert_eq!(b.sweep(t0 + 2 * SWEEP).map(|r| r.drainable), Some(7_500), "the pace settles: 15,000/s");
        // The slow endpoints deliver one each in the next 20 ms: 50/s each, 25 each.
        deliver(&mut b, &["fast", "slow0", "slow1", "slow2", "slow3", "slow4"], 1);
        deliver(&mut b, &["slow5", "slow6", "slow7", "slow8", "slow9"], 1);
        let sum = b.sweep(t0 + 3 * SWEEP).expect("swept").drainable;
        // fast: (15,000 + 50) / 2 = 7,525/s → 3,762.5; each slow one (0 + 50) / 2 = 25/s → 12.5.
        assert_eq!(sum, 3_887, "the slow endpoints count for what they deliver, not for what they hold");
    }

    #[test]
    fn an_endpoint_that_runs_dry_keeps_the_consumer_reading_until_it_is_forgotten() {
        let t0 = Instant::now();
        let mut b = Backlog::new(HashMap::from([(b"a".to_vec(), 100), (b"b".to_vec(), 10)]));
        b.sweep(t0);
        deliver(&mut b, &["a"], 100);
        // "b" runs dry and gets 5 more within the same window.
        deliver(&mut b, &["b"], 10);
        let mut more = Changes::kept();
        more.add(b"b", 5, 0);
        b.apply(&mut more);
        let r = b.sweep(t0 + SWEEP);
        assert_eq!(r, Some(Reading { drainable: 5, dry: 2 }), "both ran dry in the window");
        // "b" counts its 5 (its pace is 250/s), and only "a" is dry now.
        assert_eq!(b.sweep(t0 + 2 * SWEEP), Some(Reading { drainable: 5, dry: 1 }));
        // "a" keeps the consumer reading until it has had nothing for REMEMBER.
        let late = t0 + 2 * SWEEP + REMEMBER - 3 * SWEEP;
        assert_eq!(b.sweep(late).map(|r| r.dry), Some(1));
        assert_eq!(b.sweep(late + SWEEP).map(|r| r.dry), Some(0), "forgotten after REMEMBER");
        assert_eq!(b.endpoints.len(), 1, "\"b\" still has 5 ready");
        // Deleting what was stored before a restart never drives a count below 0.
        let mut c = Changes::kept();
        c.add(b"a", -5, 5);
        b.apply(&mut c);
        assert_eq!(b.endpoints[&b"a"[..]].ready, 0);
    }

    /// The case the pace alone cannot tell from a machine that is behind: 100
    /// endpoints answering in 100 ms with 16 in flight each deliver 16,000 a
    /// second between them, so they count 8,000. A fast endpoint beside them
    /// runs dry each time it is served, and the consumer must read on for it.
    #[test]
    fn many_slow_endpoints_that_deliver_a_lot_together_do_not_hold_a_fast_one_up() {
        let t0 = Instant::now();
        let slow: Vec<String> = (0..100).map(|i| format!("slow{i}")).collect();
        let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
        let mut b = Backlog::new(slow.iter().map(|e| (e.as_bytes().to_vec(), 1_000)).collect());
        b.sweep(t0);
        let mut at = t0;
        let mut last = None;
        for _ in 0..10 {
            // Each window the fast endpoint gets 10 and delivers them.
            let mut fast = Changes::kept();
            fast.add(b"fast", 10, 0);
            b.apply(&mut fast);
            deliver(&mut b, &slow, 3); // 3 per 20 ms: 150 a second each
            deliver(&mut b, &["fast"], 10);
            at += SWEEP;
            last = b.sweep(at);
        }
        let r = last.expect("swept");
        assert!(r.drainable >= HIGH, "the slow endpoints alone count {}: the case is not made", r.drainable);
        assert_eq!(r.dry, 1);
        assert!(!r.holds(), "the fast endpoint has run dry: the consumer must read on");
        assert!(Reading { dry: 0, ..r }.holds(), "without it, the slow endpoints' pace would hold the consumer");
    }

    #[test]
    fn the_busy_share_is_measured_over_whole_windows_of_all_workers() {
        let t0 = Instant::now();
        let s = Sample { at: t0, busy: Duration::ZERO, share: 0.0 };
        let same = s.next(t0 + BUSY_WINDOW - MS, 150 * MS, 2);
        assert_eq!((same.at, same.share), (t0, 0.0), "not a whole window yet");
        let s = s.next(t0 + 2 * BUSY_WINDOW, 190 * MS * 2, 2);
        assert!((s.share - 0.95).abs() < 1e-9, "190 of 200 ms on each of 2 workers: {}", s.share);
        let s = s.next(t0 + 3 * BUSY_WINDOW, 380 * MS + 10 * MS, 2);
        assert!((s.share - 0.05).abs() < 1e-9, "10 of 200 ms: {}", s.share);
        assert_eq!(s.next(t0 + 4 * BUSY_WINDOW, 390 * MS + 300 * MS, 2).share, 1.0, "never above 1");
    }

    /// On a real runtime: two tasks that keep both workers busy, then none.
    #[test]
    fn the_busy_share_of_a_real_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let busy = Busy::new(rt.metrics());
        // Tasks that yield every millisecond, more than there are workers, so
        // both workers find one to run whenever they look.
        let until = Instant::now() + 4 * BUSY_WINDOW;
        let spin = move || async move {
            while Instant::now() < until {
                let slice = Instant::now() + MS;
                while Instant::now() < slice {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        };
        rt.block_on(async {
            let tasks: Vec<_> = (0..4).map(|_| tokio::spawn(spin())).collect();
            for t in tasks {
                t.await.expect("spin");
            }
        });
        let share = busy.share(Instant::now());
        assert!(share >= 0.7, "both workers spun for the whole window: {share}");
        std::thread::sleep(2 * BUSY_WINDOW);
        let share = busy.share(Instant::now());
        assert!(share <= 0.3, "nothing ran: {share}");
    }

    #[test]
    fn the_endpoint_of_a_ready_key() {
        assert_eq!(Changes::endpoint_of(&super::super::ready_key("ep-1", 42)), b"ep-1");
    }

    #[test]
    fn the_consumer_holds_only_for_a_fresh_sum_of_high_or_more_with_nobody_dry_and_is_woken_otherwise() {
        use std::future::Future;
        let d = Drainable::default();
        let t0 = Instant::now();
        assert!(!d.holds(t0), "nothing published");
        d.publish(reading(HIGH), t0);
        assert!(d.holds(t0 + FRESH));
        assert!(!d.holds(t0 + FRESH + MS), "a stale sum: the workers may have stopped");
        let room = d.room.notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        d.publish(reading(HIGH + 1), t0);
        assert!(room.as_mut().poll(&mut cx).is_pending(), "still at HIGH or above: no wake-up");
        d.publish(reading(HIGH - 1), t0);
        assert!(!d.holds(t0));
        assert!(room.as_mut().poll(&mut cx).is_ready(), "below HIGH: woken");
        // An endpoint running dry ends the hold as a fall below HIGH does.
        d.publish(reading(HIGH + 1), t0);
        let room = d.room.notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        d.publish(Reading { drainable: HIGH + 1, dry: 1 }, t0);
        assert!(!d.holds(t0));
        assert!(room.as_mut().poll(&mut cx).is_ready(), "an endpoint ran dry: woken");
    }

    #[tokio::test]
    async fn the_consumer_waits_until_the_sum_falls_below_high() {
        let d = Arc::new(Drainable::default());
        let gate = outbox_only(d.clone());
        d.publish(reading(HIGH + 1_000), Instant::now());
        // The writer's sweeps: 500 fewer every 20 ms.
        let writer = tokio::spawn({
            let d = d.clone();
            async move {
                for sum in [HIGH + 500, HIGH, HIGH - 500] {
                    tokio::time::sleep(SWEEP).await;
                    d.publish(reading(sum), Instant::now());
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
        let gate = outbox_only(d.clone());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO, "nothing published");
        d.publish(reading(HIGH - 1), Instant::now());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO);
        d.publish(reading(HIGH), Instant::now());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(gate.admit(&shutdown).await, Duration::ZERO);
        // A sum kept fresh at HIGH: the wait ends at the bound.
        let writer = tokio::spawn({
            let d = d.clone();
            async move {
                for _ in 0..40 {
                    d.publish(reading(HIGH), Instant::now());
                    tokio::time::sleep(SWEEP).await;
                }
            }
        });
        let waited = gate.admit(&CancellationToken::new()).await;
        assert!(waited >= MAX_PAUSE && waited < 2 * MAX_PAUSE, "waited {waited:?}");
        writer.abort();
    }
}
