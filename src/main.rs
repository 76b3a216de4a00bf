//! The `webhookd` binary: parse the command line, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhookd::config::Config;

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
}

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("webhookd: {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    };
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    webhookd::telemetry::init_logs(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("webhookd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
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
