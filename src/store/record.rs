//! The stored form of a pending delivery: a small versioned binary layout,
//! length-prefixed fields, the payload last (copied once on encode).

use bytes::{Buf, BufMut, Bytes};

use crate::event::{Event, SourcePos};

const VERSION: u8 = 1;

/// One (event, endpoint) pair still to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub webhook_id: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    pub event_time_ms: i64,
    pub source: SourcePos,
    /// Attempts made so far.
    pub attempts: u32,
    /// Unix ms of the first and latest attempt (0: none yet).
    pub first_attempt_ms: i64,
    pub last_attempt_ms: i64,
    /// Last HTTP status (0: none) and last transport error ("" if none).
    pub last_status: u16,
    pub last_error: String,
    /// Set when the delivery was given up but its dead letter could not be
    /// produced yet: the reason to produce it with on the next turn.
    pub dead_letter_reason: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt delivery record: {0}")]
pub struct CorruptRecord(pub &'static str);

impl Delivery {
    /// The first delivery of `event` to an endpoint: no attempts yet.
    pub fn new(event: &Event, endpoint_id: &str) -> Delivery {
        Delivery::unattempted(crate::event::webhook_id(&event.id, endpoint_id), endpoint_id.to_owned(), event)
    }

    /// A delivery with no attempts yet: `event`'s id, type, time, source and
    /// payload under this `webhook-id` to this endpoint.
    pub fn unattempted(webhook_id: String, endpoint_id: String, event: &Event) -> Delivery {
        Delivery {
            webhook_id,
            endpoint_id,
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            event_time_ms: event.time_ms,
            source: event.source.clone(),
            attempts: 0,
            first_attempt_ms: 0,
            last_attempt_ms: 0,
            last_status: 0,
            last_error: String::new(),
            dead_letter_reason: None,
            payload: event.payload.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let strings = [&self.webhook_id, &self.endpoint_id, &self.event_id, &self.event_type, &self.source.topic];
        let text = strings.iter().map(|s| s.len()).sum::<usize>()
            + self.last_error.len()
            + self.dead_letter_reason.as_ref().map_or(0, String::len);
        // Fixed-size fields and length prefixes: at most 76 bytes.
        let mut b = Vec::with_capacity(80 + text + self.payload.len());
        b.put_u8(VERSION);
        for s in strings {
            put_str(&mut b, s);
        }
        b.put_i32(self.source.partition);
        b.put_i64(self.source.offset);
        b.put_i64(self.event_time_ms);
        b.put_u32(self.attempts);
        b.put_i64(self.first_attempt_ms);
        b.put_i64(self.last_attempt_ms);
        b.put_u16(self.last_status);
        put_str(&mut b, &self.last_error);
        match &self.dead_letter_reason {
            Some(r) => {
                b.put_u8(1);
                put_str(&mut b, r);
            }
            None => b.put_u8(0),
        }
        b.put_u32(self.payload.len() as u32);
        b.put_slice(&self.payload);
        b
    }

    pub fn decode(raw: &[u8]) -> Result<Delivery, CorruptRecord> {
        let mut b = raw;
        if get_u8(&mut b)? != VERSION {
            return Err(CorruptRecord("unknown version"));
        }
        let webhook_id = get_str(&mut b)?;
        let endpoint_id = get_str(&mut b)?;
        let event_id = get_str(&mut b)?;
        let event_type = get_str(&mut b)?;
        let topic = get_str(&mut b)?;
        need(b, 4 + 8 + 8 + 4 + 8 + 8 + 2)?;
        let partition = b.get_i32();
        let offset = b.get_i64();
        let event_time_ms = b.get_i64();
        let attempts = b.get_u32();
        let first_attempt_ms = b.get_i64();
        let last_attempt_ms = b.get_i64();
        let last_status = b.get_u16();
        let last_error = get_str(&mut b)?;
        let dead_letter_reason = match get_u8(&mut b)? {
            0 => None,
            _ => Some(get_str(&mut b)?),
        };
        need(b, 4)?;
        let len = b.get_u32() as usize;
        need(b, len)?;
        let payload = Bytes::copy_from_slice(&b[..len]);
        Ok(Delivery {
            webhook_id,
            endpoint_id,
            event_id,
            event_type,
            event_time_ms,
            source: SourcePos { topic, partition, offset },
            attempts,
            first_attempt_ms,
            last_attempt_ms,
            last_status,
            last_error,
            dead_letter_reason,
            payload,
        })
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.put_u32(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn need(b: &[u8], n: usize) -> Result<(), CorruptRecord> {
    if b.remaining() < n { Err(CorruptRecord("truncated")) } else { Ok(()) }
}

fn get_u8(b: &mut &[u8]) -> Result<u8, CorruptRecord> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn get_str(b: &mut &[u8]) -> Result<String, CorruptRecord> {
    need(b, 4)?;
    let len = b.get_u32() as usize;
    need(b, len)?;
    let s = std::str::from_utf8(&b[..len]).map_err(|_| CorruptRecord("string is not UTF-8"))?.to_owned();
    b.advance(len);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Delivery {
        Delivery {
            webhook_id: "msg_1".into(),
            endpoint_id: "ep".into(),
            event_id: "evt_1".into(),
            event_type: "ContactCreate".into(),
            event_time_ms: 1_700_000_000_000,
            source: SourcePos { topic: "events".into(), partition: 3, offset: 42 },
            attempts: 2,
            first_attempt_ms: 5,
            last_attempt_ms: 9,
            last_status: 503,
            last_error: "".into(),
            dead_letter_reason: Some("exhausted".into()),
            payload: Bytes::from_static(br#"{"id":"evt_1"}"#),
        }
    }

    #[test]
    fn round_trips() {
        let d = sample();
        assert_eq!(Delivery::decode(&d.encode()).expect("decodes"), d);
        let mut d2 = sample();
        d2.dead_letter_reason = None;
        assert_eq!(Delivery::decode(&d2.encode()).expect("decodes"), d2);
    }

    #[test]
    fn truncation_is_detected_not_panicked_on() {
        let raw = sample().encode();
        for cut in 0..raw.len() {
            assert!(Delivery::decode(&raw[..cut]).is_err(), "cut at {cut}");
        }
    }
}
