//! What both benchmarks share: a fast HTTP receiver on loopback that counts
//! requests, can be waited on, and records produce→receive latencies; a
//! process's CPU time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// The longest a benchmark waits for its requests to arrive.
pub const WAIT_LIMIT: Duration = Duration::from_secs(300);

pub fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

/// Answers 200 at once; counts requests and, while `recording`, keeps each
/// produce→receive latency (from the body's `"sent":<unix µs>`), with the
/// send time it is for.
#[derive(Default)]
pub struct Receiver {
    pub count: AtomicU64,
    pub recording: AtomicBool,
    /// (sent, latency) in µs.
    pub latencies_us: Mutex<Vec<(u64, u64)>>,
    first: Mutex<Option<Instant>>,
    /// Set to the request count to wake on, 0 for none.
    target: AtomicU64,
    reached: Notify,
    last: Mutex<Option<Instant>>,
    /// The status to answer with (0: 200).
    pub status: std::sync::atomic::AtomicU16,
    /// Connections accepted so far.
    pub connections: AtomicU64,
}

pub fn sent_us(body: &[u8]) -> Option<u64> {
    let at = body.windows(7).take(200).position(|w| w == b"\"sent\":")? + 7;
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits]).ok()?.parse().ok()
}

impl Receiver {
    pub async fn start() -> (Arc<Receiver>, SocketAddr) {
        let rx = Arc::new(Receiver::default());
        // A listen queue of 4,096 (the kernel caps it at net.core.somaxconn)
        // rather than tokio's 1,024: a client opening its pool's 1,600
        // connections at once overflowed the smaller one. A full queue drops
        // the handshake's last ACK: the client, connected as far as it knows,
        // sends its request, and TCP sends it again only after 200 ms (a SYN
        // dropped there waits a second).
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let listener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let state = rx.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                state.connections.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            state.hit(&body);
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            let status = state.status.load(Ordering::Relaxed);
                            if status != 0 {
                                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        (rx, addr)
    }

    fn hit(&self, body: &[u8]) {
        let now = Instant::now();
        if self.recording.load(Ordering::Relaxed)
            && let Some(sent) = sent_us(body)
        {
            let lat = unix_us().saturating_sub(sent);
            self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push((sent, lat));
        }
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        self.first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(now);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        let target = self.target.load(Ordering::Acquire);
        if target != 0 && n >= target {
            self.reached.notify_one();
        }
    }

    /// Starts a new phase: counts from zero.
    pub fn reset(&self, recording: bool) {
        self.count.store(0, Ordering::Release);
        *self.first.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.recording.store(recording, Ordering::Release);
    }

    /// Waits until `n` requests arrived in this phase; false at the time limit.
    pub async fn wait_for(&self, n: u64) -> bool {
        self.target.store(n, Ordering::Release);
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        while self.count.load(Ordering::Acquire) < n {
            if tokio::time::timeout_at(deadline, self.reached.notified()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Requests per second from the first to the last request of the phase.
    pub fn rate(&self) -> f64 {
        let first = *self.first.lock().unwrap_or_else(|p| p.into_inner());
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        match (first, last) {
            (Some(f), Some(l)) if l > f => (self.count.load(Ordering::Acquire) - 1) as f64 / (l - f).as_secs_f64(),
            _ => 0.0,
        }
    }
}
