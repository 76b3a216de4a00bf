//! The event envelope and its decoding.
//!
//! A Kafka message value is a UTF-8 JSON object with at least an `id` and a
//! `type` (field names and header sources are configurable). Decoding reads
//! only those fields and skips the payload without building it, so the body
//! delivered is the message's bytes untouched. Every way a message can be bad
//! is an [`InvalidEvent`] variant with a stable reason label.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::EnvelopeConfig;

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SourcePos {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A decoded event, ready to be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub location_id: Option<String>,
    /// Event time in unix milliseconds: the envelope's `timestamp`, else the
    /// Kafka message timestamp, else the time of intake.
    pub time_ms: i64,
    pub payload: Bytes,
    pub source: SourcePos,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("message has no value")]
    Empty,
    #[error("message is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not UTF-8: {0}")]
    NotUtf8(String),
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message is JSON but not an object")]
    NotAnObject,
    #[error("required field {0:?} is missing")]
    MissingField(String),
    #[error("field {0:?} is empty")]
    EmptyField(String),
    #[error("field {field:?} must be {expected}")]
    WrongType { field: String, expected: &'static str },
    #[error("field {0:?} appears more than once")]
    DuplicateField(String),
    #[error("field {field:?} is not an RFC 3339 timestamp: {detail}")]
    BadTimestamp { field: String, detail: String },
    #[error("header {0:?} is missing, empty or not UTF-8")]
    BadHeader(String),
    #[error("JSON nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("field {0:?} is longer than {MAX_FIELD_BYTES} bytes")]
    TooLong(String),
}

impl InvalidEvent {
    /// A stable, low-cardinality reason for metrics labels and dead letters.
    /// Every value [`InvalidEvent::reason`] can return (the metrics start them at zero).
    pub const REASONS: [&'static str; 13] = [
        "empty",
        "too_large",
        "not_utf8",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "empty_field",
        "wrong_type",
        "duplicate_field",
        "bad_timestamp",
        "bad_header",
        "too_deep",
        "too_long",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            InvalidEvent::Empty => "empty",
            InvalidEvent::TooLarge { .. } => "too_large",
            InvalidEvent::NotUtf8(_) => "not_utf8",
            InvalidEvent::InvalidJson(_) => "invalid_json",
            InvalidEvent::NotAnObject => "not_an_object",
            InvalidEvent::MissingField(_) => "missing_field",
            InvalidEvent::EmptyField(_) => "empty_field",
            InvalidEvent::WrongType { .. } => "wrong_type",
            InvalidEvent::DuplicateField(_) => "duplicate_field",
            InvalidEvent::BadTimestamp { .. } => "bad_timestamp",
            InvalidEvent::BadHeader(_) => "bad_header",
            InvalidEvent::TooDeep => "too_deep",
            InvalidEvent::TooLong(_) => "too_long",
        }
    }
}

/// A message's headers: name and value (absent when the header has none).
pub type Headers<'a> = Vec<(&'a str, Option<&'a [u8]>)>;

/// One raw Kafka message, as the decoder needs it.
pub struct RawMessage<'a> {
    pub value: Option<&'a [u8]>,
    pub headers: Headers<'a>,
    pub kafka_time_ms: Option<i64>,
    pub source: SourcePos,
}

pub fn decode(msg: RawMessage<'_>, cfg: &EnvelopeConfig, max_bytes: usize, now_ms: i64) -> Result<Event, InvalidEvent> {
    let value = msg.value.filter(|v| !v.is_empty()).ok_or(InvalidEvent::Empty)?;
    if value.len() > max_bytes {
        return Err(InvalidEvent::TooLarge { size: value.len(), limit: max_bytes });
    }
    let text = std::str::from_utf8(value).map_err(|e| InvalidEvent::NotUtf8(e.to_string()))?;
    if !text.trim_start().starts_with('{') {
        return match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Err(InvalidEvent::NotAnObject),
            Err(e) => Err(InvalidEvent::InvalidJson(e.to_string())),
        };
    }
    if nesting_exceeds(text.as_bytes(), MAX_DEPTH) {
        return Err(InvalidEvent::TooDeep);
    }
    let fields = FieldsSeed { cfg };
    let mut de = serde_json::Deserializer::from_str(text);
    let head = fields.deserialize(&mut de).and_then(|h| de.end().map(|_| h)).map_err(|e| {
        // Our own checks travel inside serde's error as a tagged message.
        let s = e.to_string();
        match s.strip_prefix(TAG) {
            Some(rest) => decode_tagged(rest),
            None => InvalidEvent::InvalidJson(s),
        }
    })?;

    let header = |name: &str| -> Result<String, InvalidEvent> {
        msg.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| *v)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|v| !v.trim().is_empty())
            .map(str::to_owned)
            .ok_or_else(|| InvalidEvent::BadHeader(name.to_owned()))
    };
    let id = match &cfg.id_header {
        Some(h) => header(h)?,
        None => required(head.id, &cfg.id_field)?,
    };
    let event_type = match &cfg.type_header {
        Some(h) => header(h)?,
        None => required(head.event_type, &cfg.type_field)?,
    };
    let too_long = |v: &str, field: &str| v.len() > MAX_FIELD_BYTES && !field.is_empty();
    for (value, field) in [
        (Some(id.as_str()), cfg.id_header.as_deref().unwrap_or(&cfg.id_field)),
        (Some(event_type.as_str()), cfg.type_header.as_deref().unwrap_or(&cfg.type_field)),
        (head.location.as_deref(), cfg.location_field.as_str()),
    ] {
        if let Some(v) = value
            && too_long(v, field)
        {
            return Err(InvalidEvent::TooLong(field.to_owned()));
        }
    }
    let time_ms = match head.timestamp {
        Some(ts) => OffsetDateTime::parse(&ts, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| InvalidEvent::BadTimestamp { field: cfg.timestamp_field.clone(), detail: e.to_string() })?,
        None => msg.kafka_time_ms.unwrap_or(now_ms),
    };
    Ok(Event {
        id,
        event_type,
        location_id: head.location,
        time_ms,
        payload: Bytes::copy_from_slice(value),
        source: msg.source,
    })
}

/// Longest id, type or locationId accepted. They end up in storage keys,
/// headers and dead letters; real ones are short.
pub const MAX_FIELD_BYTES: usize = 256;

/// Deepest nesting of arrays and objects accepted in an event. Receivers'
/// parsers are often recursive; webhookd will not forward what could crash them.
pub const MAX_DEPTH: usize = 64;

/// Whether brackets nest deeper than `max`, ignoring those inside strings.
/// Strings, most of an event's bytes, are skipped with `memchr` (a byte at a
/// time, this check was half of decoding a 1 KiB event).
fn nesting_exceeds(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        i += 1;
        match b {
            b'"' => loop {
                // To the closing quote: past each backslash and the byte it escapes.
                let rest = json.get(i..).unwrap_or_default();
                match memchr::memchr2(b'"', b'\\', rest) {
                    Some(k) if rest[k] == b'\\' => i += k + 2,
                    Some(k) => {
                        i += k + 1;
                        break;
                    }
                    None => return false,
                }
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn required(v: Option<String>, field: &str) -> Result<String, InvalidEvent> {
    match v {
        None => Err(InvalidEvent::MissingField(field.to_owned())),
        Some(s) if s.trim().is_empty() => Err(InvalidEvent::EmptyField(field.to_owned())),
        Some(s) => Ok(s),
    }
}

/// The `webhook-id` of one (event, endpoint) pair: derived, so it is the same
/// for every retry and after any restart.
pub fn webhook_id(event_id: &str, endpoint_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(event_id.as_bytes());
    h.update([0u8]);
    h.update(endpoint_id.as_bytes());
    format!("msg_{}", hex::encode(&h.finalize()[..16]))
}

const TAG: &str = "webhookd:";

fn tagged(kind: &str, field: &str) -> String {
    format!("{TAG}{kind}:{field}")
}

fn decode_tagged(rest: &str) -> InvalidEvent {
    // serde_json appends " at line L column C" to custom messages.
    let rest = rest.split(" at line ").next().unwrap_or(rest);
    let (kind, field) = rest.split_once(':').unwrap_or((rest, ""));
    let field = field.to_owned();
    match kind {
        "dup" => InvalidEvent::DuplicateField(field),
        _ => InvalidEvent::WrongType { field, expected: "a string" },
    }
}

#[derive(Default)]
struct Head {
    id: Option<String>,
    event_type: Option<String>,
    location: Option<String>,
    timestamp: Option<String>,
}

struct FieldsSeed<'c> {
    cfg: &'c EnvelopeConfig,
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Head;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Head, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Head;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event envelope (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        let mut head = Head::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let (slot, name) = if key == self.cfg.id_field {
                (&mut head.id, &self.cfg.id_field)
            } else if key == self.cfg.type_field {
                (&mut head.event_type, &self.cfg.type_field)
            } else if key == self.cfg.location_field {
                (&mut head.location, &self.cfg.location_field)
            } else if key == self.cfg.timestamp_field {
                (&mut head.timestamp, &self.cfg.timestamp_field)
            } else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if slot.is_some() {
                return Err(de::Error::custom(tagged("dup", name)));
            }
            let v: serde_json::Value = map.next_value()?;
            match v {
                serde_json::Value::String(s) => *slot = Some(s),
                // An explicit null is the same as a missing field.
                serde_json::Value::Null => {}
                _ => return Err(de::Error::custom(tagged("type", name))),
            }
        }
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_in_the_list_the_metrics_start_with() {
        let s = || String::new();
        let all = [
            InvalidEvent::Empty,
            InvalidEvent::TooLarge { size: 0, limit: 0 },
            InvalidEvent::NotUtf8(s()),
            InvalidEvent::InvalidJson(s()),
            InvalidEvent::NotAnObject,
            InvalidEvent::MissingField(s()),
            InvalidEvent::EmptyField(s()),
            InvalidEvent::WrongType { field: s(), expected: "" },
            InvalidEvent::DuplicateField(s()),
            InvalidEvent::BadTimestamp { field: s(), detail: s() },
            InvalidEvent::BadHeader(s()),
            InvalidEvent::TooDeep,
            InvalidEvent::TooLong(s()),
        ];
        assert_eq!(all.map(|e| e.reason()), InvalidEvent::REASONS);
    }

    fn cfg() -> EnvelopeConfig {
        EnvelopeConfig::default()
    }

    fn raw(v: &[u8]) -> RawMessage<'_> {
        RawMessage {
            value: Some(v),
            headers: vec![],
            kafka_time_ms: Some(1_000),
            source: SourcePos { topic: "t".into(), partition: 0, offset: 0 },
        }
    }

    fn reason(v: &[u8]) -> &'static str {
        decode(raw(v), &cfg(), 1024, 0).expect_err("should be invalid").reason()
    }

    #[test]
    fn decodes_the_spec_envelope() {
        let body = br#"{ "id": "evt_1", "type": "ContactCreate", "locationId": "loc_42",
            "timestamp": "2025-01-15T10:30:00Z", "data": { "id": "c", "tags": ["lead"] } }"#;
        let e = decode(raw(body), &cfg(), 1024, 0).expect("valid");
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.event_type, "ContactCreate");
        assert_eq!(e.location_id.as_deref(), Some("loc_42"));
        assert_eq!(e.time_ms, 1_736_937_000_000);
        assert_eq!(&e.payload[..], &body[..]);
    }

    #[test]
    fn timestamp_defaults_to_kafka_time_and_offsets_are_understood() {
        let e = decode(raw(br#"{"id":"a","type":"T"}"#), &cfg(), 1024, 0).expect("valid");
        assert_eq!(e.time_ms, 1_000);
        let e = decode(raw(br#"{"id":"a","type":"T","timestamp":"2025-01-15T12:30:00+02:00"}"#), &cfg(), 1024, 0)
            .expect("valid");
        assert_eq!(e.time_ms, 1_736_937_000_000);
    }

    #[test]
    fn every_kind_of_bad_input_has_its_reason() {
        assert_eq!(reason(b""), "empty");
        assert_eq!(reason(&[b' '; 2000]), "too_large");
        assert_eq!(reason(b"{\"id\":\"\xff\"}"), "not_utf8");
        assert_eq!(reason(b"{\"id\": \"a\", "), "invalid_json");
        assert_eq!(reason(b"{\"id\": \"a\"} trailing"), "invalid_json");
        assert_eq!(reason(b"[1,2]"), "not_an_object");
        assert_eq!(reason(b"\"text\""), "not_an_object");
        assert_eq!(reason(b"nonsense"), "invalid_json");
        assert_eq!(reason(br#"{"type":"T"}"#), "missing_field");
        assert_eq!(reason(br#"{"id":null,"type":"T"}"#), "missing_field");
        assert_eq!(reason(br#"{"id":"a"}"#), "missing_field");
        assert_eq!(reason(br#"{"id":"  ","type":"T"}"#), "empty_field");
        assert_eq!(reason(br#"{"id":7,"type":"T"}"#), "wrong_type");
        assert_eq!(reason(br#"{"id":"a","type":["T"]}"#), "wrong_type");
        assert_eq!(reason(br#"{"id":"a","id":"b","type":"T"}"#), "duplicate_field");
        assert_eq!(reason(br#"{"id":"a","type":"T","timestamp":"yesterday"}"#), "bad_timestamp");
        let long = |field: &str| {
            let mut v = serde_json::json!({ "id": "a", "type": "T", "locationId": "l" });
            v[field] = "x".repeat(MAX_FIELD_BYTES + 1).into();
            let body = v.to_string();
            decode(raw(body.as_bytes()), &cfg(), 1 << 20, 0).expect_err("too long")
        };
        for field in ["id", "type", "locationId"] {
            assert_eq!(long(field), InvalidEvent::TooLong(field.into()));
        }
        let deep = format!("{{\"id\":\"a\",\"type\":\"T\",\"d\":{}{}}}", "[".repeat(500), "]".repeat(500));
        assert_eq!(decode(raw(deep.as_bytes()), &cfg(), 1 << 20, 0).expect_err("too deep").reason(), "too_deep");
        let ok = format!(
            "{{\"id\":\"a\",\"type\":\"T\",\"s\":\"{}\",\"d\":{}{}}}",
            "[".repeat(200),
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(decode(raw(ok.as_bytes()), &cfg(), 1 << 20, 0).is_ok(), "brackets inside strings do not count");
    }

    #[test]
    fn nesting_is_counted_outside_strings_only_with_escapes_honoured() {
        // (input, deeper than 2?)
        let cases: [(&str, bool); 9] = [
            (r#"[[1]]"#, false),
            (r#"[[[1]]]"#, true),
            (r#"{"a":{"b":[1]}}"#, true),
            (r#"["[[[[", "]]]]"]"#, false),
            (r#"["\"[[[["]"#, false),
            (r#"["\\", [[1]]]"#, true),
            (r#"["\\\"", [1]]"#, false),
            (r#"["unterminated [[["#, false),
            (r#"["ends in a backslash \"#, false),
        ];
        for (json, deep) in cases {
            assert_eq!(nesting_exceeds(json.as_bytes(), 2), deep, "{json}");
        }
    }

    #[test]
    fn escaped_keys_and_unknown_fields_are_fine() {
        let e = decode(raw(br#"{"\u0069d":"a","type":"T","extra":{"x":[1,2,{"y":null}]}}"#), &cfg(), 1024, 0)
            .expect("valid");
        assert_eq!(e.id, "a");
    }

    #[test]
    fn id_and_type_can_come_from_headers() {
        let mut c = cfg();
        c.id_header = Some("event-id".into());
        c.type_header = Some("event-type".into());
        let mut m = raw(br#"{"payload":1}"#);
        m.headers = vec![("event-id", Some(b"h1")), ("Event-Type", Some(b"InvoicePaid"))];
        let e = decode(m, &c, 1024, 0).expect("valid");
        assert_eq!((e.id.as_str(), e.event_type.as_str()), ("h1", "InvoicePaid"));
        let mut m = raw(br#"{"payload":1}"#);
        m.headers = vec![("event-id", None)];
        assert_eq!(decode(m, &c, 1024, 0).expect_err("no header").reason(), "bad_header");
    }

    #[test]
    fn webhook_ids_are_stable_and_distinct() {
        assert_eq!(webhook_id("e1", "a"), webhook_id("e1", "a"));
        assert_ne!(webhook_id("e1", "a"), webhook_id("e1", "b"));
        assert_ne!(webhook_id("e1a", ""), webhook_id("e1", "a"));
        assert!(webhook_id("e", "a").starts_with("msg_"));
    }
}
