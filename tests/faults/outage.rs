//! Outages: the broker, an endpoint, the disk under the store.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bed::*;
use crate::helpers::{Kafka, free_port, http_get};

fn events(prefix: &str, range: std::ops::Range<usize>) -> (HashSet<String>, Vec<Vec<u8>>) {
    let ids: Vec<String> = range.clone().map(|i| format!("{prefix}_{i}")).collect();
    let payloads = ids.iter().zip(range).map(|(id, i)| event(id, i)).collect();
    (ids.into_iter().collect(), payloads)
}

/// Polls `/readyz` until its status is `want`; returns the body.
async fn readyz_becomes(w: &Webhookd, want: u16, within: Duration) -> String {
    match readyz_within(w, want, within).await {
        Some(body) => body,
        None => panic!("/readyz did not become {want} within {within:?}: {:?}", http_get(w.admin, "/readyz").await),
    }
}

async fn readyz_within(w: &Webhookd, want: u16, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(w.admin, "/readyz").await;
        if status == want {
            return Some(body);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_keeps_the_outbox_flowing_and_recovers_without_help() {
    // This one needs a broker it can stop: always a tansu process.
    let mut tansu = Tansu::start(free_port()).await;
    let kafka = Kafka::connect(&tansu.bootstrap);
    let topic = kafka.topic("outage", 4).await;
    let a = Ledger::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A rate limit makes a backlog: the outbox holds what the broker gave.
    let endpoints = format!(
        "[[endpoints]]\nid = \"a\"\nurl = \"http://127.0.0.1:{}/a\"\nsecrets = [\"{}\"]\nrate_limit = {{ per_second = 400 }}\n",
        a.port,
        crate::helpers::SECRET_A
    );
    let config = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db"), "", &endpoints);
    let mut w = Webhookd::start(&config).await;
    w.ready().await;
    let (mut ids, first) = events("before", 0..4000);
    kafka.produce_all(&topic, &first).await;
    let deadline = Instant::now() + LONG;
    while w.metric("webhookd_events_consumed_total").await < 4000.0 {
        assert!(Instant::now() < deadline, "the first events were not consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tansu.stop();
    let stopped = Instant::now();
    let at_stop = a.delivered();
    let not_ready = readyz_becomes(&w, 503, Duration::from_secs(30)).await;
    assert!(not_ready.contains("kafka"), "{not_ready}");
    let noticed = stopped.elapsed();
    // The outbox keeps draining with the broker gone.
    let deadline = Instant::now() + LONG;
    while a.delivered() < at_stop + 400 {
        assert!(Instant::now() < deadline, "deliveries stopped with the broker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = a.delivered() - at_stop;
    let down_for = stopped.elapsed();

    // The broker comes back empty (memory storage): the topics are created
    // again, as an operator's tooling would; webhookd reconnects by itself.
    tansu.restart().await;
    let back = Instant::now();
    kafka.create(&topic, 4).await;
    kafka.create(&format!("{topic}.dlq"), 1).await;
    readyz_becomes(&w, 200, Duration::from_secs(60)).await;
    let ready_again = back.elapsed();
    let (later_ids, later) = events("after", 0..400);
    kafka.produce_all(&topic, &later).await;
    ids.extend(later_ids);
    let (t, _) = settle_everything(&kafka, &topic, &ids, &[("a", &a)]).await;
    assert!(w.terminate(Duration::from_secs(30)).await.0.success());
    println!(
        "broker outage of {:.1} s: not ready after {:.1} s; {during} deliveries made from the outbox while it was \
         down; ready again {:.1} s after it returned; {} events, delivered {}, missing {}, duplicates {}",
        down_for.as_secs_f64(),
        noticed.as_secs_f64(),
        ready_again.as_secs_f64(),
        ids.len(),
        t.delivered,
        t.missing.len(),
        t.duplicates
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_for_a_long_stretch_parks_its_deliveries_and_drains_when_back() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("endpoint-down", 4).await;
    let (healthy, down) = (Ledger::ok().await, Ledger::ok().await);
    down.go_down(503);
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("healthy", healthy.port) + &endpoint("down", down.port);
    // Retries an hour apart: once the endpoint is back, the backlog drains at
    // full speed only because its parked retries are recalled.
    let retry = "[retry]\nbase = \"1h\"\ncap = \"2h\"\nmax_attempts = 100000\n";
    let config =
        write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db"), "", &endpoints).to_path_buf();
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("[retry]\nbase = \"100ms\"\ncap = \"500ms\"\nmax_attempts = 1000\n", retry))
        .expect("config");
    let mut w = Webhookd::start(&config).await;
    w.ready().await;
    let start_rss = w.rss_mib();
    let n = 30_000;
    let (ids, payloads) = events("evt", 0..n);
    let started = Instant::now();
    let mut rss_samples = Vec::new();
    for chunk in payloads.chunks(n / 3) {
        kafka.produce_all(&topic, chunk).await;
        rss_samples.push(w.rss_mib());
    }
    healthy.wait_delivered("the healthy endpoint, while the other is down", n).await;
    let healthy_took = started.elapsed();
    // Everything for the down endpoint is parked in the retry schedule, not in memory.
    let deadline = Instant::now() + LONG;
    while w.metric("webhookd_outbox_waiting_deliveries").await < (n as f64) * 0.9 {
        assert!(Instant::now() < deadline, "deliveries to the down endpoint were not parked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let parked = w.metric("webhookd_outbox_waiting_deliveries").await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_samples.push(w.rss_mib());
    }
    let attempts_while_down = down.requests();
    assert_eq!(down.delivered(), 0);

    down.recover();
    let recovered = Instant::now();
    down.wait_delivered("the endpoint after it came back", n).await;
    let drained = recovered.elapsed();
    let recalled = w.metric("webhookd_retries_recalled_total{endpoint=\"down\"}").await;
    let peak = w.peak_rss_mib();
    let (t, _) = settle_everything(&kafka, &topic, &ids, &[("healthy", &healthy), ("down", &down)]).await;
    assert!(w.terminate(Duration::from_secs(30)).await.0.success());
    println!(
        "endpoint down while {n} events arrived: the healthy endpoint got all {n} in {:.1} s; {parked} deliveries \
         parked ({attempts_while_down} attempts refused); RSS {start_rss:.0} MiB at start, samples {:?} MiB, peak \
         {peak:.0} MiB; drained {n} in {:.1} s ({:.0}/s, {recalled} recalled) once it returned; missing {}, \
         duplicates {}",
        healthy_took.as_secs_f64(),
        rss_samples.iter().map(|r| r.round()).collect::<Vec<_>>(),
        drained.as_secs_f64(),
        n as f64 / drained.as_secs_f64(),
        t.missing.len(),
        t.duplicates
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
    assert!(recalled >= n as f64 * 0.9, "only {recalled} of {n} parked retries were recalled");
    assert!(peak < 200.0, "peak RSS {peak:.0} MiB: memory grows with the parked backlog");
}

/// A small tmpfs for the store, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &at.display().to_string()])
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "mounting a tmpfs failed: this test needs root (CI and scripts/test run as root)");
        SmallDisk { path: at.to_path_buf() }
    }

    fn remount(&self, mode: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{mode}"), &self.path.display().to_string()])
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "remount {mode} failed");
    }
}

/// Fills the filesystem under `dir` with a new file, leaving almost nothing free.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join(format!("filler-{}", crate::helpers::unique()));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"])
        .stderr(std::process::Stdio::null())
        .status();
    filler
}

/// Keeps a disk full until dropped, then frees what it took.
struct Topper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<PathBuf>>>,
}

impl SmallDisk {
    fn keep_full(&self) -> Topper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, dir) = (stop.clone(), self.path.clone());
        let thread = std::thread::spawn(move || {
            let mut files = Vec::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                files.push(fill(&dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            files
        });
        Topper { stop, thread: Some(thread) }
    }
}

impl Drop for Topper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            for f in t.join().unwrap_or_default() {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.path.display().to_string()]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_or_full_disk_stops_consumption_and_loses_nothing() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("disk", 2).await;
    let a = Ledger::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(&dir.path().join("disk"), "64m");
    let store = disk.path.join("db");
    let config = write_config(dir.path(), &kafka.bootstrap, &topic, &store, "", &endpoint("a", a.port));

    // Unwritable at start (Linux refuses to make a filesystem read-only while
    // files on it are open for writing, so this is the unwritable case).
    disk.remount("ro");
    let (code, output) = run_to_exit(&config, Duration::from_secs(60));
    assert_eq!(code, Some(1), "webhookd must refuse to start:\n{output}");
    let error = output.lines().find(|l| l.starts_with("webhookd: ")).unwrap_or_default().to_owned();
    assert!(error.contains("store") && error.contains(&store.display().to_string()), "unclear error: {output}");
    assert!(error.contains("Read-only file system"), "unclear error: {error}");
    disk.remount("rw");

    let mut w = Webhookd::start(&config).await;
    w.ready().await;
    let (mut ids, first) = events("ok", 0..200);
    kafka.produce_all(&topic, &first).await;
    a.wait_delivered("before the disk fills", 200).await;
    let group = format!("{topic}-group");
    let deadline = Instant::now() + LONG;
    while committed_total(&kafka, &group, &topic, 2).await < 200 {
        assert!(Instant::now() < deadline, "the first events' offsets were not committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (delivered_before, committed_before) = (a.delivered(), committed_total(&kafka, &group, &topic, 2).await);
    assert_eq!(delivered_before, 200);

    // Full at run time. RocksDB frees space as it flushes and drops old log
    // files, so a topper keeps taking whatever becomes free; events go on
    // arriving until a write fails.
    let topper = disk.keep_full();
    let mut produced_full = 0;
    let body = loop {
        // Large events, so RocksDB's preallocated log and memtable fill in a few rounds.
        let (more_ids, more) = events(&format!("full{produced_full}"), 0..300);
        let more: Vec<Vec<u8>> = more
            .into_iter()
            .map(|e| {
                let mut v: serde_json::Value = serde_json::from_slice(&e).expect("json");
                v["data"]["blob"] = "b".repeat(48 * 1024).into();
                v.to_string().into_bytes()
            })
            .collect();
        kafka.produce_all(&topic, &more).await;
        ids.extend(more_ids);
        produced_full += 300;
        if let Some(body) = readyz_within(&w, 503, Duration::from_secs(2)).await {
            break body;
        }
        assert!(produced_full < 30_000, "the store never failed with the disk full");
    };
    assert!(body.contains("\"store\":false"), "{body}");
    let log = w.log_text();
    let logged = log.lines().find(|l| l.contains("store write failed")).unwrap_or("").to_owned();
    assert!(logged.contains("No space left on device"), "no clear error in the log ({produced_full} produced):\n{log}");
    // These arrive while the disk stays full: they must wait, not vanish, and
    // no offset may move past them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (held_ids, held) = events("held", 0..300);
    kafka.produce_all(&topic, &held).await;
    ids.extend(held_ids.iter().cloned());
    let mut samples = Vec::new();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        samples.push((a.delivered(), committed_total(&kafka, &group, &topic, 2).await));
    }
    let last = &samples[samples.len() - 8..];
    assert!(last.iter().all(|s| *s == last[0]), "consumption went on with the disk full: {samples:?}");
    let (delivered_during, committed_during) = last[0];
    let entries = a.entries();
    let held_through = held_ids.iter().filter(|id| entries.contains_key(&webhookd::event::webhook_id(id, "a"))).count();
    assert!(held_through < held_ids.len(), "nothing was held while the disk was full");

    // Space comes back; webhookd carries on by itself.
    drop(topper);
    let freed = Instant::now();
    readyz_becomes(&w, 200, Duration::from_secs(60)).await;
    let recovered = freed.elapsed();
    let (t, _) = settle_everything(&kafka, &topic, &ids, &[("a", &a)]).await;
    assert!(w.terminate(Duration::from_secs(30)).await.0.success());
    println!(
        "disk trouble: read-only store at start -> exit 1 with {error:?}; disk full at run time -> not ready, \
         delivered held at {delivered_during} and committed offsets at {committed_during} (before: {delivered_before} \
         and {committed_before}; {produced_full} produced until a write failed, {held_through} of the 300 sent \
         while it stayed full got through), logged {logged}; \
         ready again {:.1} s after space was freed; {} events, delivered {}, missing {}, duplicates {}",
        recovered.as_secs_f64(),
        ids.len(),
        t.delivered,
        t.missing.len(),
        t.duplicates
    );
    assert!(t.missing.is_empty(), "lost: {:?}", &t.missing[..t.missing.len().min(10)]);
}

/// Runs webhookd until it exits by itself; its exit code and output.
fn run_to_exit(config: &Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(webhookd_bin())
        .args(["run", "--config", &config.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn webhookd");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("webhookd did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (status.code(), text)
}

async fn committed_total(kafka: &Kafka, group: &str, topic: &str, partitions: i32) -> i64 {
    let mut total = 0;
    for p in 0..partitions {
        total += kafka.committed(group, topic, p).await.max(0);
    }
    total
}
