//! The metrics catalogue: every metric webhookd exports is named, described
//! and given its labels here, and nowhere else.
//!
//! Naming rule: `webhookd_<thing>_<unit>[_total]`; counters end in `_total`,
//! durations are in seconds. Labels stay bounded: `reason`, `outcome`,
//! `result` and `state` are fixed sets; `topic` and `partition` are the
//! partitions this instance owns; `endpoint` is the configured endpoint id for
//! the first `admin.endpoint_label_limit` endpoints and [`OTHER_ENDPOINTS`]
//! for the rest, so 100,000 endpoints make at most limit + 1 series each.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Always 1; label `version`.
pub const BUILD_INFO: &str = "webhookd_build_info";
/// 1 while `/readyz` would answer 200, else 0.
pub const READY: &str = "webhookd_ready";
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
/// Event timestamp to the 2xx that delivered it (includes retries); label `endpoint`.
pub const DELIVERY_LATENCY: &str = "webhookd_delivery_latency_seconds";
/// Retries written to the schedule; label `endpoint`.
pub const RETRIES_SCHEDULED: &str = "webhookd_retries_scheduled_total";
/// Parked retries brought forward when their endpoint recovered; label `endpoint`.
pub const RETRIES_RECALLED: &str = "webhookd_retries_recalled_total";
/// Dead letters produced; label `reason`.
pub const DEAD_LETTERS: &str = "webhookd_dead_letters_total";
/// Dead letters moved back to the outbox by an operator's replay.
pub const DEAD_LETTERS_REPLAYED: &str = "webhookd_dead_letters_replayed_total";
/// Deliveries due now, across endpoints.
pub const OUTBOX_READY: &str = "webhookd_outbox_ready_deliveries";
/// Deliveries waiting in the retry schedule.
pub const OUTBOX_WAITING: &str = "webhookd_outbox_waiting_deliveries";
/// Attempts that had to wait for the endpoint's rate limit; label `endpoint`.
pub const RATE_LIMITED: &str = "webhookd_rate_limited_total";
/// Attempts that waited for a place under `delivery.max_connections_per_host`.
pub const HOST_WAITS: &str = "webhookd_host_connection_waits_total";
/// Attempts under way; label `endpoint`.
pub const IN_FLIGHT: &str = "webhookd_in_flight_requests";
/// 1 when an endpoint is enabled, 0 when disabled; label `endpoint`.
pub const ENDPOINT_ENABLED: &str = "webhookd_endpoint_enabled";
/// Configured endpoints by `state` (enabled, disabled).
pub const ENDPOINTS: &str = "webhookd_endpoints";
/// Messages behind the partition's end not yet settled and committed
/// (librdkafka's `consumer_lag`, refreshed every few seconds); labels `topic`, `partition`.
pub const CONSUMER_LAG: &str = "webhookd_consumer_lag_messages";
/// Source partitions assigned to this instance.
pub const PARTITIONS_ASSIGNED: &str = "webhookd_partitions_assigned";
/// RocksDB's SST files across column families (the write-ahead log excluded).
pub const STORE_SIZE: &str = "webhookd_store_size_bytes";
/// RocksDB's write-ahead log files (bounded by `store::MAX_TOTAL_WAL`).
pub const STORE_WAL: &str = "webhookd_store_wal_bytes";
/// RocksDB's memory; label `kind` (memtables, table_readers, block_cache).
pub const STORE_MEMORY: &str = "webhookd_store_memory_bytes";
/// The heap, by the binary's allocator (jemalloc, which serves RocksDB and
/// librdkafka as well); label `kind`: `allocated` (live allocations) and
/// `resident` (physical memory the allocator holds). The process's RSS
/// beyond `resident` is thread stacks and the binary.
pub const ALLOCATOR: &str = "webhookd_allocator_bytes";
/// Offset commits; label `result` (ok, error).
pub const OFFSET_COMMITS: &str = "webhookd_offset_commits_total";
/// Duration of each store write: one group of operations (intake, outcomes,
/// retries) committed in one RocksDB write batch, the fdatasync included when
/// `store.sync_writes` is on. Every event waits for one.
pub const STORE_WRITE_DURATION: &str = "webhookd_store_write_duration_seconds";
/// Each wait of the consumer for the endpoint workers to catch up
/// (`store::IntakeGate`): the machine is behind on deliveries (the workers
/// are busy, have 4,096 or more ready deliveries that they will deliver within
/// 0.5 s, and no endpoint has run dry), so more intake would only wait in the
/// store.
pub const INTAKE_WAIT: &str = "webhookd_intake_wait_seconds";
/// Failed RocksDB writes.
pub const STORE_WRITE_ERRORS: &str = "webhookd_store_write_errors_total";
/// Stored records that could not be decoded and were quarantined.
pub const STORE_CORRUPT_RECORDS: &str = "webhookd_store_corrupt_records_total";
/// Partitions whose position the broker no longer had (retention), reset to its oldest offset.
pub const CONSUMER_OFFSET_RESETS: &str = "webhookd_consumer_offset_resets_total";

/// How often histogram samples are folded into buckets without a scrape.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The `endpoint` label shared by endpoints beyond `admin.endpoint_label_limit`.
pub const OTHER_ENDPOINTS: &str = "_other";

const ATTEMPT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// From 100 µs (a synced write on a fast local disk) to 2.5 s (a disk in trouble).
const STORE_WRITE_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// From milliseconds (a healthy pipeline) to a day (the default retry span).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];
/// From a millisecond to `store::gate::MAX_PAUSE`, the longest wait.
const INTAKE_WAIT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];

fn describe() {
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which webhookd this is.");
    describe_gauge!(READY, "1 while the instance is ready (the /readyz checks pass), else 0.");
    describe_counter!(EVENTS_CONSUMED, Unit::Count, "Kafka messages read from the source topics.");
    describe_counter!(EVENTS_DUPLICATE, Unit::Count, "Events dropped as duplicates within the dedup window.");
    describe_counter!(EVENTS_INVALID, Unit::Count, "Messages that could not be decoded, by reason.");
    describe_counter!(DELIVERIES, Unit::Count, "Delivery attempts by endpoint and outcome.");
    describe_histogram!(ATTEMPT_DURATION, Unit::Seconds, "Delivery attempt duration, connect to last body byte.");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Event timestamp to the 2xx that delivered it, retries included."
    );
    describe_counter!(RETRIES_SCHEDULED, Unit::Count, "Retries written to the retry schedule.");
    describe_counter!(
        RETRIES_RECALLED,
        Unit::Count,
        "Parked retries brought forward to the ready queue when their endpoint answered 2xx again."
    );
    describe_counter!(DEAD_LETTERS, Unit::Count, "Dead letters produced, by reason.");
    describe_counter!(DEAD_LETTERS_REPLAYED, Unit::Count, "Dead letters moved back to the outbox by a replay.");
    describe_gauge!(OUTBOX_READY, Unit::Count, "Deliveries due now.");
    describe_gauge!(OUTBOX_WAITING, Unit::Count, "Deliveries waiting in the retry schedule.");
    describe_counter!(RATE_LIMITED, Unit::Count, "Attempts delayed by the endpoint's rate limit.");
    describe_counter!(
        HOST_WAITS,
        Unit::Count,
        "Attempts that waited for a place under delivery.max_connections_per_host."
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Delivery attempts under way.");
    describe_gauge!(ENDPOINT_ENABLED, Unit::Count, "1 if the endpoint is enabled, 0 if disabled.");
    describe_gauge!(ENDPOINTS, Unit::Count, "Configured endpoints by state (enabled, disabled).");
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Messages past the committed offset of each owned partition.");
    describe_gauge!(PARTITIONS_ASSIGNED, Unit::Count, "Source partitions assigned to this instance.");
    describe_gauge!(STORE_SIZE, Unit::Bytes, "Size of RocksDB's SST files, all column families.");
    describe_gauge!(STORE_WAL, Unit::Bytes, "Size of RocksDB's write-ahead log files.");
    describe_gauge!(STORE_MEMORY, Unit::Bytes, "RocksDB's memory: memtables, table readers, block cache.");
    describe_gauge!(
        ALLOCATOR,
        Unit::Bytes,
        "The heap (jemalloc): allocated (live) and resident (held by the allocator)."
    );
    describe_counter!(OFFSET_COMMITS, Unit::Count, "Kafka offset commits by result.");
    describe_counter!(
        CONSUMER_OFFSET_RESETS,
        Unit::Count,
        "Partitions whose position the broker no longer had, reset to the oldest offset it has (events deleted by retention unread are skipped)."
    );
    describe_histogram!(
        STORE_WRITE_DURATION,
        Unit::Seconds,
        "Duration of each store write batch, the fdatasync included when store.sync_writes is on."
    );
    describe_histogram!(
        INTAKE_WAIT,
        Unit::Seconds,
        "Each wait of the consumer for the endpoint workers to catch up (backpressure)."
    );
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
                .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.to_owned()), LATENCY_BUCKETS)
                .expect("buckets are non-empty")
                .set_buckets_for_metric(Matcher::Full(STORE_WRITE_DURATION.to_owned()), STORE_WRITE_BUCKETS)
                .expect("buckets are non-empty")
                .set_buckets_for_metric(Matcher::Full(INTAKE_WAIT.to_owned()), INTAKE_WAIT_BUCKETS)
                .expect("buckets are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a host application);
            // then metrics go there and this handle renders ours, empty.
            let _ = metrics::set_global_recorder(recorder);
            // Histogram samples are kept raw until folded into their buckets,
            // which a scrape does; nobody may be scraping (Prometheus down, a
            // laptop), and at thousands of attempts a second the samples
            // would pile up. Fold them every few seconds regardless.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("webhookd-metrics".into()).spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            start_at_zero();
            handle
        })
        .clone()
}

/// Registers the series whose label values are known up front, so they are
/// exported (at 0) before anything happens: `rate()` and alerts see a
/// counter from its start instead of from its first increment.
fn start_at_zero() {
    for name in [
        EVENTS_CONSUMED,
        EVENTS_DUPLICATE,
        DEAD_LETTERS_REPLAYED,
        STORE_WRITE_ERRORS,
        STORE_CORRUPT_RECORDS,
        HOST_WAITS,
        CONSUMER_OFFSET_RESETS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in crate::event::InvalidEvent::REASONS {
        metrics::counter!(EVENTS_INVALID, "reason" => reason).increment(0);
        metrics::counter!(DEAD_LETTERS, "reason" => reason).increment(0);
    }
    for failure in crate::dead_letter::DeliveryFailure::ALL {
        metrics::counter!(DEAD_LETTERS, "reason" => failure.as_str()).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(OFFSET_COMMITS, "result" => result).increment(0);
    }
    for state in [true, false] {
        endpoints_in_state(state).increment(0.0);
    }
    for gauge in [READY, OUTBOX_READY, OUTBOX_WAITING, PARTITIONS_ASSIGNED, STORE_SIZE, STORE_WAL] {
        metrics::gauge!(gauge).increment(0.0);
    }
    for kind in ["memtables", "table_readers", "block_cache"] {
        metrics::gauge!(STORE_MEMORY, "kind" => kind).increment(0.0);
    }
    // Exported with a count of 0 until the first wait, which may never come.
    let _ = metrics::histogram!(INTAKE_WAIT);
}

/// The `outcome` label values of [`DELIVERIES`].
const OUTCOMES: [&str; 4] = ["delivered", "retry", "dead_letter", "gone"];

/// One endpoint's series, resolved once when the endpoint is built, so an
/// attempt does no registry lookups and allocates no labels. Endpoints past
/// the label limit share the [`OTHER_ENDPOINTS`] series (gauges such as
/// in-flight add up; `endpoint_enabled` is not exported for them).
#[derive(Debug)]
pub struct EndpointMetrics {
    pub in_flight: Gauge,
    pub attempt_duration: Histogram,
    pub delivery_latency: Histogram,
    pub rate_limited: Counter,
    pub retries_scheduled: Counter,
    pub retries_recalled: Counter,
    pub enabled: Gauge,
    deliveries: [Counter; 4],
}

impl EndpointMetrics {
    /// `label`: the endpoint id, or [`OTHER_ENDPOINTS`].
    pub fn new(label: &str) -> Self {
        let l = || ("endpoint", label.to_owned());
        EndpointMetrics {
            in_flight: metrics::gauge!(IN_FLIGHT, &[l()]),
            attempt_duration: metrics::histogram!(ATTEMPT_DURATION, &[l()]),
            delivery_latency: metrics::histogram!(DELIVERY_LATENCY, &[l()]),
            rate_limited: metrics::counter!(RATE_LIMITED, &[l()]),
            retries_scheduled: metrics::counter!(RETRIES_SCHEDULED, &[l()]),
            retries_recalled: metrics::counter!(RETRIES_RECALLED, &[l()]),
            enabled: if label == OTHER_ENDPOINTS { Gauge::noop() } else { metrics::gauge!(ENDPOINT_ENABLED, &[l()]) },
            deliveries: OUTCOMES.map(|o| metrics::counter!(DELIVERIES, &[l(), ("outcome", o.to_owned())])),
        }
    }

    /// Series for a stand-in endpoint (one removed from the config): none.
    pub fn noop() -> Self {
        EndpointMetrics {
            in_flight: Gauge::noop(),
            attempt_duration: Histogram::noop(),
            delivery_latency: Histogram::noop(),
            rate_limited: Counter::noop(),
            retries_scheduled: Counter::noop(),
            retries_recalled: Counter::noop(),
            enabled: Gauge::noop(),
            deliveries: [Counter::noop(), Counter::noop(), Counter::noop(), Counter::noop()],
        }
    }

    /// The [`DELIVERIES`] counter for an outcome label (one of [`OUTCOMES`]).
    pub fn delivery(&self, outcome: &str) -> &Counter {
        let i = OUTCOMES.iter().position(|o| *o == outcome).expect("outcome labels are the catalogue's");
        &self.deliveries[i]
    }
}

/// jemalloc's figures for [`ALLOCATOR`], as (kind, bytes). Any program that
/// links this crate allocates through jemalloc, C and C++ code included (it
/// overrides `malloc`), so they cover the whole heap. jemalloc caches them
/// until the epoch advances.
pub fn allocator_stats() -> Option<[(&'static str, u64); 2]> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some([("allocated", stats::allocated::read().ok()? as u64), ("resident", stats::resident::read().ok()? as u64)])
}

/// Sets [`ALLOCATOR`]; called at scrape time.
pub fn refresh_allocator() {
    for (kind, bytes) in allocator_stats().into_iter().flatten() {
        metrics::gauge!(ALLOCATOR, "kind" => kind).set(bytes as f64);
    }
}

/// The [`ENDPOINTS`] gauge of a state.
pub fn endpoints_in_state(enabled: bool) -> Gauge {
    metrics::gauge!(ENDPOINTS, "state" => if enabled { "enabled" } else { "disabled" })
}
