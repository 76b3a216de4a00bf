//! The metrics catalogue: every metric webhookd exports is named, described
//! and given its labels here, and nowhere else.
//!
//! Naming rule: `webhookd_<thing>_<unit>[_total]`; counters end in `_total`,
//! durations are in seconds. Labels stay low-cardinality: `reason` and
//! `outcome` are fixed sets; `endpoint` is the configured endpoint id.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Kafka messages read from the source topics.
pub const EVENTS_CONSUMED: &str = "webhookd_events_consumed_total";
/// Valid events dropped because their id was seen within the dedup window.
pub const EVENTS_DUPLICATE: &str = "webhookd_events_duplicate_total";
/// Messages that failed decoding; label `reason`.
pub const EVENTS_INVALID: &str = "webhookd_events_invalid_total";
/// Attempt outcomes; labels `endpoint`, `outcome` (delivered, retry, dead_letter, gone).
pub const DELIVERIES: &str = "webhookd_deliveries_total";
/// Duration of each attempt, connect to last body byte; label `endpoint`.
pub const ATTEMPT_DURATION: &str = "webhookd_attempt_duration_seconds";
/// Retries written to the schedule; label `endpoint`.
pub const RETRIES_SCHEDULED: &str = "webhookd_retries_scheduled_total";
/// Dead letters produced; label `reason`.
pub const DEAD_LETTERS: &str = "webhookd_dead_letters_total";
/// Deliveries due now, across endpoints.
pub const OUTBOX_READY: &str = "webhookd_outbox_ready_deliveries";
/// Deliveries waiting in the retry schedule.
pub const OUTBOX_WAITING: &str = "webhookd_outbox_waiting_deliveries";
/// Attempts that had to wait for the endpoint's rate limit; label `endpoint`.
pub const RATE_LIMITED: &str = "webhookd_rate_limited_total";
/// Attempts under way; label `endpoint`.
pub const IN_FLIGHT: &str = "webhookd_in_flight_requests";
/// 1 when an endpoint is enabled, 0 when disabled; label `endpoint`.
pub const ENDPOINT_ENABLED: &str = "webhookd_endpoint_enabled";
/// Offset commits; label `result` (ok, error).
pub const OFFSET_COMMITS: &str = "webhookd_offset_commits_total";
/// Failed RocksDB writes.
pub const STORE_WRITE_ERRORS: &str = "webhookd_store_write_errors_total";
/// Stored records that could not be decoded and were quarantined.
pub const STORE_CORRUPT_RECORDS: &str = "webhookd_store_corrupt_records_total";

const ATTEMPT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn describe() {
    describe_counter!(EVENTS_CONSUMED, Unit::Count, "Kafka messages read from the source topics.");
    describe_counter!(EVENTS_DUPLICATE, Unit::Count, "Events dropped as duplicates within the dedup window.");
    describe_counter!(EVENTS_INVALID, Unit::Count, "Messages that could not be decoded, by reason.");
    describe_counter!(DELIVERIES, Unit::Count, "Delivery attempts by endpoint and outcome.");
    describe_histogram!(ATTEMPT_DURATION, Unit::Seconds, "Delivery attempt duration, connect to last body byte.");
    describe_counter!(RETRIES_SCHEDULED, Unit::Count, "Retries written to the retry schedule.");
    describe_counter!(DEAD_LETTERS, Unit::Count, "Dead letters produced, by reason.");
    describe_gauge!(OUTBOX_READY, Unit::Count, "Deliveries due now.");
    describe_gauge!(OUTBOX_WAITING, Unit::Count, "Deliveries waiting in the retry schedule.");
    describe_counter!(RATE_LIMITED, Unit::Count, "Attempts delayed by the endpoint's rate limit.");
    describe_gauge!(IN_FLIGHT, Unit::Count, "Delivery attempts under way.");
    describe_gauge!(ENDPOINT_ENABLED, Unit::Count, "1 if the endpoint is enabled, 0 if disabled.");
    describe_counter!(OFFSET_COMMITS, Unit::Count, "Kafka offset commits by result.");
    describe_counter!(STORE_WRITE_ERRORS, Unit::Count, "RocksDB write batches that failed.");
    describe_counter!(
        STORE_CORRUPT_RECORDS,
        Unit::Count,
        "Stored records that could not be decoded and were quarantined."
    );
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ATTEMPT_DURATION.to_owned()), ATTEMPT_BUCKETS)
                .expect("buckets are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a host application);
            // then metrics go there and this handle renders ours, empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The `outcome` label values of [`DELIVERIES`].
const OUTCOMES: [&str; 4] = ["delivered", "retry", "dead_letter", "gone"];

/// One endpoint's series, resolved once per endpoint worker, so an attempt
/// does no registry lookups and allocates no labels.
pub struct EndpointMetrics {
    pub in_flight: Gauge,
    pub attempt_duration: Histogram,
    pub rate_limited: Counter,
    pub retries_scheduled: Counter,
    pub enabled: Gauge,
    deliveries: [Counter; 4],
}

impl EndpointMetrics {
    pub fn new(endpoint: &str) -> Self {
        let label = || ("endpoint", endpoint.to_owned());
        EndpointMetrics {
            in_flight: metrics::gauge!(IN_FLIGHT, &[label()]),
            attempt_duration: metrics::histogram!(ATTEMPT_DURATION, &[label()]),
            rate_limited: metrics::counter!(RATE_LIMITED, &[label()]),
            retries_scheduled: metrics::counter!(RETRIES_SCHEDULED, &[label()]),
            enabled: metrics::gauge!(ENDPOINT_ENABLED, &[label()]),
            deliveries: OUTCOMES.map(|o| metrics::counter!(DELIVERIES, &[label(), ("outcome", o.to_owned())])),
        }
    }

    /// The [`DELIVERIES`] counter for an outcome label (one of [`OUTCOMES`]).
    pub fn delivery(&self, outcome: &str) -> &Counter {
        let i = OUTCOMES.iter().position(|o| *o == outcome).expect("outcome labels are the catalogue's");
        &self.deliveries[i]
    }
}
