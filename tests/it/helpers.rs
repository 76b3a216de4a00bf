//! Shared test parts, all real: a Kafka-protocol broker (librdkafka's mock
//! cluster in this process, or any Kafka named by `WEBHOOKD_TEST_BOOTSTRAP`),
//! RocksDB in a temp dir, and HTTP receivers on 127.0.0.1:0 whose answers the
//! test controls.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use webhookd::app::Started;
use webhookd::config::Config;

/// A bound on every wait in the tests: reaching it is a failure, never a pass.
pub const WAIT: Duration = Duration::from_secs(30);

pub const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SECRET_B: &str = "whsec_dGhpcyBpcyBhIGRlbW8gc2VjcmV0IGtleSAxMjM0NTY3OA==";

// ---------------------------------------------------------------- broker

/// A Kafka-protocol broker for one test.
pub struct Kafka {
    pub mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pub bootstrap: String,
    producer: FutureProducer,
}

impl Kafka {
    /// The in-process mock cluster (3 brokers), unless `WEBHOOKD_TEST_BOOTSTRAP` names a real one.
    pub fn start() -> Kafka {
        let (mock, bootstrap) = match std::env::var("WEBHOOKD_TEST_BOOTSTRAP") {
            Ok(b) if !b.is_empty() => (None, b),
            _ => {
                let m = MockCluster::new(3).expect("mock cluster starts");
                let b = m.bootstrap_servers();
                (Some(m), b)
            }
        };
        Self::with(mock, bootstrap)
    }

    /// A broker running elsewhere (a tansu process, a real Kafka).
    pub fn connect(bootstrap: &str) -> Kafka {
        Self::with(None, bootstrap.to_owned())
    }

    fn with(mock: Option<MockCluster<'static, DefaultProducerContext>>, bootstrap: String) -> Kafka {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "2")
            .set("message.max.bytes", "12000000")
            .create()
            .expect("producer");
        Kafka { mock, bootstrap, producer }
    }

    /// A producer that can move to another task.
    pub fn producer(&self) -> Producer {
        Producer(self.producer.clone())
    }

    pub async fn produce_all(&self, topic: &str, payloads: &[Vec<u8>]) {
        self.producer().produce_all(topic, payloads).await
    }
}

impl Kafka {
    /// A fresh topic name (tests share nothing) with its dead-letter topic created too.
    pub async fn topic(&self, name: &str, partitions: i32) -> String {
        let topic = format!("{name}-{}", unique());
        self.create(&topic, partitions).await;
        self.create(&format!("{topic}.dlq"), 1).await;
        topic
    }

    pub async fn create(&self, topic: &str, partitions: i32) {
        match &self.mock {
            Some(m) => m.create_topic(topic, partitions, 1).expect("create topic"),
            None => {
                let admin: AdminClient<DefaultClientContext> =
                    ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().expect("admin client");
                let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                admin.create_topics([&t], &AdminOptions::new()).await.expect("create topic");
            }
        }
    }

    pub async fn produce(&self, topic: &str, partition: Option<i32>, payload: &[u8]) {
        self.produce_with_headers(topic, partition, payload, &[]).await
    }

    pub async fn produce_with_headers(
        &self,
        topic: &str,
        partition: Option<i32>,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(*v) });
        }
        let mut rec = FutureRecord::<(), _>::to(topic).payload(payload).headers(h);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        self.producer.send(rec, Duration::from_secs(10)).await.expect("produce");
    }

    /// Reads `n` messages from the start of every partition of `topic`.
    pub async fn read(&self, topic: &str, partitions: i32, n: usize) -> Vec<serde_json::Value> {
        self.read_until(topic, partitions, WAIT, move |out| out.len() >= n).await
    }

    /// Reads every partition of `topic` from the start (JSON records, headers
    /// as `_header_<key>` fields) until `done` holds over what was read;
    /// fails the test after `within`.
    pub async fn read_until(
        &self,
        topic: &str,
        partitions: i32,
        within: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool + Send + 'static,
    ) -> Vec<serde_json::Value> {
        let topic = topic.to_owned();
        self.with_consumer(&format!("reader-{}", unique()), move |c| {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("tpl");
            }
            c.assign(&tpl).expect("assign");
            let deadline = Instant::now() + within;
            let mut out = Vec::new();
            while !done(&out) {
                assert!(Instant::now() < deadline, "{topic}: condition not met after {} records: {out:#?}", out.len());
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    let mut v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default()).expect("dead letters are JSON");
                    if let Some(h) = m.headers() {
                        for h in h.iter() {
                            v["_header_".to_owned() + h.key] =
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into();
                        }
                    }
                    out.push(v);
                }
            }
            out
        })
        .await
    }

    /// The oldest offset the broker still has for a partition.
    pub async fn low_watermark(&self, topic: &str, partition: i32) -> i64 {
        let topic = topic.to_owned();
        self.with_consumer(&format!("watermarks-{}", unique()), move |c| {
            c.fetch_watermarks(&topic, partition, Duration::from_secs(5)).expect("watermarks").0
        })
        .await
    }

    /// The offset the group has committed for a partition (-1: none).
    pub async fn committed(&self, group: &str, topic: &str, partition: i32) -> i64 {
        let topic = topic.to_owned();
        self.with_consumer(group, move |c| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let got = c.committed_offsets(tpl, Duration::from_secs(5)).expect("committed offsets");
            match got.find_partition(&topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            }
        })
        .await
    }

    /// Runs `f` on a consumer of `group` (no automatic commits), off the
    /// runtime's threads.
    async fn with_consumer<T: Send + 'static>(
        &self,
        group: &str,
        f: impl FnOnce(&BaseConsumer) -> T + Send + 'static,
    ) -> T {
        let (bootstrap, group) = (self.bootstrap.clone(), group.to_owned());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let out = f(&c);
            // Closing a consumer has been seen to hang (rust-rdkafka #509): leave it.
            std::mem::forget(c);
            out
        })
        .await
        .expect("consumer task")
    }
}

#[derive(Clone)]
pub struct Producer(FutureProducer);

impl Producer {
    /// Produces every payload (keyed by position, so spread over partitions)
    /// and waits for all acknowledgements, many in flight at once.
    pub async fn produce_all(&self, topic: &str, payloads: &[Vec<u8>]) {
        for chunk in payloads.chunks(2000) {
            let mut acks = tokio::task::JoinSet::new();
            for (i, p) in chunk.iter().enumerate() {
                let (producer, topic, p) = (self.0.clone(), topic.to_owned(), p.clone());
                acks.spawn(async move {
                    let key = format!("{i}");
                    let rec = FutureRecord::to(&topic).payload(&p).key(&key);
                    producer.send(rec, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
                });
            }
            while let Some(r) = acks.join_next().await {
                r.expect("produce task").expect("produce");
            }
        }
    }
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}{}", nanos % 1_000_000_000, N.fetch_add(1, Ordering::Relaxed))
}

pub fn event(id: &str, ty: &str) -> Vec<u8> {
    serde_json::json!({ "id": id, "type": ty, "locationId": "loc_42", "data": { "email": "jane@example.com" } })
        .to_string()
        .into_bytes()
}

// ---------------------------------------------------------------- receiver

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    pub webhook_id: String,
    /// 1 for the first request with this webhook-id, 2 for the second, ...
    pub attempt: usize,
    pub status: u16,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    pub fn event_id(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["id"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// How the receiver answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, delay: Duration::ZERO, retry_after: None }
    }
}

type Behaviour = Arc<dyn Fn(&Hit) -> Reply + Send + Sync>;

/// Every request so far, and how many came with each webhook-id.
#[derive(Default)]
struct Hits {
    all: Vec<Hit>,
    attempts: HashMap<String, usize>,
}

struct ReceiverState {
    hits: Mutex<Hits>,
    changed: Notify,
    behaviour: RwLock<Behaviour>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start(behaviour: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Receiver {
        Self::start_on("127.0.0.1:0", None, behaviour).await
    }

    /// A receiver on a chosen loopback address, speaking TLS when given an acceptor.
    pub async fn start_on(
        bind: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        behaviour: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ReceiverState {
            hits: Mutex::default(),
            changed: Notify::new(),
            behaviour: RwLock::new(Arc::new(behaviour)),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    match tls {
                        None => {
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            // A handshake the client aborts (untrusted certificate) just ends here.
                            if let Ok(tls_stream) = acceptor.accept(stream).await {
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(tls_stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Receiver { addr, state }
    }

    pub fn ok() -> impl Fn(&Hit) -> Reply + Send + Sync + 'static {
        |_| Reply::status(200)
    }

    /// Answers 200 after `delay`.
    pub fn ok_after(delay: Duration) -> impl Fn(&Hit) -> Reply + Send + Sync + 'static {
        move |_: &Hit| Reply { delay, ..Reply::status(200) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_behaviour(&self, behaviour: impl Fn(&Hit) -> Reply + Send + Sync + 'static) {
        *self.state.behaviour.write().expect("lock") = Arc::new(behaviour);
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().expect("lock").all.clone()
    }

    /// Waits until `pred` holds over the hits so far; fails the test after [`WAIT`].
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let hits = self.hits();
            if pred(&hits) {
                return hits;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out waiting for {what}; the receiver saw {} requests: {:#?}",
                    hits.len(),
                    hits.iter().map(|h| (h.path.clone(), h.event_id(), h.attempt, h.status)).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Requests so far (without copying them, unlike [`Receiver::hits`]).
    pub fn count(&self) -> usize {
        self.state.hits.lock().expect("lock").all.len()
    }

    /// Waits for `n` requests.
    pub async fn wait_for(&self, n: usize) -> Vec<Hit> {
        self.wait_until(&format!("{n} requests"), |h| h.len() >= n).await
    }
}

async fn handle(s: Arc<ReceiverState>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let at = Instant::now();
    let body = req.into_body().collect().await?.to_bytes();
    let webhook_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let reply = {
        let mut hits = s.hits.lock().expect("lock");
        let attempt = {
            let n = hits.attempts.entry(webhook_id.clone()).or_default();
            *n += 1;
            *n
        };
        let mut hit = Hit { path, headers, body, at, webhook_id, attempt, status: 0 };
        let behaviour = s.behaviour.read().expect("lock").clone();
        let reply = behaviour(&hit);
        hit.status = reply.status;
        hits.all.push(hit);
        reply
    };
    s.changed.notify_waiters();
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = Response::builder().status(reply.status);
    if let Some(ra) = &reply.retry_after {
        resp = resp.header("retry-after", ra);
    }
    Ok(resp.body(Full::new(Bytes::new())).expect("response"))
}

// ---------------------------------------------------------------- daemon

/// The daemon as a process, its stderr drained into a channel of lines.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_with_env(args, &[])
    }

    /// Spawns with extra environment variables (none of the caller's log settings).
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_webhookd"))
            .args(args)
            .env_remove("WEBHOOKD_LOG")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn webhookd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Proc { child, lines }
    }

    /// Waits for a JSON log line with this field; returns its value.
    pub fn log_field(&self, field: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no log line with {field:?}"));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(s) = v[field].as_str()
            {
                return s.to_owned();
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} failed");
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "webhookd did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, toml: &str) -> String {
    let path = dir.join("webhookd.toml");
    std::fs::write(&path, toml.replace("level = \"warn\"", "level = \"info\"\nformat = \"json\""))
        .expect("write config");
    path.display().to_string()
}

/// A test configuration: the broker, one topic, a temp store, fast retries.
pub fn config(kafka: &Kafka, topic: &str, store: &Path, retry: &str, endpoints: &str) -> String {
    format!(
        r#"
[source]
brokers = ["{bootstrap}"]
topics = ["{topic}"]
group_id = "{topic}-group"
dead_letter_topic = "{topic}.dlq"
commit_interval = "100ms"
session_timeout = "6s"
max_event_bytes = 4096
[store]
path = "{store}"
sync_writes = false
[admin]
listen = "127.0.0.1:0"
[delivery]
shutdown_grace = "2s"
allow_networks = ["127.0.0.0/8", "::1/128"]
[retry]
{retry}
[log]
level = "warn"
{endpoints}
"#,
        bootstrap = kafka.bootstrap,
        store = store.display()
    )
}

pub fn endpoint(id: &str, url: &str, extra: &str) -> String {
    format!("[[endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET_A}\"]\n{extra}\n")
}

pub const FAST_RETRY: &str = "base = \"50ms\"\ncap = \"200ms\"\nmax_attempts = 10";

pub struct Daemon {
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    started: Started,
}

impl Daemon {
    pub async fn start(toml: &str) -> Daemon {
        // WEBHOOKD_TEST_LOG=webhookd=debug shows the daemon's logs in a test's output.
        if let Ok(filter) = std::env::var("WEBHOOKD_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let config = Config::from_toml_str(toml, Vec::new()).expect("test config is valid");
        let shutdown = CancellationToken::new();
        let started = webhookd::app::start(config, shutdown.clone()).await.expect("webhookd starts");
        Daemon { admin: started.admin_addr, shutdown, started }
    }

    /// Graceful stop; returns once the store is closed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.started.wait()).await.expect("stops in time").expect("clean stop");
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one series of `/metrics` (0 when absent), e.g.
    /// `webhookd_deliveries_total{endpoint="a",outcome="delivered"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.get("/metrics").await.1, series)
    }
}

pub fn metric_value(exposition: &str, series: &str) -> f64 {
    let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
    let wanted: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (lhs, value) = l.rsplit_once(' ')?;
            let (n, ls) = lhs.split_once('{').map_or((lhs, ""), |(n, l)| (n, l.trim_end_matches('}')));
            (n == name && wanted.iter().all(|w| ls.split(',').any(|x| x == *w))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A loopback port nothing listens on now, for a process the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Polls `f` until it returns true; for state outside this process (the
/// broker's committed offsets) that no event announces.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
