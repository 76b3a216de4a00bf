//! RocksDB: one database, one column family per kind of state.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `dedup`    | event id | first-seen unix ms (expired by a compaction filter) |
//! | `ready`    | endpoint id, 0x00, seq (u64 BE) | [`Delivery`] due now, FIFO per endpoint |
//! | `waiting`  | due unix ms (u64 BE), seq | [`Delivery`] scheduled for a retry |
//! | `parked`   | endpoint id, 0x00, `waiting` key | empty: the endpoint's retries that may be brought forward |
//! | `dead`     | unix ms, seq | the dead letter as produced to the topic |
//! | `endpoints`| endpoint id | JSON state (disabled, why, when) |
//! | `meta`     | name | e.g. the last sequence number |
//!
//! A delivery lives in exactly one of `ready` and `waiting` until it is done or
//! dead-lettered. Every mutation goes through one writer thread that groups
//! whatever is queued into a single atomic `WriteBatch` (group commit), hands
//! out sequence numbers in commit order, and only then wakes the endpoint
//! workers and the retry scheduler, handing new ready deliveries to the
//! workers in memory ([`feed`]) so a worker that keeps up never reads back what
//! was just written. Reads run on tokio's blocking pool, so no RocksDB call
//! ever runs on an async worker thread.

mod feed;
mod gate;
mod record;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};

pub use feed::{Feed, PER_ENDPOINT as FEED_PER_ENDPOINT, Take};
pub use gate::IntakeGate;
use gate::{Backlog, Changes, Drainable};
pub use record::{CorruptRecord, Delivery};
use writer::{Op, Writer};

pub(crate) const CF_DEDUP: &str = "dedup";
pub(crate) const CF_READY: &str = "ready";
pub(crate) const CF_WAITING: &str = "waiting";
pub(crate) const CF_DEAD: &str = "dead";
pub(crate) const CF_ENDPOINTS: &str = "endpoints";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_PARKED: &str = "parked";
const ALL_CFS: [&str; 7] = [CF_DEDUP, CF_READY, CF_WAITING, CF_DEAD, CF_ENDPOINTS, CF_META, CF_PARKED];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("cannot open the store at {path}: {error}")]
    Open { path: PathBuf, error: rocksdb::Error },
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    #[error("the store is closed")]
    Closed,
    #[error("the store is being reopened after a write error")]
    Reopening,
    #[error("store task failed: {0}")]
    Task(String),
}

/// An event to take in: its dedup key and one delivery per matching endpoint.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub deliveries: Vec<Delivery>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Seen within the dedup window: nothing written.
    Duplicate,
    /// Dedup key and this many deliveries written.
    Accepted(usize),
}

/// What becomes of a ready delivery after an attempt that did not deliver it
/// (a delivered one is forgotten with [`Store::delivered`]).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "built once per attempt and moved straight to the writer")]
pub enum Next {
    /// Retry at `due_ms` (unix ms) with the updated record. `recall`: it may
    /// be brought forward when the endpoint recovers (false when the receiver
    /// asked for the delay with `Retry-After`, or when it waits for the
    /// dead-letter topic rather than the endpoint).
    Wait { due_ms: i64, delivery: Delivery, recall: bool },
    /// Dead-lettered (already produced to the topic): keep this record in the local index.
    Dead { record: Vec<u8> },
}

/// A delivery due now, as an endpoint worker loads it.
#[derive(Debug, Clone)]
pub struct ReadyItem {
    pub seq: u64,
    pub key: Vec<u8>,
    pub delivery: Delivery,
}

/// A retry that has come due.
#[derive(Debug, Clone)]
pub struct DueItem {
    pub key: Vec<u8>,
    /// When it was due (unix ms).
    pub due_ms: i64,
    pub delivery: Delivery,
}

/// Who to wake after a commit, and the endpoint workers' feeds.
#[derive(Debug)]
pub struct Wakeups {
    endpoints: RwLock<HashMap<String, Arc<Feed>>>,
    /// Items held by all feeds.
    fed: Arc<AtomicUsize>,
    scheduler: Notify,
    /// Earliest due time of retries scheduled since the scheduler last looked;
    /// it reads from there even if that is below where it had got to.
    min_new_due: AtomicI64,
    /// Where to report deliveries for endpoints that have no worker.
    orphans: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            endpoints: RwLock::default(),
            fed: Arc::default(),
            scheduler: Notify::new(),
            min_new_due: AtomicI64::new(i64::MAX),
            orphans: Mutex::new(None),
        }
    }
}

impl Wakeups {
    /// The feed an endpoint worker takes from and waits on; registers the endpoint.
    pub fn endpoint(&self, id: &str) -> Arc<Feed> {
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned()).or_insert_with(|| Arc::new(Feed::new(self.fed.clone()))).clone()
    }
    /// Hands committed ready deliveries to their workers' feeds; `skipped`
    /// names endpoints that got committed deliveries not among them.
    fn feed(&self, items: Vec<ReadyItem>, skipped: &HashSet<String>) {
        if items.is_empty() && skipped.is_empty() {
            return;
        }
        let map = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        for id in skipped {
            if let Some(f) = map.get(id) {
                f.mark_behind();
            }
        }
        // Unknown endpoints are left out: a feed registered later starts behind.
        for item in items {
            if let Some(f) = map.get(&item.delivery.endpoint_id) {
                f.push(item);
            }
        }
    }
    /// Sends every worker to the store: after a failed write, whose batch may
    /// still have reached the log and come back when the store is reopened.
    fn all_behind(&self) {
        let map = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        for f in map.values() {
            f.mark_behind();
            f.wake();
        }
    }
    /// Whether the feeds can take more than `pending` (the writer copies deliveries only then).
    fn feed_has_room(&self, pending: usize) -> bool {
        self.fed.load(Ordering::Acquire) + pending < feed::TOTAL
    }
    pub fn scheduler(&self) -> &Notify {
        &self.scheduler
    }
    /// Receives the ids of endpoints that get ready deliveries but have no worker.
    pub fn orphans(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.orphans.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }
    /// The earliest due time scheduled since the last call (`i64::MAX` if none).
    pub fn take_min_new_due(&self) -> i64 {
        self.min_new_due.swap(i64::MAX, Ordering::AcqRel)
    }
    fn note_new_due(&self, due: i64) {
        self.min_new_due.fetch_min(due, Ordering::AcqRel);
    }
    fn wake_endpoint(&self, id: &str) {
        let map = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(f) => f.wake(),
            None => {
                drop(map);
                // Register it so it is reported once; the new worker takes it over.
                self.endpoint(id);
                if let Some(tx) = self.orphans.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    let _ = tx.send(id.to_owned());
                }
            }
        }
    }
}

/// A dead letter's place in the local index: when it was dead-lettered (unix
/// ms) and the store's sequence number. Written `<ms>-<seq>`; ordered by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadId {
    pub ms: i64,
    pub seq: u64,
}

impl DeadId {
    fn key(&self) -> Vec<u8> {
        seq_key(self.ms, self.seq)
    }

    fn from_key(k: &[u8]) -> Option<DeadId> {
        let ms = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
        let seq = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
        Some(DeadId { ms: i64::try_from(ms).ok()?, seq })
    }
}

impl std::fmt::Display for DeadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for DeadId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad dead-letter id {s:?}: expected <ms>-<seq> as listed, e.g. 1732400000000-42");
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(DeadId { ms: ms.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadQuery {
    /// Only this endpoint's.
    pub endpoint: Option<String>,
    /// Only this reason (`exhausted`, `rejected`, `gone`, ...).
    pub reason: Option<String>,
    /// Dead-lettered at or after this unix ms...
    pub since_ms: Option<i64>,
    /// ...and before this one.
    pub until_ms: Option<i64>,
    /// Resume after this id (paging).
    pub after: Option<DeadId>,
    pub limit: usize,
}

/// The fields of a dead letter a query filters on (the rest is skipped unparsed).
#[derive(serde::Deserialize)]
struct Filterable<'a> {
    #[serde(borrow, default)]
    endpoint_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<std::borrow::Cow<'a, str>>,
}

impl DeadQuery {
    fn matches(&self, f: &Filterable<'_>) -> bool {
        let is = |have: &Option<std::borrow::Cow<'_, str>>, want: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_deref() == Some(w.as_str()))
        };
        is(&f.endpoint_id, &self.endpoint) && is(&f.reason, &self.reason)
    }
}

/// Live counts of the outbox, kept by the writer.
#[derive(Debug, Default)]
pub struct Depth {
    pub ready: AtomicI64,
    pub waiting: AtomicI64,
    /// Test hook: the writer's next write fails without writing.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dedup_window: Duration,
    pub sync_writes: bool,
    /// Keep each endpoint's ready count and pace for the intake gate
    /// (`source.backpressure`); off, the writer does no work for it.
    pub backpressure: bool,
}

/// The open database. After a failed write (a full or failing disk) RocksDB
/// refuses every further write until it is reopened, so the writer can close
/// and open it again once the disk is back, without restarting webhookd.
pub(crate) struct DbCell {
    slot: RwLock<Option<Arc<DB>>>,
    path: PathBuf,
    dedup_window_ms: i64,
}

impl DbCell {
    /// The database, or `Reopening` while the writer swaps it.
    pub(crate) fn get(&self) -> Result<Arc<DB>, StoreError> {
        match self.slot.try_read() {
            Ok(slot) => slot.clone().ok_or(StoreError::Reopening),
            Err(_) => Err(StoreError::Reopening),
        }
    }

    /// Closes the database and opens it again. Readers holding it (short
    /// reads on the blocking pool) are waited for up to `wait`.
    pub(crate) fn reopen(&self, wait: Duration) -> Result<(), StoreError> {
        let mut slot = self.slot.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.take() {
            let deadline = std::time::Instant::now() + wait;
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if Arc::strong_count(&old) > 1 {
                *slot = Some(old);
                return Err(StoreError::Task("readers still hold the store; reopen later".into()));
            }
            drop(old);
        }
        *slot = Some(Arc::new(open_db(&self.path, self.dedup_window_ms)?));
        Ok(())
    }
}

/// RocksDB's memory, bounded whatever the backlog: memtables of all column
/// families together (a retry backlog churns `ready` and `waiting` hard, and
/// RocksDB's default of 64 MiB per family would let six of them grow), and one
/// block cache shared by all families instead of one each. The bound is
/// passed while full memtables wait to be flushed: a heap profile at the
/// peak of parking 1,000,000 retries found 42 MB of memtables under the
/// 32 MiB bound used before. With 16 MiB the peak RSS of that run was
/// 183-190 MiB in four runs against 191-193 in three with 32, alternating,
/// at the same throughput within the spread (README, Performance).
const MEMTABLES_TOTAL: usize = 16 << 20;
const MEMTABLE_PER_FAMILY: usize = 8 << 20;
/// The blocks a memtable takes its memory in. RocksDB's default is an eighth
/// of the memtable, 1 MiB, which jemalloc returns to the system as soon as
/// it is freed (`oversize_threshold`, .cargo/config.toml), so every page of
/// every new block was a page fault. Half that comes from jemalloc's
/// arenas, which reuse freed pages for a while: 400,000-event runs, the
/// writer's page faults 294,000-299,000 → 157,000-159,000 and its CPU 7 %
/// lower; parking 1,000,000, the same peak RSS (README, Performance).
const MEMTABLE_BLOCK: usize = 512 << 10;
const BLOCK_CACHE: usize = 8 << 20;
/// The write-ahead logs' bound. A log file is deleted only once every column
/// family has flushed what it holds, and `meta` (one key per write) and
/// `dedup` rarely fill a memtable: they kept 19 logs (152 MB) alive in one
/// load run, and RocksDB's own bound, 4 × every family's most memtables,
/// would be 448 MiB here. Past this one RocksDB flushes the families that pin
/// the oldest log: 4 × the memtables' real bound.
pub(crate) const MAX_TOTAL_WAL: u64 = 4 * MEMTABLES_TOTAL as u64;
/// The dedup filter's bits per key (10: about 1 % false positives).
const DEDUP_FILTER_BITS_PER_KEY: f64 = 10.0;

fn open_db(path: &Path, window_ms: i64) -> Result<DB, StoreError> {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    db_opts.set_keep_log_file_num(4);
    db_opts.set_db_write_buffer_size(MEMTABLES_TOTAL);
    db_opts.set_max_total_wal_size(MAX_TOTAL_WAL);
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&cache);
    // Every event looks its id up in `dedup`, and nearly always it is new: a
    // miss, which without a filter reads a data block from every level and
    // every L0 file it could be in. With a filter a miss is answered from
    // memory (about 1 % false positives). Bloom rather than Ribbon, which
    // takes ~30 % less memory once built but more while it is being built:
    // parking 1,000,000 deliveries (as many new ids) peaked at
    // 215-222 MiB RSS with Ribbon below L0, 197-205 with Bloom, 188-204 with
    // no filter. Filters live with the table readers, outside the block cache
    // (`webhookd_store_memory_bytes`, kind="table_readers"): about 1.25 bytes
    // per id in the window.
    let mut dedup_table = rocksdb::BlockBasedOptions::default();
    dedup_table.set_block_cache(&cache);
    dedup_table.set_bloom_filter(DEDUP_FILTER_BITS_PER_KEY, false);
    dedup_table.set_optimize_filters_for_memory(true);
    let cfs = ALL_CFS.iter().map(|name| {
        let mut o = Options::default();
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_write_buffer_size(MEMTABLE_PER_FAMILY);
        o.set_arena_block_size(MEMTABLE_BLOCK);
        o.set_block_based_table_factory(if *name == CF_DEDUP { &dedup_table } else { &table });
        if *name == CF_DEDUP {
            // Expired dedup keys are dropped as compaction rewrites them, so
            // expiry never scans on the hot path; a periodic compaction makes
            // sure cold files get rewritten too. Reads check expiry as well.
            o.set_compaction_filter("dedup-expiry", move |_level, _key, value| {
                if expired(value, window_ms, now_ms()) {
                    rocksdb::CompactionDecision::Remove
                } else {
                    rocksdb::CompactionDecision::Keep
                }
            });
            o.set_periodic_compaction_seconds(24 * 3600);
        }
        ColumnFamilyDescriptor::new(*name, o)
    });
    DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|error| StoreError::Open { path: path.to_path_buf(), error })
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DbCell>,
    tx: mpsc::Sender<Op>,
    wake: Arc<Wakeups>,
    depth: Arc<Depth>,
    drainable: Arc<Drainable>,
    healthy: Arc<AtomicBool>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    dedup_window_ms: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.db.path).finish()
    }
}

impl Store {
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let window_ms = i64::try_from(opts.dedup_window.as_millis()).unwrap_or(i64::MAX);
        let db = Arc::new(open_db(path, window_ms)?);
        let depth = Arc::new(Depth::default());
        let backlog = if opts.backpressure {
            let ready = ready_by_endpoint(&db)?;
            depth.ready.store(ready.values().sum(), Ordering::Relaxed);
            Some(Backlog::new(ready))
        } else {
            depth.ready.store(count(&db, CF_READY)?, Ordering::Relaxed);
            None
        };
        depth.waiting.store(count(&db, CF_WAITING)?, Ordering::Relaxed);
        let drainable = Arc::new(Drainable::default());
        let wake = Arc::new(Wakeups::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel(1024);
        let db = Arc::new(DbCell { slot: RwLock::new(Some(db)), path: path.to_path_buf(), dedup_window_ms: window_ms });
        let writer = Writer::new(
            db.clone(),
            rx,
            wake.clone(),
            (depth.clone(), backlog, drainable.clone()),
            healthy.clone(),
            opts.sync_writes,
            window_ms,
        )?;
        let handle = std::thread::Builder::new()
            .name("webhookd-store".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(Store {
            db,
            tx,
            wake,
            depth,
            drainable,
            healthy,
            writer: Arc::new(Mutex::new(Some(handle))),
            dedup_window_ms: window_ms,
        })
    }

    pub fn wakeups(&self) -> &Arc<Wakeups> {
        &self.wake
    }
    pub fn depth(&self) -> &Arc<Depth> {
        &self.depth
    }

    /// Where the consumer waits while the workers catch up ([`IntakeGate`]).
    /// Call it within the runtime the endpoint workers run on: the gate asks
    /// how busy its workers are.
    pub fn intake_gate(&self) -> IntakeGate {
        IntakeGate::new(self.drainable.clone(), tokio::runtime::Handle::current().metrics())
    }
    /// False after a write failed, until one succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes each event's dedup key and deliveries in one atomic batch; events
    /// seen within the dedup window (or earlier in the same batch) are skipped.
    pub async fn intake(&self, events: Arc<Vec<NewEvent>>) -> Result<Vec<Intake>, StoreError> {
        self.call(|reply| Op::Intake { events, reply }).await
    }

    /// Forgets a delivered delivery. While the store is healthy, without
    /// waiting for the write: it returns once the writer has it (an error
    /// only if the store is closed), and the writer deletes it with its next
    /// group or, if that write fails, with the first that succeeds, and only
    /// then drops `slot` (taken from the caller): an in-flight slot stays
    /// taken until its delivery is settled, so after a crash at most the
    /// deliveries holding slots are repeated. After a failed write, until one
    /// succeeds, it waits for the write like [`Store::finish`] and leaves
    /// `slot` to the caller, who retries.
    /// Like every settlement it is not fsynced: a crash before it reaches
    /// the disk means one more delivery, never none. The writer takes
    /// operations in the order they are sent: any later writer operation that
    /// succeeds has written it too (reads may still see it before then).
    pub async fn delivered(
        &self,
        ready_key: Vec<u8>,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<(), StoreError> {
        if self.is_healthy() {
            let op = Op::Delivered { ready_key, reply: None, slot: slot.take() };
            self.tx.send(op).await.map_err(|_| StoreError::Closed)
        } else {
            self.call(|reply| Op::Delivered { ready_key, reply: Some(reply), slot: None }).await
        }
    }

    /// Settles a ready delivery after an attempt that did not deliver it.
    pub async fn finish(&self, ready_key: Vec<u8>, next: Next) -> Result<(), StoreError> {
        self.call(|reply| Op::Finish { ready_key, next, reply }).await
    }

    /// Moves due retries back to their endpoints' ready queues.
    pub async fn promote(&self, due: Vec<DueItem>) -> Result<(), StoreError> {
        self.call(|reply| Op::Promote { due, reply }).await
    }

    /// Brings up to `limit` of an endpoint's parked retries forward to its
    /// ready queue, oldest due first: how many moved, and whether more may remain.
    pub async fn recall(&self, endpoint: &str, limit: usize) -> Result<(usize, bool), StoreError> {
        let endpoint = endpoint.to_owned();
        self.call(|reply| Op::Recall { endpoint, limit, reply }).await
    }

    /// Persists an endpoint's disabled state (`None` re-enables it).
    pub async fn set_endpoint_disabled(&self, id: &str, state: Option<serde_json::Value>) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(|reply| Op::EndpointState { id, state, reply }).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DB) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.get()?;
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Up to `limit` ready deliveries of one endpoint with a sequence number
    /// above `after`, and the highest sequence number looked at (records that
    /// cannot be decoded are quarantined and skipped, never returned).
    pub async fn load_ready(
        &self,
        endpoint: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<ReadyItem>, Option<u64>), StoreError> {
        let endpoint = endpoint.to_owned();
        let tx = self.tx.clone();
        self.read(move |db| {
            let cf = cf(db, CF_READY);
            let start = ready_key(&endpoint, after.map_or(0, |s| s.saturating_add(1)));
            let mut end = endpoint.as_bytes().to_vec();
            end.push(1);
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(start.clone());
            ro.set_iterate_upper_bound(end);
            let mut out = Vec::new();
            let mut last = None;
            for kv in db.iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)).take(limit) {
                let (k, v) = kv?;
                let Some(seq) = k.len().checked_sub(8).and_then(|i| k[i..].try_into().ok()).map(u64::from_be_bytes)
                else {
                    quarantine(&tx, CF_READY, &k, &v, "bad key");
                    continue;
                };
                last = Some(seq);
                match Delivery::decode(&v) {
                    Ok(delivery) => out.push(ReadyItem { seq, key: k.to_vec(), delivery }),
                    Err(e) => quarantine(&tx, CF_READY, &k, &v, e.0),
                }
            }
            Ok((out, last))
        })
        .await
    }

    /// Retries due at or before `now_ms` (up to `limit`), and the due time of
    /// the next one after them. `from_ms` skips the already-promoted range.
    pub async fn due(
        &self,
        now_ms: i64,
        from_ms: i64,
        limit: usize,
    ) -> Result<(Vec<DueItem>, Option<i64>), StoreError> {
        let tx = self.tx.clone();
        self.read(move |db| {
            let cf = cf(db, CF_WAITING);
            let start = (from_ms.max(0) as u64).to_be_bytes().to_vec();
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(start.clone());
            let mut out = Vec::new();
            for kv in db.iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = kv?;
                let Some(due) = k.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes) else {
                    quarantine(&tx, CF_WAITING, &k, &v, "bad key");
                    continue;
                };
                if due > now_ms || out.len() >= limit {
                    return Ok((out, Some(due)));
                }
                match Delivery::decode(&v) {
                    Ok(delivery) => out.push(DueItem { key: k.to_vec(), due_ms: due, delivery }),
                    Err(e) => quarantine(&tx, CF_WAITING, &k, &v, e.0),
                }
            }
            Ok((out, None))
        })
        .await
    }

    /// The endpoint ids that have ready deliveries: one seek per endpoint, not a scan.
    pub async fn ready_endpoints(&self) -> Result<Vec<String>, StoreError> {
        self.read(|db| {
            let mut out = Vec::new();
            let mut it = db.raw_iterator_cf(cf(db, CF_READY));
            it.seek_to_first();
            while let Some(k) = it.key() {
                let id = k.split(|b| *b == 0).next().unwrap_or_default().to_vec();
                let mut next = id.clone();
                next.push(1);
                out.push(String::from_utf8_lossy(&id).into_owned());
                it.seek(&next);
            }
            it.status()?;
            Ok(out)
        })
        .await
    }

    /// Disabled endpoints and their recorded state.
    pub async fn disabled_endpoints(&self) -> Result<HashMap<String, serde_json::Value>, StoreError> {
        self.read(|db| {
            let mut out = HashMap::new();
            for kv in db.iterator_cf(cf(db, CF_ENDPOINTS), IteratorMode::Start) {
                let (k, v) = kv?;
                let state = serde_json::from_slice(&v).map_err(|_| CorruptRecord("endpoint state"))?;
                out.insert(String::from_utf8_lossy(&k).into_owned(), state);
            }
            Ok(out)
        })
        .await
    }

    /// Dead letters of the local index that match `q`, oldest first, at most
    /// `q.limit`, as stored (JSON). Records that are not JSON are skipped (none are written).
    pub async fn dead_letters(&self, q: DeadQuery) -> Result<Vec<(DeadId, Vec<u8>)>, StoreError> {
        self.read(move |db| {
            let mut out = Vec::new();
            let mut it = db.raw_iterator_cf(cf(db, CF_DEAD));
            let from = q.since_ms.map_or(DeadId { ms: 0, seq: 0 }, |ms| DeadId { ms, seq: 0 });
            let from = match q.after {
                Some(after) if after >= from => DeadId { seq: after.seq.saturating_add(1), ..after },
                _ => from,
            };
            it.seek(from.key());
            while out.len() < q.limit {
                let Some((k, v)) = it.item() else { break };
                let Some(id) = DeadId::from_key(k) else { break };
                if q.until_ms.is_some_and(|until| id.ms >= until) {
                    break;
                }
                if serde_json::from_slice::<Filterable<'_>>(v).is_ok_and(|f| q.matches(&f)) {
                    out.push((id, v.to_vec()));
                }
                it.next();
            }
            it.status()?;
            Ok(out)
        })
        .await
    }

    /// The dead letters with these ids, as stored (None where there is none).
    pub async fn dead_letters_by_id(&self, ids: Vec<DeadId>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.read(move |db| {
            let dead = cf(db, CF_DEAD);
            let keys: Vec<Vec<u8>> = ids.iter().map(DeadId::key).collect();
            let mut out = Vec::with_capacity(keys.len());
            for found in db.multi_get_cf(keys.iter().map(|k| (dead, k.as_slice()))) {
                out.push(found?);
            }
            Ok(out)
        })
        .await
    }

    /// Moves dead letters back to the outbox as fresh deliveries, in one
    /// atomic write. Each is moved only if it is still in the index, so a
    /// dead letter replayed twice (even concurrently) is delivered once.
    /// Returns, per item, whether it was moved.
    pub async fn replay(&self, items: Vec<(DeadId, Delivery)>) -> Result<Vec<bool>, StoreError> {
        let items = items.into_iter().map(|(id, d)| (id.key(), d)).collect();
        self.call(|reply| Op::Replay { items, reply }).await
    }

    /// Bytes of SST files over all column families (None while reopening).
    pub fn size_bytes(&self) -> Option<u64> {
        let db = self.db.get().ok()?;
        let sizes = ALL_CFS
            .iter()
            .map(|name| db.property_int_value_cf(cf(&db, name), "rocksdb.total-sst-files-size").ok().flatten());
        Some(sizes.map(Option::unwrap_or_default).sum())
    }

    /// Bytes of write-ahead log files (RocksDB's `NNNNNN.log` in the store's
    /// directory; its info log is `LOG`). None if the directory cannot be read.
    pub fn wal_bytes(&self) -> Option<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.db.path).ok()? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let is_wal = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .is_some_and(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()));
            if is_wal {
                // A log deleted since the listing counts as nothing.
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Some(total)
    }

    /// RocksDB's memory by kind: memtables, table readers (index and filter
    /// blocks outside the cache) and the block cache, in bytes.
    pub fn memory_bytes(&self) -> Option<[(&'static str, u64); 3]> {
        let db = self.db.get().ok()?;
        let sum = |property: &str| -> u64 {
            ALL_CFS.iter().filter_map(|name| db.property_int_value_cf(cf(&db, name), property).ok().flatten()).sum()
        };
        // One cache serves every column family but `default` (which holds
        // nothing and has RocksDB's own): read it once, through one of ours.
        let cache =
            db.property_int_value_cf(cf(&db, CF_READY), "rocksdb.block-cache-usage").ok().flatten().unwrap_or_default();
        Some([
            ("memtables", sum("rocksdb.cur-size-all-mem-tables")),
            ("table_readers", sum("rocksdb.estimate-table-readers-mem")),
            ("block_cache", cache),
        ])
    }

    /// Whether an event id is inside the dedup window.
    pub async fn seen(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_owned();
        let window = self.dedup_window_ms;
        self.read(move |db| Ok(db.get_cf(cf(db, CF_DEDUP), id)?.is_some_and(|v| !expired(&v, window, now_ms())))).await
    }

    /// Stops the writer after it has applied everything queued before this call.
    pub async fn close(&self) {
        let _ = self.tx.send(Op::Close).await;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// Hands an undecodable record to the writer to move into the dead index.
/// Called from the blocking read pool.
fn quarantine(tx: &mpsc::Sender<Op>, cf_name: &'static str, key: &[u8], raw: &[u8], why: &str) {
    tracing::error!(column_family = cf_name, key = %hex::encode(key), why, "corrupt record: moved to the dead-letter index");
    metrics::counter!(crate::telemetry::metrics::STORE_CORRUPT_RECORDS).increment(1);
    let _ = tx.blocking_send(Op::Quarantine { cf_name, key: key.to_vec(), raw: raw.to_vec() });
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}

pub(crate) fn ready_key(endpoint: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(endpoint.len() + 9);
    k.extend_from_slice(endpoint.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// An endpoint's entry in `parked` for its retry at `waiting_key`.
pub(crate) fn parked_key(endpoint: &str, waiting_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(endpoint.len() + 1 + waiting_key.len());
    k.extend_from_slice(endpoint.as_bytes());
    k.push(0);
    k.extend_from_slice(waiting_key);
    k
}

pub(crate) fn seq_key(ms: i64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&(ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn expired(value: &[u8], window_ms: i64, now: i64) -> bool {
    match <[u8; 8]>::try_from(value) {
        Ok(b) => i64::from_be_bytes(b).saturating_add(window_ms) < now,
        Err(_) => true,
    }
}

/// The ready deliveries stored, per endpoint id.
fn ready_by_endpoint(db: &DB) -> Result<HashMap<Vec<u8>, i64>, StoreError> {
    let mut counts: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut it = db.raw_iterator_cf(cf(db, CF_READY));
    it.seek_to_first();
    while let Some(key) = it.key() {
        let endpoint = Changes::endpoint_of(key);
        match counts.get_mut(endpoint) {
            Some(n) => *n += 1,
            None => {
                counts.insert(endpoint.to_vec(), 1);
            }
        }
        it.next();
    }
    it.status()?;
    Ok(counts)
}

fn count(db: &DB, name: &str) -> Result<i64, StoreError> {
    let mut n = 0;
    let mut it = db.raw_iterator_cf(cf(db, name));
    it.seek_to_first();
    while it.valid() {
        n += 1;
        it.next();
    }
    it.status()?;
    Ok(n)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Store {
        /// The database itself, for tests that reach under the API.
        fn raw(&self) -> Arc<DB> {
            self.db.get().expect("db")
        }
    }
    use crate::event::SourcePos;
    use bytes::Bytes;

    pub(super) fn delivery(event: &str, endpoint: &str) -> Delivery {
        delivery_of(event, endpoint, Bytes::from_static(b"{}"))
    }

    fn delivery_of(event: &str, endpoint: &str, payload: Bytes) -> Delivery {
        let ev = crate::event::Event {
            id: event.into(),
            event_type: "T".into(),
            location_id: None,
            time_ms: 0,
            payload,
            source: SourcePos { topic: "t".into(), partition: 0, offset: 0 },
        };
        Delivery::new(&ev, endpoint)
    }

    fn new_event(id: &str, endpoints: &[&str]) -> NewEvent {
        NewEvent { event_id: id.into(), deliveries: endpoints.iter().map(|e| delivery(id, e)).collect() }
    }

    fn open(dir: &Path, window: Duration) -> Store {
        Store::open(dir, StoreOptions { dedup_window: window, sync_writes: true, backpressure: true }).expect("open")
    }

    #[tokio::test]
    async fn intake_dedups_within_a_batch_and_across_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let r =
            s.intake(Arc::new(vec![new_event("e1", &["a", "b"]), new_event("e1", &["a"]), new_event("e2", &[])])).await;
        assert_eq!(r.expect("intake"), vec![Intake::Accepted(2), Intake::Duplicate, Intake::Accepted(0)]);
        let r = s.intake(Arc::new(vec![new_event("e2", &["a"]), new_event("e3", &["a"])])).await;
        assert_eq!(r.expect("intake"), vec![Intake::Duplicate, Intake::Accepted(1)]);
        assert_eq!(s.depth().ready.load(Ordering::Relaxed), 3);
        let (a, _) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(
            a.iter().map(|i| i.delivery.event_id.as_str()).collect::<Vec<_>>(),
            ["e1", "e3"],
            "FIFO per endpoint"
        );
        assert_eq!(
            s.load_ready("a", Some(a[0].seq), 10).await.expect("load").0.len(),
            1,
            "the cursor skips what was loaded"
        );
        s.close().await;
    }

    #[tokio::test]
    async fn expired_dedup_keys_are_ignored_and_compacted_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_millis(1));
        s.intake(Arc::new(vec![new_event("old", &[])])).await.expect("intake");
        // The window is the feature under test: real time has to pass it.
        std::thread::sleep(Duration::from_millis(5));
        assert!(!s.seen("old").await.expect("read"), "outside the window");
        s.raw().compact_range_cf(cf(&s.raw(), CF_DEDUP), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(
            s.raw().get_cf(cf(&s.raw(), CF_DEDUP), "old").expect("get"),
            None,
            "the compaction filter dropped it"
        );
        let r = s.intake(Arc::new(vec![new_event("old", &["a"])])).await.expect("intake");
        assert_eq!(r, vec![Intake::Accepted(1)], "an id outside the window is delivered again");
        s.close().await;
        drop(s);

        let s = open(dir.path(), Duration::from_secs(3600));
        s.intake(Arc::new(vec![new_event("fresh", &[])])).await.expect("intake");
        s.raw().compact_range_cf(cf(&s.raw(), CF_DEDUP), None::<&[u8]>, None::<&[u8]>);
        assert!(s.seen("fresh").await.expect("read"), "inside the window it survives compaction");
        s.close().await;
    }

    /// New ids are the common case of the dedup lookup: on disk, the filter
    /// must answer them without searching the files, at L0 and below, while
    /// ids that were seen are still found.
    #[tokio::test]
    async fn new_ids_are_answered_by_the_dedup_filter_on_every_level() {
        use rocksdb::perf::{PerfContext, PerfMetric, PerfStatsLevel, set_perf_stats};
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let seen: Vec<NewEvent> = (0..2000).map(|i| new_event(&format!("id-{i}"), &[])).collect();
        s.intake(Arc::new(seen)).await.expect("intake");
        let db = s.raw();
        let dedup = cf(&db, CF_DEDUP);
        // (level, misses answered by a filter, seen ids found)
        let probe = |level: &str| {
            set_perf_stats(PerfStatsLevel::EnableCount);
            let mut ctx = PerfContext::default();
            ctx.reset();
            // Within the files' key range, so only a filter can rule them out.
            let new = db.multi_get_cf((0..1000).map(|i| (dedup, format!("id-{i}-new"))));
            let filtered = ctx.metric(PerfMetric::BloomSstMissCount);
            let old = db.multi_get_cf((0..1000).map(|i| (dedup, format!("id-{i}"))));
            set_perf_stats(PerfStatsLevel::Disable);
            assert!(new.iter().all(|r| matches!(r, Ok(None))), "{level}: no new id is found");
            assert!(old.iter().all(|r| matches!(r, Ok(Some(_)))), "{level}: every seen id is found");
            assert!(filtered >= 950, "{level}: the filter answered {filtered} of 1000 new ids");
        };
        db.flush_cf(dedup).expect("flush");
        assert_eq!(db.property_int_value_cf(dedup, "rocksdb.num-files-at-level0").expect("prop"), Some(1));
        probe("L0");
        db.compact_range_cf(dedup, None::<&[u8]>, None::<&[u8]>);
        assert_eq!(db.property_int_value_cf(dedup, "rocksdb.num-files-at-level0").expect("prop"), Some(0));
        probe("after compaction");
        s.close().await;
    }

    #[tokio::test]
    async fn only_deliveries_that_succeed_give_an_endpoint_pace_for_backpressure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let mut events: Vec<NewEvent> = (0..110).map(|i| new_event(&format!("ok{i}"), &["ok"])).collect();
        events.extend((0..300).map(|i| new_event(&format!("bad{i}"), &["bad"])));
        // Its commit is the writer's first: it starts the window the pace is measured over.
        s.intake(Arc::new(events)).await.expect("intake");
        let (ok, _) = s.load_ready("ok", None, 200).await.expect("load");
        let (bad, _) = s.load_ready("bad", None, 400).await.expect("load");
        for item in &ok[..100] {
            s.delivered(item.key.clone(), &mut None).await.expect("delivered");
        }
        // An endpoint that fails fast: each attempt ends, none delivers.
        let dead = || Next::Dead { record: b"{\"reason\":\"rejected\"}".to_vec() };
        for item in &bad[..100] {
            s.finish(item.key.clone(), dead()).await.expect("dead");
        }
        // A pace is measured over a window of time: let one pass, then commit.
        tokio::time::sleep(gate::SWEEP).await;
        s.finish(bad[100].key.clone(), dead()).await.expect("dead");
        // "ok" delivers fast and has 10 left: they count. "bad" has 199 left
        // and delivers nothing: they count for nothing. Neither has run dry.
        assert_eq!(s.drainable.last_reading(), Some(gate::Reading { drainable: 10, dry: 0 }));
        s.close().await;
    }

    #[tokio::test]
    async fn finish_reschedule_promote_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        s.intake(Arc::new(vec![new_event("e1", &["a"]), new_event("e2", &["a"]), new_event("e3", &["a"])]))
            .await
            .expect("intake");
        let (items, _) = s.load_ready("a", None, 10).await.expect("load");
        let mut d = items[1].delivery.clone();
        d.attempts = 1;
        s.delivered(items[0].key.clone(), &mut None).await.expect("delivered");
        s.finish(items[1].key.clone(), Next::Wait { due_ms: now_ms() - 10, delivery: d, recall: true })
            .await
            .expect("wait");
        s.finish(items[2].key.clone(), Next::Dead { record: b"{\"reason\":\"rejected\"}".to_vec() })
            .await
            .expect("dead");
        assert_eq!((s.depth().ready.load(Ordering::Relaxed), s.depth().waiting.load(Ordering::Relaxed)), (0, 1));
        assert_eq!(s.dead_letters(DeadQuery { limit: 10, ..Default::default() }).await.expect("dead").len(), 1);
        let last_seq = items[2].seq;
        s.close().await;
        drop(s);

        // Reopened: counts are recovered, the retry is still there, and new
        // sequence numbers never reuse old ones.
        let s = open(dir.path(), Duration::from_secs(3600));
        assert_eq!(s.depth().waiting.load(Ordering::Relaxed), 1);
        let (due, next) = s.due(now_ms(), 0, 10).await.expect("due");
        assert_eq!((due.len(), next), (1, None));
        s.promote(due).await.expect("promote");
        let (ready, _) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].delivery.attempts, 1, "the retry keeps its history");
        assert!(ready[0].seq > last_seq, "sequence numbers continue after a restart");
        assert_eq!((s.depth().ready.load(Ordering::Relaxed), s.depth().waiting.load(Ordering::Relaxed)), (1, 0));
        s.close().await;
    }

    /// A store holding one ready delivery, of event `e1` to endpoint `a`.
    async fn one_ready(dir: &Path) -> (Store, Vec<ReadyItem>) {
        let s = open(dir, Duration::from_secs(3600));
        s.intake(Arc::new(vec![new_event("e1", &["a"])])).await.expect("intake");
        let (items, _) = s.load_ready("a", None, 10).await.expect("load");
        (s, items)
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock, reason = "the test holds the database's slot to make the writer refuse")]
    async fn a_delivered_delete_refused_while_reopening_is_written_with_the_next_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, items) = one_ready(dir.path()).await;
        {
            // The database taken out, as during a reopen: the writer refuses writes.
            let _swapping = s.db.slot.write().expect("slot");
            s.delivered(items[0].key.clone(), &mut None).await.expect("queued");
            // Answered after the writer took the delete (operations are taken in order).
            let refused = s.intake(Arc::new(vec![new_event("e2", &["a"])])).await;
            assert!(matches!(refused, Err(StoreError::Reopening)), "{refused:?}");
        }
        s.intake(Arc::new(vec![new_event("e3", &["a"])])).await.expect("intake once back");
        let (items, _) = s.load_ready("a", None, 10).await.expect("load");
        let ids: Vec<&str> = items.iter().map(|i| i.delivery.event_id.as_str()).collect();
        assert_eq!(ids, ["e3"], "e1's delete was kept, and written with the next group");
        assert_eq!(s.depth().ready.load(Ordering::Relaxed), 1);
        s.close().await;
    }

    /// The memory gauges by kind: memtables before a flush; table readers (the
    /// dedup filter lives there) and the block cache once tables exist and are
    /// read.
    #[tokio::test]
    async fn memory_by_kind_counts_table_readers_and_the_block_cache_once_tables_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let events: Vec<NewEvent> = (0..500).map(|i| new_event(&format!("e{i}"), &["a"])).collect();
        s.intake(Arc::new(events)).await.expect("intake");
        let kind = |m: [(&str, u64); 3], k: &str| m.iter().find(|(name, _)| *name == k).expect("kind").1;
        let before = s.memory_bytes().expect("memory");
        assert!(kind(before, "memtables") > 0, "{before:?}");
        assert_eq!(kind(before, "table_readers"), 0, "no table yet: {before:?}");
        // RocksDB keeps a few bytes of its own there (87 seen).
        assert!(kind(before, "block_cache") < 1024, "nothing read yet: {before:?}");
        let db = s.raw();
        for name in ALL_CFS {
            db.flush_cf(cf(&db, name)).expect("flush");
        }
        drop(db);
        let (ready, _) = s.load_ready("a", None, 500).await.expect("load");
        assert_eq!(ready.len(), 500, "read back from the tables");
        assert!(s.seen("e7").await.expect("seen"), "a dedup lookup through the table and its filter");
        let after = s.memory_bytes().expect("memory");
        assert!(kind(after, "table_readers") > 0, "{after:?}");
        assert!(kind(after, "block_cache") >= kind(before, "block_cache") + 4096, "a data block at least: {after:?}");
        assert!(kind(after, "memtables") < kind(before, "memtables"), "flushed: {before:?} then {after:?}");
        s.close().await;
    }

    /// A delivered delete nobody waits for, whose write fails, is kept and
    /// written once the store is reopened (the failure injected, the reopen
    /// real).
    #[tokio::test]
    async fn a_delivered_delete_whose_write_failed_is_kept_and_written_after_the_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, items) = one_ready(dir.path()).await;
        s.depth.fail_next_write.store(true, Ordering::Release);
        s.delivered(items[0].key.clone(), &mut None).await.expect("queued");
        // The next write either shares the failed group (and hears of it) or
        // follows it and reopens the store first.
        let mut tries = 0;
        while s.intake(Arc::new(vec![new_event("e2", &["b"])])).await.is_err() {
            tries += 1;
            assert!(tries < 3, "the store did not recover");
        }
        assert!(!s.depth.fail_next_write.load(Ordering::Acquire), "no write failed: the test shows nothing");
        assert!(s.is_healthy());
        let (left, _) = s.load_ready("a", None, 10).await.expect("load");
        assert!(left.is_empty(), "the delete was lost with the failed write: {left:?}");
        assert_eq!(s.depth().ready.load(Ordering::Relaxed), 1, "e2 only");
        s.close().await;
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock, reason = "the test holds the database's slot to make the writer refuse")]
    async fn after_a_failed_write_a_delivered_delete_waits_for_its_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, items) = one_ready(dir.path()).await;
        s.healthy.store(false, Ordering::Release); // as after a failed write
        {
            let _swapping = s.db.slot.write().expect("slot");
            let refused = s.delivered(items[0].key.clone(), &mut None).await;
            assert!(matches!(refused, Err(StoreError::Reopening)), "the caller hears it: {refused:?}");
        }
        s.delivered(items[0].key.clone(), &mut None).await.expect("written once the store is back");
        assert!(s.is_healthy(), "a write succeeded");
        let (left, _) = s.load_ready("a", None, 10).await.expect("load");
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(s.depth().ready.load(Ordering::Relaxed), 0);
        s.close().await;
    }

    #[tokio::test]
    async fn the_store_reopens_in_place_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        s.intake(Arc::new(vec![new_event("e1", &["a"])])).await.expect("intake");
        let held = s.raw();
        assert!(
            s.db.reopen(Duration::from_millis(20)).is_err(),
            "a reader still holds the database: not closed under it"
        );
        drop(held);
        s.db.reopen(Duration::from_millis(20)).expect("reopen");
        assert!(s.seen("e1").await.expect("read"), "data survives the reopen");
        s.intake(Arc::new(vec![new_event("e2", &["a"])])).await.expect("intake after reopen");
        let (items, _) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(items.iter().map(|i| i.delivery.event_id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert!(items[0].seq < items[1].seq, "sequence numbers go on increasing");
        s.close().await;
    }

    #[tokio::test]
    async fn endpoint_state_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(60));
        s.set_endpoint_disabled("a", Some(serde_json::json!({"reason": "gone"}))).await.expect("disable");
        s.close().await;
        drop(s);
        let s = open(dir.path(), Duration::from_secs(60));
        assert_eq!(s.disabled_endpoints().await.expect("read")["a"]["reason"], "gone");
        s.set_endpoint_disabled("a", None).await.expect("enable");
        assert!(s.disabled_endpoints().await.expect("read").is_empty());
        s.close().await;
    }

    #[tokio::test]
    async fn a_corrupt_record_is_quarantined_not_a_blocker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(60));
        s.intake(Arc::new(vec![new_event("e1", &["a"])])).await.expect("intake");
        // A record no version of webhookd wrote, between two good ones.
        s.raw().put_cf(cf(&s.raw(), CF_READY), ready_key("a", 1_000_000), b"\x07garbage").expect("put");
        s.raw().put_cf(cf(&s.raw(), CF_READY), ready_key("a", 1_000_001), delivery("e2", "a").encode()).expect("put");
        let (items, scanned_to) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(items.iter().map(|i| i.delivery.event_id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        assert_eq!(scanned_to, Some(1_000_001));
        // The quarantine goes through the writer: wait for it by closing.
        s.close().await;
        let dead: Vec<serde_json::Value> = s
            .dead_letters(DeadQuery { limit: 10, ..Default::default() })
            .await
            .expect("dead")
            .into_iter()
            .map(|(_, raw)| serde_json::from_slice(&raw).expect("json"))
            .collect();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0]["reason"], "corrupt_record");
        assert_eq!(dead[0]["column_family"], "ready");
        assert_eq!(s.raw().get_cf(cf(&s.raw(), CF_READY), ready_key("a", 1_000_000)).expect("get"), None);
    }

    #[tokio::test]
    async fn dead_letters_are_listed_by_filter_and_replayed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let specs = [("e1", "a", "rejected"), ("e2", "b", "exhausted"), ("e3", "a", "exhausted"), ("e4", "a", "gone")];
        let events: Vec<NewEvent> = specs.iter().map(|(e, ep, _)| new_event(e, &[ep])).collect();
        s.intake(Arc::new(events)).await.expect("intake");
        for ep in ["a", "b"] {
            for item in s.load_ready(ep, None, 10).await.expect("load").0 {
                let (_, _, reason) = specs.iter().find(|(e, ..)| *e == item.delivery.event_id).expect("known");
                let record =
                    serde_json::json!({ "reason": reason, "endpoint_id": ep, "event_id": item.delivery.event_id });
                s.finish(item.key, Next::Dead { record: record.to_string().into_bytes() }).await.expect("dead");
            }
        }
        let list = |q: DeadQuery| {
            let s = s.clone();
            async move {
                let page = s.dead_letters(DeadQuery { limit: 10, ..q }).await.expect("list");
                let json = |raw: &[u8]| serde_json::from_slice::<serde_json::Value>(raw).expect("json");
                page.into_iter()
                    .map(|(id, raw)| (id, json(&raw)["event_id"].as_str().unwrap_or("?").to_owned()))
                    .collect::<Vec<_>>()
            }
        };
        let all = list(DeadQuery::default()).await;
        assert_eq!(all.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), ["e1", "e3", "e4", "e2"]);
        let a_exhausted =
            list(DeadQuery { endpoint: Some("a".into()), reason: Some("exhausted".into()), ..Default::default() })
                .await;
        assert_eq!(a_exhausted.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), ["e3"]);
        let page2 = list(DeadQuery { after: Some(all[1].0), ..Default::default() }).await;
        assert_eq!(page2.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), ["e4", "e2"], "paging resumes after");
        let later = list(DeadQuery { since_ms: Some(now_ms() + 60_000), ..Default::default() }).await;
        assert!(later.is_empty(), "nothing dead-lettered in the future");
        let earlier = list(DeadQuery { until_ms: Some(all[0].0.ms), ..Default::default() }).await;
        assert!(earlier.is_empty(), "until is exclusive");
        assert_eq!(all[0].0.to_string().parse::<DeadId>(), Ok(all[0].0), "ids round-trip");

        // Replaying e3 twice in one call and once more after: moved once.
        let id = a_exhausted[0].0;
        let fresh = delivery("e3", "a");
        let moved = s.replay(vec![(id, fresh.clone()), (id, fresh.clone())]).await.expect("replay");
        assert_eq!(moved, vec![true, false]);
        assert_eq!(s.replay(vec![(id, fresh)]).await.expect("replay"), vec![false], "already replayed");
        let (ready, _) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(
            ready.iter().map(|i| (i.delivery.event_id.as_str(), i.delivery.attempts)).collect::<Vec<_>>(),
            [("e3", 0)]
        );
        assert_eq!(
            s.dead_letters_by_id(vec![id, all[0].0])
                .await
                .expect("get")
                .iter()
                .map(Option::is_some)
                .collect::<Vec<_>>(),
            [false, true]
        );
        assert_eq!(list(DeadQuery::default()).await.len(), 3);
        s.close().await;
    }

    #[tokio::test]
    async fn recall_brings_an_endpoints_parked_retries_forward_once_and_only_those_it_may() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600));
        let ids = ["e1", "e2", "e3", "e4", "e5"];
        s.intake(Arc::new(ids.iter().map(|id| new_event(id, &["a"])).chain([new_event("b1", &["b"])]).collect()))
            .await
            .expect("intake");
        let (mut items, _) = s.load_ready("a", None, 10).await.expect("load");
        items.extend(s.load_ready("b", None, 10).await.expect("load").0);
        let far = now_ms() + 3_600_000;
        for (i, item) in items.iter().enumerate() {
            let mut d = item.delivery.clone();
            d.attempts = 1;
            // e5 waits for a Retry-After the receiver asked for: never recalled.
            let recall = d.event_id != "e5";
            s.finish(item.key.clone(), Next::Wait { due_ms: far + i as i64, delivery: d, recall }).await.expect("wait");
        }
        assert_eq!(s.depth().waiting.load(Ordering::Relaxed), 6);

        // The scheduler read e1 and e2 as due before the recall moved them (a race).
        let (stale, _) = s.due(far + 10, 0, 2).await.expect("due");
        assert_eq!(stale.iter().map(|d| d.delivery.event_id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);

        assert_eq!(s.recall("a", 2).await.expect("recall"), (2, true), "two of a's, oldest due first; more may remain");
        assert_eq!(s.recall("a", 10).await.expect("recall"), (2, false), "the rest but e5");
        assert_eq!(s.recall("a", 10).await.expect("recall"), (0, false), "nothing parked twice");
        s.promote(stale).await.expect("promote");
        let (ready, _) = s.load_ready("a", None, 10).await.expect("load");
        let mut got: Vec<_> = ready.iter().map(|r| r.delivery.event_id.as_str()).collect();
        got.sort();
        assert_eq!(got, ["e1", "e2", "e3", "e4"], "each once: the stale promotion moved nothing");
        assert!(ready.iter().all(|r| r.delivery.attempts == 1), "records as they were parked");
        assert_eq!((s.depth().ready.load(Ordering::Relaxed), s.depth().waiting.load(Ordering::Relaxed)), (4, 2));

        // b's retry is untouched; promoting it clears its index entry.
        let (due, _) = s.due(far + 10, 0, 10).await.expect("due");
        assert_eq!(due.iter().map(|d| d.delivery.event_id.as_str()).collect::<Vec<_>>(), ["e5", "b1"]);
        s.promote(due).await.expect("promote");
        assert_eq!(s.recall("b", 10).await.expect("recall"), (0, false));
        assert_eq!(s.raw().iterator_cf(cf(&s.raw(), CF_PARKED), IteratorMode::Start).count(), 0, "index emptied");
        assert_eq!((s.depth().ready.load(Ordering::Relaxed), s.depth().waiting.load(Ordering::Relaxed)), (6, 0));
        s.close().await;
    }

    /// An outbox that churns at full speed (deliveries taken in and done, as
    /// in a long catch-up) keeps its write-ahead logs under the bound, even
    /// though `meta` and `dedup` are written by every batch and seldom flushed.
    #[tokio::test]
    async fn write_ahead_logs_stay_bounded_while_the_outbox_churns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(
            dir.path(),
            StoreOptions { dedup_window: Duration::from_secs(3600), sync_writes: false, backpressure: false },
        )
        .expect("open");
        let payload = Bytes::from(vec![b'x'; 16 << 10]);
        let (mut written, mut peak, mut cursor) = (0u64, 0u64, None);
        for batch in 0..300 {
            let events = (0..64)
                .map(|i| {
                    let id = format!("e{batch}-{i}");
                    NewEvent { deliveries: vec![delivery_of(&id, "a", payload.clone())], event_id: id }
                })
                .collect();
            s.intake(Arc::new(events)).await.expect("intake");
            written += 64 * payload.len() as u64;
            let (items, _) = s.load_ready("a", cursor, 64).await.expect("load");
            assert_eq!(items.len(), 64);
            cursor = items.last().map(|i| i.seq);
            for item in items {
                s.delivered(item.key, &mut None).await.expect("delivered");
            }
            peak = peak.max(s.wal_bytes().expect("the store's directory"));
        }
        assert!(written > 4 * MAX_TOTAL_WAL, "the test writes several bounds' worth: {written}");
        // A log is deleted once the flush it triggered is done: allow one memtables' worth over.
        let allowed = MAX_TOTAL_WAL + MEMTABLES_TOTAL as u64;
        assert!(peak <= allowed, "write-ahead logs peaked at {peak} bytes, over {allowed}");
        assert!(peak > 0, "the logs were measured");
        s.close().await;
    }

    #[tokio::test]
    async fn ready_endpoints_lists_each_endpoint_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(60));
        s.intake(Arc::new(vec![new_event("e1", &["a", "b"]), new_event("e2", &["a", "c"])])).await.expect("intake");
        assert_eq!(s.ready_endpoints().await.expect("scan"), ["a", "b", "c"]);
        s.close().await;
    }

    #[tokio::test]
    async fn retries_scheduled_below_the_scheduler_position_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(60));
        s.intake(Arc::new(vec![new_event("e1", &["a"])])).await.expect("intake");
        let (items, _) = s.load_ready("a", None, 10).await.expect("load");
        assert_eq!(s.wakeups().take_min_new_due(), i64::MAX, "nothing scheduled yet");
        let before = now_ms();
        let d = items[0].delivery.clone();
        s.finish(items[0].key.clone(), Next::Wait { due_ms: before - 60_000, delivery: d, recall: true })
            .await
            .expect("wait");
        let reported = s.wakeups().take_min_new_due();
        assert!((before..=now_ms()).contains(&reported), "a due time in the past is clamped to now and reported");
        assert_eq!(s.wakeups().take_min_new_due(), i64::MAX, "reported once");
        s.close().await;
    }
}
