//! Benchmarks of the dispatch path: decode, route, sign (per event); the
//! store's group-committed intake batch; and the whole in-process pipeline
//! (store → endpoint workers → rate limit → sign → HTTP to a loopback
//! receiver). `cargo bench --bench dispatch` prints the figures; the end-to-end
//! benchmark with Kafka is `./scripts/load-bench` (benches/load.rs).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webhookd::config::{Config, EnvelopeConfig};
use webhookd::dead_letter::DeadLetters;
use webhookd::deliver::sign::{SigningSecret, signature_header};
use webhookd::deliver::{Deliverer, client};
use webhookd::event::Event;
use webhookd::event::{RawMessage, SourcePos, decode};
use webhookd::route::Registry;
use webhookd::store::{Delivery, NewEvent, Store, StoreOptions};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn envelope_1k() -> Vec<u8> {
    let pad = "x".repeat(850);
    format!(
        r#"{{"id":"evt_01JB000000000000000000","type":"ContactCreate","locationId":"loc_42","timestamp":"2025-01-15T10:30:00Z","data":{{"id":"c1","email":"jane@example.com","tags":["lead"],"notes":"{pad}"}}}}"#
    )
    .into_bytes()
}

fn benches(c: &mut Criterion) {
    let body = envelope_1k();
    let env = EnvelopeConfig::default();
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_1KiB_envelope", |b| {
        b.iter(|| {
            let raw = RawMessage {
                value: Some(black_box(&body)),
                headers: Vec::new(),
                kafka_time_ms: Some(0),
                source: SourcePos { topic: "t".into(), partition: 0, offset: 0 },
            };
            decode(raw, &env, 1 << 20, 0).expect("valid")
        })
    });
    let secrets = vec![SigningSecret::parse(SECRET).expect("secret")];
    g.bench_function("sign_1KiB", |b| {
        b.iter(|| signature_header(&secrets, "msg_0123456789abcdef", 1_700_000_000, black_box(&body)))
    });

    let mut toml = String::new();
    for i in 0..10_000 {
        let filter = match i % 3 {
            0 => "\"*\"".to_owned(),
            1 => format!("\"Type{}\"", i % 50),
            _ => "\"Contact*\"".to_owned(),
        };
        toml.push_str(&format!(
            "[[endpoints]]\nid = \"ep{i}\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{SECRET}\"]\nevent_types = [{filter}]\nlocation_ids = [\"loc_{}\"]\n",
            i % 100
        ));
    }
    let cfg = Config::from_toml_str(&toml, Vec::new()).expect("valid");
    let table = Registry::from_configs(&cfg.endpoints, 1000).snapshot();
    g.bench_function("route_against_10k_endpoints", |b| {
        b.iter(|| table.route(black_box("ContactCreate"), Some("loc_42")))
    });
    g.finish();
}

/// Events of one intake batch (the source's default `batch_max`).
const BATCH: usize = 512;

fn new_events(next: &AtomicU64, n: usize, endpoints: usize, body: &Bytes) -> Vec<NewEvent> {
    (0..n)
        .map(|_| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let ev = Event {
                id: format!("evt_{i}"),
                event_type: "ContactCreate".into(),
                location_id: None,
                time_ms: 0,
                payload: body.clone(),
                source: SourcePos { topic: "t".into(), partition: 0, offset: i as i64 },
            };
            let endpoint = format!("e{}", i as usize % endpoints);
            NewEvent { event_id: ev.id.clone(), deliveries: vec![Delivery::new(&ev, &endpoint)] }
        })
        .collect()
}

fn store_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let body = Bytes::from(envelope_1k());
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(BATCH as u64));
    for sync_writes in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StoreOptions { dedup_window: Duration::from_secs(3600), sync_writes, backpressure: false };
        let store = Store::open(dir.path(), opts).expect("store");
        let next = AtomicU64::new(0);
        let name = format!("intake_batch_of_{BATCH}_sync_{sync_writes}");
        g.bench_function(&name, |b| {
            b.iter_batched(
                || Arc::new(new_events(&next, BATCH, 100, &body)),
                |events| rt.block_on(store.intake(events)).expect("intake"),
                BatchSize::SmallInput,
            )
        });
        rt.block_on(store.close());
    }
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    // 10 endpoints take ~51 events each per batch; at 10,000 each event is
    // its endpoint's only one, as with many endpoints of little traffic.
    for endpoints in [10, 10_000] {
        pipeline_with(c, endpoints);
    }
}

fn pipeline_with(c: &mut Criterion, endpoints: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let _guard = rt.enter();
    let (sink, addr) = rt.block_on(Receiver::start());
    let mock = MockCluster::new(1).expect("mock cluster");
    let mut toml = String::from("[delivery]\nallow_networks = [\"127.0.0.0/8\"]\n");
    for i in 0..endpoints {
        toml.push_str(&format!(
            "[[endpoints]]\nid = \"e{i}\"\nurl = \"http://{addr}/e{i}\"\nsecrets = [\"{SECRET}\"]\nrate_limit = {{ per_second = 1000000 }}\n"
        ));
    }
    let cfg = Config::from_toml_str(&toml, Vec::new()).expect("valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        dir.path(),
        StoreOptions { dedup_window: Duration::from_secs(3600), sync_writes: true, backpressure: false },
    )
    .expect("store");
    let kafka = rdkafka::ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).clone();
    let health = Arc::new(webhookd::telemetry::admin::Health::default());
    let deliverer = Arc::new(Deliverer {
        store: store.clone(),
        client: client::build(&cfg.delivery).expect("client"),
        dead_letters: DeadLetters::new(&kafka, "dlq", health).expect("producer"),
        policy: cfg.retry.clone(),
        max_response_bytes: cfg.delivery.max_response_bytes,
        attempts: TaskTracker::new(),
        abort: CancellationToken::new(),
    });
    let shutdown = CancellationToken::new();
    for ep in Registry::from_configs(&cfg.endpoints, 1000).snapshot().all() {
        rt.spawn(deliverer.clone().run_endpoint(ep.clone(), shutdown.clone()));
    }
    let body = Bytes::from(envelope_1k());
    let next = AtomicU64::new(0);
    // One event to each endpoint first, so that every worker has done what
    // it does once when it starts (read its queue in the store, set up its
    // rate limiter) before anything is timed.
    rt.block_on(async {
        for start in (0..endpoints).step_by(BATCH) {
            let n = BATCH.min(endpoints - start);
            sink.reset(false);
            store.intake(Arc::new(new_events(&next, n, endpoints, &body))).await.expect("intake");
            assert!(sink.wait_for(n as u64).await, "the warm-up was delivered in time");
        }
    });
    // The process's CPU over the timed batches (store, workers, client and
    // the receiver alike): at 10,000 endpoints the time per batch is partly
    // waiting, so this is the figure to compare.
    let (mut cpu_s, mut events) = (0.0, 0u64);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("intake_to_2xx_{BATCH}_events_{endpoints}_endpoints"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch = Arc::new(new_events(&next, BATCH, endpoints, &body));
                sink.reset(false);
                // Read before the clock starts: the read is not the pipeline's time.
                let cpu0 = cpu_seconds(std::process::id());
                let start = Instant::now();
                rt.block_on(async {
                    store.intake(batch).await.expect("intake");
                    assert!(sink.wait_for(BATCH as u64).await, "the batch was delivered in time");
                });
                total += start.elapsed();
                cpu_s += cpu_seconds(std::process::id()) - cpu0;
                events += BATCH as u64;
            }
            total
        })
    });
    g.finish();
    println!(
        "pipeline, {endpoints} endpoints: {:.1} µs of CPU per event over {events} events (this process: store, workers, client and receiver)",
        cpu_s * 1e6 / events.max(1) as f64
    );
    shutdown.cancel();
    rt.block_on(store.close());
}

#[allow(dead_code)] // shared with benches/load.rs, which uses more of it
mod support;

use support::{Receiver, cpu_seconds};

criterion_group!(dispatch, benches, store_batch, pipeline);
criterion_main!(dispatch);
