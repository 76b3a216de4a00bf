//! The dead-letter topic: what could not be delivered, and why.
//!
//! A dead letter is one JSON object (format in the README): the reason, where
//! the message came from, for deliveries the endpoint and attempt history, and
//! the original event (embedded as JSON when it was valid JSON, as base64
//! otherwise). The same bytes go to the topic and to the local index.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::event::{InvalidEvent, SourcePos};
use crate::store::Delivery;
use crate::telemetry::admin::Health;
use crate::telemetry::metrics as m;

/// Largest event embedded whole in a dead letter. Kafka's default message
/// limit is about 1 MB, and a dead letter that can never be produced would hold
/// its partition (or delivery) forever; beyond this, the dead letter carries the
/// first [`TRUNCATED_PREFIX`] bytes, `event_truncated: true` and the event's
/// size, and the event itself stays at `source` on the source topic.
pub const MAX_EMBEDDED_EVENT: usize = 512 * 1024;
/// How much of an oversize event a dead letter keeps.
pub const TRUNCATED_PREFIX: usize = 64 * 1024;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Why a delivery was given up. Also the `reason` label of dead-letter metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFailure {
    /// A permanent HTTP status (3xx, most 4xx, 501).
    Rejected,
    /// 410 Gone: the endpoint was disabled too.
    Gone,
    /// Attempts or age used up.
    Exhausted,
    /// The endpoint is disabled.
    EndpointDisabled,
    /// The endpoint is no longer in the configuration.
    EndpointRemoved,
    /// The request could not be built.
    Refused,
    /// The SSRF guard refused the endpoint's address.
    DestinationRefused,
}

impl DeliveryFailure {
    pub const ALL: [DeliveryFailure; 7] = [
        DeliveryFailure::Rejected,
        DeliveryFailure::Gone,
        DeliveryFailure::Exhausted,
        DeliveryFailure::EndpointDisabled,
        DeliveryFailure::EndpointRemoved,
        DeliveryFailure::Refused,
        DeliveryFailure::DestinationRefused,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryFailure::Rejected => "rejected",
            DeliveryFailure::Gone => "gone",
            DeliveryFailure::Exhausted => "exhausted",
            DeliveryFailure::EndpointDisabled => "endpoint_disabled",
            DeliveryFailure::EndpointRemoved => "endpoint_removed",
            DeliveryFailure::Refused => "refused",
            DeliveryFailure::DestinationRefused => "destination_refused",
        }
    }

    pub fn parse(s: &str) -> DeliveryFailure {
        match s {
            "gone" => DeliveryFailure::Gone,
            "exhausted" => DeliveryFailure::Exhausted,
            "endpoint_disabled" => DeliveryFailure::EndpointDisabled,
            "endpoint_removed" => DeliveryFailure::EndpointRemoved,
            "refused" => DeliveryFailure::Refused,
            "destination_refused" => DeliveryFailure::DestinationRefused,
            _ => DeliveryFailure::Rejected,
        }
    }
}

/// Produces dead letters; cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    health: Arc<Health>,
}

impl DeadLetters {
    pub fn new(kafka: &ClientConfig, topic: &str, health: Arc<Health>) -> Result<Self, KafkaError> {
        let producer = kafka
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()?;
        Ok(DeadLetters { producer, topic: topic.to_owned(), health })
    }

    /// Produces one dead letter and waits for the broker's acknowledgement.
    pub async fn send(&self, key: &str, reason: &str, record: &[u8]) -> Result<(), KafkaError> {
        let headers = OwnedHeaders::new().insert(Header { key: "webhookd-reason", value: Some(reason) });
        let rec = FutureRecord::to(&self.topic).key(key).payload(record).headers(headers);
        let result = self.producer.send(rec, Duration::from_secs(5)).await;
        let ok = result.is_ok();
        if self.health.dead_letters.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                tracing::info!(topic = %self.topic, "dead letters are being produced again");
            } else {
                tracing::error!(topic = %self.topic, "cannot produce dead letters: not ready");
            }
        }
        match result {
            Ok(_) => {
                metrics::counter!(m::DEAD_LETTERS, "reason" => reason.to_owned()).increment(1);
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    /// Waits up to `timeout` for queued dead letters to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "dead letters still queued at shutdown");
        }
    }
}

fn rfc3339(ms: i64) -> Value {
    if ms <= 0 {
        return Value::Null;
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

fn source(pos: &SourcePos) -> Value {
    json!({ "topic": pos.topic, "partition": pos.partition, "offset": pos.offset })
}

/// The record for a message that could not be decoded.
pub fn invalid_record(pos: &SourcePos, value: Option<&[u8]>, err: &InvalidEvent, now_ms: i64) -> Vec<u8> {
    let mut v = json!({
        "reason": err.reason(),
        "detail": err.to_string(),
        "source": source(pos),
        "dead_lettered_at": rfc3339(now_ms),
        "event_bytes": value.map_or(0, <[u8]>::len),
    });
    match value {
        Some(bytes) if bytes.len() > MAX_EMBEDDED_EVENT => {
            v["event_base64"] = b64(&bytes[..TRUNCATED_PREFIX]).into();
            v["event_truncated"] = true.into();
        }
        Some(bytes) => v["event_base64"] = b64(bytes).into(),
        None => v["event_base64"] = Value::Null,
    }
    v.to_string().into_bytes()
}

#[derive(serde::Serialize)]
struct DeliveryLetter<'a> {
    reason: &'static str,
    source: Value,
    event_id: &'a str,
    event_type: &'a str,
    endpoint_id: &'a str,
    webhook_id: &'a str,
    attempts: u32,
    last_status: Option<u16>,
    last_error: Option<&'a str>,
    first_attempt_at: Value,
    last_attempt_at: Value,
    dead_lettered_at: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_base64: Option<String>,
    event_bytes: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    event_truncated: bool,
}

/// The record for a delivery that was given up.
pub fn delivery_record(d: &Delivery, failure: DeliveryFailure, now_ms: i64) -> Vec<u8> {
    let truncated = d.payload.len() > MAX_EMBEDDED_EVENT;
    let event = std::str::from_utf8(&d.payload)
        .ok()
        .filter(|_| !truncated)
        .and_then(|s| serde_json::value::RawValue::from_string(s.to_owned()).ok());
    let letter = DeliveryLetter {
        reason: failure.as_str(),
        source: source(&d.source),
        event_id: &d.event_id,
        event_type: &d.event_type,
        endpoint_id: &d.endpoint_id,
        webhook_id: &d.webhook_id,
        attempts: d.attempts,
        last_status: (d.last_status != 0).then_some(d.last_status),
        last_error: (!d.last_error.is_empty()).then_some(d.last_error.as_str()),
        first_attempt_at: rfc3339(d.first_attempt_ms),
        last_attempt_at: rfc3339(d.last_attempt_ms),
        dead_lettered_at: rfc3339(now_ms),
        event_base64: event.is_none().then(|| {
            let keep = if truncated { TRUNCATED_PREFIX } else { d.payload.len() };
            b64(&d.payload[..keep])
        }),
        event,
        event_bytes: d.payload.len(),
        event_truncated: truncated,
    };
    serde_json::to_vec(&letter).expect("a dead letter always serialises")
}

/// What a replay reads from a delivery's dead letter.
#[derive(serde::Deserialize)]
struct StoredLetter<'a> {
    reason: String,
    endpoint_id: Option<String>,
    event_id: Option<String>,
    event_type: Option<String>,
    webhook_id: Option<String>,
    source: Option<SourcePos>,
    #[serde(borrow)]
    event: Option<&'a serde_json::value::RawValue>,
    event_base64: Option<String>,
    #[serde(default)]
    event_truncated: bool,
    #[serde(default)]
    event_bytes: usize,
}

/// The delivery a replay of this dead letter makes: the same event bytes and
/// `webhook-id` to the same endpoint, with no attempts yet. Its latency is
/// counted from the replay (`now_ms`), not from the event's timestamp. Only a
/// delivery's dead letter with the whole event can be replayed.
pub fn replay_delivery(record: &[u8], now_ms: i64) -> Result<Delivery, String> {
    let letter: StoredLetter<'_> =
        serde_json::from_slice(record).map_err(|e| format!("the stored dead letter cannot be read: {e}"))?;
    let (Some(endpoint_id), Some(event_id), Some(event_type), Some(webhook_id), Some(source)) =
        (letter.endpoint_id, letter.event_id, letter.event_type, letter.webhook_id, letter.source)
    else {
        return Err(format!(
            "not a delivery (reason {}): an event that could not be decoded is replayed by publishing it again, fixed",
            letter.reason
        ));
    };
    if letter.event_truncated {
        return Err(format!(
            "the dead letter keeps only part of the {}-byte event; it is still at {}/{}/{} on the source topic",
            letter.event_bytes, source.topic, source.partition, source.offset
        ));
    }
    let payload = match (letter.event, letter.event_base64) {
        (Some(raw), _) => bytes::Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(bytes::Bytes::from)
            .map_err(|e| format!("event_base64 does not decode: {e}"))?,
        (None, None) => return Err("the dead letter holds no event".into()),
    };
    let event = crate::event::Event { id: event_id, event_type, location_id: None, time_ms: now_ms, payload, source };
    Ok(Delivery::unattempted(webhook_id, endpoint_id, &event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos() -> SourcePos {
        SourcePos { topic: "t".into(), partition: 1, offset: 9 }
    }

    #[test]
    fn oversize_events_are_truncated_so_the_dead_letter_fits_in_kafka() {
        let huge = vec![b'x'; 10 * 1024 * 1024];
        let err = InvalidEvent::TooLarge { size: huge.len(), limit: 1024 };
        let rec = invalid_record(&pos(), Some(&huge), &err, 0);
        assert!(rec.len() < 200 * 1024, "{} bytes", rec.len());
        let v: Value = serde_json::from_slice(&rec).expect("json");
        assert_eq!((v["event_truncated"].as_bool(), v["event_bytes"].as_u64()), (Some(true), Some(10 * 1024 * 1024)));
        assert_eq!(v["reason"], "too_large");

        let small = invalid_record(&pos(), Some(b"{ nope"), &InvalidEvent::InvalidJson("x".into()), 0);
        let v: Value = serde_json::from_slice(&small).expect("json");
        assert_eq!(v["event_base64"], b64(b"{ nope"));
        assert!(v.get("event_truncated").is_none());
    }

    #[test]
    fn delivery_records_embed_the_event_untouched_unless_oversize() {
        let mut d = crate::store::Delivery {
            webhook_id: "msg_1".into(),
            endpoint_id: "a".into(),
            event_id: "e".into(),
            event_type: "T".into(),
            event_time_ms: 0,
            source: pos(),
            attempts: 3,
            first_attempt_ms: 1_700_000_000_000,
            last_attempt_ms: 1_700_000_001_000,
            last_status: 503,
            last_error: String::new(),
            dead_letter_reason: None,
            payload: bytes::Bytes::from_static(br#"{"id":"e","n":1.250}"#),
        };
        let v: Value = serde_json::from_slice(&delivery_record(&d, DeliveryFailure::Exhausted, 0)).expect("json");
        assert_eq!(v["reason"], "exhausted");
        assert_eq!(v["last_status"], 503);
        assert!(v["last_error"].is_null());
        assert_eq!(v["first_attempt_at"], "2023-11-14T22:13:20Z");
        let raw = String::from_utf8(delivery_record(&d, DeliveryFailure::Exhausted, 0)).expect("utf8");
        assert!(raw.contains(r#""event":{"id":"e","n":1.250}"#), "embedded byte for byte: {raw}");
        let back = replay_delivery(&delivery_record(&d, DeliveryFailure::Exhausted, 0), 7).expect("replayable");
        assert_eq!(back.payload, d.payload, "byte for byte");
        assert_eq!((back.attempts, back.webhook_id.as_str(), back.event_time_ms), (0, "msg_1", 7));
        d.payload = bytes::Bytes::from_static(b"\xff not json");
        let back = replay_delivery(&delivery_record(&d, DeliveryFailure::Exhausted, 0), 7).expect("replayable");
        assert_eq!(back.payload, d.payload, "base64 form");
        let err = replay_delivery(&invalid_record(&pos(), Some(b"{"), &InvalidEvent::InvalidJson("x".into()), 0), 7);
        assert!(err.expect_err("invalid events are not replayed").contains("publishing it again"));
        d.payload = bytes::Bytes::from(vec![b' '; MAX_EMBEDDED_EVENT + 1]);
        let err = replay_delivery(&delivery_record(&d, DeliveryFailure::Rejected, 0), 7).expect_err("truncated");
        assert!(err.contains("t/1/9"), "{err}");
        let v: Value = serde_json::from_slice(&delivery_record(&d, DeliveryFailure::Rejected, 0)).expect("json");
        assert_eq!(v["event_truncated"], true);
        assert!(v.get("event").is_none());
        assert_eq!(v["event_base64"].as_str().map(str::len), Some(TRUNCATED_PREFIX / 3 * 4 + 4));
    }
}
