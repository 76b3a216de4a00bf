//! The test bed: a tansu broker process (or any Kafka named by
//! `WEBHOOKD_TEST_BOOTSTRAP`), webhookd's release binary as a process, fast
//! receivers that keep a ledger of every `webhook-id`, and the accounting of
//! every (event, endpoint) pair at the end.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::helpers::{Kafka, free_port, http_get, unique};

/// Every wait here is bounded; reaching a bound fails the test.
pub const LONG: Duration = Duration::from_secs(180);

/// The webhookd binary: the release build named by `WEBHOOKD_TEST_BIN`
/// (scripts/test builds it), else this test build's own.
pub fn webhookd_bin() -> String {
    std::env::var("WEBHOOKD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_webhookd").to_owned())
}

/// A command that dies with the test: if the test process is killed (the
/// hang guard), its broker and daemons must not live on and load the machine.
fn command(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--", program]);
    c
}

// ---------------------------------------------------------------- broker

pub use crate::tansu::Tansu;

/// The broker for a test: a tansu process, unless `WEBHOOKD_TEST_BOOTSTRAP`
/// names another Kafka (then `tansu` is None).
pub async fn broker() -> (Option<Tansu>, Kafka) {
    match std::env::var("WEBHOOKD_TEST_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => (None, Kafka::connect(&b)),
        _ => {
            let t = Tansu::start(free_port()).await;
            let k = Kafka::connect(&t.bootstrap);
            (Some(t), k)
        }
    }
}

// ---------------------------------------------------------------- webhookd

/// webhookd as a process: its log lines collected, its admin address read off them.
pub struct Webhookd {
    child: Child,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Webhookd {
    pub async fn start(config: &Path) -> Webhookd {
        let mut child = command(&webhookd_bin())
            .args(["run", "--config", &config.display().to_string()])
            .env_remove("RUST_LOG")
            .env("WEBHOOKD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn webhookd");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(a) = v["admin"].as_str().and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(a);
                }
                sink.lock().expect("lock").push(line);
            }
        });
        let admin = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("webhookd did not start:\n{}", log.lock().expect("lock").join("\n")));
        Webhookd { child, admin, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(self.admin, "/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "webhookd not ready: {}", http_get(self.admin, "/readyz").await.1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, series: &str) -> f64 {
        crate::helpers::metric_value(&http_get(self.admin, "/metrics").await.1, series)
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub async fn terminate(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill -TERM failed");
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < limit, "webhookd did not exit within {limit:?} of SIGTERM");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Peak resident set size so far, in MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> f64 {
        proc_status_kib(self.pid(), "VmHWM:") as f64 / 1024.0
    }

    pub fn rss_mib(&self) -> f64 {
        proc_status_kib(self.pid(), "VmRSS:") as f64 / 1024.0
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("lock").join("\n")
    }
}

impl Drop for Webhookd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A config for the fault tests: the broker, one topic, a store, the endpoints.
pub fn write_config(dir: &Path, bootstrap: &str, topic: &str, store: &Path, extra: &str, endpoints: &str) -> PathBuf {
    let toml = format!(
        r#"[source]
brokers = ["{bootstrap}"]
topics = ["{topic}"]
group_id = "{topic}-group"
dead_letter_topic = "{topic}.dlq"
commit_interval = "200ms"
session_timeout = "6s"
[store]
path = "{store}"
[admin]
listen = "127.0.0.1:0"
[delivery]
shutdown_grace = "2s"
allow_networks = ["127.0.0.0/8"]
[retry]
base = "100ms"
cap = "500ms"
max_attempts = 1000
[log]
format = "json"
{extra}
{endpoints}"#,
        store = store.display()
    );
    let path = dir.join(format!("webhookd-{}.toml", unique()));
    std::fs::write(&path, toml).expect("write config");
    path
}

pub fn endpoint(id: &str, port: u16) -> String {
    format!(
        "[[endpoints]]\nid = \"{id}\"\nurl = \"http://127.0.0.1:{port}/{id}\"\nsecrets = [\"{}\"]\n\
         rate_limit = {{ per_second = 100000 }}\n",
        crate::helpers::SECRET_A
    )
}

// ---------------------------------------------------------------- receivers

/// How a ledger answers: status for (webhook-id, attempt number at this receiver).
pub type Answer = Arc<dyn Fn(&str, u32) -> u16 + Send + Sync>;

#[derive(Default, Clone, Copy, Debug)]
pub struct Entry {
    pub attempts: u32,
    pub ok: u32,
}

struct LedgerState {
    entries: Mutex<HashMap<String, Entry>>,
    requests: AtomicU64,
    delivered: AtomicU64,
    /// When non-zero, every request gets this status (the endpoint is "down").
    forced: AtomicU16,
    answer: Answer,
    /// How long each answer takes, in milliseconds.
    delay_ms: AtomicU64,
}

/// A fast receiver keeping, per `webhook-id`, how many requests it saw and
/// how many it answered 2xx.
#[derive(Clone)]
pub struct Ledger {
    pub port: u16,
    state: Arc<LedgerState>,
    /// Which webhook-ids this receiver rejects for good (they end dead-lettered).
    rejects: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Ledger {
    pub async fn start(answer: impl Fn(&str, u32) -> u16 + Send + Sync + 'static) -> Ledger {
        Self::start_slow(Duration::ZERO, answer).await
    }

    /// A receiver that takes `delay` over every answer.
    pub async fn start_slow(delay: Duration, answer: impl Fn(&str, u32) -> u16 + Send + Sync + 'static) -> Ledger {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(LedgerState {
            entries: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            forced: AtomicU16::new(0),
            answer: Arc::new(answer),
            delay_ms: AtomicU64::new(delay.as_millis() as u64),
        });
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let id =
                                req.headers().get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                            let _ = req.into_body().collect().await;
                            let delay = s.delay_ms.load(Ordering::Relaxed);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let status = s.record(&id);
                            hyper::Response::builder().status(status).body(Full::new(Bytes::new()))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ledger { port, state, rejects: Arc::new(|_| false) }
    }

    /// Declares which webhook-ids the answer function rejects permanently.
    pub fn rejecting(mut self, rejects: impl Fn(&str) -> bool + Send + Sync + 'static) -> Ledger {
        self.rejects = Arc::new(rejects);
        self
    }

    pub fn rejects(&self, webhook_id: &str) -> bool {
        (self.rejects)(webhook_id)
    }

    /// Answers 200 to everything.
    pub async fn ok() -> Ledger {
        Self::start(|_, _| 200).await
    }

    /// Every request gets `status` until [`Ledger::recover`].
    pub fn go_down(&self, status: u16) {
        self.state.forced.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn recover(&self) {
        self.state.forced.store(0, Ordering::SeqCst);
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn delivered(&self) -> u64 {
        self.state.delivered.load(Ordering::SeqCst)
    }

    pub fn entries(&self) -> HashMap<String, Entry> {
        self.state.entries.lock().expect("lock").clone()
    }

    /// Waits until `n` distinct webhook-ids were answered 2xx.
    pub async fn wait_delivered(&self, what: &str, n: usize) {
        let deadline = Instant::now() + LONG;
        loop {
            let got = self.state.entries.lock().expect("lock").values().filter(|e| e.ok > 0).count();
            if got >= n {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {got} of {n} delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl LedgerState {
    fn record(&self, id: &str) -> u16 {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().expect("lock");
        let e = entries.entry(id.to_owned()).or_default();
        e.attempts += 1;
        let forced = self.forced.load(Ordering::SeqCst);
        let status = if forced != 0 { forced } else { (self.answer)(id, e.attempts) };
        if (200..300).contains(&status) {
            e.ok += 1;
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        status
    }
}

/// A number from a webhook-id, to pick behaviours deterministically.
pub fn bucket(webhook_id: &str, modulo: u64) -> u64 {
    u64::from_str_radix(&webhook_id[webhook_id.len().saturating_sub(8)..], 16).unwrap_or(0) % modulo
}

// ---------------------------------------------------------------- load and accounting

/// An event of about 1 KiB from the SPEC catalogue.
pub fn event(id: &str, i: usize) -> Vec<u8> {
    const TYPES: &[&str] = &["ContactCreate", "InvoicePaid", "AppointmentCreate", "OpportunityStageUpdate"];
    serde_json::json!({
        "id": id, "type": TYPES[i % TYPES.len()], "locationId": format!("loc_{}", i % 7),
        "timestamp": "2026-11-23T20:00:00Z",
        "data": { "email": "jane@example.com", "note": "x".repeat(900) }
    })
    .to_string()
    .into_bytes()
}

/// Where every expected (event, endpoint) pair ended up.
#[derive(Debug)]
pub struct Tally {
    pub expected: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    pub missing: Vec<(String, String)>,
    /// 2xx answers beyond the first for the same webhook-id.
    pub duplicates: u64,
}

pub fn tally(event_ids: &HashSet<String>, endpoints: &[(&str, &Ledger)], dead: &[serde_json::Value]) -> Tally {
    let dead: HashSet<(String, String)> = dead
        .iter()
        .filter_map(|d| Some((d["event_id"].as_str()?.to_owned(), d["endpoint_id"].as_str()?.to_owned())))
        .collect();
    let mut t = Tally { expected: 0, delivered: 0, dead_lettered: 0, missing: Vec::new(), duplicates: 0 };
    for (name, ledger) in endpoints {
        let entries = ledger.entries();
        t.duplicates += entries.values().map(|e| u64::from(e.ok.saturating_sub(1))).sum::<u64>();
        for id in event_ids {
            t.expected += 1;
            let wid = webhookd::event::webhook_id(id, name);
            if entries.get(&wid).is_some_and(|e| e.ok > 0) {
                t.delivered += 1;
            } else if dead.contains(&(id.clone(), name.to_string())) {
                t.dead_lettered += 1;
            } else {
                t.missing.push((id.clone(), name.to_string()));
            }
        }
    }
    t
}

/// Waits until every (event, endpoint) pair has settled: delivered, or (for
/// what a ledger rejects for good) in the dead-letter topic; then tallies.
pub async fn settle_everything(
    kafka: &Kafka,
    topic: &str,
    ids: &HashSet<String>,
    endpoints: &[(&str, &Ledger)],
) -> (Tally, Vec<serde_json::Value>) {
    // Every pair must end delivered or dead-lettered; wait for both sides.
    let rejected_by = |name: &str, ledger: &Ledger| {
        ids.iter().filter(|id| ledger.rejects(&webhookd::event::webhook_id(id, name))).count()
    };
    let rejected: usize = endpoints.iter().map(|(name, ledger)| rejected_by(name, ledger)).sum();
    for (name, ledger) in endpoints {
        ledger.wait_delivered(name, ids.len() - rejected_by(name, ledger)).await;
    }
    let dead = kafka
        .read_until(&format!("{topic}.dlq"), 1, LONG, move |d| {
            d.iter()
                .filter_map(|r| Some((r["event_id"].as_str()?.to_owned(), r["endpoint_id"].as_str()?.to_owned())))
                .collect::<HashSet<_>>()
                .len()
                >= rejected
        })
        .await;
    (tally(ids, endpoints, &dead), dead)
}
