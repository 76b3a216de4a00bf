//! The retry scheduler: moves retries whose time has come from the `waiting`
//! schedule back to their endpoints' ready queues.
//!
//! It sleeps until the earliest due time, or until the store says a new retry
//! was scheduled, and never scans what it has already moved: reads start at
//! the due time of the last promoted retry, or earlier when the store reports
//! a retry scheduled below that (a slow write, a clock step).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deliver::sleep_or_cancel;
use crate::store::{Store, now_ms};

/// Most retries promoted in one store write.
const PROMOTE_BATCH: usize = 1024;
/// Longest sleep when nothing is scheduled (a wake-up comes sooner).
const IDLE: Duration = Duration::from_secs(60);

pub async fn run(store: Store, shutdown: CancellationToken) {
    let mut from_ms = 0i64;
    loop {
        from_ms = from_ms.min(store.wakeups().take_min_new_due());
        let now = now_ms();
        let (due, next) = match store.due(now, from_ms, PROMOTE_BATCH).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the retry schedule");
                if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if let Some(last) = due.last() {
            let last_due = last.due_ms;
            let count = due.len();
            match store.promote(due).await {
                Ok(()) => {
                    tracing::debug!(count, "promoted due retries");
                    from_ms = last_due;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot promote due retries");
                    if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                        return;
                    }
                }
            }
            continue;
        }
        let wait = next.map_or(IDLE, |at| Duration::from_millis((at - now).clamp(0, IDLE.as_millis() as i64) as u64));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = store.wakeups().scheduler().notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
