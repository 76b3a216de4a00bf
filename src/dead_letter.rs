//! The dead-letter topic: what could not be delivered, and why.
//!
//! A dead letter is one JSON object (format in the README): the reason, where
//! the message came from, for deliveries the endpoint and attempt history, and
//! the original event (embedded as JSON when it was valid JSON, as base64
//! otherwise). The same bytes go to the topic and to the local index.

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
use crate::telemetry::metrics as m;

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
    /// The request was refused before sending (e.g. a forbidden destination).
    Refused,
}

impl DeliveryFailure {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryFailure::Rejected => "rejected",
            DeliveryFailure::Gone => "gone",
            DeliveryFailure::Exhausted => "exhausted",
            DeliveryFailure::EndpointDisabled => "endpoint_disabled",
            DeliveryFailure::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> DeliveryFailure {
        match s {
            "gone" => DeliveryFailure::Gone,
            "exhausted" => DeliveryFailure::Exhausted,
            "endpoint_disabled" => DeliveryFailure::EndpointDisabled,
            "refused" => DeliveryFailure::Refused,
            _ => DeliveryFailure::Rejected,
        }
    }
}

/// Produces dead letters; cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(kafka: &ClientConfig, topic: &str) -> Result<Self, KafkaError> {
        let producer = kafka
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()?;
        Ok(DeadLetters {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces one dead letter and waits for the broker's acknowledgement.
    pub async fn send(&self, key: &str, reason: &str, record: &[u8]) -> Result<(), KafkaError> {
        let headers = OwnedHeaders::new().insert(Header {
            key: "webhookd-reason",
            value: Some(reason),
        });
        let rec = FutureRecord::to(&self.topic)
            .key(key)
            .payload(record)
            .headers(headers);
        match self.producer.send(rec, Duration::from_secs(5)).await {
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
pub fn invalid_record(
    pos: &SourcePos,
    value: Option<&[u8]>,
    err: &InvalidEvent,
    now_ms: i64,
) -> Vec<u8> {
    json!({
        "reason": err.reason(),
        "detail": err.to_string(),
        "source": source(pos),
        "dead_lettered_at": rfc3339(now_ms),
        "event_base64": value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
    })
    .to_string()
    .into_bytes()
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
}

/// The record for a delivery that was given up.
pub fn delivery_record(d: &Delivery, failure: DeliveryFailure, now_ms: i64) -> Vec<u8> {
    let event = std::str::from_utf8(&d.payload)
        .ok()
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
        event_base64: event
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&d.payload)),
        event,
    };
    serde_json::to_vec(&letter).expect("a dead letter always serialises")
}
