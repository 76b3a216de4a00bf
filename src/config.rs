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

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::{Table, Value};
use url::Url;

use crate::deliver::sign::SigningSecret;
use crate::retry::RetryPolicy;
use crate::route::TypeFilter;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "WEBHOOKD_";
/// Environment variables with the prefix that are not config overrides.
const ENV_NOT_OVERRIDES: &[&str] = &["WEBHOOKD_CONFIG", "WEBHOOKD_LOG"];
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
    pub commit_interval: Duration,
    pub session_timeout: Duration,
    pub embedded_partitions: NonZeroU32,
    pub envelope: EnvelopeConfig,
    /// Extra librdkafka properties, passed through verbatim (security, SASL…).
    pub kafka: BTreeMap<String, String>,
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
    pub max_in_flight: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
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

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub id: String,
    pub url: Url,
    pub enabled: bool,
    pub event_types: Vec<TypeFilter>,
    pub location_ids: Vec<String>,
    pub secrets: Vec<SigningSecret>,
    pub rate_limit: RateLimit,
    pub max_in_flight: NonZeroUsize,
    pub attempt_timeout: Duration,
    pub legacy_hmac_header: bool,
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
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            problems: vec![format!("TOML syntax: {}", e.to_string().trim())],
        })?;
        let mut from_env = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if ENV_NOT_OVERRIDES.contains(&name.as_str()) || name.starts_with(ENV_TEST_PREFIX) || rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            match set_path(&mut table, &path, env_value(&value)) {
                Ok(()) => {
                    from_env.insert(display_path(path.iter().map(String::as_str)), name);
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        let mut r = Reader { root: &table, seen: BTreeSet::new(), free_form: Vec::new(), problems, from_env };
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
            batch_linger: r.duration("source.batch_linger", Duration::from_millis(5)),
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
            kafka: r.get("source.kafka", BTreeMap::new()),
        };
        r.free_form("source.kafka");
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
            pool_max_idle_per_host: r.get("delivery.pool_max_idle_per_host", 64),
            max_in_flight: r.get("delivery.max_in_flight", nz_usize(16)),
        };
        let retry = Self::read_retry(r);
        let admin = AdminConfig { listen: r.get("admin.listen", SocketAddr::from(([127, 0, 0, 1], 9090))) };
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
        let endpoints = (0..count).map(|i| Self::read_endpoint(r, i, &delivery)).collect::<Vec<_>>();
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

    fn read_endpoint(r: &mut Reader, i: usize, delivery: &DeliveryConfig) -> EndpointConfig {
        let p = |key: &str| format!("endpoints.{i}.{key}");
        let id = r.non_empty(&p("id"), "");
        if !id.is_empty() && !valid_endpoint_id(&id) {
            r.problem(&p("id"), "use 1-64 characters of A-Z a-z 0-9 . _ -");
        }
        let url = r.get::<Option<Url>>(&p("url"), None).unwrap_or_else(|| {
            if r.lookup(&p("url")).is_none() {
                r.problem(&p("url"), "required");
            }
            Url::parse("http://invalid.invalid/").expect("static URL parses")
        });
        if !matches!(url.scheme(), "http" | "https") {
            r.problem(&p("url"), &format!("scheme must be http or https, found {:?}", url.scheme()));
        }
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
        let secrets = r
            .list(&p("secrets"), &[])
            .iter()
            .filter_map(|s| match SigningSecret::parse(s) {
                Ok(s) => Some(s),
                Err(e) => {
                    r.problem(&p("secrets"), &e.to_string());
                    None
                }
            })
            .collect::<Vec<_>>();
        if secrets.is_empty() && r.problems_for(&p("secrets")) == 0 {
            r.problem(&p("secrets"), "at least one signing secret (whsec_…) is required");
        }
        let per_second = r.get(&p("rate_limit.per_second"), NonZeroU32::MIN.saturating_add(99));
        let burst = r.get(&p("rate_limit.burst"), per_second);
        for (key, v) in [("rate_limit.per_second", per_second), ("rate_limit.burst", burst)] {
            if v.get() > MAX_RATE {
                r.problem(&p(key), &format!("at most {MAX_RATE}, found {v}"));
            }
        }
        EndpointConfig {
            url,
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
}

impl Reader<'_> {
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

    fn problems_for(&self, path: &str) -> usize {
        let shown = display_path(path.split('.'));
        self.problems.iter().filter(|p| p.starts_with(&shown)).count()
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
        let mut r = Reader {
            root: &Table::new(),
            seen: BTreeSet::new(),
            free_form: Vec::new(),
            problems: Vec::new(),
            from_env: BTreeMap::new(),
        };
        let _ = Config::read(&mut r);
        let mut with_endpoint = Table::new();
        with_endpoint.insert("endpoints".into(), Value::Array(vec![Value::Table(Table::new())]));
        let mut r2 = Reader {
            root: &with_endpoint,
            seen: BTreeSet::new(),
            free_form: Vec::new(),
            problems: Vec::new(),
            from_env: BTreeMap::new(),
        };
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
    fn environment_overrides_reach_nested_keys_and_arrays() {
        let toml = format!("[[endpoints]]\nid = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecrets = [\"{SECRET}\"]\n");
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
                    [[endpoints]]\nid = \"a\"\nurl = \"http://127.0.0.1/\"\nsecrets = []\nrate_limit = { burst = 5000000 }\n";
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
            "endpoints[0].secrets: a signing secret's key must be 24 to 64 bytes",
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

    #[test]
    fn syntax_errors_and_unknown_keys_are_named() {
        assert!(Config::from_toml_str("[source\n", Vec::new()).expect_err("bad").to_string().contains("TOML syntax"));
        let err = Config::from_toml_str(
            "[sorce]\nbrokers = []\n[source.kafka]\n\"security.protocol\" = \"SSL\"\n",
            Vec::new(),
        )
        .expect_err("unknown");
        assert_eq!(err.problems, vec!["sorce.brokers: unknown key".to_owned()], "librdkafka properties are free-form");
    }
}
