//! Subscriptions: which endpoints get which event.
//!
//! The [`Registry`] holds the endpoints and their enabled state. It is fed from
//! the config today and is the seam a management API will feed later: routing
//! reads an immutable [`RouteTable`] snapshot, so replacing the endpoint set is
//! one pointer swap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::EndpointConfig;
use crate::telemetry::metrics::{self, EndpointMetrics, OTHER_ENDPOINTS};

/// One entry of an endpoint's event-type filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeFilter {
    /// `*`: every type.
    Any,
    /// `ContactCreate`
    Exact(String),
    /// `Contact*`: every type starting with the prefix.
    Prefix(String),
}

impl TypeFilter {
    pub fn parse(s: &str) -> Result<TypeFilter, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(TypeFilter::Any);
        }
        let (body, wildcard) = match s.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        if body.is_empty() || body.contains('*') || body.chars().any(char::is_whitespace) {
            return Err(format!(
                "bad event-type filter {s:?}: use \"*\", an exact type such as \"ContactCreate\" or a prefix such as \"Contact*\""
            ));
        }
        Ok(if wildcard { TypeFilter::Prefix(body.to_owned()) } else { TypeFilter::Exact(body.to_owned()) })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            TypeFilter::Any => true,
            TypeFilter::Exact(t) => t == event_type,
            TypeFilter::Prefix(p) => event_type.starts_with(p.as_str()),
        }
    }
}

/// Failures in a row that make an outage: the 2xx after them starts a recall
/// of the endpoint's parked retries.
pub const RECOVERY_STREAK: u32 = 3;

/// An endpoint as the delivery path sees it: its config plus live state.
#[derive(Debug)]
pub struct Endpoint {
    pub config: EndpointConfig,
    pub metrics: EndpointMetrics,
    enabled: AtomicBool,
    removed: bool,
    /// Retry-class failures since the last 2xx. It starts at
    /// [`RECOVERY_STREAK`]: the store may hold retries parked before a restart.
    failures: AtomicU32,
    /// Retries of this endpoint may be parked in the schedule (true at start,
    /// for the same reason).
    may_have_parked: AtomicBool,
    /// It answered 2xx after an outage: its worker should bring the parked
    /// retries forward.
    recall_wanted: AtomicBool,
}

impl Endpoint {
    /// `label`: the endpoint's `endpoint` metric label (its id, or the shared
    /// one past the label limit).
    pub fn new(config: EndpointConfig, label: &str) -> Self {
        let metrics = EndpointMetrics::new(label);
        metrics.enabled.set(if config.enabled { 1.0 } else { 0.0 });
        metrics::endpoints_in_state(config.enabled).increment(1.0);
        let enabled = AtomicBool::new(config.enabled);
        Endpoint {
            config,
            metrics,
            enabled,
            removed: false,
            failures: AtomicU32::new(RECOVERY_STREAK),
            may_have_parked: AtomicBool::new(true),
            recall_wanted: AtomicBool::new(false),
        }
    }

    /// Stands in for an endpoint that still has deliveries in the store but is
    /// gone from the configuration: its worker dead-letters them
    /// (`endpoint_removed`), so nothing is stuck and nothing is sent.
    pub fn removed(id: &str) -> Self {
        let config = EndpointConfig {
            id: id.to_owned(),
            url: url::Url::parse("http://removed.invalid/").expect("static URL parses"),
            authorization: None,
            enabled: false,
            event_types: Vec::new(),
            location_ids: Vec::new(),
            secrets: Default::default(),
            rate_limit: crate::config::RateLimit {
                per_second: std::num::NonZeroU32::MIN.saturating_add(999),
                burst: std::num::NonZeroU32::MIN.saturating_add(999),
            },
            max_in_flight: std::num::NonZeroUsize::MIN.saturating_add(15),
            attempt_timeout: std::time::Duration::from_secs(5),
            legacy_hmac_header: false,
        };
        Endpoint {
            config,
            metrics: EndpointMetrics::noop(),
            enabled: AtomicBool::new(false),
            removed: true,
            failures: AtomicU32::new(0),
            may_have_parked: AtomicBool::new(false),
            recall_wanted: AtomicBool::new(false),
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed
    }
    pub fn id(&self) -> &str {
        &self.config.id
    }
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    /// Turns deliveries on or off; true if that changed anything.
    pub fn set_enabled(&self, on: bool) -> bool {
        let changed = self.enabled.swap(on, Ordering::AcqRel) != on;
        if changed && !self.removed {
            self.metrics.enabled.set(if on { 1.0 } else { 0.0 });
            metrics::endpoints_in_state(on).increment(1.0);
            metrics::endpoints_in_state(!on).decrement(1.0);
        }
        changed
    }
    /// An attempt failed with a retry outcome; `recallable`: its retry was
    /// scheduled and may be brought forward.
    pub fn note_failed(&self, recallable: bool) {
        let _ = self.failures.fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| Some(f.saturating_add(1)));
        if recallable {
            self.may_have_parked.store(true, Ordering::Release);
        }
    }
    /// An attempt was delivered: true if that ends an outage (at least
    /// [`RECOVERY_STREAK`] failures in a row before it) while retries may be
    /// parked, and the worker has been asked to recall them. A single failing
    /// delivery among successes is no outage: its retry keeps its time.
    pub fn note_delivered(&self) -> bool {
        // Most deliveries follow a success: read before writing the shared counter.
        if self.failures.load(Ordering::Acquire) == 0 {
            return false;
        }
        let streak = self.failures.swap(0, Ordering::AcqRel);
        if streak >= RECOVERY_STREAK && self.may_have_parked.swap(false, Ordering::AcqRel) {
            self.recall_wanted.store(true, Ordering::Release);
            return true;
        }
        false
    }
    /// Whether a recall was asked for and not yet taken.
    pub fn recall_wanted(&self) -> bool {
        self.recall_wanted.load(Ordering::Acquire)
    }
    /// Takes the request for a recall: true if there was one.
    pub fn take_recall(&self) -> bool {
        self.recall_wanted.swap(false, Ordering::AcqRel)
    }
    /// Whether the endpoint is failing again: [`RECOVERY_STREAK`] failures in
    /// a row since its last 2xx.
    pub fn is_failing(&self) -> bool {
        self.failures.load(Ordering::Acquire) >= RECOVERY_STREAK
    }
    /// The subscription rule stated plainly; the index must agree with it.
    #[cfg(test)]
    fn accepts(&self, event_type: &str, location: Option<&str>) -> bool {
        self.config.event_types.iter().any(|f| f.matches(event_type))
            && (self.config.location_ids.is_empty()
                || location.is_some_and(|l| self.config.location_ids.iter().any(|x| x == l)))
    }
}

/// Endpoints by event-type filter: exact types by hash, prefixes and `*` by scan.
#[derive(Debug, Default)]
struct TypeIndex {
    exact: HashMap<String, Vec<usize>>,
    prefix: Vec<(String, usize)>,
    any: Vec<usize>,
}

impl TypeIndex {
    fn add(&mut self, filter: &TypeFilter, i: usize) {
        match filter {
            TypeFilter::Any => self.any.push(i),
            TypeFilter::Exact(x) => self.exact.entry(x.clone()).or_default().push(i),
            TypeFilter::Prefix(p) => self.prefix.push((p.clone(), i)),
        }
    }

    fn collect(&self, event_type: &str, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.any);
        if let Some(v) = self.exact.get(event_type) {
            out.extend_from_slice(v);
        }
        out.extend(self.prefix.iter().filter(|(p, _)| event_type.starts_with(p.as_str())).map(|(_, i)| *i));
    }
}

/// An index over the endpoints, so an event is matched against the few
/// endpoints that could want it rather than every filter of every endpoint:
/// first by account (endpoints without a location filter, plus those
/// filtering on the event's `locationId`), then by type.
#[derive(Debug, Default)]
pub struct RouteTable {
    endpoints: Vec<Arc<Endpoint>>,
    by_id: HashMap<String, usize>,
    any_location: TypeIndex,
    by_location: HashMap<String, TypeIndex>,
}

impl RouteTable {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let mut t = RouteTable { endpoints, ..Default::default() };
        for (i, e) in t.endpoints.iter().enumerate() {
            t.by_id.insert(e.id().to_owned(), i);
            for f in &e.config.event_types {
                if e.config.location_ids.is_empty() {
                    t.any_location.add(f, i);
                }
                for loc in &e.config.location_ids {
                    t.by_location.entry(loc.clone()).or_default().add(f, i);
                }
            }
        }
        t
    }

    /// The enabled endpoints subscribed to this event, each once, in config order.
    pub fn route(&self, event_type: &str, location: Option<&str>) -> Vec<Arc<Endpoint>> {
        let mut hits = Vec::new();
        self.any_location.collect(event_type, &mut hits);
        if let Some(index) = location.and_then(|l| self.by_location.get(l)) {
            index.collect(event_type, &mut hits);
        }
        hits.sort_unstable();
        hits.dedup();
        hits.into_iter().map(|i| &self.endpoints[i]).filter(|e| e.is_enabled()).cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.by_id.get(id).map(|&i| &self.endpoints[i])
    }

    pub fn all(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

/// The current set of endpoints.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    table: Arc<RwLock<Arc<RouteTable>>>,
}

impl Registry {
    /// The first `label_limit` endpoints get their id as metric label, the
    /// rest share [`OTHER_ENDPOINTS`].
    pub fn from_configs(configs: &[EndpointConfig], label_limit: usize) -> Self {
        let endpoints = configs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let label = if i < label_limit { c.id.as_str() } else { OTHER_ENDPOINTS };
                Arc::new(Endpoint::new(c.clone(), label))
            })
            .collect();
        Registry { table: Arc::new(RwLock::new(Arc::new(RouteTable::new(endpoints)))) }
    }

    /// A consistent snapshot to route a batch against.
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.snapshot().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn registry(toml: &str) -> Registry {
        let cfg = Config::from_toml_str(toml, Vec::new()).expect("valid config");
        Registry::from_configs(&cfg.endpoints, 1000)
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn ids(r: &Registry, ty: &str, loc: Option<&str>) -> Vec<String> {
        r.snapshot().route(ty, loc).iter().map(|e| e.id().to_owned()).collect()
    }

    #[test]
    fn a_recall_is_asked_for_after_an_outage_not_after_one_failing_delivery() {
        let r = registry(&format!(
            "[[endpoints]]\nid = \"a\"\nurl = \"https://a.example.com/\"\nsecrets = [\"{SECRET}\"]\n"
        ));
        let ep = r.get("a").expect("a");
        assert!(ep.note_delivered(), "the first 2xx after a start recalls what an earlier run parked");
        assert!(ep.take_recall() && !ep.take_recall(), "taken once");
        assert!(!ep.note_delivered(), "nothing failed since");

        ep.note_failed(true);
        assert!(!ep.is_failing());
        assert!(!ep.note_delivered(), "one failing delivery among successes is no outage: its retry keeps its time");
        for _ in 0..RECOVERY_STREAK {
            ep.note_failed(false);
        }
        assert!(ep.is_failing());
        assert!(ep.note_delivered(), "an outage ended, and a retry was parked before it");
        assert!(!ep.is_failing());
        assert!(ep.take_recall());

        for _ in 0..RECOVERY_STREAK {
            ep.note_failed(false);
        }
        assert!(!ep.note_delivered(), "only Retry-After retries since the last recall: none to bring forward");
    }

    #[test]
    fn filters_parse_and_match() {
        assert_eq!(TypeFilter::parse("*"), Ok(TypeFilter::Any));
        assert_eq!(TypeFilter::parse("Contact*"), Ok(TypeFilter::Prefix("Contact".into())));
        assert_eq!(TypeFilter::parse("InvoicePaid"), Ok(TypeFilter::Exact("InvoicePaid".into())));
        for bad in ["", "**", "*Contact", "Con*tact", "a b"] {
            assert!(TypeFilter::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(TypeFilter::Prefix("Contact".into()).matches("ContactTagUpdate"));
        assert!(!TypeFilter::Prefix("Contact".into()).matches("InvoicePaid"));
        assert!(!TypeFilter::Exact("ContactCreate".into()).matches("ContactCreated"));
    }

    #[test]
    fn events_go_to_every_enabled_matching_endpoint_once() {
        let r = registry(&format!(
            r#"
            [[endpoints]]
            id = "all"
            url = "https://hooks.example.com/"
            secrets = ["{SECRET}"]
            [[endpoints]]
            id = "contacts"
            url = "https://hooks.example.com/"
            event_types = ["Contact*", "ContactCreate"]
            secrets = ["{SECRET}"]
            [[endpoints]]
            id = "loc42-invoices"
            url = "https://hooks.example.com/"
            event_types = ["InvoicePaid"]
            location_ids = ["loc_42"]
            secrets = ["{SECRET}"]
            [[endpoints]]
            id = "off"
            url = "https://hooks.example.com/"
            enabled = false
            secrets = ["{SECRET}"]
            "#
        ));
        assert_eq!(ids(&r, "ContactCreate", None), ["all", "contacts"]);
        assert_eq!(ids(&r, "InvoicePaid", Some("loc_42")), ["all", "loc42-invoices"]);
        assert_eq!(ids(&r, "InvoicePaid", Some("loc_7")), ["all"]);
        assert_eq!(ids(&r, "InvoicePaid", None), ["all"]);
        r.get("all").expect("exists").set_enabled(false);
        assert_eq!(ids(&r, "NoteCreate", None), Vec::<String>::new());
    }

    #[test]
    fn the_index_agrees_with_the_plain_rule() {
        let types = ["ContactCreate", "ContactDelete", "InvoicePaid", "NoteCreate", "Contact"];
        let filters = ["*", "Contact*", "ContactCreate", "Invoice*", "NoteCreate"];
        let locations = [None, Some("loc_1"), Some("loc_2")];
        let mut toml = String::new();
        for i in 0..60 {
            let f1 = filters[i % filters.len()];
            let f2 = filters[(i / 5) % filters.len()];
            let locs = match i % 4 {
                0 => String::new(),
                1 => "location_ids = [\"loc_1\"]".into(),
                2 => "location_ids = [\"loc_2\", \"loc_1\"]".into(),
                _ => "location_ids = [\"loc_9\"]".into(),
            };
            toml.push_str(&format!(
                "[[endpoints]]\nid = \"e{i}\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{SECRET}\"]\nevent_types = [\"{f1}\", \"{f2}\"]\n{locs}\nenabled = {}\n",
                i % 7 != 0
            ));
        }
        let r = registry(&toml);
        let table = r.snapshot();
        for ty in types {
            for loc in locations {
                let routed = table.route(ty, loc);
                let indexed: Vec<&str> = routed.iter().map(|e| e.id()).collect();
                let plain: Vec<&str> =
                    table.all().iter().filter(|e| e.is_enabled() && e.accepts(ty, loc)).map(|e| e.id()).collect();
                assert_eq!(indexed, plain, "type {ty}, location {loc:?}");
            }
        }
    }
}
