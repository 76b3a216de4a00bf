//! The `webhookd` binary: parse the command line, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhookd::config::Config;
use webhookd::manage::cli::{self, CliError, Filter, Target};

/// jemalloc rather than glibc's malloc: in the load benchmark it cut CPU per
/// delivered event by about a fifth and parked 200,000 retries in 17 s instead
/// of 26 s (README, Performance). It serves RocksDB and librdkafka too (the
/// `unprefixed_malloc_on_supported_platforms` feature overrides `malloc`):
/// glibc's malloc kept the C heap's peak long after bursts, and one allocator
/// is one set of figures (`webhookd_allocator_bytes`). Its options are built
/// in: `.cargo/config.toml`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "webhookd", version, about = "Kafka events in, signed webhook deliveries out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, env = "WEBHOOKD_CONFIG", default_value = "config/webhookd.toml")]
        config: PathBuf,
    },
    /// Validate the configuration (file plus WEBHOOKD_* overrides) and exit.
    Check {
        #[arg(long, short, env = "WEBHOOKD_CONFIG", default_value = "config/webhookd.toml")]
        config: PathBuf,
    },
    /// Run the daemon on the embedded broker with a demo receiver and producer.
    Demo {
        #[arg(long, short, default_value = "config/demo.toml")]
        config: PathBuf,
        /// How many sample events to publish.
        #[arg(long, default_value_t = 200)]
        events: u32,
    },
    /// List and replay dead letters, through a running webhookd's management API.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// List endpoints and re-enable disabled ones, through the management API.
    #[command(subcommand)]
    Endpoints(EndpointCommand),
}

/// Where the management API is.
#[derive(Args)]
struct TargetArgs {
    /// The admin listener of the webhookd to manage.
    #[arg(long, env = "WEBHOOKD_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    admin: url::Url,
    /// The management API key (the daemon's admin.api_key).
    #[arg(long, env = "WEBHOOKD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target { admin: self.admin, api_key: self.api_key.unwrap_or_default() }
    }
}

/// Which dead letters.
#[derive(Args)]
struct FilterArgs {
    /// Only this endpoint's.
    #[arg(long)]
    endpoint: Option<String>,
    /// Only this reason: rejected, exhausted, gone, endpoint_disabled, endpoint_removed, refused, destination_refused.
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at or after: an RFC 3339 time, or a duration ago such as 2h.
    #[arg(long)]
    since: Option<String>,
    /// Dead-lettered before: an RFC 3339 time, or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
}

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Filter {
        Filter { endpoint: a.endpoint, reason: a.reason, since: a.since, until: a.until, limit: a.limit }
    }
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List the dead letters this instance keeps, oldest first.
    List {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line (id and the stored record) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters again: each goes back to the outbox once, with fresh
    /// attempts and the same webhook-id, bypassing deduplication.
    Replay {
        #[command(flatten)]
        target: TargetArgs,
        /// A dead letter's id, as listed (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print what would be replayed and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// The configured endpoints and whether they are enabled.
    List {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Re-enable an endpoint that was disabled (by a 410 Gone answer).
    Enable {
        #[command(flatten)]
        target: TargetArgs,
        /// The endpoint's id.
        id: String,
    },
}

/// Builds the async runtime, or says why it cannot.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("webhookd: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Runs an operator command against the management API.
fn manage(command: Command) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        match command {
            Command::DeadLetters(DeadLetterCommand::List { target, filter, json }) => {
                cli::list(target.target(), filter.into(), json).await
            }
            Command::DeadLetters(DeadLetterCommand::Replay { target, ids, filter, dry_run }) => {
                cli::replay(target.target(), ids, filter.into(), dry_run).await
            }
            Command::Endpoints(EndpointCommand::List { target }) => cli::endpoints(target.target()).await,
            Command::Endpoints(EndpointCommand::Enable { target, id }) => cli::enable(target.target(), &id).await,
            _ => Err(CliError::Usage("not a management command".into())),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webhookd: {e}");
            ExitCode::from(if matches!(e, CliError::Usage(_)) { EXIT_CONFIG } else { 1 })
        }
    }
}

/// Exit code for a configuration that does not validate, or a bad command line.
const EXIT_CONFIG: u8 = 2;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("webhookd: {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::DeadLetters(_) | Command::Endpoints(_)) {
        return manage(cli.command);
    }
    let (config, demo_events) = match &cli.command {
        Command::Check { config } => {
            return match load(config) {
                Ok(c) => {
                    let brokers =
                        if c.source.brokers.is_empty() { "embedded".to_owned() } else { c.source.brokers.join(",") };
                    println!(
                        "{}: OK ({} endpoint{}, topics {:?}, brokers {brokers})",
                        config.display(),
                        c.endpoints.len(),
                        if c.endpoints.len() == 1 { "" } else { "s" },
                        c.source.topics
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            };
        }
        Command::Run { config } => (config, None),
        Command::Demo { config, events } => (config, Some(*events)),
        Command::DeadLetters(_) | Command::Endpoints(_) => unreachable!("handled above"),
    };
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    webhookd::telemetry::init_logs(&config.log);
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        match demo_events {
            Some(n) => webhookd::demo::run(config, n, shutdown).await,
            None => webhookd::app::run(config, shutdown).await.map_err(anyhow::Error::from),
        }
    });
    // Blocking tasks still running (a Kafka client that will not close) must
    // not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let why = describe(&e);
            tracing::error!(error = %why, "webhookd failed");
            eprintln!("webhookd: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: the error types here already
/// show their source in their own message, contexts added with anyhow do not.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once.
async fn on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            tracing::info!("signal received: shutting down (send it again to exit at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jemalloc_serves_c_allocations_with_the_built_in_options() {
        assert!(tikv_jemalloc_ctl::opt::background_thread::read().expect("opt.background_thread"));
        let allocated = || webhookd::telemetry::metrics::allocator_stats().expect("jemalloc stats")[0].1;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = rocksdb::DB::open_default(dir.path()).expect("open RocksDB");
        let before = allocated();
        // RocksDB's memtable arena is allocated with C++ `new`, i.e. `malloc`:
        // with glibc's malloc none of these 8 MiB would show in jemalloc's figures.
        let value = vec![7u8; 4096];
        for i in 0..2048u32 {
            db.put(i.to_be_bytes(), &value).expect("put");
        }
        let grown = allocated().saturating_sub(before);
        assert!(grown >= 4 << 20, "jemalloc saw only {grown} bytes of RocksDB's 8 MiB memtable");
    }
}
