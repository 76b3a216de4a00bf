//! Deliveries as a receiver sees them: signatures, dedup, retries, outcomes,
//! limits and isolation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::helpers::*;

/// Standard Webhooks, computed here from the specification, not by webhookd.
fn expected_signature(secret: &str, id: &str, ts: &str, body: &[u8]) -> String {
    let key = B64.decode(secret.strip_prefix("whsec_").expect("prefix")).expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_signed_per_standard_webhooks() {
    let kafka = Kafka::start();
    let topic = kafka.topic("signed", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ep = format!(
        "[[endpoints]]\nid = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET_A}\", \"{SECRET_B}\"]\nlegacy_hmac_header = true\n",
        rx.url("/hook")
    );
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &ep)).await;
    let body = br#"{"id":"evt_sig_1","type":"ContactCreate","locationId":"loc_42","data":{"email":"jane@example.com","n":1.50}}"#;
    kafka.produce(&topic, None, body).await;

    let hit = rx.wait_for(1).await.remove(0);
    assert_eq!(hit.path, "/hook");
    assert_eq!(&hit.body[..], &body[..], "the event is delivered byte for byte");
    assert_eq!(hit.header("content-type"), "application/json");
    assert!(hit.header("user-agent").starts_with("webhookd/"));
    let id = hit.header("webhook-id");
    assert!(id.starts_with("msg_"), "{id}");
    let ts = hit.header("webhook-timestamp");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert!((now - ts.parse::<i64>().expect("unix seconds")).abs() < 60, "timestamp {ts} is not now");
    let sigs: Vec<&str> = hit.header("webhook-signature").split(' ').collect();
    assert_eq!(
        sigs,
        vec![expected_signature(SECRET_A, id, ts, body), expected_signature(SECRET_B, id, ts, body)],
        "one signature per active secret, space-separated"
    );
    let key = B64.decode(&SECRET_A[6..]).expect("key");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(body);
    assert_eq!(hit.header("x-hmac-signature"), hex::encode(mac.finalize().into_bytes()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_event_is_not_delivered_twice_even_after_a_restart() {
    let kafka = Kafka::start();
    let topic = kafka.topic("dedup", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // One in flight, so deliveries arrive in the order events were published.
    let cfg = config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), "max_in_flight = 1"));
    let d = Daemon::start(&cfg).await;
    kafka.produce(&topic, None, &event("evt_dup", "ContactCreate")).await;
    kafka.produce(&topic, None, &event("evt_dup", "ContactUpdate")).await;
    kafka.produce(&topic, None, &event("evt_sentinel_1", "NoteCreate")).await;
    rx.wait_until("the first sentinel", |h| h.iter().any(|h| h.event_id() == "evt_sentinel_1")).await;
    assert!(d.metric("webhookd_events_duplicate_total").await >= 1.0);
    d.stop().await;

    let d = Daemon::start(&cfg).await;
    kafka.produce(&topic, None, &event("evt_dup", "ContactDelete")).await;
    kafka.produce(&topic, None, &event("evt_sentinel_2", "NoteCreate")).await;
    let hits = rx.wait_until("the second sentinel", |h| h.iter().any(|h| h.event_id() == "evt_sentinel_2")).await;
    let dups = hits.iter().filter(|h| h.event_id() == "evt_dup").count();
    assert_eq!(dups, 1, "evt_dup was published three times and must arrive once");
    assert_eq!(hits.len(), 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_the_same_webhook_id_until_success() {
    let kafka = Kafka::start();
    let topic = kafka.topic("retry", 1).await;
    let rx = Receiver::start(|h: &Hit| Reply::status(if h.attempt <= 2 { 503 } else { 200 })).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""))).await;
    kafka.produce(&topic, None, &event("evt_retry", "ContactCreate")).await;
    let hits = rx.wait_until("a 200 after two 503s", |h| h.iter().any(|h| h.status == 200)).await;
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), vec![503, 503, 200]);
    assert!(hits.iter().all(|h| h.webhook_id == hits[0].webhook_id), "webhook-id is stable across retries");
    assert_eq!(d.metric("webhookd_retries_scheduled_total{endpoint=\"a\"}").await, 2.0);
    assert_eq!(d.metric("webhookd_deliveries_total{endpoint=\"a\",outcome=\"delivered\"}").await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_dead_lettered_at_once_with_its_history() {
    let kafka = Kafka::start();
    let topic = kafka.topic("status400", 1).await;
    let rx = Receiver::start(|_: &Hit| Reply::status(400)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""))).await;
    let body = event("evt_400", "InvoicePaid");
    kafka.produce(&topic, None, &body).await;
    let dead = kafka.read(&format!("{topic}.dlq"), 1, 1).await.remove(0);
    assert_eq!(dead["reason"], "rejected");
    assert_eq!(dead["_header_webhookd-reason"], "rejected");
    assert_eq!(dead["endpoint_id"], "a");
    assert_eq!(dead["event_id"], "evt_400");
    assert_eq!(dead["attempts"], 1);
    assert_eq!(dead["last_status"], 400);
    assert!(dead["first_attempt_at"].is_string() && dead["last_attempt_at"].is_string());
    assert_eq!(dead["event"], serde_json::from_slice::<serde_json::Value>(&body).expect("json"));
    assert_eq!(dead["source"]["topic"], topic.as_str());
    assert_eq!(rx.hits().len(), 1, "no retry after a 400");
    assert_eq!(dead["webhook_id"], rx.hits()[0].webhook_id.as_str());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_endpoint_and_that_survives_a_restart() {
    let kafka = Kafka::start();
    let topic = kafka.topic("gone", 1).await;
    let gone = Receiver::start(|_: &Hit| Reply::status(410)).await;
    let fine = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let eps = endpoint("gone", &gone.url("/"), "") + &endpoint("fine", &fine.url("/"), "max_in_flight = 1");
    let cfg = config(&kafka, &topic, dir.path(), FAST_RETRY, &eps);
    let d = Daemon::start(&cfg).await;
    kafka.produce(&topic, None, &event("evt_g1", "ContactCreate")).await;
    let dead = kafka.read(&format!("{topic}.dlq"), 1, 1).await.remove(0);
    assert_eq!((dead["reason"].as_str(), dead["endpoint_id"].as_str()), (Some("gone"), Some("gone")));
    assert_eq!(d.metric("webhookd_endpoint_enabled{endpoint=\"gone\"}").await, 0.0);
    kafka.produce(&topic, None, &event("evt_g2", "ContactCreate")).await;
    fine.wait_until("evt_g2 at the healthy endpoint", |h| h.iter().any(|h| h.event_id() == "evt_g2")).await;
    d.stop().await;

    let d = Daemon::start(&cfg).await;
    kafka.produce(&topic, None, &event("evt_g3", "ContactCreate")).await;
    fine.wait_until("evt_g3 at the healthy endpoint", |h| h.iter().any(|h| h.event_id() == "evt_g3")).await;
    assert_eq!(gone.hits().len(), 1, "a disabled endpoint gets nothing more, before or after a restart");
    assert_eq!(d.metric("webhookd_endpoint_enabled{endpoint=\"gone\"}").await, 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_delays_the_next_attempt() {
    let kafka = Kafka::start();
    let topic = kafka.topic("retryafter", 1).await;
    let rx = Receiver::start(|h: &Hit| {
        if h.attempt == 1 {
            Reply { status: 429, delay: Duration::ZERO, retry_after: Some("2".into()) }
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let retry = "base = \"10ms\"\ncap = \"50ms\"";
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), retry, &endpoint("a", &rx.url("/"), ""))).await;
    kafka.produce(&topic, None, &event("evt_ra", "ContactCreate")).await;
    let hits = rx.wait_for(2).await;
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(1950),
        "Retry-After: 2 was not honoured: retried after {gap:?} (backoff alone is ≤ 50 ms)"
    );
    assert_eq!(hits[1].status, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_endpoint_gets_its_parked_retries_at_once_but_not_those_it_asked_to_delay() {
    let kafka = Kafka::start();
    let topic = kafka.topic("recall", 1).await;
    let down = Arc::new(AtomicBool::new(true));
    let rx = Receiver::start({
        let down = down.clone();
        move |h: &Hit| match (down.load(Ordering::SeqCst), h.event_id() == "evt_ra") {
            (_, true) => Reply { status: 503, delay: Duration::ZERO, retry_after: Some("3600".into()) },
            (true, false) => Reply::status(503),
            (false, false) => Reply::status(200),
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Retries an hour apart: only a recall can bring them back within the test.
    let retry = "base = \"1h\"\ncap = \"2h\"\nmax_attempts = 10";
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), retry, &endpoint("a", &rx.url("/"), ""))).await;
    let parked: Vec<String> = (0..20).map(|i| format!("evt_p{i}")).collect();
    for id in parked.iter().map(String::as_str).chain(["evt_ra"]) {
        kafka.produce(&topic, None, &event(id, "ContactCreate")).await;
    }
    rx.wait_for(21).await;
    assert_eq!(rx.hits().iter().filter(|h| h.status == 200).count(), 0);

    down.store(false, Ordering::SeqCst);
    // The next 2xx (a new event) is the sign of recovery.
    kafka.produce(&topic, None, &event("evt_up", "ContactCreate")).await;
    rx.wait_until("every parked retry delivered after the recovery", |hits| {
        parked.iter().all(|id| hits.iter().any(|h| h.event_id() == *id && h.status == 200))
    })
    .await;
    let recalled = d.metric("webhookd_retries_recalled_total{endpoint=\"a\"}").await;
    // A jittered first retry may come due by itself within the test (p ≈ 3%).
    assert!((18.0..=20.0).contains(&recalled), "recalled {recalled}");
    let ra: Vec<_> = rx.hits().into_iter().filter(|h| h.event_id() == "evt_ra").collect();
    assert_eq!(ra.len(), 1, "the retry the receiver asked to delay by an hour stays parked");
    assert_eq!(d.metric("webhookd_outbox_waiting_deliveries").await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_over_its_budget_is_cut_and_retried() {
    let kafka = Kafka::start();
    let topic = kafka.topic("budget", 1).await;
    let rx = Receiver::start(|h: &Hit| {
        if h.attempt == 1 {
            Reply { status: 200, delay: Duration::from_secs(10), retry_after: None }
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(
        &kafka,
        &topic,
        dir.path(),
        FAST_RETRY,
        &endpoint("a", &rx.url("/"), "attempt_timeout = \"300ms\""),
    ))
    .await;
    kafka.produce(&topic, None, &event("evt_slow", "ContactCreate")).await;
    let hits = rx.wait_for(2).await;
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap < Duration::from_secs(5),
        "the first attempt was not cut at its 300 ms budget (retry came {gap:?} later)"
    );
    assert!(gap >= Duration::from_millis(300), "retried before the budget ran out: {gap:?}");
    assert_eq!(hits[0].webhook_id, hits[1].webhook_id);
    assert_eq!(d.metric("webhookd_deliveries_total{endpoint=\"a\",outcome=\"retry\"}").await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_at_the_receiver() {
    let kafka = Kafka::start();
    let topic = kafka.topic("ratelimit", 2).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (rate, burst, n) = (20usize, 5usize, 90usize);
    let ep = endpoint("a", &rx.url("/"), &format!("rate_limit = {{ per_second = {rate}, burst = {burst} }}"));
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &ep)).await;
    for i in 0..n {
        kafka.produce(&topic, None, &event(&format!("evt_rl_{i}"), "ContactCreate")).await;
    }
    let hits = rx.wait_for(n).await;
    let times: Vec<_> = hits.iter().map(|h| h.at).collect();
    // In any one-second window: at most the burst plus one second's worth.
    let worst = (0..times.len())
        .map(|i| times[i..].iter().take_while(|t| **t - times[i] < Duration::from_secs(1)).count())
        .max()
        .unwrap_or(0);
    println!("rate limit {rate}/s burst {burst}: busiest one-second window had {worst} requests");
    assert!(worst <= rate + burst, "{worst} requests in one second, limit {rate}/s + burst {burst}");
    let span = *times.last().expect("hits") - times[0];
    assert!(
        span >= Duration::from_secs_f64((n - burst) as f64 / rate as f64 * 0.95),
        "{n} requests took only {span:?}"
    );
    assert!(d.metric("webhookd_rate_limited_total{endpoint=\"a\"}").await > 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_on_one_host_share_its_connection_cap() {
    let kafka = Kafka::start();
    let topic = kafka.topic("hostcap", 2).await;
    // Each request takes 100 ms, so it occupies [arrival, arrival + 100 ms):
    // the next request on its connection can only arrive after that.
    let hold = Duration::from_millis(100);
    let rx = Receiver::start(Receiver::ok_after(hold)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Four endpoints on one host, up to 16 requests in flight between them, capped at 3.
    let eps: String =
        (0..4).map(|i| endpoint(&format!("h{i}"), &rx.url(&format!("/h{i}")), "max_in_flight = 4")).collect();
    let toml = config(&kafka, &topic, dir.path(), FAST_RETRY, &eps)
        .replace("[delivery]\n", "[delivery]\nmax_connections_per_host = 3\n");
    let d = Daemon::start(&toml).await;
    // Every event goes to all four endpoints.
    for i in 0..8 {
        kafka.produce(&topic, None, &event(&format!("evt_hc_{i}"), "ContactCreate")).await;
    }
    let n = 32;
    let hits = rx.wait_for(n).await;
    let mut at: Vec<_> = hits.iter().map(|h| h.at).collect();
    at.sort();
    let most = (0..at.len()).map(|i| at[i..].iter().take_while(|t| **t - at[i] < hold).count()).max().unwrap_or(0);
    println!("{n} requests to 4 endpoints on one host: at most {most} in flight at once");
    assert!(most <= 3, "{most} requests in flight to one host, capped at 3");
    assert_eq!(most, 3, "the cap was never reached: the test shows nothing");
    assert!(d.metric("webhookd_host_connection_waits_total").await > 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_slow_a_fast_one() {
    let kafka = Kafka::start();
    let topic = kafka.topic("isolation", 1).await;
    let slow = Receiver::start(Receiver::ok_after(Duration::from_secs(2))).await;
    let fast = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let eps = endpoint("slow", &slow.url("/"), "max_in_flight = 2") + &endpoint("fast", &fast.url("/"), "");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &eps)).await;
    let n = 60;
    for i in 0..n {
        kafka.produce(&topic, None, &event(&format!("evt_iso_{i}"), "ContactCreate")).await;
    }
    // The slow endpoint needs 2 s per pair: 60 s for all. The fast one must not wait for it.
    fast.wait_for(n).await;
    let slow_done = slow.hits().len();
    println!("fast endpoint received all {n}; slow endpoint had received {slow_done}");
    assert!(slow_done < n / 2, "the slow endpoint was not slow ({slow_done}); the test proves nothing");
    d.stop().await;
}

/// With `source.backpressure` (on by default), the consumer waits while the
/// workers will deliver 4,096 or more ready deliveries within 0.5 s, each
/// endpoint at its own pace, among other conditions (store::IntakeGate).
/// Slow endpoints holding more than that must not make it wait: here ten
/// endpoints that answer nothing hold 5,000 (a rule on the whole ready queue
/// would wait), and the consumer must not wait once while a fast endpoint's
/// events go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoints_holding_a_large_backlog_do_not_hold_intake() {
    let kafka = Kafka::start();
    let topic = kafka.topic("intake-gate", 1).await;
    let slow = Receiver::start(Receiver::ok_after(Duration::from_secs(30))).await;
    let fast = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (slow_endpoints, per_slow) = (10, 500);
    let mut eps: String = (0..slow_endpoints)
        .map(|i| {
            endpoint(&format!("slow{i}"), &slow.url("/"), &format!("event_types = [\"Slow{i}\"]\nmax_in_flight = 1"))
        })
        .collect();
    eps += &endpoint("fast", &fast.url("/"), "event_types = [\"Fast\"]");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &eps)).await;
    let backlog: Vec<Vec<u8>> = (0..slow_endpoints * per_slow)
        .map(|n| event(&format!("evt_gate_slow_{n}"), &format!("Slow{}", n % slow_endpoints)))
        .collect();
    kafka.produce_all(&topic, &backlog).await;
    // All committed to the store, and so handed to the slow endpoints' feeds.
    eventually("the slow endpoints' backlog in the outbox", || async {
        d.metric("webhookd_outbox_ready_deliveries").await >= backlog.len() as f64
    })
    .await;
    let n = 50;
    let fast_events: Vec<Vec<u8>> = (0..n).map(|i| event(&format!("evt_gate_fast_{i}"), "Fast")).collect();
    kafka.produce_all(&topic, &fast_events).await;
    fast.wait_for(n).await;
    let slow_hits = slow.hits().len();
    let waits = d.metric("webhookd_intake_wait_seconds_count").await;
    let waited = d.metric("webhookd_intake_wait_seconds_sum").await;
    println!(
        "fast endpoint received all {n}; slow endpoints had {slow_hits} requests; intake waited {waits} times, {waited:.3} s in all"
    );
    assert_eq!(waits, 0.0, "the consumer waited {waited:.3} s for endpoints that finish nothing");
    d.stop().await;
}

/// The case backpressure's pace alone cannot tell from a machine that is
/// behind: 100 endpoints that answer in 100 ms, 16 in flight each, deliver
/// up to 16,000 a second between them and would count 8,000 (store::gate).
/// The consumer must still read on for a fast endpoint beside them: it runs
/// dry each time it is served, and the workers wait on the slow endpoints'
/// answers, not on this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoints_that_deliver_a_lot_together_do_not_hold_intake() {
    let kafka = Kafka::start();
    let topic = kafka.topic("intake-gate-many", 1).await;
    let slow = Receiver::start(Receiver::ok_after(Duration::from_millis(100))).await;
    let fast = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let slow_endpoints = 100;
    let mut eps: String = (0..slow_endpoints)
        .map(|i| endpoint(&format!("slow{i}"), &slow.url("/"), "event_types = [\"Slow\"]\nmax_in_flight = 16"))
        .collect();
    eps += &endpoint("fast", &fast.url("/"), "event_types = [\"Fast\"]");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &eps)).await;
    let fast_events = |from: usize, n: usize| {
        (from..from + n).map(|i| event(&format!("evt_many_fast_{i}"), "Fast")).collect::<Vec<_>>()
    };
    kafka.produce_all(&topic, &fast_events(0, 10)).await;
    fast.wait_for(10).await;
    // 600 events to every slow endpoint: 60,000 deliveries, 3.75 s at 16,000 a second.
    let backlog: Vec<Vec<u8>> = (0..600).map(|n| event(&format!("evt_many_slow_{n}"), "Slow")).collect();
    kafka.produce_all(&topic, &backlog).await;
    eventually("the slow endpoints' backlog in the outbox and their pace measured", || async {
        d.metric("webhookd_outbox_ready_deliveries").await >= 30_000.0 && slow.count() >= 2 * 1_600
    })
    .await;
    kafka.produce_all(&topic, &fast_events(10, 50)).await;
    fast.wait_for(60).await;
    let slow_hits = slow.count();
    let ready = d.metric("webhookd_outbox_ready_deliveries").await;
    let waits = d.metric("webhookd_intake_wait_seconds_count").await;
    let waited = d.metric("webhookd_intake_wait_seconds_sum").await;
    println!(
        "fast endpoint received all 60; slow endpoints had {slow_hits} requests and {ready} ready; intake waited {waits} times, {waited:.3} s in all"
    );
    assert!(ready >= 8_000.0, "the slow endpoints' backlog was gone ({ready}): the test shows nothing");
    assert_eq!(waits, 0.0, "the consumer waited {waited:.3} s behind endpoints that are slow, not behind this machine");
    d.stop().await;
}
