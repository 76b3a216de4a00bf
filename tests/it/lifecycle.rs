//! Restarts, crashes, signals, the embedded broker, the admin listener, and
//! the binary's handling of bad configuration.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

fn ids_with_200(hits: &[Hit]) -> HashSet<String> {
    hits.iter().filter(|h| h.status == 200).map(Hit::event_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_resume_after_a_restart() {
    let kafka = Kafka::start();
    let topic = kafka.topic("resume", 1).await;
    let rx = Receiver::start(|_: &Hit| Reply::status(503)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let retry = "base = \"200ms\"\ncap = \"500ms\"\nmax_attempts = 1000";
    let cfg = config(&kafka, &topic, dir.path(), retry, &endpoint("a", &rx.url("/"), ""));
    let d = Daemon::start(&cfg).await;
    let n = 5;
    for i in 0..n {
        kafka.produce(&topic, None, &event(&format!("evt_r{i}"), "ContactCreate")).await;
    }
    let before = rx
        .wait_until("a failed attempt of every event", |h| {
            h.iter().map(Hit::event_id).collect::<HashSet<_>>().len() == n
        })
        .await;
    d.stop().await;
    let ids_before: HashMap<String, String> = before.iter().map(|h| (h.event_id(), h.webhook_id.clone())).collect();

    rx.set_behaviour(Receiver::ok());
    let d = Daemon::start(&cfg).await;
    let after = rx.wait_until("every event delivered after the restart", |h| ids_with_200(h).len() == n).await;
    for h in after.iter().filter(|h| h.status == 200) {
        assert_eq!(ids_before[&h.event_id()], h.webhook_id, "same webhook-id after the restart");
    }
    assert_eq!(d.metric("webhookd_outbox_waiting_deliveries").await, 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let kafka = Kafka::start();
    let topic = kafka.topic("kill9", 2).await;
    // Every first attempt fails, so retries are always pending when the kill lands.
    let rx = Receiver::start(|h: &Hit| Reply::status(if h.attempt == 1 { 503 } else { 200 })).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let retry = "base = \"100ms\"\ncap = \"300ms\"\nmax_attempts = 1000";
    let path = write_config(
        dir.path(),
        &config(&kafka, &topic, &dir.path().join("db"), retry, &endpoint("a", &rx.url("/"), "")),
    );
    let (first, second) = (40, 20);

    let mut p = Proc::spawn(&["run", "--config", &path]);
    for i in 0..first {
        kafka.produce(&topic, None, &event(&format!("evt_k{i}"), "ContactCreate")).await;
    }
    rx.wait_for(first / 2).await;
    p.child.kill().expect("kill -9");
    p.wait_exit(WAIT).await;
    let at_kill = rx.hits().len();
    for i in first..first + second {
        kafka.produce(&topic, None, &event(&format!("evt_k{i}"), "ContactCreate")).await;
    }
    let _p = Proc::spawn(&["run", "--config", &path]);
    let hits = rx.wait_until("every event delivered after kill -9", |h| ids_with_200(h).len() == first + second).await;
    let delivered_twice = hits.iter().filter(|h| h.status == 200).count() - (first + second);
    println!("kill -9 after {at_kill} requests: {} events, lost 0, delivered twice {delivered_twice}", first + second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_quick_start_and_sigterm_exit_zero() {
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[store]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[delivery]\nallow_networks = [\"127.0.0.0/8\"]\n\
         [log]\nformat = \"json\"\n{}",
        dir.path().join("db").display(),
        endpoint("a", &rx.url("/"), "")
    );
    let path = dir.path().join("quick.toml");
    std::fs::write(&path, toml).expect("write");
    let mut p = Proc::spawn(&["run", "--config", &path.display().to_string()]);
    let bootstrap = p.log_field("bootstrap");
    assert!(bootstrap.starts_with("127.0.0.1:"), "embedded broker on loopback, got {bootstrap}");
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("producer");
    let body = event("evt_quick", "FormSubmitted");
    producer
        .send(rdkafka::producer::FutureRecord::<(), _>::to("webhookd.events").payload(&body), Duration::from_secs(10))
        .await
        .expect("produce to the embedded broker");
    let hit = rx.wait_for(1).await.remove(0);
    assert_eq!(hit.event_id(), "evt_quick");
    drop(producer);
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM must end in a clean exit 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_naming_every_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[source]\ntopics = []\ncommit_interval = \"often\"\n[retry]\nfactor = 0.1\n[admin]\nlisten = \"not-an-address\"\n\
         [[endpoints]]\nid = \"x\"\nurl = \"gopher://x\"\nsecrets = [\"whsec_c2hvcnQ=\"]\ntypo = 1\n",
    )
    .expect("write");
    let path = path.display().to_string();
    for cmd in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_webhookd"))
            .args([cmd, "--config", &path])
            .env("WEBHOOKD_STORE__SYNC_WRITES", "maybe")
            .output()
            .expect("run webhookd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        for field in [
            "source.topics",
            "source.commit_interval",
            "retry.factor",
            "admin.listen",
            "endpoints[0].url",
            "endpoints[0].secrets",
            "endpoints[0].typo: unknown key",
            "store.sync_writes (set by WEBHOOKD_STORE__SYNC_WRITES)",
        ] {
            assert!(err.contains(field), "{cmd}: {field} not named in:\n{err}");
        }
        assert!(!err.contains("webhookd running"), "nothing may start");
    }
}

#[test]
fn each_kind_of_config_mistake_is_named_and_nothing_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("db");
    let ep = |extra: &str| {
        format!("[[endpoints]]\nid = \"a\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{SECRET_A}\"]\n{extra}")
    };
    // (what is wrong, the config, an env override, what the error must name)
    type Case<'a> = (&'a str, String, Option<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("TOML syntax", "[source\n".into(), None, "TOML syntax at line 1, column 8"),
        ("unknown key", "[stor]\npath = \"x\"\n".into(), None, "stor.path: unknown key"),
        ("wrong type", "[source]\nbatch_max = \"many\"\n".into(), None, "source.batch_max"),
        ("bad duration", "[retry]\nbase = \"soon\"\n".into(), None, "retry.base: not a duration"),
        ("zero where positive", "[delivery]\nattempt_timeout = \"0s\"\n".into(), None, "delivery.attempt_timeout"),
        ("unknown enum value", "[log]\nformat = \"xml\"\n".into(), None, "log.format"),
        ("bad socket address", "[admin]\nlisten = \"localhost\"\n".into(), None, "admin.listen"),
        ("topic clash", "[source]\ndead_letter_topic = \"webhookd.events\"\n".into(), None, "source.dead_letter_topic"),
        (
            "librdkafka property",
            "[source.kafka]\n\"linger.msx\" = \"5\"\n".into(),
            None,
            "source.kafka: \"linger.msx\"",
        ),
        ("bad CIDR", "[delivery]\nallow_networks = [\"10.0.0.0/40\"]\n".into(), None, "delivery.allow_networks"),
        (
            "missing CA file",
            "[delivery]\nextra_ca_file = \"/nonexistent.pem\"\n".into(),
            None,
            "delivery.extra_ca_file",
        ),
        ("missing url", "[[endpoints]]\nid = \"a\"\nsecrets = []\n".into(), None, "endpoints[0].url: required"),
        ("bad endpoint id", ep("").replace("id = \"a\"", "id = \"a b\""), None, "endpoints[0].id"),
        ("duplicate endpoint id", ep("") + &ep(""), None, "endpoints[1].id: duplicate"),
        ("URL scheme", ep("").replace("https://hooks", "ftp://hooks"), None, "endpoints[0].url: scheme"),
        (
            "refused destination",
            ep("").replace("hooks.example.com", "169.254.169.254"),
            None,
            "endpoints[0].url: destination refused",
        ),
        (
            "http in HTTPS-only mode",
            format!("[delivery]\nhttps_only = true\n{}", ep("").replace("https", "http")),
            None,
            "https_only",
        ),
        ("bad secret", ep("").replace(SECRET_A, "whsec_short"), None, "endpoints[0].secrets[0]"),
        (
            "secret variable unset",
            ep("").replace(&format!("\"{SECRET_A}\""), "{ env = \"NO_SUCH_VAR_X\" }"),
            None,
            "endpoints[0].secrets[0].env",
        ),
        ("bad event filter", ep("event_types = [\"*Create\"]\n"), None, "endpoints[0].event_types"),
        (
            "rate limit too high",
            ep("rate_limit = { per_second = 2000000 }\n"),
            None,
            "endpoints[0].rate_limit.per_second",
        ),
        (
            "bad env override",
            String::new(),
            Some(("WEBHOOKD_STORE__SYNC_WRITES", "maybe")),
            "store.sync_writes (set by WEBHOOKD_STORE__SYNC_WRITES)",
        ),
        (
            "env override of an unknown key",
            String::new(),
            Some(("WEBHOOKD_SOURCE__BROKER", "k:9092")),
            "source.broker (set by WEBHOOKD_SOURCE__BROKER): unknown key",
        ),
    ];
    for (what, toml, env, named) in &cases {
        let path = dir.path().join("case.toml");
        std::fs::write(&path, toml).expect("write");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_webhookd"));
        cmd.args(["run", "--config", &path.display().to_string()]).env("WEBHOOKD_STORE__PATH", &store);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run webhookd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: exit code\n{err}");
        assert!(err.contains(named), "{what}: {named:?} not named in:\n{err}");
        assert!(!store.exists(), "{what}: the store was created; something started");
    }
    println!("{} kinds of config mistake: each named, exit 2, nothing started", cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let kafka = Kafka::start();
    let topic = kafka.topic("admin", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""))).await;
    assert_eq!(d.get("/healthz").await.0, 200);
    eventually("ready", || async { d.get("/readyz").await.0 == 200 }).await;
    let (_, ready) = d.get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("readyz is JSON");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["checks"]["kafka"], true);
    assert_eq!(ready["checks"]["partitions_assigned"], true);

    kafka.produce(&topic, None, &event("evt_m", "ContactCreate")).await;
    rx.wait_for(1).await;
    eventually("the delivery counted", || async {
        d.metric("webhookd_deliveries_total{endpoint=\"a\",outcome=\"delivered\"}").await == 1.0
    })
    .await;
    let (status, text) = d.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "webhookd_events_consumed_total",
        "webhookd_deliveries_total",
        "webhookd_attempt_duration_seconds",
        "webhookd_store_write_duration_seconds",
        "webhookd_store_wal_bytes",
        "webhookd_outbox_ready_deliveries",
        "webhookd_endpoint_enabled",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} is not described:\n{text}");
    }
    assert_eq!(metric_value(&text, "webhookd_attempt_duration_seconds_count{endpoint=\"a\"}"), 1.0);
    // At least the event's intake and its delivery's outcome, each a write.
    assert!(metric_value(&text, "webhookd_store_write_duration_seconds_count") >= 2.0, "{text}");
    assert!(metric_value(&text, "webhookd_store_write_duration_seconds_sum") > 0.0, "{text}");
    // The event and its outcome are in the log until their families flush.
    assert!(metric_value(&text, "webhookd_store_wal_bytes") > 0.0, "{text}");
    // RocksDB's memtables hold the event and its outcome (no SST file yet,
    // so table readers and the block cache may still be empty).
    assert!(metric_value(&text, "webhookd_store_memory_bytes{kind=\"memtables\"}") > 0.0, "{text}");
    assert_eq!(metric_value(&text, "webhookd_outbox_ready_deliveries"), 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_for_a_removed_endpoint_are_dead_lettered_not_stuck() {
    let kafka = Kafka::start();
    let topic = kafka.topic("removed", 1).await;
    let down = Receiver::start(|_: &Hit| Reply::status(503)).await;
    let up = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let retry = "base = \"100ms\"\ncap = \"300ms\"\nmax_attempts = 1000";
    let with_old = endpoint("old", &down.url("/"), "") + &endpoint("new", &up.url("/"), "");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), retry, &with_old)).await;
    let n = 4;
    for i in 0..n {
        kafka.produce(&topic, None, &event(&format!("evt_rm{i}"), "ContactCreate")).await;
    }
    down.wait_until("a failed attempt of every event", |h| {
        h.iter().map(Hit::event_id).collect::<HashSet<_>>().len() == n
    })
    .await;
    up.wait_for(n).await;
    d.stop().await;

    // "old" is gone from the config: its pending retries must not wait forever.
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), retry, &endpoint("new", &up.url("/"), ""))).await;
    let dead = kafka.read(&format!("{topic}.dlq"), 1, n).await;
    assert!(dead.iter().all(|v| v["reason"] == "endpoint_removed" && v["endpoint_id"] == "old"), "{dead:#?}");
    let ids: HashSet<&str> = dead.iter().filter_map(|v| v["event_id"].as_str()).collect();
    assert_eq!(ids.len(), n);
    eventually("the outbox drained", || async {
        d.metric("webhookd_outbox_waiting_deliveries").await == 0.0
            && d.metric("webhookd_outbox_ready_deliveries").await == 0.0
    })
    .await;
    d.stop().await;
}
