//! SPEC.md's outcome table as one pure function: what an attempt's result
//! means for the delivery.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | delivered |
//! | connect/TLS/IO error, over budget, 408, 425, 429, 5xx except 501 | retry |
//! | 3xx, 400, 401, 403, 404, 405, 413, 422, 501, other 4xx | dead-letter |
//! | 410 | dead-letter and disable the endpoint |

use std::time::{Duration, SystemTime};

/// How an attempt ended before any status was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("attempt exceeded its {0:?} budget")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("request refused before sending: {0}")]
    Refused(String),
    /// The SSRF guard refused the destination: permanent.
    #[error("{0}")]
    Destination(String),
}

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The parsed `Retry-After` header, if any.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again; `retry_after` is the receiver's wish (only honoured on 429/503).
    Retry {
        retry_after: Option<Duration>,
    },
    /// Give up now.
    DeadLetter,
    /// 410: give up and disable the endpoint.
    Gone,
}

impl Outcome {
    /// Label value for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::DeadLetter => "dead_letter",
            Outcome::Gone => "gone",
        }
    }
}

pub fn classify(result: &Result<Response, AttemptError>) -> Outcome {
    let response = match result {
        Ok(r) => r,
        Err(AttemptError::Refused(_) | AttemptError::Destination(_)) => return Outcome::DeadLetter,
        Err(_) => return Outcome::Retry { retry_after: None },
    };
    match response.status {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Gone,
        429 | 503 => Outcome::Retry { retry_after: response.retry_after },
        408 | 425 => Outcome::Retry { retry_after: None },
        501 => Outcome::DeadLetter,
        500..=599 => Outcome::Retry { retry_after: None },
        // 1xx are never final in HTTP/1.1 clients; anything else odd is permanent.
        _ => Outcome::DeadLetter,
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v).ok().map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Outcome {
        classify(&Ok(Response { status: s, retry_after: None }))
    }

    #[test]
    fn the_outcome_table() {
        let retry = Outcome::Retry { retry_after: None };
        let table: &[(u16, Outcome)] = &[
            (200, Outcome::Delivered),
            (201, Outcome::Delivered),
            (204, Outcome::Delivered),
            (299, Outcome::Delivered),
            (301, Outcome::DeadLetter),
            (302, Outcome::DeadLetter),
            (307, Outcome::DeadLetter),
            (308, Outcome::DeadLetter),
            (400, Outcome::DeadLetter),
            (401, Outcome::DeadLetter),
            (403, Outcome::DeadLetter),
            (404, Outcome::DeadLetter),
            (405, Outcome::DeadLetter),
            (408, retry),
            (409, Outcome::DeadLetter),
            (410, Outcome::Gone),
            (413, Outcome::DeadLetter),
            (422, Outcome::DeadLetter),
            (425, retry),
            (429, retry),
            (451, Outcome::DeadLetter),
            (500, retry),
            (501, Outcome::DeadLetter),
            (502, retry),
            (503, retry),
            (504, retry),
            (599, retry),
        ];
        for &(code, want) in table {
            assert_eq!(status(code), want, "status {code}");
        }
    }

    #[test]
    fn transport_failures_retry_and_refusals_do_not() {
        for e in [
            AttemptError::Timeout(Duration::from_secs(5)),
            AttemptError::Connect("connection refused".into()),
            AttemptError::Io("connection reset".into()),
        ] {
            assert_eq!(classify(&Err(e)), Outcome::Retry { retry_after: None });
        }
        assert_eq!(classify(&Err(AttemptError::Refused("bad header".into()))), Outcome::DeadLetter);
        assert_eq!(classify(&Err(AttemptError::Destination("10.0.0.1 is private".into()))), Outcome::DeadLetter);
    }

    #[test]
    fn retry_after_is_kept_only_for_429_and_503() {
        let ra = Some(Duration::from_secs(7));
        for code in [429, 503] {
            assert_eq!(classify(&Ok(Response { status: code, retry_after: ra })), Outcome::Retry { retry_after: ra });
        }
        assert_eq!(classify(&Ok(Response { status: 500, retry_after: ra })), Outcome::Retry { retry_after: None });
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
