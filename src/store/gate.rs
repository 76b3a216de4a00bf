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
use std::time::{Duration, Instant};

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

impl Pace {
    /// The pace at `now`, given the count of finished deliveries then; `None`
    /// while a window is being measured after none was for [`PACE_STALE`].
    fn at(&mut self, now: Instant, finished: u64) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= PACE_STALE {
            *self = Pace { since: now, finished_then: finished, per_s: None };
        } else if elapsed >= PACE_WINDOW {
            let per_s = finished.saturating_sub(self.finished_then) as f64 / elapsed.as_secs_f64();
            *self = Pace { since: now, finished_then: finished, per_s: Some(per_s) };
        }
        self.per_s
    }
}

/// Whether the consumer waits for `ready` deliveries finished at `pace`
/// (`None`: not measured yet, so it waits one window to measure it).
fn holds(ready: i64, pace: Option<f64>) -> bool {
    ready >= HIGH && pace.is_none_or(|per_s| per_s * MAX_PAUSE.as_secs_f64() >= ready as f64)
}

impl IntakeGate {
    pub fn new(depth: Arc<Depth>) -> IntakeGate {
        let finished_then = depth.finished.load(Ordering::Acquire);
        IntakeGate { depth, pace: Mutex::new(Pace { since: Instant::now(), finished_then, per_s: None }) }
    }

    /// Waits while the consumer should; returns how long it waited.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Duration {
        let start = Instant::now();
        let mut waiting = false;
        loop {
            // Registered before the count is read, so a fall below HIGH in
            // between still wakes this wait.
            let room = self.depth.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            let ready = self.depth.ready.load(Ordering::Acquire);
            if ready < HIGH || start.elapsed() >= MAX_PAUSE || shutdown.is_cancelled() || !holds(ready, self.pace()) {
                return if waiting { start.elapsed() } else { Duration::ZERO };
            }
            waiting = true;
            tokio::select! {
                _ = room => {}
                _ = tokio::time::sleep(PACE_WINDOW) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    fn pace(&self) -> Option<f64> {
        let finished = self.depth.finished.load(Ordering::Acquire);
        self.pace.lock().unwrap_or_else(|p| p.into_inner()).at(Instant::now(), finished)
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

    #[test]
    fn the_pace_is_measured_over_windows_and_afresh_after_a_stale_one() {
        let t0 = Instant::now();
        let mut p = Pace { since: t0, finished_then: 100, per_s: None };
        assert_eq!(p.at(t0 + PACE_WINDOW / 2, 150), None, "less than a window: nothing measured yet");
        assert_eq!(p.at(t0 + PACE_WINDOW, 200), Some(10_000.0), "100 finished in 10 ms");
        assert_eq!(p.at(t0 + PACE_WINDOW + PACE_WINDOW / 2, 900), Some(10_000.0), "the last window's, until the next");
        assert_eq!(p.at(t0 + 3 * PACE_WINDOW, 1200), Some(50_000.0), "1,000 finished in 20 ms");
        let later = t0 + 3 * PACE_WINDOW + PACE_STALE;
        assert_eq!(p.at(later, 1300), None, "a second without a look: measured again");
        assert_eq!(p.at(later + PACE_WINDOW, 1300), Some(0.0));
    }

    #[test]
    fn only_a_queue_of_high_or_more_finished_within_the_pause_holds_the_consumer() {
        assert!(!holds(HIGH - 1, None));
        assert!(!holds(HIGH - 1, Some(1e9)));
        assert!(holds(HIGH, None), "the pace unknown: one window to measure it");
        // 0.5 s at 2 × HIGH a second finishes HIGH.
        assert!(holds(HIGH, Some(2.0 * HIGH as f64)));
        assert!(!holds(HIGH, Some(2.0 * HIGH as f64 - 1.0)));
        assert!(!holds(1_000_000, Some(0.0)), "nothing finished: a slow endpoint's backlog");
    }

    #[test]
    fn a_fall_below_high_wakes_a_waiting_consumer() {
        use std::future::Future;
        let d = depth(HIGH + 1);
        let room = d.room.notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        d.committed(-1, 0, 1);
        assert!(room.as_mut().poll(&mut cx).is_pending(), "still at HIGH: no wake-up");
        d.committed(-1, 0, 1);
        assert!(room.as_mut().poll(&mut cx).is_ready(), "below HIGH: woken");
    }

    #[tokio::test]
    async fn the_consumer_waits_for_a_queue_finished_fast_until_it_is_below_high() {
        let d = depth(HIGH + 500);
        let gate = IntakeGate::new(d.clone());
        // 50 a millisecond, as the writer commits outcomes: what is ready
        // would be finished in about 0.1 s.
        let workers = tokio::spawn({
            let d = d.clone();
            async move {
                while d.ready.load(Ordering::Acquire) > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    d.committed(-50, 0, 50);
                }
            }
        });
        let waited = gate.admit(&CancellationToken::new()).await;
        let ready = d.ready.load(Ordering::Acquire);
        assert!(ready < HIGH, "the consumer went on with {ready} ready");
        assert!(waited > Duration::ZERO && waited < MAX_PAUSE, "waited {waited:?}");
        workers.abort();
    }

    #[tokio::test]
    async fn a_queue_nobody_finishes_holds_the_consumer_one_window_only() {
        let d = depth(HIGH + 500);
        let gate = IntakeGate::new(d.clone());
        let shutdown = CancellationToken::new();
        let first = gate.admit(&shutdown).await;
        assert!(first >= PACE_WINDOW, "the pace was not measured: {first:?}");
        assert!(first < MAX_PAUSE / 2, "waited {first:?} for endpoints that finish nothing");
        assert_eq!(gate.admit(&shutdown).await, Duration::ZERO, "the pace is known now: no more waiting");
    }

    #[tokio::test]
    async fn below_high_or_at_shutdown_the_consumer_does_not_wait() {
        let d = depth(HIGH - 1);
        let gate = IntakeGate::new(d.clone());
        assert_eq!(gate.admit(&CancellationToken::new()).await, Duration::ZERO);
        d.committed(1, 0, 0);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(gate.admit(&shutdown).await, Duration::ZERO);
    }
}
