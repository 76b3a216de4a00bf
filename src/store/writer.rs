//! The single writer thread: group commit of everything queued, sequence
//! numbers in commit order, wake-ups only after the write is durable.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::gate::{Backlog, Changes, Drainable};
use super::{
    CF_DEAD, CF_DEDUP, CF_ENDPOINTS, CF_META, CF_PARKED, CF_READY, CF_WAITING, DbCell, Delivery, Depth, DueItem,
    Intake, NewEvent, Next, ReadyItem, StoreError, Wakeups, cf, expired, now_ms, parked_key, ready_key, seq_key,
};
use crate::telemetry::metrics as m;

/// Most operations folded into one write batch.
const MAX_GROUP: usize = 512;
const META_SEQ: &[u8] = b"seq";
/// After a failed write, how often the writer tries to reopen the database.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// While deletes of delivered deliveries wait to be written (no caller will
/// send anything for them), how often the writer looks again without an op.
const UNDELIVERED_POLL: Duration = Duration::from_millis(100);

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
/// Sends an operation's answer once its group's write has succeeded or failed.
type Answer = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

#[allow(clippy::large_enum_variant, reason = "each op is moved once through the channel; boxing would allocate per op")]
pub(super) enum Op {
    Intake {
        events: Arc<Vec<NewEvent>>,
        reply: Reply<Vec<Intake>>,
    },
    Finish {
        ready_key: Vec<u8>,
        next: Next,
        reply: Reply<()>,
    },
    /// A delivered delivery to forget. Unanswered (`reply: None`) while the
    /// store is healthy: then the writer keeps it, and the endpoint's
    /// in-flight `slot`, until it is written.
    Delivered {
        ready_key: Vec<u8>,
        reply: Option<Reply<()>>,
        slot: Option<OwnedSemaphorePermit>,
    },
    /// Due retries to their ready queues, each only if still waiting.
    Promote {
        due: Vec<DueItem>,
        reply: Reply<()>,
    },
    /// An endpoint's parked retries to its ready queue.
    Recall {
        endpoint: String,
        limit: usize,
        reply: Reply<(usize, bool)>,
    },
    /// Moves an undecodable record out of the way, into the dead-letter index.
    Quarantine {
        cf_name: &'static str,
        key: Vec<u8>,
        raw: Vec<u8>,
    },
    EndpointState {
        id: String,
        state: Option<serde_json::Value>,
        reply: Reply<()>,
    },
    /// Dead letters (by index key) back to the outbox, each only if still there.
    Replay {
        items: Vec<(Vec<u8>, Delivery)>,
        reply: Reply<Vec<bool>>,
    },
    Close,
}

pub(super) struct Writer {
    db: Arc<DbCell>,
    /// A write failed: RocksDB takes no more writes until reopened.
    broken: bool,
    last_reopen: Option<Instant>,
    rx: mpsc::Receiver<Op>,
    wake: Arc<Wakeups>,
    depth: Arc<Depth>,
    /// Each endpoint's share of the ready queue (only with backpressure on),
    /// and where their sum goes.
    backlog: Option<Backlog>,
    drainable: Arc<Drainable>,
    healthy: Arc<AtomicBool>,
    sync_writes: bool,
    dedup_window_ms: i64,
    next_seq: u64,
    /// Deletes of delivered deliveries whose write failed or was refused,
    /// written with the next group that can be (their slots held until then).
    undelivered: Vec<Unanswered>,
    write_duration: metrics::Histogram,
}

/// The effects of one group, applied only if its batch commits.
#[derive(Default)]
struct Group {
    batch: WriteBatch,
    sync: bool,
    replies: Vec<Answer>,
    wake_endpoints: HashSet<String>,
    /// New ready deliveries for the workers' feeds, and the endpoints that got
    /// some not copied there (the feeds were full).
    fed: Vec<ReadyItem>,
    unfed: HashSet<String>,
    wake_scheduler: bool,
    /// Unanswered deletes of delivered deliveries in this group.
    delivered: Vec<Unanswered>,
    ready_delta: i64,
    waiting_delta: i64,
    /// Each endpoint's ready deliveries added and delivered, for the intake gate.
    shares: Changes,
    dedup_added: HashSet<String>,
    /// Dead letters and waiting retries this group already moves to a ready
    /// queue (a second replay, promotion or recall finds none).
    moved: HashSet<Vec<u8>>,
    /// Earliest due time among retries this group schedules.
    min_new_due: Option<i64>,
}

impl Writer {
    pub(super) fn new(
        db: Arc<DbCell>,
        rx: mpsc::Receiver<Op>,
        wake: Arc<Wakeups>,
        (depth, backlog, drainable): (Arc<Depth>, Option<Backlog>, Arc<Drainable>),
        healthy: Arc<AtomicBool>,
        sync_writes: bool,
        dedup_window_ms: i64,
    ) -> Result<Writer, StoreError> {
        let next_seq = stored_next_seq(db.get()?.as_ref())?;
        Ok(Writer {
            db,
            broken: false,
            last_reopen: None,
            rx,
            wake,
            depth,
            backlog,
            drainable,
            healthy,
            sync_writes,
            dedup_window_ms,
            next_seq,
            undelivered: Vec::new(),
            write_duration: metrics::histogram!(m::STORE_WRITE_DURATION),
        })
    }

    /// Closes and reopens the database after a failed write, at most once per
    /// [`REOPEN_INTERVAL`] unless `now`; until it works, every operation is
    /// refused (and retried by its caller).
    fn try_reopen(&mut self, now: bool) {
        if !now && self.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_INTERVAL) {
            return;
        }
        self.last_reopen = Some(Instant::now());
        let reopened = self.db.reopen(Duration::from_secs(5)).and_then(|()| stored_next_seq(self.db.get()?.as_ref()));
        match reopened {
            Ok(next) => {
                self.broken = false;
                // Never backwards: a batch reported failed may still have reached the log.
                self.next_seq = self.next_seq.max(next);
                tracing::warn!("store reopened after a write error; writing again");
            }
            Err(e) => tracing::error!(error = %e, "cannot reopen the store yet; will try again"),
        }
    }

    pub(super) fn run(mut self) {
        let mut closing = false;
        while !closing {
            let mut ops = Vec::new();
            if self.undelivered.is_empty() {
                let Some(first) = self.rx.blocking_recv() else {
                    break;
                };
                ops.push(first);
            } else {
                // Nobody waits on these deletes, so nobody will send an op to
                // get them written: look again (and reopen) on a timer.
                match self.rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(UNDELIVERED_POLL),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            while ops.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            if self.broken {
                // Closing: one more try at once, so kept deletes are not lost to the interval.
                let close = ops.iter().any(|op| matches!(op, Op::Close));
                self.try_reopen(close && !self.undelivered.is_empty());
            }
            let db = match self.db.get() {
                Ok(db) if !self.broken => db,
                Ok(_) | Err(_) => {
                    for op in ops {
                        match op {
                            Op::Delivered { ready_key, reply: None, slot } => {
                                self.undelivered.push(Unanswered { ready_key, slot })
                            }
                            op => closing |= refuse(op),
                        }
                    }
                    continue;
                }
            };
            let mut g = Group::default();
            if self.backlog.is_some() {
                g.shares = Changes::kept();
            }
            let seq_before = self.next_seq;
            for Unanswered { ready_key, slot } in std::mem::take(&mut self.undelivered) {
                self.apply(&db, Op::Delivered { ready_key, reply: None, slot }, &mut g);
            }
            for op in ops {
                match op {
                    Op::Close => closing = true,
                    op => self.apply(&db, op, &mut g),
                }
            }
            if g.replies.is_empty() && g.delivered.is_empty() {
                continue;
            }
            if self.next_seq != seq_before {
                g.batch.put_cf(cf(&db, CF_META), META_SEQ, (self.next_seq - 1).to_be_bytes());
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(g.sync);
            let started = Instant::now();
            #[cfg(test)]
            let injected = self.depth.fail_next_write.swap(false, Ordering::AcqRel);
            #[cfg(not(test))]
            let injected = false;
            let result = if injected {
                Err(StoreError::Task("injected write failure".into()))
            } else {
                db.write_opt(g.batch, &wo).map_err(StoreError::from)
            };
            self.write_duration.record(started.elapsed());
            drop(db);
            match &result {
                Ok(()) => {
                    self.healthy.store(true, Ordering::Release);
                    let ready = self.depth.ready.fetch_add(g.ready_delta, Ordering::AcqRel) + g.ready_delta;
                    let waiting = self.depth.waiting.fetch_add(g.waiting_delta, Ordering::AcqRel) + g.waiting_delta;
                    if let Some(backlog) = &mut self.backlog {
                        backlog.apply(&mut g.shares);
                        let now = Instant::now();
                        if let Some(reading) = backlog.sweep(now) {
                            self.drainable.publish(reading, now);
                        }
                    }
                    metrics::gauge!(m::OUTBOX_READY).set(ready as f64);
                    metrics::gauge!(m::OUTBOX_WAITING).set(waiting as f64);
                }
                Err(e) => {
                    self.healthy.store(false, Ordering::Release);
                    self.broken = true;
                    metrics::counter!(m::STORE_WRITE_ERRORS).increment(1);
                    tracing::error!(error = %e, "store write failed; nothing of this batch was applied");
                    self.undelivered.append(&mut g.delivered);
                    // Unless it reached the log after all: then the reopened
                    // store has ready deliveries no feed was given.
                    self.wake.all_behind();
                }
            }
            // Wake-ups before answers: whoever the answer unblocks finds the
            // scheduler and the workers already told.
            if result.is_ok() {
                if let Some(due) = g.min_new_due {
                    self.wake.note_new_due(due);
                }
                self.wake.feed(std::mem::take(&mut g.fed), &g.unfed);
                for id in &g.wake_endpoints {
                    self.wake.wake_endpoint(id);
                }
                if g.wake_scheduler {
                    self.wake.scheduler().notify_one();
                }
            }
            for reply in g.replies {
                reply(result.as_ref().map(|_| ()));
            }
            // Written: the delivered deliveries' in-flight slots are free.
            drop(g.delivered);
        }
        if !self.undelivered.is_empty() {
            tracing::warn!(
                deliveries = self.undelivered.len(),
                "store closed before it could record some deliveries as done; they will be delivered again"
            );
        }
        tracing::debug!("store writer stopped");
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn apply(&mut self, db: &DB, op: Op, g: &mut Group) {
        match op {
            Op::Intake { events, reply } => match self.intake(db, events, g) {
                Ok(results) => g.replies.push(Box::new(move |r| {
                    let _ = reply.send(r.map(|_| results).map_err(clone_err));
                })),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Op::Finish { ready_key, next, reply } => {
                g.batch.delete_cf(cf(db, CF_READY), &ready_key);
                g.ready_delta -= 1;
                // Not delivered: it gives the endpoint no pace.
                g.shares.add(Changes::endpoint_of(&ready_key), -1, 0);
                match next {
                    Next::Wait { due_ms, delivery, recall } => {
                        let due = due_ms.max(now_ms());
                        g.min_new_due = Some(g.min_new_due.map_or(due, |m| m.min(due)));
                        let key = seq_key(due, self.seq());
                        if recall {
                            g.batch.put_cf(cf(db, CF_PARKED), parked_key(&delivery.endpoint_id, &key), []);
                        }
                        g.batch.put_cf(cf(db, CF_WAITING), key, delivery.encode());
                        g.waiting_delta += 1;
                        g.wake_scheduler = true;
                    }
                    Next::Dead { record } => {
                        let key = seq_key(now_ms(), self.seq());
                        g.batch.put_cf(cf(db, CF_DEAD), key, record);
                    }
                }
                g.replies.push(simple(reply));
            }
            Op::Delivered { ready_key, reply, slot } => {
                g.batch.delete_cf(cf(db, CF_READY), &ready_key);
                g.ready_delta -= 1;
                g.shares.add(Changes::endpoint_of(&ready_key), -1, 1);
                match reply {
                    Some(reply) => g.replies.push(simple(reply)),
                    None => g.delivered.push(Unanswered { ready_key, slot }),
                }
            }
            Op::Promote { due, reply } => match self.promote(db, due, g) {
                Ok(()) => g.replies.push(simple(reply)),
                Err(e) => drop(reply.send(Err(e))),
            },
            Op::Recall { endpoint, limit, reply } => match self.recall(db, &endpoint, limit, g) {
                Ok(found) => g.replies.push(Box::new(move |r| {
                    let _ = reply.send(r.map(|_| found).map_err(clone_err));
                })),
                Err(e) => drop(reply.send(Err(e))),
            },
            Op::EndpointState { id, state, reply } => {
                let cf = cf(db, CF_ENDPOINTS);
                match state {
                    Some(s) => g.batch.put_cf(cf, id.as_bytes(), s.to_string()),
                    None => g.batch.delete_cf(cf, id.as_bytes()),
                }
                g.wake_endpoints.insert(id);
                g.replies.push(simple(reply));
            }
            Op::Replay { items, reply } => match self.replay(db, items, g) {
                Ok(moved) => g.replies.push(Box::new(move |r| {
                    let _ = reply.send(r.map(|_| moved).map_err(clone_err));
                })),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Op::Quarantine { cf_name, key, raw } => {
                g.batch.delete_cf(cf(db, cf_name), &key);
                match cf_name {
                    CF_READY => {
                        g.ready_delta -= 1;
                        g.shares.add(Changes::endpoint_of(&key), -1, 0);
                    }
                    CF_WAITING => g.waiting_delta -= 1,
                    _ => {}
                }
                let record = serde_json::json!({
                    "reason": "corrupt_record",
                    "column_family": cf_name,
                    "key_hex": hex::encode(&key),
                    "raw_base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &raw),
                });
                let dead_key = seq_key(now_ms(), self.seq());
                g.batch.put_cf(cf(db, CF_DEAD), dead_key, record.to_string());
                g.replies.push(Box::new(|_| {}));
            }
            Op::Close => {}
        }
    }

    /// Moves due retries to their ready queues, skipping any a recall already moved.
    fn promote(&mut self, db: &DB, due: Vec<DueItem>, g: &mut Group) -> Result<(), StoreError> {
        let waiting = cf(db, CF_WAITING);
        let found = db
            .multi_get_cf(due.iter().map(|d| (waiting, d.key.as_slice())))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for (item, prior) in due.into_iter().zip(found) {
            if prior.is_none() || !g.moved.insert(item.key.clone()) {
                continue;
            }
            g.batch.delete_cf(waiting, &item.key);
            g.batch.delete_cf(cf(db, CF_PARKED), parked_key(&item.delivery.endpoint_id, &item.key));
            g.waiting_delta -= 1;
            self.put_ready(db, g, Cow::Owned(item.delivery));
        }
        Ok(())
    }

    /// Moves up to `limit` of `endpoint`'s parked retries to its ready queue,
    /// earliest due first. Index entries whose retry is gone, or cannot be
    /// decoded (the scheduler quarantines it when due), are dropped.
    fn recall(&mut self, db: &DB, endpoint: &str, limit: usize, g: &mut Group) -> Result<(usize, bool), StoreError> {
        let (parked, waiting) = (cf(db, CF_PARKED), cf(db, CF_WAITING));
        let start = parked_key(endpoint, &[]);
        let mut end = endpoint.as_bytes().to_vec();
        end.push(1);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let keys = db
            .iterator_cf_opt(parked, ro, IteratorMode::From(&start, Direction::Forward))
            .take(limit)
            .map(|kv| kv.map(|(k, _)| k))
            .collect::<Result<Vec<_>, _>>()?;
        let found = db
            .multi_get_cf(keys.iter().map(|k| (waiting, &k[start.len()..])))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut moved = 0;
        for (key, value) in keys.iter().zip(found) {
            let wait_key = &key[start.len()..];
            g.batch.delete_cf(parked, key);
            let Some(Ok(d)) = value.map(|v| Delivery::decode(&v)) else { continue };
            if !g.moved.insert(wait_key.to_vec()) {
                continue;
            }
            g.batch.delete_cf(waiting, wait_key);
            g.waiting_delta -= 1;
            self.put_ready(db, g, Cow::Owned(d));
            moved += 1;
        }
        Ok((moved, keys.len() == limit))
    }

    /// Queues `d` on its endpoint's ready queue, and for its worker's feed
    /// when the feeds have room (copying it only then).
    fn put_ready(&mut self, db: &DB, g: &mut Group, d: Cow<'_, Delivery>) {
        let seq = self.seq();
        let key = ready_key(&d.endpoint_id, seq);
        g.batch.put_cf(cf(db, CF_READY), &key, d.encode());
        g.ready_delta += 1;
        g.shares.add(d.endpoint_id.as_bytes(), 1, 0);
        if !g.wake_endpoints.contains(&d.endpoint_id) {
            g.wake_endpoints.insert(d.endpoint_id.clone());
        }
        if self.wake.feed_has_room(g.fed.len()) {
            g.fed.push(ReadyItem { seq, key, delivery: d.into_owned() });
        } else if !g.unfed.contains(&d.endpoint_id) {
            g.unfed.insert(d.endpoint_id.clone());
        }
    }

    fn replay(&mut self, db: &DB, items: Vec<(Vec<u8>, Delivery)>, g: &mut Group) -> Result<Vec<bool>, StoreError> {
        let dead = cf(db, CF_DEAD);
        let found = db
            .multi_get_cf(items.iter().map(|(k, _)| (dead, k.as_slice())))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut moved = Vec::with_capacity(items.len());
        for ((key, d), prior) in items.into_iter().zip(found) {
            if prior.is_none() || !g.moved.insert(key.clone()) {
                moved.push(false);
                continue;
            }
            g.batch.delete_cf(dead, &key);
            self.put_ready(db, g, Cow::Owned(d));
            moved.push(true);
        }
        g.sync |= self.sync_writes;
        Ok(moved)
    }

    fn intake(&mut self, db: &DB, events: Arc<Vec<NewEvent>>, g: &mut Group) -> Result<Vec<Intake>, StoreError> {
        let dedup = cf(db, CF_DEDUP);
        // Resolve every read before touching the batch, so an error leaves no partial write.
        let found = db
            .multi_get_cf(events.iter().map(|e| (dedup, e.event_id.as_bytes())))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_ms();
        let mut results = Vec::with_capacity(events.len());

        for (event, prior) in events.iter().zip(found) {
            let seen = match prior {
                Some(v) => !expired(&v, self.dedup_window_ms, now),
                None => false,
            };
            // Also a duplicate if an earlier event of this group (this op or another) had the id.
            if seen || !g.dedup_added.insert(event.event_id.clone()) {
                results.push(Intake::Duplicate);
                continue;
            }
            g.batch.put_cf(dedup, event.event_id.as_bytes(), now.to_be_bytes());
            for d in &event.deliveries {
                self.put_ready(db, g, Cow::Borrowed(d));
            }
            results.push(Intake::Accepted(event.deliveries.len()));
        }
        g.sync |= self.sync_writes;
        Ok(results)
    }
}

/// A delivered delivery's delete that nobody waits for, with the in-flight
/// slot it keeps taken until written (dropping it frees the slot).
struct Unanswered {
    ready_key: Vec<u8>,
    slot: Option<OwnedSemaphorePermit>,
}

/// Answers an operation that cannot be written now; true for `Close`.
fn refuse(op: Op) -> bool {
    let err = || StoreError::Reopening;
    match op {
        Op::Intake { reply, .. } => drop(reply.send(Err(err()))),
        Op::Replay { reply, .. } => drop(reply.send(Err(err()))),
        Op::Finish { reply, .. }
        | Op::Promote { reply, .. }
        | Op::EndpointState { reply, .. }
        | Op::Delivered { reply: Some(reply), .. } => drop(reply.send(Err(err()))),
        Op::Recall { reply, .. } => drop(reply.send(Err(err()))),
        Op::Quarantine { .. } | Op::Delivered { reply: None, .. } => {}
        Op::Close => return true,
    }
    false
}

fn stored_next_seq(db: &DB) -> Result<u64, StoreError> {
    Ok(match db.get_cf(cf(db, CF_META), META_SEQ)? {
        Some(v) => u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8])) + 1,
        None => 1,
    })
}

fn simple(reply: Reply<()>) -> Answer {
    Box::new(move |r| {
        let _ = reply.send(r.map_err(clone_err));
    })
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Rocks(r) => StoreError::Rocks(r.clone()),
        other => StoreError::Task(other.to_string()),
    }
}
