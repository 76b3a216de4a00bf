//! Backpressure from the outbox to the consumer.
//!
//! While Kafka holds a backlog the consumer reads faster than the endpoints
//! are served, and without a bound the outbox's ready queue would take in the
//! whole backlog: safe, since it is durable, but every delivery beyond what the
//! workers' feeds hold in memory is read back from RocksDB, flushed and
//! compacted. So the consumer waits while the ready queue holds [`HIGH`]
//! deliveries that the workers are finishing fast.
//!
//! A slow endpoint must not make the consumer wait, or it would delay the
//! events of every other endpoint. Its backlog is finished slowly: the consumer
//! waits only for a ready queue that would be finished within [`MAX_PAUSE`] at
//! the pace measured, and never longer than that at a time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Depth;

/// The consumer waits while the ready queue holds this many deliveries: half
/// of what the workers' feeds hold in memory, so the batches already on their
/// way to the store (4 of 512 events by default) still fit there.
pub const HIGH: i64 = (super::feed::TOTAL / 2) as i64;
/// The consumer waits only for a ready queue the workers would finish within
/// this long at their pace, and never longer than this at a time.
pub const MAX_PAUSE: Duration = Duration::from_millis(500);
/// How often a waiting consumer measures the workers' pace.
const PACE_WINDOW: Duration = Duration::from_millis(10);
/// A pace measured longer ago than this is measured again before it is used.
const PACE_STALE: Duration = Duration::from_secs(1);

/// Where the consumer waits before it hands a batch to the store.
#[derive(Debug)]
pub struct IntakeGate {
    depth: Arc<Depth>,
    pace: Mutex<Pace>,
}

/// Ready deliveries finished per second over the last window measured.
#[derive(Debug)]
struct Pace {
    since: Instant,
    finished_then: u64,
    per_s: Option<f64>,
}

impl IntakeGate {
    pub fn new(depth: Arc<Depth>) -> IntakeGate {
        let finished_then = depth.finished.load(Ordering::Acquire);
        IntakeGate { depth, pace: Mutex::new(Pace { since: Instant::now(), finished_then, per_s: None }) }
    }

    /// Waits while the consumer should; returns how long it waited.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Duration {
        let start = Instant::now();
        let mut waited = false;
        loop {
            let room = self.depth.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            let ready = self.depth.ready.load(Ordering::Acquire);
            let slow = || self.pace().is_some_and(|per_s| per_s * MAX_PAUSE.as_secs_f64() < ready as f64);
            if ready < HIGH || start.elapsed() >= MAX_PAUSE || shutdown.is_cancelled() || slow() {
                return if waited { start.elapsed() } else { Duration::ZERO };
            }
            waited = true;
            tokio::select! {
                _ = room => {}
                _ = tokio::time::sleep(PACE_WINDOW) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// The workers' pace, unless it has not been measured recently.
    fn pace(&self) -> Option<f64> {
        let mut p = self.pace.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let finished = self.depth.finished.load(Ordering::Acquire);
        let elapsed = now - p.since;
        if elapsed >= PACE_STALE {
            *p = Pace { since: now, finished_then: finished, per_s: None };
        } else if elapsed >= PACE_WINDOW {
            let per_s = finished.saturating_sub(p.finished_then) as f64 / elapsed.as_secs_f64();
            *p = Pace { since: now, finished_then: finished, per_s: Some(per_s) };
        }
        p.per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox with `ready` deliveries.
    fn depth(ready: i64) -> Arc<Depth> {
        let d = Arc::new(Depth::default());
        d.committed(ready, 0, 0);
        d
    }

    /// Finishes `per_tick` ready deliveries every `tick`, as the writer does
    /// when their outcomes commit, until none is left.
    async fn workers(d: Arc<Depth>, per_tick: i64, tick: Duration) {
        while d.ready.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(tick).await;
            d.committed(-per_tick, 0, per_tick as u64);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_consumer_waits_while_the_ready_queue_is_finished_fast_and_goes_on_below_high() {
        let d = depth(HIGH + 500);
        let gate = IntakeGate::new(d.clone());
        // 50 a millisecond: what is ready would be finished in about 0.1 s.
        let workers = tokio::spawn(workers(d.clone(), 50, Duration::from_millis(1)));
        let waited = gate.admit(&CancellationToken::new()).await;
        let ready = d.ready.load(Ordering::Acquire);
        assert!(ready < HIGH, "the consumer went on with {ready} ready");
        assert!(ready >= HIGH - 50, "it went on {} deliveries late: the wake-up was missed", HIGH - ready);
        assert!(waited > Duration::ZERO && waited < MAX_PAUSE, "waited {waited:?}");
        workers.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_queue_finished_slowly_does_not_hold_the_consumer() {
        // Slow endpoints: 1 delivery finished every 10 ms in all.
        let d = depth(HIGH + 500);
        let gate = IntakeGate::new(d.clone());
        let workers = tokio::spawn(workers(d.clone(), 1, Duration::from_millis(10)));
        let shutdown = CancellationToken::new();
        let first = gate.admit(&shutdown).await;
        assert!(d.ready.load(Ordering::Acquire) >= HIGH);
        assert!(first <= 2 * PACE_WINDOW, "one window to measure the pace, then on; waited {first:?}");
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(gate.admit(&shutdown).await, Duration::ZERO, "the pace is known: no more waiting");
        }
        workers.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn below_high_or_at_shutdown_the_consumer_does_not_wait() {
        let d = depth(HIGH - 1);
        let gate = IntakeGate::new(d.clone());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO);
        d.committed(1, 0, 0);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(gate.admit(&shutdown).await, Duration::ZERO);
        // Nothing is finished at all: that is a slow pace too.
        let waited = gate.admit(&CancellationToken::new()).await;
        assert!(waited <= 2 * PACE_WINDOW, "waited {waited:?} for a queue nobody finishes");
    }
}
