//! What operators touch: the metrics as promtool and a real Prometheus see
//! them, the dead-letter and endpoint commands, and the per-attempt logs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::helpers::*;

const API_KEY: &str = "test-api-key-0123456789";

/// The catalogue as deploy/metrics.txt lists it (name and type), which the
/// alerts and the dashboard are checked against by scripts/check-deploy.
fn catalogue() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/metrics.txt")).expect("read");
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(str::to_owned).collect()
}

/// A tool the suite needs; scripts/setup installs it, `WEBHOOKD_TEST_<NAME>` may point elsewhere.
fn tool(name: &str) -> String {
    std::env::var(format!("WEBHOOKD_TEST_{}", name.to_ascii_uppercase())).unwrap_or_else(|_| name.to_owned())
}

/// Kills the child when the test ends, passed or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_webhookd"))
            .args(&args)
            .env_remove("WEBHOOKD_API_KEY")
            .env_remove("WEBHOOKD_ADMIN_URL")
            .output()
            .expect("run webhookd")
    })
    .await
    .expect("join")
}

/// `webhookd <args> --admin … --api-key …`; asserts it succeeds and returns stdout.
async fn manage(admin: SocketAddr, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--admin".into(), format!("http://{admin}"), "--api-key".into(), API_KEY.into()]);
    let out = run(all).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "webhookd {args:?}: {:?}\n{stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect()
}

async fn prometheus_query(port: u16, query: &str) -> Option<f64> {
    let path = format!(
        "/api/v1/query?query={}",
        percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC)
    );
    // Prometheus may not be listening yet: that is "no answer", not a failure.
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (status, body) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), &path).await;
    if status != 200 {
        return None;
    }
    // Prometheus answers with chunked encoding here; the JSON is on one line.
    let json = body.lines().find(|l| l.starts_with('{'))?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_stay_bounded_and_a_real_prometheus_scrapes_them() {
    let kafka = Kafka::start();
    let topic = kafka.topic("metrics", 2).await;
    let ok = Receiver::start(Receiver::ok()).await;
    let reject = Receiver::start(|_: &Hit| Reply::status(400)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Two endpoints, a label limit of one: "b" must show up only as "_other".
    let endpoints = endpoint("a", &ok.url("/"), "") + &endpoint("b", &reject.url("/"), "");
    let toml = config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoints)
        .replace("[admin]\n", "[admin]\nendpoint_label_limit = 1\n");
    let d = Daemon::start(&toml).await;
    for i in 0..20 {
        kafka.produce(&topic, Some(i % 2), &event(&format!("evt_p{i}"), "ContactCreate")).await;
    }
    kafka.produce(&topic, Some(0), b"{ not json").await;
    ok.wait_for(20).await;
    reject.wait_for(20).await;
    eventually("dead letters counted and the lag of both partitions reported", || async {
        let text = d.get("/metrics").await.1;
        metric_value(&text, "webhookd_dead_letters_total{reason=\"rejected\"}") == 20.0
            && text.matches("webhookd_consumer_lag_messages{").count() == 2
            && metric_value(&text, "webhookd_offset_commits_total{result=\"ok\"}") > 0.0
    })
    .await;
    let (_, text) = d.get("/metrics").await;
    // Exactly the documented catalogue, each family with a help text.
    let mut exported: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE webhookd_").map(|rest| format!("webhookd_{rest}")))
        .collect();
    exported.sort();
    assert_eq!(exported, catalogue(), "/metrics and deploy/metrics.txt disagree");
    for line in &exported {
        let name = line.split(' ').next().unwrap_or_default();
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help text");
    }
    assert!(text.contains("endpoint=\"_other\""), "endpoints past the limit share a label");
    assert!(!text.contains("endpoint=\"b\""), "no series of its own past the limit");
    assert_eq!(metric_value(&text, "webhookd_deliveries_total{endpoint=\"_other\",outcome=\"dead_letter\"}"), 20.0);
    assert_eq!(metric_value(&text, "webhookd_endpoints{state=\"enabled\"}"), 2.0);
    assert_eq!(metric_value(&text, "webhookd_partitions_assigned"), 2.0);
    assert_eq!(metric_value(&text, "webhookd_ready"), 1.0);
    assert_eq!(metric_value(&text, "webhookd_events_invalid_total{reason=\"invalid_json\"}"), 1.0);
    assert_eq!(metric_value(&text, "webhookd_delivery_latency_seconds_count{endpoint=\"a\"}"), 20.0);

    // promtool's lint: names, units, suffixes, help texts.
    let promtool = tool("promtool");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{promtool}: {e} (scripts/setup installs the Debian package prometheus)"));
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
    println!("promtool check metrics: clean ({} lines, {} families)", text.lines().count(), exported.len());

    // A real Prometheus scrapes the daemon and answers a query about it.
    let port = free_port();
    let prom_dir = tempfile::tempdir().expect("tempdir");
    let cfg = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: webhookd\n    static_configs:\n      - targets: ['{}']\n", d.admin),
    )
    .expect("write");
    let prometheus = tool("prometheus");
    let _prom = Reaped(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{prometheus}: {e} (scripts/setup installs the Debian package prometheus)")),
    );
    let query = "sum(webhookd_deliveries_total{job=\"webhookd\",outcome=\"delivered\"})";
    eventually("Prometheus to scrape webhookd", || async { prometheus_query(port, query).await.is_some() }).await;
    assert_eq!(prometheus_query(port, query).await, Some(20.0), "{query}");
    assert_eq!(prometheus_query(port, "up{job=\"webhookd\"}").await, Some(1.0));
    println!("Prometheus {prometheus} on 127.0.0.1:{port}: {query} = 20");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_once_and_a_gone_endpoint_is_re_enabled() {
    let kafka = Kafka::start();
    let topic = kafka.topic("replay", 1).await;
    // "a" rejects events until told otherwise; "g" answers 410 Gone.
    let a = Receiver::start(|_: &Hit| Reply::status(422)).await;
    let g = Receiver::start(|_: &Hit| Reply::status(410)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("a", &a.url("/"), "event_types = [\"Contact*\"]")
        + &endpoint("g", &g.url("/"), "event_types = [\"Invoice*\"]");
    let toml = config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoints)
        .replace("[admin]\n", &format!("[admin]\napi_key = \"{API_KEY}\"\n"));
    let d = Daemon::start(&toml).await;
    for i in 0..3 {
        kafka.produce(&topic, None, &event(&format!("evt_r{i}"), "ContactCreate")).await;
    }
    kafka.produce(&topic, None, &event("evt_inv", "InvoicePaid")).await;
    kafka.read(&format!("{topic}.dlq"), 1, 4).await;
    let first: Vec<Hit> = a.wait_for(3).await;

    // Listed, filtered by endpoint and reason, as JSON lines and as a table.
    eventually("four dead letters in the local index", || async {
        json_lines(&manage(d.admin, &["dead-letters", "list", "--json"]).await).len() == 4
    })
    .await;
    let a_rejected = json_lines(
        &manage(d.admin, &["dead-letters", "list", "--json", "--endpoint", "a", "--reason", "rejected"]).await,
    );
    assert_eq!(a_rejected.len(), 3, "{a_rejected:#?}");
    assert!(a_rejected.iter().all(|l| l["record"]["last_status"] == 422 && l["record"]["attempts"] == 1));
    let since_later = manage(d.admin, &["dead-letters", "list", "--json", "--since", "2099-01-01T00:00:00Z"]).await;
    assert!(since_later.is_empty(), "nothing dead-lettered after 2099");
    let recent = json_lines(&manage(d.admin, &["dead-letters", "list", "--json", "--since", "10m"]).await);
    assert_eq!(recent.len(), 4, "a duration means that long ago");
    let table = manage(d.admin, &["dead-letters", "list", "--reason", "gone"]).await;
    assert!(table.contains("evt_inv") && table.contains("410"), "{table}");
    let ids: Vec<String> = a_rejected.iter().map(|l| l["id"].as_str().expect("id").to_owned()).collect();

    // Replay two of a's three once a is healthy: delivered again, same webhook-id, despite dedup.
    a.set_behaviour(Receiver::ok());
    let out = manage(d.admin, &["dead-letters", "replay", "--id", &ids[0], "--id", &ids[1]]).await;
    assert_eq!(out.lines().filter(|l| l.starts_with("replayed ")).count(), 2, "{out}");
    let hits = a.wait_until("the two replays delivered", |h| h.len() >= 5).await;
    let replayed: Vec<&Hit> = hits[3..].iter().collect();
    let want: HashSet<String> =
        a_rejected[..2].iter().map(|l| l["record"]["event_id"].as_str().expect("event id").to_owned()).collect();
    assert_eq!(replayed.iter().map(|h| h.event_id()).collect::<HashSet<_>>(), want);
    for h in &replayed {
        let original = first.iter().find(|f| f.event_id() == h.event_id()).expect("first attempt");
        assert_eq!(h.header("webhook-id"), original.header("webhook-id"), "the same message, sent again");
    }
    // Once: a second replay of the same id does nothing.
    let again = manage(d.admin, &["dead-letters", "replay", "--id", &ids[0]]).await;
    assert!(again.contains(&format!("skipped  {}: no such dead letter", ids[0])), "{again}");
    let left = json_lines(&manage(d.admin, &["dead-letters", "list", "--json", "--endpoint", "a"]).await);
    assert_eq!(left.iter().map(|l| l["id"].as_str().unwrap_or("")).collect::<Vec<_>>(), [ids[2].as_str()]);

    // g was disabled by its 410: replay waits for it to be enabled again.
    let endpoints_out = manage(d.admin, &["endpoints", "list"]).await;
    assert!(
        endpoints_out.lines().any(|l| l.starts_with("g ") && l.contains("disabled") && l.contains("gone (status 410)")),
        "{endpoints_out}"
    );
    let refused = manage(d.admin, &["dead-letters", "replay", "--endpoint", "g"]).await;
    assert!(refused.contains("is disabled: enable it first"), "{refused}");
    g.set_behaviour(Receiver::ok());
    assert_eq!(manage(d.admin, &["endpoints", "enable", "g"]).await.trim(), "endpoint g enabled");
    assert_eq!(d.metric("webhookd_endpoint_enabled{endpoint=\"g\"}").await, 1.0);
    let out = manage(d.admin, &["dead-letters", "replay", "--endpoint", "g", "--reason", "gone"]).await;
    assert_eq!(out.lines().filter(|l| l.starts_with("replayed ")).count(), 1, "{out}");
    kafka.produce(&topic, None, &event("evt_inv2", "InvoicePaid")).await;
    let g_hits = g.wait_until("the replay and a new event delivered to g", |h| h.len() >= 3).await;
    assert_eq!(
        g_hits[1..].iter().map(Hit::event_id).collect::<HashSet<_>>(),
        HashSet::from(["evt_inv".into(), "evt_inv2".into()])
    );
    assert_eq!(d.metric("webhookd_dead_letters_replayed_total").await, 3.0);

    // Bad requests get a clear error and change nothing.
    let wrong = run(vec![
        "dead-letters".into(),
        "list".into(),
        "--admin".into(),
        format!("http://{}", d.admin),
        "--api-key".into(),
        "wrong-key-0123456789".into(),
    ])
    .await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401: wrong API key"));
    let no_key = run(vec!["dead-letters".into(), "list".into(), "--admin".into(), format!("http://{}", d.admin)]).await;
    assert_eq!(no_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("no API key"));
    let nothing = run(vec!["dead-letters".into(), "replay".into(), "--api-key".into(), API_KEY.into()]).await;
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("say what to replay"));
    let args =
        ["dead-letters", "replay", "--id", "nope", "--api-key", API_KEY, "--admin", &format!("http://{}", d.admin)];
    let bad_id = run(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(bad_id.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad_id.stderr).contains("400: ids: bad dead-letter id \"nope\": expected <ms>-<seq>")
    );
    assert_eq!(d.get("/api/v1/dead-letters").await.0, 401, "the API needs the key");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_is_logged_in_a_span_with_its_status_and_duration() {
    let kafka = Kafka::start();
    let topic = kafka.topic("spans", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // write_config turns on JSON logs.
    let toml = config(&kafka, &topic, &dir.path().join("db"), FAST_RETRY, &endpoint("a", &rx.url("/"), ""));
    let path = write_config(dir.path(), &toml);
    let mut p = Proc::spawn_with_env(&["run", "--config", &path], &[("WEBHOOKD_LOG", "webhookd=debug")]);
    kafka.produce(&topic, None, &event("evt_span", "ContactCreate")).await;
    rx.wait_for(1).await;
    let line = loop {
        let line = p.lines.recv_timeout(WAIT).expect("an attempt log line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if v["message"] == "attempt finished" {
            break v;
        }
    };
    let span = &line["span"];
    assert_eq!((span["name"].as_str(), span["endpoint"].as_str()), (Some("attempt"), Some("a")), "{line}");
    assert_eq!((span["event_id"].as_str(), span["attempt"].as_u64()), (Some("evt_span"), Some(1)), "{line}");
    assert_eq!((span["status"].as_u64(), span["outcome"].as_str()), (Some(200), Some("delivered")), "{line}");
    assert!(span["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 5000.0), "{line}");
    p.signal("-TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}

/// The allocator's options are built into the binary (.cargo/config.toml);
/// jemalloc names any option it cannot take on stderr, at start-up, and
/// otherwise ignores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_starts_without_an_allocator_warning() {
    let out = run(vec!["--version".into()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "webhookd --version failed: {stderr}");
    assert!(!stderr.contains("<jemalloc>"), "jemalloc rejected a built-in option: {stderr}");
}
