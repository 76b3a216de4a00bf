//! kill -9 and SIGTERM under load, and two instances sharing a consumer group.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::bed::*;
use crate::helpers::Producer;

/// Produces the catalogue in chunks until stopped or `max` events, republishing
/// some earlier events (duplicates webhookd must drop). Returns the unique ids.
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(HashSet<String>, usize)>,
}

impl Load {
    pub fn start(kafka: Producer, topic: &str, prefix: &str, per_chunk: usize, pause: Duration, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, topic, prefix) = (stop.clone(), topic.to_owned(), prefix.to_owned());
        let task = tokio::spawn(async move {
            let mut ids = HashSet::new();
            let mut republished = 0;
            let mut n = 0;
            while !s.load(Ordering::SeqCst) && n < max {
                let mut chunk = Vec::with_capacity(per_chunk + 20);
                for _ in 0..per_chunk.min(max - n) {
                    let id = format!("{prefix}_{n}");
                    chunk.push(event(&id, n));
                    ids.insert(id);
                    n += 1;
                }
                // Every chunk republishes a few events from earlier chunks.
                for k in (0..n.saturating_sub(per_chunk)).step_by(97).take(10) {
                    chunk.push(event(&format!("{prefix}_{k}"), k));
                    republished += 1;
                }
                kafka.produce_all(&topic, &chunk).await;
                tokio::time::sleep(pause).await;
            }
            (ids, republished)
        });
        Load { stop, task }
    }

    pub async fn finish(self) -> (HashSet<String>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("load task")
    }
}

/// Receivers for the crash tests: a few first attempts fail with 503, a few
/// events are always rejected with 400 (so they end in the dead-letter topic).
pub async fn flaky() -> Ledger {
    Ledger::start(|id, attempt| match (bucket(id, 50), bucket(id, 10), attempt) {
        (0, _, _) => 400,
        (_, 1, 1) => 503,
        _ => 200,
    })
    .await
    .rejecting(|id| bucket(id, 50) == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twenty_times_under_load_loses_nothing() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("kill9", 4).await;
    let (a, b) = (flaky().await, flaky().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("a", a.port) + &endpoint("b", b.port);
    let config = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db"), "", &endpoints);
    let started = Instant::now();
    // About 1,000 events a second for as long as the kills take (bounded).
    let load = Load::start(kafka.producer(), &topic, "evt", 100, Duration::from_millis(100), 200_000);
    let kills = 20;
    let mut in_flight_at_kills = 0.0;
    let mut under_load = 0;
    for _ in 0..kills {
        let mut w = Webhookd::start(&config).await;
        w.ready().await;
        // Let deliveries flow, then kill at a random moment.
        let before = a.requests() + b.requests();
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.requests() + b.requests() < before + 50 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if a.requests() + b.requests() >= before + 50 {
            under_load += 1;
        }
        let wait = rand::rng().random_range(0..800);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        in_flight_at_kills += w.metric("webhookd_in_flight_requests").await;
        w.kill_9();
    }
    let (ids, republished) = load.finish().await;
    assert!(under_load >= kills / 2, "only {under_load} of {kills} kills landed while deliveries flowed");
    let produced = ids.len();
    let mut w = Webhookd::start(&config).await;
    let (t, dead) = settle_everything(&kafka, &topic, &ids, &[("a", &a), ("b", &b)]).await;
    let (status, _) = w.terminate(Duration::from_secs(30)).await;
    assert!(status.success());
    let bound = kills as u64 * 2 * 16;
    println!(
        "kill -9 x{kills} ({under_load} while deliveries flowed): {produced} events (+{republished} republished), {} pairs: delivered {}, \
         dead-lettered {} ({} records), missing {}; duplicates {} (bound {bound}: 2 endpoints x 16 in flight x {kills} \
         kills; in flight sampled just before the kills: {in_flight_at_kills}); {:.0} s",
        t.expected,
        t.delivered,
        t.dead_lettered,
        dead.len(),
        t.missing.len(),
        t.duplicates,
        started.elapsed().as_secs_f64()
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
    assert!(t.duplicates <= bound, "{} duplicates exceed what was in flight", t.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_within_the_grace_period_and_loses_nothing() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("sigterm", 4).await;
    // Slow answers, so attempts are in flight when the signal lands.
    let a = Ledger::start_slow(Duration::from_millis(300), |_, _| 200).await;
    let b = flaky().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("a", a.port) + &endpoint("b", b.port);
    let config = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db"), "", &endpoints);
    let load = Load::start(kafka.producer(), &topic, "evt", 100, Duration::from_millis(100), 20_000);
    let mut w = Webhookd::start(&config).await;
    w.ready().await;
    b.wait_delivered("deliveries under way", 300).await;
    let in_flight = w.metric("webhookd_in_flight_requests").await;
    let (status, took) = w.terminate(Duration::from_secs(60)).await;
    let log = w.log_text();
    drop(w);
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}:\n{log}");
    let grace = Duration::from_secs(2);
    a.set_delay(Duration::ZERO);
    // Load goes on while webhookd is down; the restart picks everything up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ids, republished) = load.finish().await;
    let mut w = Webhookd::start(&config).await;
    let (t, _) = settle_everything(&kafka, &topic, &ids, &[("a", &a), ("b", &b)]).await;
    assert!(w.terminate(Duration::from_secs(30)).await.0.success());
    println!(
        "SIGTERM with {in_flight} attempts in flight: exit 0 after {:.2} s (shutdown_grace {grace:?}); after restart \
         {} events (+{republished} republished), {} pairs: delivered {}, dead-lettered {}, missing {}, duplicates {}",
        took.as_secs_f64(),
        ids.len(),
        t.expected,
        t.delivered,
        t.dead_lettered,
        t.missing.len(),
        t.duplicates
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
    // Attempts still running at the end of the grace period are abandoned (and
    // repeated after the restart); the rest of shutdown is commits and closing.
    assert!(took < grace + Duration::from_secs(8), "exit took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions_and_one_takes_over_when_the_other_is_killed() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("pair", 4).await;
    let (a, b) = (Ledger::ok().await, Ledger::ok().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("a", a.port) + &endpoint("b", b.port);
    let config_1 = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db1"), "", &endpoints);
    let config_2 = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db2"), "", &endpoints);
    let mut one = Webhookd::start(&config_1).await;
    let mut two = Webhookd::start(&config_2).await;
    one.ready().await;
    two.ready().await;
    let load = Load::start(kafka.producer(), &topic, "evt", 100, Duration::from_millis(100), 30_000);
    // Both consume: the group split the partitions between them.
    let deadline = Instant::now() + LONG;
    let consumed = "webhookd_events_consumed_total";
    while one.metric(consumed).await < 200.0 || two.metric(consumed).await < 200.0 {
        assert!(Instant::now() < deadline, "the partitions were not split between the two instances");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(500..2000))).await;
    let (c1, c2) = (one.metric(consumed).await, two.metric(consumed).await);
    two.kill_9();
    let killed_at = Instant::now();
    // The survivor takes the partitions over once the group notices (session timeout).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (ids, republished) = load.finish().await;
    let (t, _) = settle_everything(&kafka, &topic, &ids, &[("a", &a), ("b", &b)]).await;
    let took_over = killed_at.elapsed();
    assert!(one.terminate(Duration::from_secs(30)).await.0.success());
    println!(
        "two instances: consumed {c1} and {c2} before one was killed; the survivor settled everything {:.1} s after \
         the kill. {} events (+{republished} republished), {} pairs: delivered {}, missing {}; duplicate window on \
         the partition move: {} deliveries repeated ({:.2}% of pairs)",
        took_over.as_secs_f64(),
        ids.len(),
        t.expected,
        t.delivered,
        t.missing.len(),
        t.duplicates,
        100.0 * t.duplicates as f64 / t.expected as f64
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
}
