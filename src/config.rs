//! Configuration: defaults → TOML file → `WEBHOOKD_*` environment → validation.
//!
//! Every value is typed here, at the edge (durations, URLs, non-zero numbers,
//! socket addresses), so nothing downstream parses strings. Reading never stops
//! at the first mistake: every bad or unknown key is collected with its path
//! (`endpoints[1].url`) and where it came from, and [`ConfigError`] lists them
//! all at once.
//!
//! Environment overrides use `__` between path segments and array indexes as
//! numbers: `WEBHOOKD_SOURCE__BROKERS=kafka-0:9092,kafka-1:9092`,
//! `WEBHOOKD_ENDPOINTS__0__URL=https://…`. A value is read as TOML when it
//! parses as one (`true`, `12`, `["a","b"]`) and as a plain string otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use hyper::header::HeaderValue;
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::de::DeserializeOwned;
use toml::{Table, Value};
use url::Url;

use crate::deliver::guard::NetworkPolicy;
use crate::deliver::sign::{EndpointSecret, Secrets, SigningSecret};
use crate::redact::redacted_url;
use crate::retry::RetryPolicy;
use crate::route::TypeFilter;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "WEBHOOKD_";
/// Environment variables with the prefix that are not config overrides: the
/// config path, the log filter, and the management commands' admin URL and
/// API key (a config can name the latter with `api_key = { env = "WEBHOOKD_API_KEY" }`).
const ENV_NOT_OVERRIDES: &[&str] = &["WEBHOOKD_CONFIG", "WEBHOOKD_LOG", "WEBHOOKD_ADMIN_URL", "WEBHOOKD_API_KEY"];
/// Variables for the test suite (e.g. `WEBHOOKD_TEST_BOOTSTRAP`), not overrides either.
const ENV_TEST_PREFIX: &str = "WEBHOOKD_TEST_";

#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    pub retry: RetryPolicy,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Bootstrap brokers; empty means "start the embedded in-process broker".
    pub brokers: Vec<String>,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dead_letter_topic: String,
    pub max_event_bytes: NonZeroUsize,
    pub batch_max: NonZeroUsize,
    pub batch_linger: Duration,
    /// Hold intake while the machine is behind on deliveries
    /// (`store::IntakeGate`). On by default.
    pub backpressure: bool,
    pub commit_interval: Duration,
    pub session_timeout: Duration,
    pub embedded_partitions: NonZeroU32,
    pub envelope: EnvelopeConfig,
    /// Extra librdkafka properties, passed through verbatim (security, SASL…).
    pub kafka: KafkaProperties,
}

/// librdkafka properties. `Debug` masks the values of secret ones
/// (`sasl.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`, …).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    pub fn is_secret(key: &str) -> bool {
        ["password", "secret", "key", "jaas", "token", "credential"].iter().any(|w| key.contains(w))
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if Self::is_secret(k) { "<redacted>" } else { v.as_str() })))
            .finish()
    }
}

/// Where the envelope's fields live in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeConfig {
    pub id_field: String,
    pub type_field: String,
    pub location_field: String,
    pub timestamp_field: String,
    /// When set, the event id is read from this Kafka header instead of the body.
    pub id_header: Option<String>,
    /// When set, the event type is read from this Kafka header instead of the body.
    pub type_header: Option<String>,
}

impl Default for EnvelopeConfig {
    /// SPEC.md's envelope: `{"id", "type", "locationId", "timestamp", …}`.
    fn default() -> Self {
        EnvelopeConfig {
            id_field: "id".into(),
            type_field: "type".into(),
            location_field: "locationId".into(),
            timestamp_field: "timestamp".into(),
            id_header: None,
            type_header: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub dedup_window: Duration,
    /// fsync the write-ahead log on every intake batch (survives power loss,
    /// not only process death).
    pub sync_writes: bool,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub attempt_timeout: Duration,
    pub max_response_bytes: usize,
    pub shutdown_grace: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Requests in flight to one host (scheme, host, port) at once, and so
    /// its connections: HTTP/1.1 carries one request at a time. `None`: only
    /// the endpoints' own `max_in_flight` bound them.
    pub max_connections_per_host: Option<NonZeroUsize>,
    pub max_in_flight: NonZeroUsize,
    /// Networks deliveries may reach even though the SSRF guard refuses them by default.
    pub allow_networks: Vec<IpNet>,
    /// Networks deliveries may never reach; wins over `allow_networks`.
    pub deny_networks: Vec<IpNet>,
    /// Refuse `http://` endpoints (at config time, and in the connector).
    pub https_only: bool,
    /// Trust anchors added to the webpki roots, for private PKI.
    pub extra_ca: ExtraCa,
}

impl DeliveryConfig {
    /// The SSRF guard's policy, from `allow_networks` and `deny_networks`.
    pub fn network_policy(&self) -> NetworkPolicy {
        NetworkPolicy::new(self.allow_networks.clone(), self.deny_networks.clone())
    }
}

/// Extra CA certificates, read from a PEM bundle.
#[derive(Clone, Default)]
pub struct ExtraCa {
    pub path: Option<PathBuf>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for ExtraCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraCa({:?}, {} certificates)", self.path, self.certs.len())
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer key of the management API (`/api/v1/...`); None: the API is off.
    pub api_key: Option<ApiKey>,
    /// Endpoints beyond this many (in config order) share the metric label
    /// `endpoint="_other"`, so the series count stays bounded.
    pub endpoint_label_limit: usize,
}

/// Shortest management API key accepted.
pub const MIN_API_KEY_CHARS: usize = 16;

/// The management API key; never printed.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Clone)]
pub struct EndpointConfig {
    pub id: String,
    /// The URL requests go to, without any credentials (see `authorization`).
    pub url: Url,
    /// `Basic` credentials taken out of the configured URL's user and password.
    pub authorization: Option<HeaderValue>,
    pub enabled: bool,
    pub event_types: Vec<TypeFilter>,
    pub location_ids: Vec<String>,
    pub secrets: Secrets,
    pub rate_limit: RateLimit,
    pub max_in_flight: NonZeroUsize,
    pub attempt_timeout: Duration,
    pub legacy_hmac_header: bool,
}

/// Written by hand so that no credential reaches a log line: the URL's
/// secret-looking query parameters are redacted and secrets are never shown.
impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("id", &self.id)
            .field("url", &redacted_url(&self.url))
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("enabled", &self.enabled)
            .field("event_types", &self.event_types)
            .field("location_ids", &self.location_ids)
            .field("secrets", &self.secrets)
            .field("rate_limit", &self.rate_limit)
            .field("max_in_flight", &self.max_in_flight)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("legacy_hmac_header", &self.legacy_hmac_header)
            .finish()
    }
}

/// The default idle-connection pool per host never goes below this.
const MIN_IDLE_PER_HOST: usize = 64;

/// The most requests that can be in flight to one host (scheme, host, port)
/// at once: the sum of the in-flight caps of the endpoints on it. An idle pool
/// smaller than that closes connections the next request has to open again
/// (measured: 100 endpoints on one host with 64 idle connections left 26,000
/// sockets in TIME_WAIT within a minute).
fn busiest_host_in_flight(endpoints: &[EndpointConfig]) -> usize {
    let mut per_host: HashMap<(String, Option<String>, Option<u16>), usize> = HashMap::new();
    for e in endpoints {
        let key = (e.url.scheme().to_owned(), e.url.host_str().map(str::to_owned), e.url.port_or_known_default());
        *per_host.entry(key).or_default() += e.max_in_flight.get();
    }
    per_host.into_values().max().unwrap_or(0)
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem{}):\n  - {}", .problems.len(), if .problems.len() == 1 { "" } else { "s" }, .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Reads `path`, applies `WEBHOOKD_*` overrides from the process environment
    /// and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { problems: vec![format!("{}: cannot read: {e}", path.display())] })?;
        Self::from_toml_str(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment (tests pass their own).
    pub fn from_toml_str(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        // Only the message and the position: the error's own Display quotes
        // the offending line, which may hold a secret.
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e.span().map(|s| line_col(text, s.start)).map(|(l, c)| format!(" at line {l}, column {c}"));
            ConfigError { problems: vec![format!("TOML syntax{}: {}", at.unwrap_or_default(), e.message().trim())] }
        })?;
        let mut from_env = BTreeMap::new();
        let mut problems = Vec::new();
        let env: HashMap<String, String> = env.into_iter().collect();
        for (name, value) in &env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if ENV_NOT_OVERRIDES.contains(&name.as_str()) || name.starts_with(ENV_TEST_PREFIX) || rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            match set_path(&mut table, &path, env_value(value)) {
                Ok(()) => {
                    from_env.insert(display_path(path.iter().map(String::as_str)), name.clone());
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        let mut r = Reader::new(&table, env.clone());
        r.problems = problems;
        r.from_env = from_env;
        let config = Config::read(&mut r);
        r.unknown_keys();
        if r.problems.is_empty() { Ok(config) } else { Err(ConfigError { problems: r.problems }) }
    }

    fn read(r: &mut Reader) -> Config {
        let envelope = EnvelopeConfig::default();
        let source = SourceConfig {
            brokers: r.list("source.brokers", &[]),
            topics: r.list("source.topics", &["webhookd.events"]),
            group_id: r.non_empty("source.group_id", "webhookd"),
            dead_letter_topic: r.non_empty("source.dead_letter_topic", "webhookd.dead-letter"),
            max_event_bytes: r.get("source.max_event_bytes", nz_usize(1024 * 1024)),
            batch_max: r.get("source.batch_max", nz_usize(512)),
            batch_linger: r.duration("source.batch_linger", Duration::ZERO),
            backpressure: r.get("source.backpressure", true),
            commit_interval: r.positive_duration("source.commit_interval", Duration::from_secs(1)),
            session_timeout: r.positive_duration("source.session_timeout", Duration::from_secs(10)),
            embedded_partitions: r.get("source.embedded_partitions", NonZeroU32::MIN.saturating_add(3)),
            envelope: EnvelopeConfig {
                id_field: r.non_empty("source.envelope.id_field", &envelope.id_field),
                type_field: r.non_empty("source.envelope.type_field", &envelope.type_field),
                location_field: r.non_empty("source.envelope.location_field", &envelope.location_field),
                timestamp_field: r.non_empty("source.envelope.timestamp_field", &envelope.timestamp_field),
                id_header: r.get::<Option<String>>("source.envelope.id_header", None),
                type_header: r.get::<Option<String>>("source.envelope.type_header", None),
            },
            kafka: r.kafka_properties("source.kafka"),
        };
        if source.topics.is_empty() {
            r.problem("source.topics", "at least one topic is required");
        }
        if source.topics.contains(&source.dead_letter_topic) {
            r.problem("source.dead_letter_topic", "must not be one of source.topics");
        }
        let store = StoreConfig {
            path: r.get("store.path", PathBuf::from("./data")),
            dedup_window: r.positive_duration("store.dedup_window", Duration::from_secs(7 * 24 * 3600)),
            sync_writes: r.get("store.sync_writes", true),
        };
        let delivery = DeliveryConfig {
            attempt_timeout: r.positive_duration("delivery.attempt_timeout", Duration::from_secs(5)),
            max_response_bytes: r.get("delivery.max_response_bytes", 64 * 1024),
            shutdown_grace: r.duration("delivery.shutdown_grace", Duration::from_secs(10)),
            pool_idle_timeout: r.positive_duration("delivery.pool_idle_timeout", Duration::from_secs(90)),
            // 0 until the endpoints are read: then, unless set, enough for the busiest host.
            pool_max_idle_per_host: r.get("delivery.pool_max_idle_per_host", 0),
            max_connections_per_host: NonZeroUsize::new(r.get("delivery.max_connections_per_host", 0)),
            max_in_flight: r.get("delivery.max_in_flight", nz_usize(16)),
            allow_networks: r.networks("delivery.allow_networks"),
            deny_networks: r.networks("delivery.deny_networks"),
            https_only: r.get("delivery.https_only", false),
            extra_ca: r.extra_ca("delivery.extra_ca_file"),
        };
        let retry = Self::read_retry(r);
        let admin = AdminConfig {
            listen: r.get("admin.listen", SocketAddr::from(([127, 0, 0, 1], 9090))),
            api_key: r.api_key("admin.api_key"),
            endpoint_label_limit: r.get("admin.endpoint_label_limit", 1000),
        };
        let log = LogConfig {
            level: r.non_empty("log.level", "info"),
            format: match r.non_empty("log.format", "text").as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    r.problem("log.format", &format!("expected \"text\" or \"json\", found {other:?}"));
                    LogFormat::Text
                }
            },
        };
        let count = r.array_len("endpoints");
        let policy = delivery.network_policy();
        let endpoints = (0..count).map(|i| Self::read_endpoint(r, i, &delivery, &policy)).collect::<Vec<_>>();
        let mut delivery = delivery;
        if r.lookup("delivery.pool_max_idle_per_host").is_none() {
            let busiest = busiest_host_in_flight(&endpoints).max(MIN_IDLE_PER_HOST);
            delivery.pool_max_idle_per_host =
                delivery.max_connections_per_host.map_or(busiest, |cap| busiest.min(cap.get()));
        }
        let mut ids = HashSet::new();
        for (i, e) in endpoints.iter().enumerate() {
            if !e.id.is_empty() && !ids.insert(e.id.clone()) {
                r.problem(&format!("endpoints.{i}.id"), &format!("duplicate endpoint id {:?}", e.id));
            }
        }
        Config { source, store, delivery, retry, admin, log, endpoints }
    }

    fn read_retry(r: &mut Reader) -> RetryPolicy {
        let d = RetryPolicy::default();
        let base = r.duration("retry.base", d.base());
        let factor = r.get("retry.factor", d.factor());
        let cap = r.duration("retry.cap", d.cap());
        let max_attempts = r.get("retry.max_attempts", d.max_attempts());
        let max_age = r.duration("retry.max_age", d.max_age());
        let retry_after_cap = r.duration("retry.retry_after_cap", d.retry_after_cap());
        RetryPolicy::new(base, factor, cap, max_attempts, max_age, retry_after_cap).unwrap_or_else(|(key, msg)| {
            r.problem(&format!("retry.{key}"), &msg);
            d
        })
    }

    fn read_endpoint(r: &mut Reader, i: usize, delivery: &DeliveryConfig, policy: &NetworkPolicy) -> EndpointConfig {
        let p = |key: &str| format!("endpoints.{i}.{key}");
        let id = r.non_empty(&p("id"), "");
        if !id.is_empty() && !valid_endpoint_id(&id) {
            r.problem(&p("id"), "use 1-64 characters of A-Z a-z 0-9 . _ -");
        }
        let (url, authorization) = r.endpoint_url(&p("url"), delivery.https_only, policy);
        let event_types = r
            .list(&p("event_types"), &["*"])
            .iter()
            .filter_map(|s| match TypeFilter::parse(s) {
                Ok(f) => Some(f),
                Err(e) => {
                    r.problem(&p("event_types"), &e);
                    None
                }
            })
            .collect();
        let secrets = r.secrets(&p("secrets"));
        let per_second = r.get(&p("rate_limit.per_second"), NonZeroU32::MIN.saturating_add(99));
        let burst = r.get(&p("rate_limit.burst"), per_second);
        for (key, v) in [("rate_limit.per_second", per_second), ("rate_limit.burst", burst)] {
            if v.get() > MAX_RATE {
                r.problem(&p(key), &format!("at most {MAX_RATE}, found {v}"));
            }
        }
        EndpointConfig {
            url,
            authorization,
            enabled: r.get(&p("enabled"), true),
            event_types,
            location_ids: r.list(&p("location_ids"), &[]),
            secrets,
            rate_limit: RateLimit { per_second, burst },
            max_in_flight: r.get(&p("max_in_flight"), delivery.max_in_flight),
            attempt_timeout: r.positive_duration(&p("attempt_timeout"), delivery.attempt_timeout),
            legacy_hmac_header: r.get(&p("legacy_hmac_header"), false),
            id,
        }
    }
}

/// Highest rate limit and burst accepted: above a million a second the
/// limiter's period rounds towards zero, and no receiver takes that anyway.
const MAX_RATE: u32 = 1_000_000;

/// Endpoint ids appear in storage keys, metric labels and URLs of the
/// management API, so they are kept to a safe alphabet.
pub fn valid_endpoint_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn nz_usize(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// Reads typed values out of a TOML table by dotted path, remembering which
/// keys it visited and collecting every problem instead of stopping.
struct Reader<'a> {
    root: &'a Table,
    seen: BTreeSet<String>,
    /// Tables whose keys are not ours to check (librdkafka properties).
    free_form: Vec<String>,
    problems: Vec<String>,
    /// display path → the environment variable that set it
    from_env: BTreeMap<String, String>,
    /// The whole environment, for secrets read from a variable.
    env: HashMap<String, String>,
}

/// Most secrets an endpoint may have (current plus previous ones in rotation).
const MAX_SECRETS: usize = 10;

impl<'a> Reader<'a> {
    fn new(root: &'a Table, env: HashMap<String, String>) -> Self {
        Reader {
            root,
            seen: BTreeSet::new(),
            free_form: Vec::new(),
            problems: Vec::new(),
            from_env: BTreeMap::new(),
            env,
        }
    }
    fn lookup(&self, path: &str) -> Option<&Value> {
        let mut parts = path.split('.');
        let mut cur = self.root.get(parts.next()?)?;
        for part in parts {
            cur = match (cur, part.parse::<usize>()) {
                (Value::Array(a), Ok(i)) => a.get(i)?,
                (Value::Table(t), _) => t.get(part)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn free_form(&mut self, path: &str) {
        self.free_form.push(format!("{path}."));
    }

    fn problem(&mut self, path: &str, msg: &str) {
        let shown = display_path(path.split('.'));
        let origin = self.from_env.get(&shown).map(|v| format!(" (set by {v})")).unwrap_or_default();
        self.problems.push(format!("{shown}{origin}: {msg}"));
    }

    fn get<T: DeserializeOwned>(&mut self, path: &str, default: T) -> T {
        self.seen.insert(path.to_owned());
        let Some(v) = self.lookup(path).cloned() else {
            return default;
        };
        match T::deserialize(v.clone()) {
            Ok(t) => t,
            Err(e) => {
                self.problem(path, &format!("{} (found {})", e.to_string().trim(), short(&v)));
                default
            }
        }
    }

    fn non_empty(&mut self, path: &str, default: &str) -> String {
        let s: String = self.get(path, default.to_owned());
        if s.trim().is_empty() {
            self.problem(path, "must not be empty");
        }
        s
    }

    fn positive_duration(&mut self, path: &str, default: Duration) -> Duration {
        let d = self.duration(path, default);
        if d.is_zero() {
            self.problem(path, "must be greater than zero");
            return default;
        }
        d
    }

    fn duration(&mut self, path: &str, default: Duration) -> Duration {
        self.seen.insert(path.to_owned());
        match self.lookup(path).cloned() {
            None => default,
            Some(Value::String(s)) => humantime::parse_duration(&s).unwrap_or_else(|e| {
                self.problem(path, &format!("not a duration ({e}); write e.g. \"250ms\", \"5s\", \"7d\""));
                default
            }),
            Some(v) => {
                self.problem(path, &format!("expected a duration string such as \"5s\", found {}", short(&v)));
                default
            }
        }
    }

    /// A list of strings, written as a TOML array or as one comma-separated string.
    fn list(&mut self, path: &str, default: &[&str]) -> Vec<String> {
        self.seen.insert(path.to_owned());
        match self.lookup(path).cloned() {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(Value::String(s)) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    other => {
                        self.problem(path, &format!("expected strings, found {}", short(other)));
                        None
                    }
                })
                .collect(),
            Some(v) => {
                self.problem(path, &format!("expected a list of strings, found {}", short(&v)));
                Vec::new()
            }
        }
    }

    fn array_len(&mut self, path: &str) -> usize {
        self.seen.insert(path.to_owned());
        match self.lookup(path) {
            None => 0,
            Some(Value::Array(a)) => a.len(),
            Some(v) => {
                let found = short(v);
                self.problem(path, &format!("expected an array of tables ([[{path}]]), found {found}"));
                0
            }
        }
    }

    /// librdkafka properties: a table of strings. Problems name the property,
    /// never its value (it may be a password).
    fn kafka_properties(&mut self, path: &str) -> KafkaProperties {
        self.seen.insert(path.to_owned());
        self.free_form(path);
        let mut out = BTreeMap::new();
        match self.lookup(path).cloned() {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    let value = match v {
                        Value::String(s) => s,
                        Value::Integer(_) | Value::Boolean(_) | Value::Float(_) => v.to_string(),
                        _ => {
                            self.problem(path, &format!("{k:?}: expected a string, number or boolean"));
                            continue;
                        }
                    };
                    // librdkafka checks each property on its own now, so `check`
                    // catches a misspelt one; its message quotes bad values,
                    // which is dropped for secret ones.
                    match rdkafka::ClientConfig::new().set(&k, &value).create_native_config() {
                        Err(rdkafka::error::KafkaError::ClientConfig(_, desc, _, _)) => {
                            let why = if KafkaProperties::is_secret(&k) { "invalid value".to_owned() } else { desc };
                            self.problem(path, &format!("{k:?}: librdkafka refuses it: {why}"));
                        }
                        _ => {
                            out.insert(k, value);
                        }
                    }
                }
            }
            Some(_) => self.problem(path, "expected a table of librdkafka properties"),
        }
        KafkaProperties(out)
    }

    /// A list of CIDRs (`10.0.0.0/8`, `::1/128`; a bare address is one host).
    fn networks(&mut self, path: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        for s in self.list(path, &[]) {
            match s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)) {
                Ok(net) => out.push(net.trunc()),
                Err(_) => {
                    self.problem(path, &format!("{s:?} is not a network; write e.g. \"10.0.0.0/8\" or \"::1/128\""))
                }
            }
        }
        out
    }

    /// A PEM bundle of CA certificates, read and parsed now so a bad file stops the start.
    fn extra_ca(&mut self, path: &str) -> ExtraCa {
        let Some(file) = self.get::<Option<PathBuf>>(path, None) else {
            return ExtraCa::default();
        };
        let certs: Result<Vec<_>, _> = match CertificateDer::pem_file_iter(&file) {
            Ok(iter) => iter.collect(),
            Err(e) => Err(e),
        };
        let certs = match certs {
            Ok(c) if c.is_empty() => {
                self.problem(path, &format!("{}: no PEM certificate in it", file.display()));
                Vec::new()
            }
            Ok(c) => c,
            Err(e) => {
                self.problem(path, &format!("{}: cannot read certificates: {e}", file.display()));
                Vec::new()
            }
        };
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            if let Err(e) = store.add(cert.clone()) {
                self.problem(path, &format!("{}: certificate {} is not a usable CA: {e}", file.display(), i + 1));
            }
        }
        ExtraCa { path: Some(file), certs }
    }

    /// The endpoint URL, checked against the scheme rules and (for IP
    /// literals) the SSRF guard, with credentials moved into an
    /// `authorization` header. Problems never quote the URL, which may hold credentials.
    fn endpoint_url(&mut self, path: &str, https_only: bool, policy: &NetworkPolicy) -> (Url, Option<HeaderValue>) {
        self.seen.insert(path.to_owned());
        let placeholder = || Url::parse("http://invalid.invalid/").expect("static URL parses");
        let mut url = match self.lookup(path).cloned() {
            None => {
                self.problem(path, "required");
                return (placeholder(), None);
            }
            Some(Value::String(s)) => match Url::parse(&s) {
                Ok(u) => u,
                Err(e) => {
                    self.problem(path, &format!("not a valid URL: {e}"));
                    return (placeholder(), None);
                }
            },
            Some(_) => {
                self.problem(path, "expected a URL string");
                return (placeholder(), None);
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if https_only => self.problem(path, "http:// is refused: delivery.https_only is set; use https://"),
            "http" => {}
            other => self.problem(path, &format!("scheme must be http or https, found {other:?}")),
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(Err(refusal)) = ip.map(|ip| policy.check(ip)) {
            self.problem(path, &format!("destination refused: {refusal}"));
        }
        let mut authorization = None;
        if !url.username().is_empty() || url.password().is_some() {
            if url.scheme() == "http" {
                self.problem(path, "credentials in an http:// URL would cross the network in cleartext; use https://");
            }
            let user: Vec<u8> = percent_encoding::percent_decode_str(url.username()).collect();
            if user.contains(&b':') {
                self.problem(path, "the user name in the URL contains ':', which Basic authentication cannot carry");
            }
            let mut pair = user;
            pair.push(b':');
            pair.extend(percent_encoding::percent_decode_str(url.password().unwrap_or("")));
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut value = HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a valid header value");
            value.set_sensitive(true);
            authorization = Some(value);
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        (url, authorization)
    }

    /// An endpoint's signing secrets. Each is a `whsec_…` string, or a table
    /// naming where it comes from (`value`, `env` or `file`) with an optional
    /// `expires` (RFC 3339) for a previous secret kept during a rotation.
    /// Problems name the entry, never its value.
    fn secrets(&mut self, path: &str) -> Secrets {
        self.seen.insert(path.to_owned());
        self.free_form(path);
        let entries: Vec<Value> = match self.lookup(path).cloned() {
            None => Vec::new(),
            // One string: the environment override form, comma-separated.
            Some(Value::String(s)) => s.split(',').filter(|s| !s.trim().is_empty()).map(Value::from).collect(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem(path, "expected a list of secrets");
                return Secrets::default();
            }
        };
        if entries.len() > MAX_SECRETS {
            self.problem(path, &format!("at most {MAX_SECRETS} secrets, found {}", entries.len()));
        }
        let before = self.problems.len();
        let mut list = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("{path}.{i}");
            if let Some(s) = self.secret(&at, entry) {
                list.push(s);
            }
        }
        if self.problems.len() == before {
            if list.is_empty() {
                self.problem(path, "at least one signing secret (whsec_…) is required");
            } else if list.iter().all(|s| s.expires_at.is_some()) {
                self.problem(
                    path,
                    "one secret must have no `expires`: it is the current one; entries with `expires` are \
                     previous secrets kept during a rotation",
                );
            }
        }
        Secrets::new(list)
    }

    /// A sensitive string from a table naming where it is: `value` (inline),
    /// `env` (a variable name) or `file` (a path, e.g. a mounted Kubernetes
    /// Secret), plus the `extra` keys the caller reads. Problems name the key,
    /// never the value.
    fn sourced(&mut self, at: &str, t: &toml::Table, extra: &[&str]) -> Option<String> {
        let known = |k: &str| ["value", "env", "file"].contains(&k) || extra.contains(&k);
        for key in t.keys().filter(|k| !known(k)) {
            let expected = ["value", "env", "file"].iter().chain(extra).copied().collect::<Vec<_>>().join(", ");
            self.problem(&format!("{at}.{key}"), &format!("unknown key (expected one of {expected})"));
        }
        let sources: Vec<_> = ["value", "env", "file"].into_iter().filter(|k| t.contains_key(*k)).collect();
        let [source] = sources[..] else {
            self.problem(at, "give exactly one of `value`, `env` or `file`");
            return None;
        };
        let Some(Value::String(s)) = t.get(source) else {
            self.problem(&format!("{at}.{source}"), "expected a string");
            return None;
        };
        if source != "value" && s.trim_start().starts_with("whsec_") {
            // The secret itself where a name belongs: say so without quoting it.
            let hint = "this looks like the secret itself; give it as `value`, or name where it is";
            self.problem(&format!("{at}.{source}"), hint);
            return None;
        }
        match source {
            "env" => match self.env.get(s) {
                Some(v) => Some(v.clone()),
                None => {
                    self.problem(&format!("{at}.env"), &format!("environment variable {s} is not set"));
                    None
                }
            },
            "file" => match std::fs::read_to_string(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.problem(&format!("{at}.file"), &format!("cannot read {s}: {e}"));
                    None
                }
            },
            _ => Some(s.clone()),
        }
    }

    /// The management API's key: a string or `{ value | env | file }`; unset
    /// means the API is off. At least 16 characters, surrounding space trimmed.
    fn api_key(&mut self, path: &str) -> Option<ApiKey> {
        self.seen.insert(path.to_owned());
        self.free_form(path);
        let raw = match self.lookup(path).cloned()? {
            Value::String(s) => s,
            Value::Table(t) => self.sourced(path, &t, &[])?,
            _ => {
                self.problem(path, "expected a string or a table { value | env | file }");
                return None;
            }
        };
        let key = raw.trim();
        if key.chars().count() < MIN_API_KEY_CHARS || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(
                path,
                &format!("the API key must be at least {MIN_API_KEY_CHARS} characters without spaces (e.g. `openssl rand -hex 24`)"),
            );
            return None;
        }
        Some(ApiKey(key.to_owned()))
    }

    fn secret(&mut self, at: &str, entry: &Value) -> Option<EndpointSecret> {
        let (raw, expires) = match entry {
            Value::String(s) => (s.clone(), None),
            Value::Table(t) => (self.sourced(at, t, &["expires"])?, t.get("expires")),
            _ => {
                self.problem(at, "expected a whsec_… string or a table { value | env | file, expires }");
                return None;
            }
        };
        let expires_at = match expires {
            None => None,
            Some(v) => {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Datetime(d) => d.to_string(),
                    _ => String::new(),
                };
                match time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339) {
                    Ok(t) => Some(t.unix_timestamp()),
                    Err(_) => {
                        self.problem(&format!("{at}.expires"), "expected an RFC 3339 time, e.g. 2026-12-01T00:00:00Z");
                        return None;
                    }
                }
            }
        };
        match SigningSecret::parse(&raw) {
            Ok(secret) => Some(EndpointSecret { secret, expires_at }),
            Err(e) => {
                self.problem(at, &e.to_string());
                None
            }
        }
    }

    /// Reports every key of the file or environment that no reader asked for.
    fn unknown_keys(&mut self) {
        let mut unknown = Vec::new();
        walk(self.root, String::new(), &mut |path| {
            let known = self.seen.contains(&path)
                || self.free_form.iter().any(|f| path.starts_with(f.as_str()))
                || self.seen.iter().any(|s| s.starts_with(&format!("{path}.")));
            if !known {
                unknown.push(path);
            }
        });
        for path in unknown {
            self.problem(&path, "unknown key");
        }
    }
}

/// Calls `f` with the dotted path of every leaf (and every empty table).
fn walk(table: &Table, prefix: String, f: &mut dyn FnMut(String)) {
    for (k, v) in table {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Table(t) if !t.is_empty() => walk(t, path, f),
            Value::Array(a) if a.iter().all(Value::is_table) && !a.is_empty() => {
                for (i, item) in a.iter().enumerate() {
                    if let Value::Table(t) = item {
                        walk(t, format!("{path}.{i}"), f);
                    }
                }
            }
            _ => f(path),
        }
    }
}

fn display_path<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for p in parts {
        if p.parse::<usize>().is_ok() {
            out.push_str(&format!("[{p}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(p);
        }
    }
    out
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if s.len() > 60 { format!("{}…", &s[..s.floor_char_boundary(60)]) } else { s }
}

fn env_value(raw: &str) -> Value {
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let is_index = rest[0].parse::<usize>().is_ok();
    let child = table
        .entry(first.clone())
        .or_insert_with(|| if is_index { Value::Array(Vec::new()) } else { Value::Table(Table::new()) });
    set_in_value(child, rest, value)
}

fn set_in_value(target: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    match target {
        Value::Table(t) => set_path(t, path, value),
        Value::Array(items) => {
            let (first, rest) = path.split_first().ok_or("empty key")?;
            let i: usize = first.parse().map_err(|_| format!("{first:?} is not an array index"))?;
            if i > items.len() {
                return Err(format!("index {i} skips entries (the array has {})", items.len()));
            }
            if i == items.len() {
                items.push(Value::Table(Table::new()));
            }
            if rest.is_empty() {
                items[i] = value;
                Ok(())
            } else {
                set_in_value(&mut items[i], rest, value)
            }
        }
        _ => Err("the key above it is not a table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_documented_default_config_is_the_default() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/webhookd.toml")).expect("file");
        let documented = Config::from_toml_str(&text, Vec::new()).expect("valid");
        let empty = Config::from_toml_str("", Vec::new()).expect("valid");
        assert_eq!(format!("{documented:?}"), format!("{empty:?}"), "config/webhookd.toml must show the defaults");
        // Every key a reader asks for is documented in the file.
        let empty_table = Table::new();
        let mut r = Reader::new(&empty_table, HashMap::new());
        let _ = Config::read(&mut r);
        let mut with_endpoint = Table::new();
        with_endpoint.insert("endpoints".into(), Value::Array(vec![Value::Table(Table::new())]));
        let mut r2 = Reader::new(&with_endpoint, HashMap::new());
        let _ = Config::read(&mut r2);
        for path in r.seen.iter().chain(r2.seen.iter()) {
            let key = path.rsplit('.').next().expect("key");
            let documented = text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.contains(&format!("{key} ="))
                    || l.starts_with(&format!("[{path}]"))
                    || l.starts_with(&format!("[[{path}]]"))
            });
            assert!(documented, "{path} is not documented in config/webhookd.toml");
        }
    }

    #[test]
    fn the_idle_pool_per_host_fits_the_busiest_host_unless_set() {
        let endpoints = |n: usize, host: &str| {
            (0..n)
                .map(|i| {
                    format!(
                        "[[endpoints]]\nid = \"{host}{i}\"\nurl = \"https://{host}/e{i}\"\nsecrets = [\"{SECRET}\"]\n"
                    )
                })
                .collect::<String>()
        };
        let pool = |toml: &str| Config::from_toml_str(toml, Vec::new()).expect("valid").delivery.pool_max_idle_per_host;
        assert_eq!(pool(""), 64, "at least 64");
        let two_hosts = endpoints(100, "a.example") + &endpoints(3, "b.example");
        assert_eq!(pool(&two_hosts), 1600, "100 × 16 on a.example");
        let host_cap = format!("[delivery]\nmax_connections_per_host = 512\n{two_hosts}");
        assert_eq!(pool(&host_cap), 512, "no more idle connections than a host may have");
        let capped = format!("[delivery]\npool_max_idle_per_host = 8\n{}", endpoints(100, "a.example"));
        assert_eq!(pool(&capped), 8, "an explicit value wins");
    }

    #[test]
    fn the_api_key_comes_from_the_file_or_the_environment_and_is_never_shown() {
        let key = "k3y-0123456789abcdef";
        let c = Config::from_toml_str(
            "[admin]\napi_key = { env = \"WEBHOOKD_API_KEY\" }",
            env(&[("WEBHOOKD_API_KEY", key)]),
        )
        .expect("valid");
        assert_eq!(c.admin.api_key.as_ref().map(|k| k.0.as_str()), Some(key));
        assert!(!format!("{c:?}").contains(key), "the key is redacted in Debug");
        assert!(Config::from_toml_str("", Vec::new()).expect("valid").admin.api_key.is_none(), "off by default");
        for (toml, want) in [
            ("api_key = \"short\"", "admin.api_key: the API key must be at least 16 characters"),
            ("api_key = { env = \"NOPE_NOT_SET\" }", "admin.api_key.env: environment variable NOPE_NOT_SET is not set"),
            ("api_key = { value = \"0123456789abcdef0\", expires = \"x\" }", "admin.api_key.expires: unknown key"),
            ("api_key = 42", "admin.api_key: expected a string or a table"),
        ] {
            let err = Config::from_toml_str(&format!("[admin]\n{toml}"), Vec::new()).expect_err(toml).to_string();
            assert!(err.contains(want), "{toml}: {err}");
            assert!(!err.contains("0123456789abcdef0"), "the value is never quoted: {err}");
        }
    }

    #[test]
    fn environment_overrides_reach_nested_keys_and_arrays() {
        let toml =
            format!("[[endpoints]]\nid = \"a\"\nurl = \"https://hooks.example.com/\"\nsecrets = [\"{SECRET}\"]\n");
        let c = Config::from_toml_str(
            &toml,
            env(&[
                ("WEBHOOKD_SOURCE__BROKERS", "k0:9092, k1:9092"),
                ("WEBHOOKD_STORE__SYNC_WRITES", "false"),
                ("WEBHOOKD_ENDPOINTS__0__URL", "https://hooks.example.com/x"),
                ("WEBHOOKD_ENDPOINTS__0__RATE_LIMIT__PER_SECOND", "7"),
                ("WEBHOOKD_CONFIG", "ignored.toml"),
                ("WEBHOOKD_TEST_BOOTSTRAP", "ignored"),
                ("OTHER", "ignored"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.source.brokers, ["k0:9092", "k1:9092"]);
        assert!(!c.store.sync_writes);
        assert_eq!(c.endpoints[0].url.as_str(), "https://hooks.example.com/x");
        assert_eq!(c.endpoints[0].rate_limit.per_second.get(), 7);
        assert_eq!(c.endpoints[0].rate_limit.burst.get(), 7, "burst defaults to the rate");
    }

    #[test]
    fn every_problem_is_reported_at_once_by_path() {
        let toml = "[source]\ntopics = [\"t\"]\ndead_letter_topic = \"t\"\nsession_timeout = 5\n[log]\nformat = \"xml\"\n\
                    [[endpoints]]\nid = \"a\"\nurl = \"not a url\"\nsecrets = [\"whsec_c2hvcnQ=\"]\nevent_types = [\"*x\"]\n\
                    [[endpoints]]\nid = \"a\"\nurl = \"https://hooks.example.com/\"\nsecrets = []\nrate_limit = { burst = 5000000 }\n";
        let err = Config::from_toml_str(
            toml,
            env(&[("WEBHOOKD_DELIVERY__MAX_IN_FLIGHT", "0"), ("WEBHOOKD_SOURCE__COMMIT_INTERVAL", "0s")]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "source.dead_letter_topic: must not be one of source.topics",
            "source.session_timeout: expected a duration string",
            "log.format: expected \"text\" or \"json\"",
            "endpoints[0].url",
            "endpoints[0].secrets[0]: a signing secret's key must be 24 to 64 bytes",
            "endpoints[0].event_types: bad event-type filter",
            "endpoints[1].id: duplicate endpoint id",
            "endpoints[1].secrets: at least one signing secret",
            "delivery.max_in_flight (set by WEBHOOKD_DELIVERY__MAX_IN_FLIGHT)",
            "source.commit_interval (set by WEBHOOKD_SOURCE__COMMIT_INTERVAL): must be greater than zero",
            "endpoints[1].rate_limit.burst: at most 1000000",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert_eq!(err.problems.len(), 11, "{text}");
    }

    fn endpoint_toml(url: &str, secrets: &str) -> String {
        format!("[[endpoints]]\nid = \"a\"\nurl = \"{url}\"\nsecrets = {secrets}\n")
    }

    #[test]
    fn secrets_come_from_the_file_the_environment_or_a_mounted_file_with_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        let old = "whsec_dGhpcyBpcyBhIGRlbW8gc2VjcmV0IGtleSAxMjM0NTY3OA==";
        std::fs::write(&file, format!("{old}\n")).expect("write");
        let secrets = format!(
            "[{{ env = \"CRM_SECRET\" }}, {{ file = {:?}, expires = \"2030-01-01T00:00:00Z\" }}, \
             {{ value = \"{SECRET}\", expires = 2020-01-01T00:00:00Z }}]",
            file.display()
        );
        let c = Config::from_toml_str(
            &endpoint_toml("https://hooks.example.com/", &secrets),
            env(&[("CRM_SECRET", "whsec_c2VjcmV0LWZyb20tdGhlLWVudmlyb25tZW50LTEyMzQ=")]),
        )
        .expect("valid");
        let s = &c.endpoints[0].secrets;
        assert_eq!(s.len(), 3);
        let from_env = SigningSecret::parse("whsec_c2VjcmV0LWZyb20tdGhlLWVudmlyb25tZW50LTEyMzQ=").expect("valid");
        let from_file = SigningSecret::parse(old).expect("valid");
        assert_eq!(s.current(), Some(&from_env));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(s.active(now).collect::<Vec<_>>(), [&from_env, &from_file], "the 2020 secret has expired");
        let shown = format!("{c:?}");
        for secret in [SECRET, old, "whsec_c2VjcmV0"] {
            assert!(!shown.contains(secret), "Debug output shows a secret: {shown}");
        }
    }

    #[test]
    fn secret_problems_name_the_entry_and_never_quote_the_value() {
        let leaked = "whsec_TGVha2VkLXNlY3JldC1tdXN0LW5vdC1hcHBlYXI";
        let cases = [
            (format!("[\"{leaked}!\"]"), "endpoints[0].secrets[0]: a signing secret must be whsec_ followed by base64"),
            ("[{ env = \"NOPE\" }]".to_owned(), "endpoints[0].secrets[0].env: environment variable NOPE is not set"),
            ("[{ file = \"/nonexistent/s\" }]".to_owned(), "endpoints[0].secrets[0].file: cannot read /nonexistent/s"),
            (format!("[{{ value = \"{leaked}\", env = \"X\" }}]"), "endpoints[0].secrets[0]: give exactly one of"),
            (
                format!("[{{ value = \"{leaked}\", expires = \"soon\" }}]"),
                "endpoints[0].secrets[0].expires: expected an RFC 3339",
            ),
            (format!("[{{ value = \"{leaked}\", expire = \"x\" }}]"), "endpoints[0].secrets[0].expire: unknown key"),
            (
                format!("[{{ value = \"{SECRET}\", expires = \"2030-01-01T00:00:00Z\" }}]"),
                "one secret must have no `expires`",
            ),
            (format!("[{{ value = [\"{leaked}\"] }}]"), "endpoints[0].secrets[0].value: expected a string"),
            ("[]".to_owned(), "endpoints[0].secrets: at least one signing secret"),
            (format!("[{{ env = \"{leaked}\" }}]"), "endpoints[0].secrets[0].env: this looks like the secret itself"),
            (format!("[{{ file = \"{leaked}\" }}]"), "endpoints[0].secrets[0].file: this looks like the secret itself"),
        ];
        for (secrets, needle) in cases {
            let err = Config::from_toml_str(&endpoint_toml("https://hooks.example.com/", &secrets), Vec::new())
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
            assert!(!err.contains("TGVha2Vk"), "an error quotes a secret: {err}");
        }
    }

    #[test]
    fn url_credentials_become_a_basic_authorization_and_are_never_shown() {
        let c = Config::from_toml_str(
            &endpoint_toml("https://alice:p%40ss@hooks.example.com/in?token=t0k3n", &format!("[\"{SECRET}\"]")),
            Vec::new(),
        )
        .expect("valid");
        let e = &c.endpoints[0];
        assert_eq!(e.url.as_str(), "https://hooks.example.com/in?token=t0k3n", "credentials leave the URL");
        let auth = e.authorization.as_ref().expect("authorization");
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().expect("ascii"), format!("Basic {}", B64.encode("alice:p@ss")));
        let shown = format!("{c:?}");
        for secret in ["alice", "p%40ss", "p@ss", "t0k3n", &B64.encode("alice:p@ss")] {
            assert!(!shown.contains(secret), "Debug output shows {secret}: {shown}");
        }
        let bad = Config::from_toml_str(&endpoint_toml("https://bob:hunter2@[bad", "[]"), Vec::new()).expect_err("bad");
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
        let secrets = format!("[\"{SECRET}\"]");
        let cleartext =
            Config::from_toml_str(&endpoint_toml("http://bob:hunter2@hooks.example.com/", &secrets), Vec::new())
                .expect_err("credentials over http")
                .to_string();
        assert!(cleartext.contains("would cross the network in cleartext") && !cleartext.contains("hunter2"));
        let colon = Config::from_toml_str(&endpoint_toml("https://a%3Ab:pw@hooks.example.com/", &secrets), Vec::new())
            .expect_err("colon in user");
        assert!(colon.to_string().contains("contains ':'"), "{colon}");
        let raw = Config::from_toml_str(&endpoint_toml("https://u:%FF%00@hooks.example.com/", &secrets), Vec::new())
            .expect("raw bytes");
        let sent = raw.endpoints[0].authorization.as_ref().expect("auth").to_str().expect("ascii").to_owned();
        assert_eq!(sent, format!("Basic {}", B64.encode(b"u:\xff\x00")), "password bytes sent as written");
    }

    #[test]
    fn the_ssrf_guard_and_https_only_are_applied_to_urls_at_config_time() {
        let secrets = format!("[\"{SECRET}\"]");
        for url in ["http://169.254.169.254/latest", "http://10.0.0.1/", "http://[::1]:8080/", "http://2130706433/"] {
            let err = Config::from_toml_str(&endpoint_toml(url, &secrets), Vec::new()).expect_err(url).to_string();
            assert!(err.contains("endpoints[0].url: destination refused"), "{url}: {err}");
        }
        let allowed = format!(
            "[delivery]\nallow_networks = [\"10.0.0.0/8\", \"::1\"]\n{}",
            endpoint_toml("http://10.0.0.1/", &secrets)
        );
        let c = Config::from_toml_str(&allowed, Vec::new()).expect("allow-listed");
        assert_eq!(c.delivery.allow_networks.len(), 2);
        let https_only =
            format!("[delivery]\nhttps_only = true\n{}", endpoint_toml("http://hooks.example.com/", &secrets));
        let err = Config::from_toml_str(&https_only, Vec::new()).expect_err("http refused").to_string();
        assert!(err.contains("endpoints[0].url: http:// is refused: delivery.https_only is set"), "{err}");
        let bad_net = "[delivery]\nallow_networks = [\"10.0.0.0/33\"]\nextra_ca_file = \"/nonexistent/ca.pem\"\n";
        let err = Config::from_toml_str(bad_net, Vec::new()).expect_err("bad").to_string();
        assert!(err.contains("delivery.allow_networks: \"10.0.0.0/33\" is not a network"), "{err}");
        assert!(err.contains("delivery.extra_ca_file: /nonexistent/ca.pem: cannot read certificates"), "{err}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_named() {
        assert!(Config::from_toml_str("[source\n", Vec::new()).expect_err("bad").to_string().contains("TOML syntax"));
        let err =
            Config::from_toml_str("[log]\nlevel = \"info\"\n[source.kafka]\n\"sasl.password\" = hunter2\n", Vec::new())
                .expect_err("unquoted value")
                .to_string();
        assert!(err.contains("TOML syntax at line 4, column") && !err.contains("hunter2"), "{err}");
        let err =
            Config::from_toml_str("[source.kafka]\n\"linger.msx\" = \"5\"\n\"ssl.key.password\" = \"\"\n", Vec::new())
                .expect_err("librdkafka refuses");
        assert!(
            err.to_string().contains("\"linger.msx\": librdkafka refuses it: No such configuration property"),
            "{err}"
        );
        let err = Config::from_toml_str(
            "[sorce]\nbrokers = []\n[source.kafka]\n\"security.protocol\" = \"SSL\"\n",
            Vec::new(),
        )
        .expect_err("unknown");
        assert_eq!(err.problems, vec!["sorce.brokers: unknown key".to_owned()], "librdkafka properties are free-form");
        let c = Config::from_toml_str(
            "[source.kafka]\n\"sasl.password\" = \"hunter2\"\n\"ssl.key.pem\" = \"PEMDATA\"\n\"linger.ms\" = 5\n",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(c.source.kafka.0["linger.ms"], "5");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("PEMDATA") && shown.contains("linger.ms"), "{shown}");
        let err = Config::from_toml_str("[source.kafka]\n\"sasl.password\" = [\"hunter2\"]\n", Vec::new())
            .expect_err("not a string")
            .to_string();
        assert!(err.contains("\"sasl.password\": expected a string") && !err.contains("hunter2"), "{err}");
    }
}
