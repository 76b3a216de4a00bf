//! The hand-off of freshly committed ready deliveries from the writer thread
//! to the endpoint workers, in memory: a worker that keeps up never reads back
//! from RocksDB what was just written to it.
//!
//! RocksDB stays the truth; the feed is only a shortcut. When it cannot take
//! an item (the endpoint's share or the global budget is used up), it marks
//! the endpoint *behind* and drops what it holds, and the worker reads the
//! store from its cursor until it has caught up. Items are fed in sequence
//! order and a worker skips what its cursor has passed, so an item found both
//! ways is attempted once.
//!
//! Why it is never missed: the writer feeds an item only after its batch has
//! committed, and reads `behind` under the same lock the worker takes to clear
//! it before reading the store. Either the worker's read comes after the
//! commit, or the feed holds the item.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::ReadyItem;

/// Most items one endpoint's feed holds.
pub const PER_ENDPOINT: usize = 512;
/// Most items all feeds together hold: about 10 MiB of 1 KiB events.
pub(super) const TOTAL: usize = 8192;

/// What a worker finds in its feed.
#[derive(Debug)]
pub enum Take {
    /// The next deliveries, in sequence order.
    Items(Vec<ReadyItem>),
    /// Some deliveries are only in the store: read it from the cursor.
    Behind,
    /// Nothing new: wait for [`Feed::notified`].
    Empty,
}

#[derive(Debug)]
pub struct Feed {
    state: Mutex<State>,
    notify: Notify,
    /// Items held by all feeds.
    total: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct State {
    items: VecDeque<ReadyItem>,
    behind: bool,
}

impl Feed {
    /// A new feed starts behind: its worker first reads what is already stored.
    pub(super) fn new(total: Arc<AtomicUsize>) -> Feed {
        Feed { state: Mutex::new(State { items: VecDeque::new(), behind: true }), notify: Notify::new(), total }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `max` fed deliveries, or `Behind` (once per time it fell behind).
    pub fn take(&self, max: usize) -> Take {
        let mut s = self.lock();
        if s.behind {
            s.behind = false;
            let dropped = s.items.len();
            s.items.clear();
            drop(s);
            self.total.fetch_sub(dropped, Ordering::AcqRel);
            return Take::Behind;
        }
        if s.items.is_empty() {
            return Take::Empty;
        }
        let n = max.min(s.items.len());
        let items: Vec<ReadyItem> = s.items.drain(..n).collect();
        drop(s);
        self.total.fetch_sub(n, Ordering::AcqRel);
        Take::Items(items)
    }

    /// Resolves after the next wake-up (one that came before the call counts).
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Called by the writer after the item's batch committed.
    pub(super) fn push(&self, item: ReadyItem) {
        let mut s = self.lock();
        if s.behind {
            return;
        }
        if s.items.len() >= PER_ENDPOINT || self.total.fetch_add(1, Ordering::AcqRel) >= TOTAL {
            if s.items.len() < PER_ENDPOINT {
                self.total.fetch_sub(1, Ordering::AcqRel);
            }
            self.fall_behind(&mut s);
            return;
        }
        s.items.push_back(item);
    }

    /// Called by the writer for a committed item it did not copy.
    pub(super) fn mark_behind(&self) {
        let mut s = self.lock();
        self.fall_behind(&mut s);
    }

    fn fall_behind(&self, s: &mut State) {
        if !s.behind {
            s.behind = true;
            let dropped = s.items.len();
            s.items.clear();
            self.total.fetch_sub(dropped, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> ReadyItem {
        ReadyItem { seq, key: seq.to_be_bytes().to_vec(), delivery: crate::store::tests::delivery("e", "a") }
    }

    fn seqs(t: Take) -> Vec<u64> {
        match t {
            Take::Items(v) => v.iter().map(|i| i.seq).collect(),
            other => panic!("expected items, got {other:?}"),
        }
    }

    #[test]
    fn starts_behind_then_feeds_in_order_within_its_budget() {
        let total = Arc::new(AtomicUsize::new(0));
        let f = Feed::new(total.clone());
        f.push(item(1));
        assert!(matches!(f.take(10), Take::Behind), "a new feed sends its worker to the store first");
        assert!(matches!(f.take(10), Take::Empty));
        for s in 2..=5 {
            f.push(item(s));
        }
        assert_eq!(total.load(Ordering::Acquire), 4);
        assert_eq!(seqs(f.take(3)), vec![2, 3, 4]);
        assert_eq!(seqs(f.take(3)), vec![5]);
        assert_eq!(total.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_full_feed_drops_what_it_holds_and_sends_the_worker_to_the_store() {
        let total = Arc::new(AtomicUsize::new(0));
        let f = Feed::new(total.clone());
        assert!(matches!(f.take(1), Take::Behind));
        for s in 0..=PER_ENDPOINT as u64 {
            f.push(item(s));
        }
        assert_eq!(total.load(Ordering::Acquire), 0, "dropped items give their budget back");
        assert!(matches!(f.take(10), Take::Behind));
        f.push(item(1000));
        assert_eq!(seqs(f.take(10)), vec![1000]);

        // The global budget: another feed's items count against it.
        total.store(TOTAL, Ordering::Release);
        f.push(item(1001));
        assert_eq!(total.load(Ordering::Acquire), TOTAL, "a refused push takes nothing");
        assert!(matches!(f.take(10), Take::Behind));
        f.mark_behind();
        assert!(matches!(f.take(10), Take::Behind));
    }
}
