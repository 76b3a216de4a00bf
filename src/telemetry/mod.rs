//! What operators see: the metrics catalogue, the admin listener, and logs.

pub mod admin;
pub mod metrics;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global `tracing` subscriber. `RUST_LOG` or `WEBHOOKD_LOG`
/// (an `EnvFilter` directive such as `webhookd=debug`) overrides `log.level`.
pub fn init_logs(cfg: &LogConfig) {
    let directive =
        std::env::var("WEBHOOKD_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|e| {
        eprintln!("webhookd: ignoring bad log filter {directive:?}: {e}");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
