//! The Kafka side: bad input is contained, offsets never pass unsettled events.

use std::collections::HashSet;

use rdkafka::mocking::MockCoordinator;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_envelopes_are_dead_lettered_while_valid_ones_flow() {
    let kafka = Kafka::start();
    let topic = kafka.topic("invalid", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""))).await;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{ not json".to_vec()),
        ("missing_field", br#"{"type":"ContactCreate"}"#.to_vec()),
        ("empty_field", br#"{"id":"","type":"ContactCreate"}"#.to_vec()),
        ("wrong_type", br#"{"id":42,"type":"ContactCreate"}"#.to_vec()),
        ("not_utf8", b"{\"id\":\"\xc3\x28\",\"type\":\"T\"}".to_vec()),
        ("not_an_object", b"[1,2,3]".to_vec()),
        ("too_large", [br#"{"id":"big","type":"T","pad":""#.as_slice(), &[b'x'; 5000], br#""}"#].concat()),
    ];
    kafka.produce(&topic, None, &event("evt_before", "ContactCreate")).await;
    for (_, payload) in &bad {
        kafka.produce(&topic, None, payload).await;
    }
    kafka.produce(&topic, None, &event("evt_after", "ContactCreate")).await;

    let dead = kafka.read(&format!("{topic}.dlq"), 1, bad.len()).await;
    let mut reasons: Vec<&str> = dead.iter().map(|v| v["reason"].as_str().expect("reason")).collect();
    reasons.sort_unstable();
    let mut want: Vec<&str> = bad.iter().map(|(r, _)| *r).collect();
    want.sort_unstable();
    assert_eq!(reasons, want);
    for v in &dead {
        assert!(v["detail"].as_str().is_some_and(|s| !s.is_empty()), "a dead letter says what is wrong: {v}");
        assert!(v["source"]["offset"].is_i64() && v["event_base64"].is_string(), "{v}");
    }
    let hits = rx.wait_for(2).await;
    let mut ids: Vec<String> = hits.iter().map(Hit::event_id).collect();
    ids.sort();
    assert_eq!(ids, ["evt_after", "evt_before"]);
    assert_eq!(d.metric("webhookd_events_invalid_total").await, bad.len() as f64);
    assert_eq!(d.metric("webhookd_events_consumed_total").await, (bad.len() + 2) as f64);
    d.stop().await;
}

/// The dead-letter topic's only partition lives on a broker we take down, so an
/// invalid event cannot settle; valid events after it are delivered, yet the
/// committed offset must stay at the invalid one until its dead letter lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_never_pass_an_unsettled_event() {
    let kafka = Kafka::start();
    let Some(mock) = kafka.mock.as_ref() else {
        eprintln!("skipped: needs the mock cluster to take a broker down");
        return;
    };
    let topic = kafka.topic("commit", 2).await;
    let dlq = format!("{topic}.dlq");
    let group = format!("{topic}-group");
    for p in 0..2 {
        mock.partition_leader(&topic, p, Some(1)).expect("leader");
    }
    mock.partition_leader(&dlq, 0, Some(2)).expect("dlq leader");
    mock.coordinator(MockCoordinator::Group(group.clone()), 1).expect("coordinator");
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""))).await;

    kafka.produce(&topic, Some(0), &event("evt_c0", "ContactCreate")).await;
    rx.wait_for(1).await;
    eventually("offset 1 committed on partition 0", || async { kafka.committed(&group, &topic, 0).await == 1 }).await;

    mock.broker_down(2).expect("dead-letter broker down");
    kafka.produce(&topic, Some(0), b"{ broken").await; // offset 1: cannot be dead-lettered now
    kafka.produce(&topic, Some(0), &event("evt_c2", "ContactCreate")).await;
    kafka.produce(&topic, Some(0), &event("evt_c3", "ContactCreate")).await;
    rx.wait_for(3).await;
    // A commit that happens after evt_c3 settled: partition 1 moving proves it.
    kafka.produce(&topic, Some(1), &event("evt_p1", "ContactCreate")).await;
    rx.wait_for(4).await;
    eventually("a commit cycle after evt_c3 settled", || async { kafka.committed(&group, &topic, 1).await == 1 }).await;
    assert_eq!(
        kafka.committed(&group, &topic, 0).await,
        1,
        "the commit passed the unsettled invalid event at offset 1"
    );

    mock.broker_up(2).expect("dead-letter broker up");
    let dead = kafka.read(&dlq, 1, 1).await;
    assert_eq!(dead[0]["source"]["offset"], 1);
    eventually("partition 0 committed past everything", || async { kafka.committed(&group, &topic, 0).await == 4 })
        .await;
    d.stop().await;
}

/// Retention deleted events webhookd had not read yet (the mock broker keeps
/// 5 MiB of a partition): at the restart its committed position is gone, the
/// consumer resumes at the oldest offset the broker still has, and the reset
/// is counted. Everything still there is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_deleted_by_retention_is_counted_and_consumption_resumes_at_the_oldest_offset() {
    let kafka = Kafka::start();
    if kafka.mock.is_none() {
        eprintln!("skipped: needs the mock cluster's 5 MiB per partition");
        return;
    }
    let topic = kafka.topic("retention", 1).await;
    let group = format!("{topic}-group");
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&kafka, &topic, dir.path(), FAST_RETRY, &endpoint("a", &rx.url("/"), ""));
    let d = Daemon::start(&toml).await;
    kafka.produce(&topic, Some(0), &event("evt_r0", "ContactCreate")).await;
    rx.wait_for(1).await;
    eventually("offset 1 committed", || async { kafka.committed(&group, &topic, 0).await == 1 }).await;
    assert_eq!(d.metric("webhookd_consumer_offset_resets_total").await, 0.0);
    d.stop().await;

    // While webhookd is down, about 6.4 MB more than the partition keeps.
    let pad = "x".repeat(3_000);
    let more: Vec<Vec<u8>> = (1..=2_100)
        .map(|i| {
            serde_json::json!({ "id": format!("evt_r{i}"), "type": "ContactCreate", "pad": pad })
                .to_string()
                .into_bytes()
        })
        .collect();
    kafka.produce_all(&topic, &more).await;
    let low = kafka.low_watermark(&topic, 0).await;
    assert!(low > 1, "the broker still has offset 1 (low watermark {low}): the case is not made");

    let d = Daemon::start(&toml).await;
    eventually("the reset counted", || async { d.metric("webhookd_consumer_offset_resets_total").await >= 1.0 }).await;
    // Offsets low..=2100 are still there (produced concurrently, so in any order).
    let retained = usize::try_from(2_101 - low).expect("count");
    let on_broker: HashSet<String> =
        kafka.read(&topic, 1, retained).await.iter().map(|v| v["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(on_broker.len(), retained);
    let hits = rx.wait_for(1 + retained).await;
    let delivered: HashSet<String> = hits.iter().map(Hit::event_id).filter(|id| id != "evt_r0").collect();
    assert_eq!(delivered, on_broker, "after the reset, exactly what the broker still has");
    assert_eq!(hits.len(), 1 + retained, "nothing twice");
    d.stop().await;
}

/// Two instances share a consumer group; one leaves. The revoke and assign
/// paths run for real, and every event is delivered (at least once: dedup is
/// per instance, so a partition that moves can repeat unsettled work). The
/// first instance lingers over its batches (`batch_linger`), the second
/// writes what it holds at once (the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_instances_loses_nothing() {
    let kafka = Kafka::start();
    let topic = kafka.topic("rebalance", 4).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let (dir1, dir2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let ep = endpoint("a", &rx.url("/"), "");
    let distinct =
        |n: usize| move |h: &[Hit]| h.iter().map(Hit::event_id).collect::<std::collections::HashSet<_>>().len() == n;
    let mut produced = 0;
    let mut produce = async |count: usize| {
        for _ in 0..count {
            kafka.produce(&topic, Some(produced % 4), &event(&format!("evt_rb{produced}"), "ContactCreate")).await;
            produced += 1;
        }
    };

    let lingering = config(&kafka, &topic, dir1.path(), FAST_RETRY, &ep)
        .replace("[source]\n", "[source]\nbatch_linger = \"20ms\"\n");
    assert!(lingering.contains("batch_linger"), "the config has a [source] table");
    let first = Daemon::start(&lingering).await;
    produce(20).await;
    rx.wait_until("20 events via the first instance", distinct(20)).await;
    // Let the first instance commit before the group changes, so what is
    // counted below is what a partition move itself repeats.
    let group = format!("{topic}-group");
    eventually("the first 20 committed", || async {
        let mut sum = 0;
        for p in 0..4 {
            sum += kafka.committed(&group, &topic, p).await.max(0);
        }
        sum == 20
    })
    .await;
    let second = Daemon::start(&config(&kafka, &topic, dir2.path(), FAST_RETRY, &ep)).await;
    produce(20).await;
    rx.wait_until("40 events via both instances", distinct(40)).await;
    first.stop().await;
    produce(20).await;
    let hits = rx.wait_until("60 events after the first instance left", distinct(60)).await;
    println!("rebalance: 60 events, {} requests ({} repeated)", hits.len(), hits.len() - 60);
    second.stop().await;
}

/// rdkafka's header accessors panic on a key that is not UTF-8; kcat (a
/// different Kafka client) can publish one. It must be dead-lettered, and the
/// consumer must carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_that_is_not_utf8_is_dead_lettered_not_fatal() {
    use std::io::Write;
    use std::os::unix::ffi::OsStringExt;
    let kafka = Kafka::start();
    let topic = kafka.topic("badheader", 1).await;
    let rx = Receiver::start(Receiver::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let eps = endpoint("a", &rx.url("/"), "") + "[source.envelope]\nid_header = \"event-id\"\n";
    let d = Daemon::start(&config(&kafka, &topic, dir.path(), FAST_RETRY, &eps)).await;

    let bad_key = std::ffi::OsString::from_vec(vec![0xff, 0xfe, b'=', b'x']);
    let mut kcat = std::process::Command::new("kcat")
        .args(["-P", "-b", &kafka.bootstrap, "-t", &topic, "-p", "0", "-H"])
        .arg(bad_key)
        .args(["-H", "event-id=k1"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kcat is installed by scripts/setup");
    kcat.stdin.take().expect("stdin").write_all(br#"{"type":"ContactCreate"}"#).expect("write");
    assert!(kcat.wait().expect("kcat").success(), "kcat could not publish");
    kafka.produce_with_headers(&topic, Some(0), br#"{"type":"ContactCreate"}"#, &[("event-id", "k2")]).await;

    let dead = kafka.read(&format!("{topic}.dlq"), 1, 1).await;
    assert_eq!(dead[0]["reason"], "bad_header");
    let hits = rx.wait_for(1).await;
    assert_eq!(hits[0].body.as_ref(), br#"{"type":"ContactCreate"}"#);
    assert_eq!(d.metric("webhookd_events_consumed_total").await, 2.0);
    d.stop().await;
}
