//! Guarantee 6, end to end: the SSRF guard, TLS, secrets that never leak, and
//! signatures checked by code nobody here wrote.

use std::collections::HashSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::helpers::*;

/// What `config()` allows by default; tests that exercise the guard replace it.
const LOOPBACK_ALLOWED: &str = "allow_networks = [\"127.0.0.0/8\", \"::1/128\"]";

fn whsec(seed: u8) -> String {
    format!("whsec_{}", B64.encode([seed; 32]))
}

fn in_an_hour() -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    t.format(&time::format_description::well_known::Rfc3339).expect("format")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_destination_is_dead_lettered_with_its_reason_and_never_contacted() {
    let kafka = Kafka::start();
    let topic = kafka.topic("ssrf", 1).await;
    // 127.0.0.2 plays a public receiver (allow-listed); localhost resolves to
    // loopback addresses that are not, and a receiver listens there.
    let public = Receiver::start_on("127.0.0.2:0", None, Receiver::ok()).await;
    let internal = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints = endpoint("public", &public.url("/"), "")
        + &endpoint("internal", &format!("http://localhost:{}/admin", internal.addr.port()), "");
    let toml = config(&kafka, &topic, &dir.path().join("db"), FAST_RETRY, &endpoints)
        .replace(LOOPBACK_ALLOWED, "allow_networks = [\"127.0.0.2/32\"]");
    let d = Daemon::start(&toml).await;
    kafka.produce(&topic, None, &event("evt_ssrf", "ContactCreate")).await;

    assert_eq!(public.wait_for(1).await[0].event_id(), "evt_ssrf");
    let dead = kafka.read(&format!("{topic}.dlq"), 1, 1).await.remove(0);
    assert_eq!(dead["reason"], "destination_refused");
    assert_eq!(dead["endpoint_id"], "internal");
    assert_eq!(dead["attempts"], 1, "a refused destination is permanent, not retried");
    let why = dead["last_error"].as_str().expect("last_error");
    assert!(why.contains("localhost") && why.contains("loopback") && why.contains("allow_networks"), "{why}");
    assert!(internal.hits().is_empty(), "the internal receiver was contacted");
    assert_eq!(d.metric("webhookd_dead_letters_total{reason=\"destination_refused\"}").await, 1.0);
    d.stop().await;
}

/// A CA, and a TLS acceptor with a certificate it signed for `names`.
fn tls_receiver_parts(dir: &std::path::Path, names: &[&str]) -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "webhookd test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(server)), ca_path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_trusts_an_extra_ca_bundle_and_refuses_an_unknown_issuer() {
    let kafka = Kafka::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (acceptor, ca_file) = tls_receiver_parts(dir.path(), &["localhost"]);
    let rx = Receiver::start_on("127.0.0.1:0", Some(acceptor), Receiver::ok()).await;
    let url = format!("https://localhost:{}/secure", rx.addr.port());

    // With the private CA trusted (and HTTPS-only on): delivered over TLS.
    let topic = kafka.topic("tls-trusted", 1).await;
    let toml = config(&kafka, &topic, &dir.path().join("db1"), FAST_RETRY, &endpoint("tls", &url, ""))
        .replace("[delivery]\n", &format!("[delivery]\nhttps_only = true\nextra_ca_file = \"{ca_file}\"\n"));
    let d = Daemon::start(&toml).await;
    kafka.produce(&topic, None, &event("evt_tls", "ContactCreate")).await;
    let hit = rx.wait_for(1).await.remove(0);
    assert_eq!((hit.path.as_str(), hit.event_id().as_str()), ("/secure", "evt_tls"));
    d.stop().await;

    // Without it, the certificate is not trusted: every attempt fails the
    // handshake (retried, as the outcome table says for TLS errors) and nothing
    // reaches the receiver.
    let topic = kafka.topic("tls-untrusted", 1).await;
    let retry = "base = \"50ms\"\ncap = \"100ms\"\nmax_attempts = 2";
    let toml = config(&kafka, &topic, &dir.path().join("db2"), retry, &endpoint("tls", &url, ""));
    let d = Daemon::start(&toml).await;
    kafka.produce(&topic, None, &event("evt_untrusted", "ContactCreate")).await;
    let dead = kafka.read(&format!("{topic}.dlq"), 1, 1).await.remove(0);
    assert_eq!((dead["reason"].as_str(), dead["attempts"].as_u64()), (Some("exhausted"), Some(2)));
    let why = dead["last_error"].as_str().expect("last_error");
    assert!(why.contains("certificate") && why.contains("UnknownIssuer"), "{why}");
    assert_eq!(rx.hits().len(), 1, "the untrusted daemon's requests never arrived");
    d.stop().await;
}

/// The Python receiver of tests/python, killed when dropped.
struct PyReceiver {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PyReceiver {
    fn start(expectations: &serde_json::Value, dir: &std::path::Path) -> PyReceiver {
        let python =
            std::env::var("WEBHOOKD_TEST_PYTHON").unwrap_or_else(|_| "/var/tmp/webhookd-venv/bin/python".into());
        let spec = dir.join("expectations.json");
        std::fs::write(&spec, expectations.to_string()).expect("write expectations");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/verify_receiver.py");
        let mut child = Command::new(&python)
            .arg(script)
            .arg(&spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} ({e}): run ./scripts/setup, which prepares it"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines.recv_timeout(WAIT).expect("the Python receiver starts (is standardwebhooks installed?)");
        let port = first.strip_prefix("listening ").and_then(|p| p.parse().ok()).expect("listening <port>");
        PyReceiver { child, port, lines }
    }

    /// The verdicts of the next `n` requests.
    fn verdicts(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        (0..n)
            .map(|i| {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("only {i} of {n} verdicts"));
                serde_json::from_str(&line).expect("a JSON verdict")
            })
            .collect()
    }
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_the_official_standard_webhooks_library_through_a_rotation() {
    let kafka = Kafka::start();
    let topic = kafka.topic("stdwebhooks", 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new, stranger) = (whsec(1), whsec(2), whsec(3));
    // Three stages of one rotation: before it, during it (the old secret kept,
    // read from a mounted file, expiring in an hour), after the old one expired.
    let expectations = serde_json::json!({
        "/before": { "must_verify": [old], "must_not_verify": [new, stranger], "signatures": 1, "legacy": null },
        "/during": { "must_verify": [new, old], "must_not_verify": [stranger], "signatures": 2, "legacy": new },
        "/after": { "must_verify": [new], "must_not_verify": [old, stranger], "signatures": 1, "legacy": null },
    });
    let py = PyReceiver::start(&expectations, dir.path());
    let old_file = dir.path().join("old-secret");
    std::fs::write(&old_file, format!("{old}\n")).expect("write secret file");
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", py.port);
    let endpoints = format!(
        "[[endpoints]]\nid = \"before\"\nurl = \"{}\"\nsecrets = [\"{old}\"]\n\
         [[endpoints]]\nid = \"during\"\nurl = \"{}\"\nlegacy_hmac_header = true\n\
         secrets = [\"{new}\", {{ file = \"{}\", expires = \"{}\" }}]\n\
         [[endpoints]]\nid = \"after\"\nurl = \"{}\"\n\
         secrets = [{{ value = \"{new}\" }}, {{ value = \"{old}\", expires = 2020-01-01T00:00:00Z }}]\n",
        url("/before"),
        url("/during"),
        old_file.display(),
        in_an_hour(),
        url("/after"),
    );
    let retry = "max_attempts = 1";
    let d = Daemon::start(&config(&kafka, &topic, &dir.path().join("db"), retry, &endpoints)).await;
    let n = 20;
    for i in 0..n {
        kafka.produce(&topic, None, &event(&format!("evt_sig{i}"), "ContactCreate")).await;
    }
    let verdicts = py.verdicts(3 * n);
    let failed: Vec<_> = verdicts.iter().filter(|v| v["ok"] != true).collect();
    assert!(failed.is_empty(), "the Standard Webhooks library rejected deliveries: {failed:#?}");
    for path in ["/before", "/during", "/after"] {
        let ids: HashSet<_> = verdicts.iter().filter(|v| v["path"] == path).map(|v| v["webhook_id"].clone()).collect();
        assert_eq!(ids.len(), n, "{path}: every event verified once");
    }
    println!("standardwebhooks 1.1.0 verified {} deliveries across the rotation; legacy hmac on /during", 3 * n);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_errors_or_dead_letters_at_the_most_verbose_level() {
    let kafka = Kafka::start();
    let topic = kafka.topic("leaks", 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let u = unique();
    let (from_env, from_file, inline) = (whsec(11), whsec(12), whsec(13));
    let (password, token, api_key) = (format!("pa55-{u}"), format!("tok-{u}"), format!("api-key-{u}-0123456789"));
    let basic = B64.encode(format!("hook-user:{password}"));
    let secret_file = dir.path().join("previous");
    std::fs::write(&secret_file, &from_file).expect("write secret");

    // The first attempt of each event fails (so failures are logged), then one
    // event is rejected (dead-lettered) and the others delivered, over TLS (so
    // rustls logs at trace level too, and the URL's credentials may be sent).
    let (acceptor, ca_file) = tls_receiver_parts(dir.path(), &["127.0.0.2"]);
    let rx = Receiver::start_on("127.0.0.2:0", Some(acceptor), |h: &Hit| {
        Reply::status(match h.attempt {
            1 => 503,
            _ if h.event_id().ends_with("rejected") => 400,
            _ => 200,
        })
    })
    .await;
    let internal = Receiver::start(Receiver::ok()).await;
    let endpoints = format!(
        "[[endpoints]]\nid = \"signed\"\nurl = \"https://hook-user:{password}@127.0.0.2:{}/in?token={token}&tenant=7\"\n\
         legacy_hmac_header = true\n\
         secrets = [{{ env = \"LEAK_TEST_SECRET\" }}, {{ file = \"{}\", expires = \"{}\" }}, {{ value = \"{inline}\", expires = \"{}\" }}]\n\
         [[endpoints]]\nid = \"internal\"\nurl = \"http://localhost:{}/?api_key={token}\"\nsecrets = [\"{inline}\"]\n",
        rx.addr.port(),
        secret_file.display(),
        in_an_hour(),
        in_an_hour(),
        internal.addr.port(),
    );
    let toml = config(&kafka, &topic, &dir.path().join("db"), FAST_RETRY, &endpoints)
        .replace(LOOPBACK_ALLOWED, &format!("allow_networks = [\"127.0.0.2/32\"]\nextra_ca_file = \"{ca_file}\""))
        .replace("[admin]\n", "[admin]\napi_key = { env = \"WEBHOOKD_API_KEY\" }\n");
    let path = write_config(dir.path(), &toml);
    let env =
        [("WEBHOOKD_LOG", "trace"), ("LEAK_TEST_SECRET", from_env.as_str()), ("WEBHOOKD_API_KEY", api_key.as_str())];
    let mut p = Proc::spawn_with_env(&["run", "--config", &path], &env);

    let mut log = Vec::new();
    let deadline = Instant::now() + WAIT;
    let admin: std::net::SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p.lines.recv_timeout(left).unwrap_or_else(|_| panic!("webhookd did not start:\n{}", log.join("\n")));
        let admin =
            serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["admin"].as_str()?.parse().ok());
        log.push(line);
        if let Some(a) = admin {
            break a;
        }
    };
    for id in ["evt_leak1", "evt_leak2", "evt_rejected"] {
        kafka.produce(&topic, None, &event(id, "ContactCreate")).await;
    }
    let hits = rx.wait_until("two delivered, one rejected", |h| h.iter().filter(|h| h.attempt == 2).count() == 3).await;
    assert!(hits.iter().all(|h| h.header("authorization") == format!("Basic {basic}")), "URL credentials are sent");
    assert!(hits.iter().all(|h| h.path == "/in"), "and the path and query kept");
    assert!(hits.iter().all(|h| h.header("webhook-signature").split(' ').count() == 3), "three active secrets sign");
    let dead = kafka.read(&format!("{topic}.dlq"), 1, 4).await;
    assert_eq!(dead.iter().filter(|d| d["reason"] == "destination_refused").count(), 3);
    assert!(internal.hits().is_empty());
    let mut scraped = String::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        scraped.push_str(&http_get(admin, path).await.1);
    }
    // The management API, used with the key: its answers and the daemon's log stay clean.
    let listed = Command::new(env!("CARGO_BIN_EXE_webhookd"))
        .args(["dead-letters", "list", "--json", "--admin", &format!("http://{admin}")])
        .env("WEBHOOKD_API_KEY", &api_key)
        .output()
        .expect("webhookd dead-letters list");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    scraped.push_str(&String::from_utf8_lossy(&listed.stdout));
    p.signal("-TERM");
    assert!(p.wait_exit(WAIT).await.success());
    log.extend(p.lines.try_iter());
    let check = Command::new(env!("CARGO_BIN_EXE_webhookd"))
        .args(["check", "--config", &path])
        .env("WEBHOOKD_API_KEY", &api_key)
        .env("LEAK_TEST_SECRET", &from_env)
        .output()
        .expect("webhookd check");
    let broken = Command::new(env!("CARGO_BIN_EXE_webhookd"))
        .args(["check", "--config", &path])
        .env("WEBHOOKD_API_KEY", &api_key)
        .env("LEAK_TEST_SECRET", format!("{from_env}!"))
        .output()
        .expect("webhookd check");
    assert!(!broken.status.success(), "a malformed secret is refused");

    let log = log.join("\n");
    assert!(log.contains("\"level\":\"TRACE\""), "the most verbose level was in effect");
    assert!(log.contains("rustls::"), "the TLS library's own logs were included");
    assert!(log.contains("destination_refused") && log.contains("loopback"), "the refusal is logged with its reason");
    let everything = [
        log.as_str(),
        &scraped,
        &serde_json::to_string(&dead).expect("json"),
        &String::from_utf8_lossy(&check.stdout),
        &String::from_utf8_lossy(&check.stderr),
        &String::from_utf8_lossy(&broken.stdout),
        &String::from_utf8_lossy(&broken.stderr),
    ]
    .join("\n");
    let b64_of = |s: &str| s.trim_start_matches("whsec_").to_owned();
    let secrets = [
        from_env.clone(),
        b64_of(&from_env),
        from_file.clone(),
        b64_of(&from_file),
        inline.clone(),
        b64_of(&inline),
        password.clone(),
        token.clone(),
        basic.clone(),
        api_key.clone(),
    ];
    for s in &secrets {
        assert!(!everything.contains(s.as_str()), "a secret ({}…) appeared in the output", &s[..8]);
    }
    println!(
        "{} log lines at trace level, {} bytes scraped: none of {} secrets appeared",
        log.lines().count(),
        scraped.len(),
        secrets.len()
    );
    // The signatures were really made with the secrets: one checks out.
    let h = &hits[0];
    let expected = webhookd::deliver::sign::signature_header(
        [&webhookd::deliver::sign::SigningSecret::parse(&from_env).expect("secret")],
        &h.webhook_id,
        h.header("webhook-timestamp").parse().expect("timestamp"),
        &h.body,
    );
    assert!(h.header("webhook-signature").split(' ').any(|s| s == expected));
}
