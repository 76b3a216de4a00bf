//! Micro-benchmarks of the per-event hot path: decode, route, sign.
//! `cargo bench --bench dispatch` prints the figures.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use webhookd::config::{Config, EnvelopeConfig};
use webhookd::deliver::sign::{SigningSecret, signature_header};
use webhookd::event::{RawMessage, SourcePos, decode};
use webhookd::route::Registry;

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

criterion_group!(dispatch, benches);
criterion_main!(dispatch);
