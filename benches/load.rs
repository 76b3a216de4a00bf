//! End-to-end load benchmark: Kafka → webhookd (the release binary, as a
//! process) → a fast HTTP receiver on loopback, and, in the same run, the
//! ceiling of this machine: the same receiver driven directly by a pooled
//! hyper client at the same concurrency.
//!
//!   ./scripts/load-bench [--events N] [--endpoints E] [--broker tansu|mock|both] [--in-flight K]
//!                        [--kafka key=value]... [--env NAME=value]... [--park N] [--stuck S] [--no-backpressure]
//!                        [--warm-up]
//!
//! The broker is a tansu process by default. librdkafka's in-process mock
//! cluster (`--broker mock`) also works. It keeps only the last 5 MiB of each
//! partition, so on it the topic gets as many partitions as a phase's events
//! need to wait there unread (4 on tansu).
//!
//! Each event (~1 KiB) goes to exactly one of the E endpoints (by
//! `locationId`), so events/s = deliveries/s. With `--stuck S`, S more
//! endpoints (in-flight cap 1) point at a listener that never answers, and
//! 500 events each wait in the outbox for them before the phases start: what
//! slow endpoints holding backpressure's threshold (4,096 ready) cost the
//! others. With `--warm-up`, one event goes to each endpoint first, and the
//! CPU webhookd took for them is printed: what an endpoint's first delivery
//! costs. Phases:
//! 1. **max rate**: N events produced as fast as the producer goes while
//!    webhookd runs; delivered events/s from the first delivery to the N-th.
//! 2. **half rate**: events produced at half that rate for a few seconds;
//!    produce→receive latency p50/p99/max (the event carries its send time).
//! 3. **park** (only with `--park N`): the receiver answers 503 while N more
//!    events arrive, until all wait in the retry schedule (RSS read then);
//!    then 200, and the time to drain them. Its peak RSS is its own: the
//!    process's VmHWM is reset when it starts.
//! 4. **broker alone**: webhookd stopped, a plain consumer here reads events
//!    produced at the half rate with webhookd's fetch settings: the floor
//!    under phase 2's latency.
//! 5. **ceiling**: one pooled client sends N requests of the same body at
//!    concurrency min(E × K, 1024): a warm-up pass that opens the connections,
//!    then five passes; the median counts.
//!
//! webhookd's peak RSS (VmHWM) and CPU time (utime + stime) come from /proc.
//! Every loop is bounded in count and time; all traffic stays on 127.0.0.1.
//! The last line is machine-readable:
//! `RESULT broker=… endpoints=… events=… events_per_s=… ceiling_per_s=… ratio=… p50_ms=… p99_ms=… max_ms=…
//! broker_p50_ms=… broker_p99_ms=… paced_rto=… rss_mib=… cpu_s=…[ stuck=…][ parked=… park_s=… parked_rss_mib=… park_peak_rss_mib=… drain_s=…]`.
//! `paced_rto` counts TCP retransmission timeouts on this machine during the
//! half-rate phase: each is a stall of 200 ms or more on some connection,
//! which is the kernel's (a dropped loopback packet), not webhookd's. Each
//! phase also prints the kernel's TCP trouble counters (`NetTrouble`).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

mod support;
#[allow(dead_code)] // shared with tests/faults, which uses other parts
#[path = "../tests/support/tansu.rs"]
mod tansu;

use support::{Receiver, cpu_seconds, sent_us, unix_us};
use tansu::Tansu;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// No phase may take longer than this.
const PHASE_LIMIT: Duration = support::WAIT_LIMIT;
const PARTITIONS: i32 = 4;
/// librdkafka's mock cluster keeps at most 5 MiB of each partition's log
/// (`rd_kafka_mock_partition_init`) and drops the oldest beyond that, read or
/// not: a consumer behind by more is reset past events it never saw. Topics on
/// it get enough partitions to hold a whole phase's events unread, at this
/// much per partition (under 5 MiB, for the records' framing).
const MOCK_PARTITION_BYTES: usize = 4 << 20;
/// An event's record on the broker, at most: its ~1 KiB body, key and headers.
const RECORD_BYTES: usize = 1_300;
const PACED_FOR: Duration = Duration::from_secs(5);
/// Counted ceiling passes (the median counts), after one warm-up pass.
const CEILING_RUNS: usize = 5;

struct Args {
    events: usize,
    endpoints: usize,
    in_flight: usize,
    brokers: Vec<String>,
    bin: PathBuf,
    /// Extra librdkafka properties for webhookd (`--kafka key=value`).
    kafka: Vec<(String, String)>,
    /// Environment for webhookd's process (`--env NAME=value`), e.g. `MALLOC_ARENA_MAX=2`.
    env: Vec<(String, String)>,
    /// Events to park (receiver answering 503), then drain (`--park N`); 0: skip.
    park: usize,
    /// Endpoints that never answer, each holding [`STUCK_EACH`] ready deliveries (`--stuck S`).
    stuck: usize,
    /// `source.backpressure`: on, as by default, unless `--no-backpressure`.
    backpressure: bool,
    /// One event to each endpoint before the max-rate phase (`--warm-up`).
    warm_up: bool,
}

/// Events waiting for each endpoint that never answers (`--stuck`).
const STUCK_EACH: usize = 500;

fn args() -> Args {
    let mut a = Args {
        events: 100_000,
        endpoints: 100,
        in_flight: 16,
        brokers: vec!["tansu".into()],
        kafka: Vec::new(),
        env: Vec::new(),
        park: 0,
        stuck: 0,
        backpressure: true,
        warm_up: false,
        bin: std::env::var("WEBHOOKD_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/webhookd")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => a.events = value().parse().expect("--events: a number"),
            "--park" => a.park = value().parse().expect("--park: a number"),
            "--stuck" => a.stuck = value().parse().expect("--stuck: a number"),
            "--no-backpressure" => a.backpressure = false,
            "--warm-up" => a.warm_up = true,
            "--endpoints" => a.endpoints = value().parse().expect("--endpoints: a number"),
            "--in-flight" => a.in_flight = value().parse().expect("--in-flight: a number"),
            "--broker" => {
                a.brokers = match value().as_str() {
                    "both" => vec!["mock".into(), "tansu".into()],
                    b @ ("mock" | "tansu") => vec![b.into()],
                    other => panic!("--broker: mock, tansu or both, not {other:?}"),
                }
            }
            "--bin" => a.bin = value().into(),
            "--kafka" => {
                let kv = value();
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("--kafka: key=value, not {kv:?}"));
                a.kafka.push((k.to_owned(), v.to_owned()));
            }
            "--env" => {
                let kv = value();
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("--env: NAME=value, not {kv:?}"));
                a.env.push((k.to_owned(), v.to_owned()));
            }
            "--bench" => {} // added by `cargo bench`
            other => panic!("unknown argument {other:?}"),
        }
    }
    assert!(a.events >= 1000 && a.endpoints >= 1 && a.in_flight >= 1, "need ≥1000 events, ≥1 endpoint");
    a
}

// ---------------------------------------------------------------- brokers

enum Broker {
    Mock(MockCluster<'static, DefaultProducerContext>),
    Tansu(Tansu),
}

impl Broker {
    /// The broker's own process (the mock cluster runs inside this one).
    fn pid(&self) -> Option<u32> {
        match self {
            Broker::Tansu(t) => t.pid(),
            Broker::Mock(_) => None,
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

async fn start_broker(kind: &str) -> (Broker, String) {
    if kind == "mock" {
        let m = MockCluster::new(1).expect("mock cluster");
        let b = m.bootstrap_servers();
        return (Broker::Mock(m), b);
    }
    let t = Tansu::start(free_port()).await;
    let bootstrap = t.bootstrap.clone();
    (Broker::Tansu(t), bootstrap)
}

/// The source topic's partitions, for up to `backlog` events produced
/// before any is read.
fn partitions_for(broker: &Broker, backlog: usize) -> i32 {
    match broker {
        Broker::Mock(_) => {
            let needed = (backlog * RECORD_BYTES).div_ceil(MOCK_PARTITION_BYTES);
            PARTITIONS.max(i32::try_from(needed).expect("partition count"))
        }
        Broker::Tansu(_) => PARTITIONS,
    }
}

/// Creates `topic`, with `partitions`, and its dead-letter topic.
async fn create_topics(broker: &Broker, bootstrap: &str, topic: &str, partitions: i32) {
    let dlq = format!("{topic}.dlq");
    if let Broker::Mock(m) = broker {
        m.create_topic(topic, partitions, 1).expect("create topic");
        m.create_topic(&dlq, 1, 1).expect("create topic");
        return;
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let topics = [
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
    ];
    admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics");
}

// ---------------------------------------------------------------- webhookd

struct Webhookd {
    child: Child,
    peak_rss_kib: Arc<AtomicU64>,
    admin: SocketAddr,
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

/// Writes out the page cache's dirty data before the measured phases. The
/// kernel writes back data left dirty for 30 s (`vm.dirty_expire_centisecs`)
/// in one burst, and the release binaries cargo has just linked are ~0.5 GB:
/// on this machine's disk that burst held every fdatasync behind it for
/// ~200 ms, and webhookd's synced store write with them, which showed as a
/// p99 of 200-250 ms in runs whose half-rate phase came 30-35 s after a
/// build (README, Performance). The benchmark measures webhookd, not that.
fn settle_writeback() {
    let t = Instant::now();
    match Command::new("sync").status() {
        Ok(s) if s.success() => println!("wrote out dirty page cache first (sync, {} ms)", t.elapsed().as_millis()),
        other => println!("warning: sync failed ({other:?}); writeback of earlier writes may land in the measurements"),
    }
}

/// Runs `phase` while reading the broker process's CPU time once a second,
/// then prints the CPU seconds it used in each whole second of `name`
/// (nothing without a pid: the mock broker runs in this process).
async fn print_broker_cpu_each_second<T>(
    pid: Option<u32>,
    name: &str,
    phase: impl std::future::Future<Output = T>,
) -> T {
    let Some(pid) = pid else { return phase.await };
    let mut phase = std::pin::pin!(phase);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // The first tick is at once.
    let (mut last, mut each) = (cpu_seconds(pid), Vec::new());
    let out = loop {
        tokio::select! {
            out = &mut phase => break out,
            _ = tick.tick() => {
                let now = cpu_seconds(pid);
                each.push(format!("{:.2}", now - last));
                last = now;
            }
        }
    };
    if !each.is_empty() {
        println!("  broker CPU in each second of {name}: {} s", each.join(" "));
    }
    out
}

/// The kernel's TCP trouble counters (this network namespace, so every
/// loopback connection here: webhookd's, the broker's, the benchmark's).
/// A packet dropped on loopback is retransmitted after TCP's minimum
/// retransmission timeout, 200 ms on Linux, and a SYN dropped from a full
/// listen queue after 1 s: such stalls show in the latency figures, and
/// these counters tell them apart from webhookd's own.
#[derive(Clone, Copy, Default)]
struct NetTrouble {
    /// Packets dropped from the kernel's per-CPU input queue
    /// (`/proc/net/softnet_stat`; its size is `net.core.netdev_max_backlog`).
    backlog_drops: u64,
    /// Connection attempts dropped because a listen queue was full.
    listen_drops: u64,
    /// Retransmission timeouts that fired (SYNs included).
    rto: u64,
    /// Segments sent again.
    retransmitted: u64,
    /// Connections the receiver accepted.
    accepted: u64,
}

impl NetTrouble {
    fn now(rx: &Receiver) -> NetTrouble {
        /// `name` in /proc/net/{netstat,snmp}, where a line of names under a
        /// prefix ("TcpExt:") is followed by a line of values.
        fn counter(file: &str, prefix: &str, name: &str) -> u64 {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let mut rows = text.lines().filter(|l| l.starts_with(prefix));
            let (Some(names), Some(values)) = (rows.next(), rows.next()) else { return 0 };
            let at = names.split_whitespace().position(|n| n == name);
            at.and_then(|i| values.split_whitespace().nth(i)?.parse().ok()).unwrap_or(0)
        }
        let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
        NetTrouble {
            backlog_drops: softnet
                .lines()
                .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
                .sum(),
            listen_drops: counter("/proc/net/netstat", "TcpExt:", "ListenDrops"),
            rto: counter("/proc/net/netstat", "TcpExt:", "TCPTimeouts"),
            retransmitted: counter("/proc/net/snmp", "Tcp:", "RetransSegs"),
            accepted: rx.connections.load(Ordering::Relaxed),
        }
    }

    /// What happened since `self`, as one line.
    fn since(self, rx: &Receiver, phase: &str) -> NetTrouble {
        let n = NetTrouble::now(rx);
        let d = NetTrouble {
            backlog_drops: n.backlog_drops - self.backlog_drops,
            listen_drops: n.listen_drops - self.listen_drops,
            rto: n.rto - self.rto,
            retransmitted: n.retransmitted - self.retransmitted,
            accepted: n.accepted - self.accepted,
        };
        println!(
            "  TCP during {phase}: receiver accepted {} connections; {} input-queue drops, {} listen drops, \
             {} retransmission timeouts, {} segments retransmitted",
            d.accepted, d.backlog_drops, d.listen_drops, d.rto, d.retransmitted
        );
        d
    }
}

impl Webhookd {
    async fn start(
        a: &Args,
        dir: &Path,
        bootstrap: &str,
        topic: &str,
        receiver: SocketAddr,
        stuck: SocketAddr,
    ) -> Webhookd {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut toml = format!(
            "[source]\nbrokers = [\"{bootstrap}\"]\ntopics = [\"{topic}\"]\ngroup_id = \"{topic}-g\"\n\
             dead_letter_topic = \"{topic}.dlq\"\nbackpressure = {}\n[store]\npath = \"{}\"\n[admin]\n\
             listen = \"{admin}\"\n{}[delivery]\nallow_networks = [\"127.0.0.0/8\"]\n[log]\nlevel = \"warn\"\n",
            a.backpressure,
            dir.join("db").display(),
            a.kafka.iter().fold(String::from("[source.kafka]\n"), |s, (k, v)| s + &format!("\"{k}\" = \"{v}\"\n"))
        );
        for i in 0..a.endpoints {
            toml.push_str(&format!(
                "[[endpoints]]\nid = \"e{i}\"\nurl = \"http://{receiver}/e{i}\"\nsecrets = [\"{SECRET}\"]\n\
                 location_ids = [\"loc_{i}\"]\nrate_limit = {{ per_second = 1000000 }}\nmax_in_flight = {}\n",
                a.in_flight
            ));
        }
        for i in 0..a.stuck {
            toml.push_str(&format!(
                "[[endpoints]]\nid = \"s{i}\"\nurl = \"http://{stuck}/s{i}\"\nsecrets = [\"{SECRET}\"]\n\
                 location_ids = [\"stuck_{i}\"]\nmax_in_flight = 1\n"
            ));
        }
        let path = dir.join("webhookd.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&a.bin)
            .args(["run", "--config"])
            .arg(&path)
            .envs(a.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (build it: cargo build --release)", a.bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  webhookd: {line}");
            }
        });
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let (peak, pid) = (peak_rss_kib.clone(), child.id());
        std::thread::spawn(move || {
            // Sampled as well as VmHWM, so a run reports the peak even if the process is gone.
            while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
                peak.fetch_max(proc_status_kib(pid, "VmHWM:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        eprintln!("  webhookd pid {pid}, admin http://{admin}");
        let w = Webhookd { child, peak_rss_kib, admin };
        let deadline = Instant::now() + Duration::from_secs(60);
        while readyz(admin).await != Some(200) {
            assert!(Instant::now() < deadline, "webhookd did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        w
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> f64 {
        let rss = self.peak_rss_kib.load(Ordering::Relaxed).max(proc_status_kib(self.pid(), "VmHWM:"));
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let _ = self.child.wait();
        rss as f64 / 1024.0
    }
}

/// The whole HTTP response to `GET path` on webhookd's admin listener
/// (empty if it cannot be read).
async fn admin_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await
        && s.write_all(request.as_bytes()).await.is_ok()
    {
        let _ = s.read_to_end(&mut buf).await;
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One unlabelled series of webhookd's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    series(&admin_get(addr, "/metrics").await, name)
}

/// Polls webhookd's `/metrics` every `poll` until `name` reaches `at_least`;
/// panics, naming `what`, after [`PHASE_LIMIT`].
async fn await_metric(addr: SocketAddr, name: &str, at_least: usize, poll: Duration, what: &str) {
    let deadline = Instant::now() + PHASE_LIMIT;
    while metric(addr, name).await.unwrap_or(0.0) < at_least as f64 {
        assert!(Instant::now() < deadline, "timed out waiting for {what} ({name} ≥ {at_least})");
        tokio::time::sleep(poll).await;
    }
}

/// One unlabelled series in a `/metrics` text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// How often webhookd's consumer has waited for its workers to catch up
/// (backpressure, `store::IntakeGate`), and for how long in all, from its
/// `/metrics`.
async fn intake_waits(addr: SocketAddr) -> (f64, f64) {
    let text = admin_get(addr, "/metrics").await;
    let value = |name| series(&text, name).unwrap_or(0.0);
    (value("webhookd_intake_wait_seconds_count"), value("webhookd_intake_wait_seconds_sum"))
}

fn print_intake_waits(phase: &str, (n, s): (f64, f64), (n0, s0): (f64, f64)) {
    println!("  webhookd's consumer waited for the outbox {:.0} times in {phase}, {:.2} s in all", n - n0, s - s0);
}

/// webhookd's attempts so far, from its `/metrics` (every endpoint's series
/// summed): all of them, and those that took longer than 100 and 250 ms.
#[derive(Clone, Copy, Default)]
struct Attempts {
    all: f64,
    within_100ms: f64,
    within_250ms: f64,
}

impl Attempts {
    async fn now(addr: SocketAddr) -> Attempts {
        let mut a = Attempts::default();
        for line in admin_get(addr, "/metrics").await.lines() {
            let Some(rest) = line.strip_prefix("webhookd_attempt_duration_seconds_bucket{") else { continue };
            let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            if rest.contains("le=\"+Inf\"") {
                a.all += value;
            } else if rest.contains("le=\"0.1\"") {
                a.within_100ms += value;
            } else if rest.contains("le=\"0.25\"") {
                a.within_250ms += value;
            }
        }
        a
    }

    /// Prints the attempts since `before`: a stall between webhookd and the
    /// receiver shows here, one before the attempt (Kafka, the store) not.
    fn since(self, before: Attempts) {
        let all = self.all - before.all;
        println!(
            "  webhookd's attempts during the half-rate phase: {all:.0}, of which {:.0} took over 100 ms and {:.0} over 250 ms",
            all - (self.within_100ms - before.within_100ms),
            all - (self.within_250ms - before.within_250ms),
        );
    }
}

/// When the events slower than 150 ms were sent. A pause of the whole
/// pipeline delays every event sent within it, so they are many and sent
/// within a span about as long as the pause; a stalled connection delays only
/// the few it carries.
fn slow_events(samples: &[(u64, u64)]) {
    const SLOW_US: u64 = 150_000;
    let Some(start) = samples.iter().map(|&(sent, _)| sent).min() else { return };
    let slow: Vec<(u64, u64)> = samples.iter().copied().filter(|&(_, l)| l > SLOW_US).collect();
    let (Some(first), Some(last)) = (slow.iter().map(|&(s, _)| s).min(), slow.iter().map(|&(s, _)| s).max()) else {
        println!("  no event took over 150 ms");
        return;
    };
    let (worst_sent, worst) = slow.iter().copied().max_by_key(|&(_, l)| l).unwrap_or_default();
    println!(
        "  {} events took over 150 ms ({:.2} %), sent from {:.0} to {:.0} ms into the phase; the slowest, {:.0} ms, sent at {:.0} ms",
        slow.len(),
        100.0 * slow.len() as f64 / samples.len() as f64,
        (first - start) as f64 / 1000.0,
        (last - start) as f64 / 1000.0,
        worst as f64 / 1000.0,
        (worst_sent - start) as f64 / 1000.0,
    );
}

/// The p99 latency of the events sent in each second of a paced phase. The
/// broker's cost per message grows within such a phase (its CPU each second
/// is printed too), so where the phase's p99 comes from matters: a pause, or
/// the last seconds' load.
fn print_p99_each_second(samples: &[(u64, u64)], phase: &str) {
    let Some(start) = samples.iter().map(|&(sent, _)| sent).min() else { return };
    let mut seconds: Vec<Vec<u64>> = Vec::new();
    for &(sent, latency) in samples {
        let i = usize::try_from((sent - start) / 1_000_000).expect("second");
        if seconds.len() <= i {
            seconds.resize_with(i + 1, Vec::new);
        }
        seconds[i].push(latency);
    }
    let p99: Vec<String> = seconds
        .iter_mut()
        .map(|lat| {
            lat.sort_unstable();
            format!("{:.1}", percentile(lat, 0.99))
        })
        .collect();
    println!("  p99 of the events sent in each second of {phase}: {} ms", p99.join(" "));
}

/// Figures of the park-and-drain phase.
struct Parked {
    events: usize,
    park_s: f64,
    /// RSS once all are parked.
    rss_mib: f64,
    /// Peak RSS from the start of this phase to the end of the drain.
    peak_rss_mib: f64,
    drain_s: f64,
}

/// The receiver answers 503 while `a.park` events arrive, until every one of
/// them waits in the retry schedule; then it answers 200 and they drain: each
/// endpoint's first 2xx recalls its parked retries, whatever their backoff.
async fn park_and_drain(
    a: &Args,
    p: &FutureProducer,
    topic: &str,
    run: &str,
    first: usize,
    rx: &Receiver,
    w: &Webhookd,
) -> Parked {
    rx.status.store(503, Ordering::Release);
    rx.reset(false);
    // "5" resets the process's peak RSS (VmHWM), so this phase's own peak can be read at its end.
    std::fs::write(format!("/proc/{}/clear_refs", w.pid()), "5").expect("reset webhookd's peak RSS");
    let start = Instant::now();
    produce(p, topic, run, first..first + a.park, (a.endpoints, "loc"), None).await;
    let what = "the parked deliveries all in the retry schedule";
    await_metric(w.admin, "webhookd_outbox_waiting_deliveries", a.park, Duration::from_millis(500), what).await;
    let park_s = start.elapsed().as_secs_f64();
    let rss_mib = proc_status_kib(w.pid(), "VmRSS:") as f64 / 1024.0;
    rx.reset(false);
    rx.status.store(0, Ordering::Release);
    let start = Instant::now();
    assert!(
        rx.wait_for(a.park as u64).await,
        "only {} of {} parked deliveries drained",
        rx.count.load(Ordering::Acquire),
        a.park
    );
    let drain_s = start.elapsed().as_secs_f64();
    let peak_rss_mib = proc_status_kib(w.pid(), "VmHWM:") as f64 / 1024.0;
    Parked { events: a.park, park_s, rss_mib, peak_rss_mib, drain_s }
}

/// A listener that takes requests and never answers them: each connection is
/// read until webhookd gives up on it (its attempt budget) and closes it.
async fn stuck_listener() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stuck listener");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut conn, &mut tokio::io::sink()).await;
            });
        }
    });
    addr
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    admin_get(addr, "/readyz").await.split(' ').nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- load

/// Event `n` of a run, for endpoint `n % endpoints` (location `{loc}_{i}`).
fn event(run: &str, n: usize, endpoints: usize, loc: &str, pad: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"evt_{run}_{n}","sent":{},"type":"ContactCreate","locationId":"{loc}_{}","data":{{"id":"c{n}","email":"jane@example.com","tags":["lead"],"notes":"{pad}"}}}}"#,
        unix_us(),
        n % endpoints
    )
    .into_bytes()
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "none")
        .create()
        .expect("producer")
}

/// Produces events `from..to` to the endpoints at locations `{loc}_{i}`;
/// `per_second` paces them (None: as fast as it goes).
async fn produce(
    p: &FutureProducer,
    topic: &str,
    run: &str,
    range: std::ops::Range<usize>,
    (endpoints, loc): (usize, &str),
    per_second: Option<f64>,
) {
    let pad = "x".repeat(860);
    let start = Instant::now();
    let mut pending = Vec::with_capacity(4096);
    for (k, n) in range.enumerate() {
        if let Some(rate) = per_second {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let body = event(run, n, endpoints, loc, &pad);
        let key = n.to_string();
        match p.send_result(FutureRecord::to(topic).key(&key).payload(&body)) {
            Ok(f) => pending.push(f),
            Err((e, _)) => panic!("produce: {e}"),
        }
        if pending.len() >= 4096 {
            for f in pending.drain(..) {
                f.await.expect("delivery future").expect("produced");
            }
        }
    }
    for f in pending.drain(..) {
        f.await.expect("delivery future").expect("produced");
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The broker's own produce→consume latency at `rate`: a plain consumer in
/// this process, assigned (no group join) to a fresh topic, with webhookd's
/// fetch settings and `--kafka`. It runs after webhookd stopped, so it is
/// the floor under webhookd's figure: what the broker and client alone take.
/// Its topic has as many partitions as webhookd's.
async fn broker_floor(
    a: &Args,
    (kafka, bootstrap, partitions): (&Broker, &str, i32),
    p: &FutureProducer,
    run: &str,
    rate: f64,
    n: usize,
) -> Vec<u64> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let topic = format!("load-{run}-floor");
    create_topics(kafka, bootstrap, &topic, partitions).await;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap).set("group.id", format!("floor-{run}")).set("enable.auto.commit", "false");
    // webhookd's consumer defaults, then the same overrides.
    for (k, v) in webhookd::source::CONSUMER_DEFAULTS {
        cfg.set(k, v);
    }
    for (k, v) in &a.kafka {
        cfg.set(k, v);
    }
    let consumer: StreamConsumer = cfg.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition_offset(&topic, partition, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    // Warm up: one event there and back, so connection and fetch set-up are not measured.
    produce(p, &topic, run, 0..1, (1, "loc"), None).await;
    tokio::time::timeout(PHASE_LIMIT, consumer.recv()).await.expect("warm-up in time").expect("warm-up event");
    let consume = async {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let m = consumer.recv().await.expect("consume");
            let sent = sent_us(m.payload().unwrap_or_default()).expect("the event's send stamp");
            lat.push((sent, unix_us().saturating_sub(sent)));
        }
        lat
    };
    let (_, lat) = tokio::join!(
        produce(p, &topic, run, 1..n + 1, (a.endpoints, "loc"), Some(rate)),
        tokio::time::timeout(PHASE_LIMIT, consume)
    );
    let samples = lat.expect("the broker floor phase finished in time");
    print_p99_each_second(&samples, "the broker-alone phase");
    let mut lat: Vec<u64> = samples.iter().map(|&(_, l)| l).collect();
    lat.sort_unstable();
    lat
}

type Pooled = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The same receiver, driven directly by a pooled client: `n` requests at `concurrency`.
async fn ceiling(
    client: &Pooled,
    receiver: SocketAddr,
    rx: &Receiver,
    n: usize,
    concurrency: usize,
    endpoints: usize,
) -> f64 {
    rx.reset(false);
    let body = Bytes::from(event("ceiling", 0, 1, "loc", &"x".repeat(860)));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, body, next) = (client.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return;
                }
                let req = hyper::Request::post(format!("http://{receiver}/e{}", i % endpoints))
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let resp = client.request(req).await.expect("ceiling request");
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("task");
        }
    };
    tokio::time::timeout(PHASE_LIMIT, all).await.expect("the ceiling phase finished in time");
    rx.rate()
}

struct Outcome {
    parked: Option<Parked>,
    events_per_s: f64,
    ceiling_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    floor_p50_ms: f64,
    floor_p99_ms: f64,
    rss_mib: f64,
    cpu_s: f64,
    /// TCP retransmission timeouts during the half-rate phase.
    paced_rto: u64,
}

async fn run_once(a: &Args, broker: &str) -> Outcome {
    let (kafka, bootstrap) = start_broker(broker).await;
    let run = format!("{:x}", unix_us());
    let topic = format!("load-{run}");
    // The most produced ahead of webhookd: one phase's events (the paced
    // phase's are read as they come).
    let backlog = a.events.max(a.park).max(a.stuck * STUCK_EACH);
    let partitions = partitions_for(&kafka, backlog);
    create_topics(&kafka, &bootstrap, &topic, partitions).await;
    if partitions != PARTITIONS {
        println!("topic with {partitions} partitions, to hold {backlog} events within the mock cluster's 5 MiB each");
    }
    let (rx, receiver) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let stuck = stuck_listener().await;
    let w = Webhookd::start(a, dir.path(), &bootstrap, &topic, receiver, stuck).await;
    let p = producer(&bootstrap);
    if a.stuck > 0 {
        let held = a.stuck * STUCK_EACH;
        produce(&p, &topic, &format!("{run}s"), 0..held, (a.stuck, "stuck"), None).await;
        let what = "the stuck endpoints' deliveries in the outbox";
        await_metric(w.admin, "webhookd_outbox_ready_deliveries", held, Duration::from_millis(50), what).await;
        println!("{} endpoints that never answer hold {held} ready deliveries", a.stuck);
    }
    if a.warm_up {
        rx.reset(false);
        let (cpu0, t) = (cpu_seconds(w.pid()), Instant::now());
        produce(&p, &topic, &format!("{run}w"), 0..a.endpoints, (a.endpoints, "loc"), None).await;
        assert!(rx.wait_for(a.endpoints as u64).await, "warm-up delivered in time");
        println!(
            "warm-up: one event to each of {} endpoints in {:.2} s; webhookd CPU {:.2} s",
            a.endpoints,
            t.elapsed().as_secs_f64(),
            cpu_seconds(w.pid()) - cpu0
        );
    }
    settle_writeback();

    // 1. Max rate.
    rx.reset(false);
    let net = NetTrouble::now(&rx);
    let broker_cpu = || kafka.pid().map_or(0.0, cpu_seconds);
    let (cpu0, broker_cpu0, own_cpu0, wall0) =
        (cpu_seconds(w.pid()), broker_cpu(), cpu_seconds(std::process::id()), Instant::now());
    let produced = produce(&p, &topic, &run, 0..a.events, (a.endpoints, "loc"), None);
    let (_, all) = tokio::join!(produced, rx.wait_for(a.events as u64));
    assert!(all, "only {} of {} events delivered within {PHASE_LIMIT:?}", rx.count.load(Ordering::Acquire), a.events);
    let events_per_s = rx.rate();
    let cpu_s = cpu_seconds(w.pid()) - cpu0;
    // Where the machine's cores went in this phase: webhookd shares them with
    // the broker and with this process (producer and receiver).
    println!(
        "max-rate phase: {:.1} s wall on {} cores; CPU webhookd {cpu_s:.1} s, broker {}, producer + receiver {:.1} s",
        wall0.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kafka.pid().map_or("in this process".into(), |_| format!("{:.1} s", broker_cpu() - broker_cpu0)),
        cpu_seconds(std::process::id()) - own_cpu0,
    );
    net.since(&rx, "the max-rate phase");
    let waits = intake_waits(w.admin).await;
    print_intake_waits("the max-rate phase", waits, (0.0, 0.0));

    // 2. Half rate: latency.
    rx.reset(true);
    let net = NetTrouble::now(&rx);
    let attempts0 = Attempts::now(w.admin).await;
    let half = events_per_s / 2.0;
    let paced = ((half * PACED_FOR.as_secs_f64()) as usize).max(100);
    let produced = produce(&p, &topic, &run, a.events..a.events + paced, (a.endpoints, "loc"), Some(half));
    let (_, all) = print_broker_cpu_each_second(kafka.pid(), "the half-rate phase", async {
        tokio::join!(produced, rx.wait_for(paced as u64))
    })
    .await;
    assert!(all, "paced phase: only {} of {paced} delivered", rx.count.load(Ordering::Acquire));
    let paced_net = net.since(&rx, "the half-rate phase");
    Attempts::now(w.admin).await.since(attempts0);
    print_intake_waits("the half-rate phase", intake_waits(w.admin).await, waits);
    let samples = rx.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
    slow_events(&samples);
    print_p99_each_second(&samples, "the half-rate phase");
    let mut lat: Vec<u64> = samples.iter().map(|&(_, l)| l).collect();
    lat.sort_unstable();
    let parked = if a.park > 0 {
        let pk = park_and_drain(a, &p, &topic, &run, a.events + paced, &rx, &w).await;
        println!(
            "parked {} events (receiver 503) in {:.1} s: RSS then {:.0} MiB; receiver back: drained in {:.1} s ({:.0}/s; parked retries recalled on recovery); \
             peak RSS of parking and draining {:.0} MiB",
            pk.events,
            pk.park_s,
            pk.rss_mib,
            pk.drain_s,
            pk.events as f64 / pk.drain_s,
            pk.peak_rss_mib
        );
        Some(pk)
    } else {
        None
    };
    let rss_mib = w.stop();

    // 3. The broker's own latency at the same rate, webhookd stopped.
    let net = NetTrouble::now(&rx);
    let floor = print_broker_cpu_each_second(
        kafka.pid(),
        "the broker-alone phase",
        broker_floor(a, (&kafka, &bootstrap, partitions), &p, &run, half, paced),
    )
    .await;
    net.since(&rx, "the broker-alone phase");

    // 4. Ceiling: one client for all passes, so its pool is warm; a first
    // pass opens the connections (a burst of 1,024 connects stalled some
    // passes to a fifth of the rate) and is not counted; then the median of
    // five (a single pass swings by ±30 % here).
    let concurrency = (a.endpoints * a.in_flight).min(1024);
    let client: Pooled = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(concurrency).build_http();
    let net = NetTrouble::now(&rx);
    let warm_up = ceiling(&client, receiver, &rx, a.events, concurrency, a.endpoints).await;
    let net = {
        net.since(&rx, "the ceiling's warm-up pass");
        NetTrouble::now(&rx)
    };
    let mut ceilings = Vec::new();
    for _ in 0..CEILING_RUNS {
        ceilings.push(ceiling(&client, receiver, &rx, a.events, concurrency, a.endpoints).await);
    }
    net.since(&rx, "the ceiling's passes");
    ceilings.sort_by(f64::total_cmp);
    let ceiling_per_s = ceilings[CEILING_RUNS / 2];
    println!(
        "broker {broker}: {} events to {} endpoints (in flight ≤ {} each): {events_per_s:.0} events/s; \
         webhookd CPU {cpu_s:.1} s ({:.1} µs/event); paced at {half:.0}/s for {paced} events: latency p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms (broker alone: p50 {:.2} ms, p99 {:.2} ms); peak RSS {rss_mib:.0} MiB; ceiling {ceiling_per_s:.0} req/s at concurrency {concurrency} \
         (median of {ceilings:.0?}, after a warm-up pass at {warm_up:.0})",
        a.events,
        a.endpoints,
        a.in_flight,
        cpu_s * 1e6 / a.events as f64,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        percentile(&floor, 0.5),
        percentile(&floor, 0.99),
    );
    Outcome {
        events_per_s,
        ceiling_per_s,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
        floor_p50_ms: percentile(&floor, 0.5),
        floor_p99_ms: percentile(&floor, 0.99),
        rss_mib,
        cpu_s,
        parked,
        paced_rto: paced_net.rto,
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!(
        "webhookd load benchmark: {} ({} cores), binary {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find_map(|l| l
                .strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(|s| s.trim().to_owned())))
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.bin.display()
    );
    for broker in &a.brokers {
        let o = rt.block_on(run_once(&a, broker));
        let park = o.parked.as_ref().map_or(String::new(), |pk| {
            format!(
                " parked={} park_s={:.1} parked_rss_mib={:.0} park_peak_rss_mib={:.0} drain_s={:.1}",
                pk.events, pk.park_s, pk.rss_mib, pk.peak_rss_mib, pk.drain_s
            )
        });
        let stuck = if a.stuck > 0 { format!(" stuck={}", a.stuck) } else { String::new() };
        println!(
            "RESULT broker={broker} endpoints={} events={} events_per_s={:.0} ceiling_per_s={:.0} ratio={:.2} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} broker_p50_ms={:.2} broker_p99_ms={:.2} paced_rto={} rss_mib={:.0} cpu_s={:.1}{stuck}{park}",
            a.endpoints,
            a.events,
            o.events_per_s,
            o.ceiling_per_s,
            o.events_per_s / o.ceiling_per_s,
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.floor_p50_ms,
            o.floor_p99_ms,
            o.paced_rto,
            o.rss_mib,
            o.cpu_s
        );
    }
}
