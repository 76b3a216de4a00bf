//! Property tests of the pure parts that meet hostile input: envelope
//! decoding, configuration parsing, the outcome function and the backoff
//! policy. Bounded by case count (`PROPTEST_CASES` overrides the 2048 here);
//! a run takes a few seconds.

use std::time::Duration;

use proptest::prelude::*;
use webhookd::config::{Config, EnvelopeConfig};
use webhookd::deliver::outcome::{AttemptError, Outcome, Response, classify, parse_retry_after};
use webhookd::event::{MAX_FIELD_BYTES, RawMessage, SourcePos, decode};
use webhookd::retry::{RetryDecision, RetryPolicy};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2048);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn raw(value: &[u8]) -> RawMessage<'_> {
    RawMessage {
        value: Some(value),
        headers: Vec::new(),
        kafka_time_ms: Some(0),
        source: SourcePos { topic: "t".into(), partition: 0, offset: 0 },
    }
}

/// JSON-ish text: fragments that make parsers work (quotes, escapes, brackets, keys).
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"id\"".to_owned()),
        Just("\"type\"".to_owned()),
        Just("\"locationId\"".to_owned()),
        Just("\"timestamp\"".to_owned()),
        Just("null".to_owned()),
        Just("\"\\u0000\\\"\\\\\"".to_owned()),
        Just("1e999".to_owned()),
        "\"[^\"\\\\]{0,12}\"",
        "[ -~]{0,6}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn decoding_never_panics_and_what_it_accepts_is_sound(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(e) = decode(raw(&bytes), &EnvelopeConfig::default(), 1 << 20, 0) {
            prop_assert!(!e.id.trim().is_empty() && e.id.len() <= MAX_FIELD_BYTES);
            prop_assert!(!e.event_type.trim().is_empty() && e.event_type.len() <= MAX_FIELD_BYTES);
            prop_assert_eq!(&e.payload[..], &bytes[..], "the payload is forwarded byte for byte");
        }
    }

    #[test]
    fn decoding_json_ish_text_never_panics(text in jsonish()) {
        match decode(raw(text.as_bytes()), &EnvelopeConfig::default(), 1 << 20, 0) {
            Ok(e) => prop_assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "accepted {:?} as {:?}", text, e.id),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_envelope_round_trips(
        id in "[^\\s]{1,64}", ty in "[A-Za-z][A-Za-z0-9.]{0,40}", loc in proptest::option::of("[a-z0-9_]{1,20}"),
        extra in "[ -~]{0,200}",
    ) {
        let mut v = serde_json::json!({ "id": id, "type": ty, "data": { "note": extra } });
        if let Some(l) = &loc {
            v["locationId"] = l.clone().into();
        }
        let body = v.to_string();
        let e = decode(raw(body.as_bytes()), &EnvelopeConfig::default(), 1 << 20, 0).expect("a valid envelope decodes");
        prop_assert_eq!(e.id, id);
        prop_assert_eq!(e.event_type, ty);
        prop_assert_eq!(e.location_id, loc);
    }

    #[test]
    fn config_parsing_never_panics_and_errors_name_something(text in "[\\[\\]a-z_.= \"0-9\\n{},]{0,200}") {
        match Config::from_toml_str(&text, Vec::new()) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.problems.is_empty() && e.problems.iter().all(|p| !p.trim().is_empty())),
        }
    }

    #[test]
    fn environment_overrides_never_panic(key in "[A-Z_]{1,30}", value in "[ -~]{0,40}") {
        let env = vec![(format!("WEBHOOKD_{key}"), value)];
        let _ = Config::from_toml_str("", env);
    }

    #[test]
    fn a_malformed_secret_is_refused_without_being_quoted(tail in "Q[A-Za-z0-9+/=!*]{15,80}") {
        let secret = format!("whsec_{tail}");
        let toml = format!("[[endpoints]]\nid = \"a\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{secret}\"]\n");
        match Config::from_toml_str(&toml, Vec::new()) {
            Ok(c) => prop_assert_eq!(c.endpoints[0].secrets.len(), 1),
            Err(e) => prop_assert!(!e.to_string().contains(&tail), "the error quotes the secret: {}", e),
        }
    }

    #[test]
    fn rate_limits_are_accepted_or_named(per_second in any::<i64>(), burst in any::<i64>()) {
        let toml = format!(
            "[[endpoints]]\nid = \"a\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{SECRET}\"]\n\
             rate_limit = {{ per_second = {per_second}, burst = {burst} }}\n"
        );
        let valid = |n: i64| (1..=1_000_000).contains(&n);
        match Config::from_toml_str(&toml, Vec::new()) {
            Ok(c) => {
                prop_assert!(valid(per_second) && valid(burst));
                prop_assert_eq!(i64::from(c.endpoints[0].rate_limit.per_second.get()), per_second);
            }
            Err(e) => {
                prop_assert!(!(valid(per_second) && valid(burst)));
                prop_assert!(e.problems.iter().all(|p| p.starts_with("endpoints[0].rate_limit.")), "{:?}", e.problems);
            }
        }
    }

    #[test]
    fn the_outcome_follows_the_spec_table(status in 100u16..600, retry_after in proptest::option::of(0u64..100_000)) {
        let retry_after = retry_after.map(Duration::from_secs);
        let got = classify(&Ok(Response { status, retry_after }));
        let want = match status {
            200..=299 => Outcome::Delivered,
            410 => Outcome::Gone,
            429 | 503 => Outcome::Retry { retry_after },
            408 | 425 => Outcome::Retry { retry_after: None },
            501 => Outcome::DeadLetter,
            500..=599 => Outcome::Retry { retry_after: None },
            _ => Outcome::DeadLetter,
        };
        prop_assert_eq!(got, want);
    }

    #[test]
    fn failures_before_a_status_retry_unless_refused(detail in "[ -~]{0,40}", ms in 0u64..10_000) {
        for e in [AttemptError::Connect(detail.clone()), AttemptError::Io(detail.clone()), AttemptError::Timeout(Duration::from_millis(ms))] {
            prop_assert_eq!(classify(&Err(e)), Outcome::Retry { retry_after: None });
        }
        for e in [AttemptError::Refused(detail.clone()), AttemptError::Destination(detail)] {
            prop_assert_eq!(classify(&Err(e)), Outcome::DeadLetter);
        }
    }

    #[test]
    fn retry_after_parses_seconds_exactly_and_never_panics(secs in any::<u32>(), junk in "[ -~]{0,40}") {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        prop_assert_eq!(parse_retry_after(&secs.to_string(), now), Some(Duration::from_secs(u64::from(secs))));
        let _ = parse_retry_after(&junk, now);
    }

    #[test]
    fn backoff_stays_within_its_bounds(
        base_ms in 1u64..60_000, factor in 1.0f64..10.0, cap_extra_ms in 0u64..10_000_000, max_attempts in 1u32..100,
        max_age_s in 1u64..200_000, retry_after_cap_s in 0u64..10_000,
        attempts in 0u32..200, age_s in 0u64..300_000, asked_s in proptest::option::of(0u64..1_000_000), unit in 0.0f64..1.0,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base + Duration::from_millis(cap_extra_ms);
        let p = RetryPolicy::new(base, factor, cap, max_attempts, Duration::from_secs(max_age_s), Duration::from_secs(retry_after_cap_s))
            .expect("valid policy");
        let (age, asked) = (Duration::from_secs(age_s), asked_s.map(Duration::from_secs));
        match p.decide(attempts, age, asked, unit) {
            RetryDecision::After(delay) => {
                prop_assert!(attempts < max_attempts, "retried past max_attempts");
                prop_assert!(age + delay <= p.max_age(), "retried past max_age");
                let ceiling = p.ceiling(attempts);
                prop_assert!(ceiling <= cap && ceiling >= base.min(cap));
                let allowed = ceiling.max(asked.map_or(Duration::ZERO, |a| a.min(p.retry_after_cap())));
                prop_assert!(delay <= allowed, "delay {:?} over {:?}", delay, allowed);
                if let Some(a) = asked {
                    prop_assert!(delay >= a.min(p.retry_after_cap()), "Retry-After made it sooner");
                }
            }
            RetryDecision::Exhausted => {
                let asked = asked.map_or(Duration::ZERO, |a| a.min(p.retry_after_cap()));
                let delay = p.ceiling(attempts).mul_f64(unit).max(asked);
                prop_assert!(attempts >= max_attempts || age + delay > p.max_age(), "gave up with time and attempts left");
            }
        }
    }

    #[test]
    fn invalid_policies_name_their_key(base_ms in 0u64..10, factor in -2.0f64..1.0, attempts in 0u32..2) {
        let r = RetryPolicy::new(Duration::from_millis(base_ms), factor, Duration::from_secs(1), attempts, Duration::from_secs(1), Duration::ZERO);
        let (key, _) = r.expect_err("a factor below 1 is always invalid");
        prop_assert!(["base", "factor", "max_attempts"].contains(&key));
    }
}
