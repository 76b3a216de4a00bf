//! A corpus of hostile messages, interleaved with valid events, through a
//! broker process into the release binary.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::bed::*;
use crate::helpers::http_get;

/// One hostile message: its value, its `event-type` header, the reason it must be dead-lettered with.
struct Bad {
    name: &'static str,
    value: Option<Vec<u8>>,
    event_type: Option<&'static str>,
    reason: &'static str,
}

fn corpus() -> Vec<Bad> {
    let valid_for = |id: &str| format!(r#"{{"id":"{id}","locationId":"loc_1","data":{{"n":1}}}}"#);
    let bad =
        |name, value: Vec<u8>, reason| Bad { name, value: Some(value), event_type: Some("ContactCreate"), reason };
    let truncated = valid_for("cut").into_bytes()[..20].to_vec();
    let deep = format!(r#"{{"id":"deep","d":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let huge_string = format!(r#"{{"id":"huge","data":"{}"}}"#, "x".repeat(2 << 20));
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    vec![
        bad("malformed JSON", br#"{"id": "m1", "data": {"#.to_vec(), "invalid_json"),
        bad("truncated JSON", truncated, "invalid_json"),
        bad("trailing garbage", br#"{"id":"t1"} {"id":"t2"}"#.to_vec(), "invalid_json"),
        bad("deep nesting (10,000 levels)", deep.into_bytes(), "too_deep"),
        bad("a 2 MiB string", huge_string.into_bytes(), "too_large"),
        bad("a 10 MiB message", vec![b' '; 10 << 20], "too_large"),
        bad("a 300-byte id", format!(r#"{{"id":"{}"}}"#, "i".repeat(300)).into_bytes(), "too_long"),
        bad("not UTF-8", b"{\"id\":\"\xff\xfe\"}".to_vec(), "not_utf8"),
        bad("binary garbage", garbage, "not_utf8"),
        bad("control characters", "\u{0}\u{1}\u{2}{".as_bytes().to_vec(), "invalid_json"),
        bad("an array", b"[1,2,3]".to_vec(), "not_an_object"),
        bad("a bare string", b"\"evt\"".to_vec(), "not_an_object"),
        bad("id of the wrong type", br#"{"id": 42}"#.to_vec(), "wrong_type"),
        bad("id an object", br#"{"id": {"a": 1}}"#.to_vec(), "wrong_type"),
        bad("empty id", br#"{"id": ""}"#.to_vec(), "empty_field"),
        bad("null id", br#"{"id": null}"#.to_vec(), "missing_field"),
        bad("no id", br#"{"data": {}}"#.to_vec(), "missing_field"),
        bad("duplicate id key", br#"{"id": "d1", "id": "d2"}"#.to_vec(), "duplicate_field"),
        bad("timestamp not RFC 3339", br#"{"id": "ts", "timestamp": "last tuesday"}"#.to_vec(), "bad_timestamp"),
        bad("empty value", Vec::new(), "empty"),
        Bad { name: "no value at all (tombstone)", value: None, event_type: Some("ContactCreate"), reason: "empty" },
        Bad {
            name: "type header without a value",
            value: Some(valid_for("nohdr").into_bytes()),
            event_type: None,
            reason: "bad_header",
        },
        Bad {
            name: "type header empty",
            value: Some(valid_for("emptyhdr").into_bytes()),
            event_type: Some(""),
            reason: "bad_header",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_with_their_reason_and_valid_ones_around_them_delivered() {
    let (_tansu, kafka) = broker().await;
    let topic = kafka.topic("hostile", 1).await;
    let a = Ledger::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The type comes from a header here, so headers without a value are in play.
    let extra = "[source.envelope]\ntype_header = \"event-type\"\n";
    let config = write_config(dir.path(), &kafka.bootstrap, &topic, &dir.path().join("db"), "", &endpoint("a", a.port));
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("[store]", &format!("{extra}[store]"))).expect("config");
    let mut w = Webhookd::start(&config).await;
    w.ready().await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("message.max.bytes", "12000000")
        .create()
        .expect("producer");
    let send = |value: Option<Vec<u8>>, event_type: Option<&'static str>| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let headers = OwnedHeaders::new().insert(Header { key: "event-type", value: event_type });
            let mut rec = FutureRecord::<(), Vec<u8>>::to(&topic).partition(0).headers(headers);
            if let Some(v) = &value {
                rec = rec.payload(v);
            }
            producer.send(rec, Duration::from_secs(30)).await.expect("produce").offset
        }
    };
    let mut valid = HashSet::new();
    let mut expected: HashMap<i64, (&str, &str)> = HashMap::new();
    let bad = corpus();
    for (i, b) in bad.iter().enumerate() {
        let id = format!("valid_{i}");
        send(Some(event(&id, i)), Some("ContactCreate")).await;
        valid.insert(id);
        let offset = send(b.value.clone(), b.event_type).await;
        expected.insert(offset, (b.name, b.reason));
    }
    valid.insert("valid_last".to_owned());
    send(Some(event("valid_last", 0)), Some("ContactCreate")).await;

    let n = expected.len();
    let dead = kafka.read(&format!("{topic}.dlq"), 1, n).await;
    let mut seen = HashMap::new();
    for d in &dead {
        let offset = d["source"]["offset"].as_i64().expect("source offset");
        let (name, reason) = expected.get(&offset).unwrap_or_else(|| panic!("unexpected dead letter: {d}"));
        assert_eq!(d["reason"], *reason, "{name}: {}", d["detail"]);
        assert!(d["detail"].as_str().is_some_and(|s| !s.is_empty()), "{name}: no detail");
        seen.insert(offset, format!("{name} -> {reason} ({})", d["detail"].as_str().unwrap_or("")));
    }
    assert_eq!(seen.len(), n, "every hostile message has its own dead letter");
    let (t, _) = settle_everything(&kafka, &topic, &valid, &[("a", &a)]).await;
    assert!(t.missing.is_empty(), "valid events lost: {:?}", t.missing);
    let (status, _) = http_get(w.admin, "/readyz").await;
    assert_eq!(status, 200, "still ready after the corpus");
    let invalid = w.metric("webhookd_events_invalid_total").await;
    assert_eq!(invalid, n as f64);
    let peak = w.peak_rss_mib();
    assert!(w.terminate(Duration::from_secs(30)).await.0.success());
    let mut lines: Vec<_> = seen.into_values().collect();
    lines.sort();
    println!(
        "hostile corpus: {n} messages dead-lettered with their reasons, {} valid events around them delivered, \
         peak RSS {peak:.0} MiB:\n  {}",
        t.delivered,
        lines.join("\n  ")
    );
}
