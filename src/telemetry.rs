//! Tracing subscriber: human-readable or JSON lines, filtered by `log.level` or `RUST_LOG`.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::{LogFormat, LogSettings};

/// The AMQP client library's target. When the broker closes a connection (unknown exchange type,
/// missing vhost, refused credentials) it logs three ERROR lines per attempt ("Connection closed",
/// "Connection error", "Exponential backoff attempts exhausted"); the service already logs one
/// warning per attempt with the same reason and the next retry.
const AMQP_CLIENT_TARGET: &str = "lapin";

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init(settings: &LogSettings) {
    let directives = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| settings.level.clone());
    let filter = EnvFilter::try_new(quiet_amqp_client(&directives))
        .unwrap_or_else(|_| EnvFilter::new(quiet_amqp_client(&settings.level)));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The filter `directives` with the AMQP client's lines shown only at debug: unchanged when the
/// directives name the client or set the default level to debug or finer, else with `lapin=off`.
pub fn quiet_amqp_client(directives: &str) -> String {
    let mut names_client = false;
    let mut default_shows_debug = false;
    for directive in directives.split(',').map(str::trim) {
        if directive.starts_with(AMQP_CLIENT_TARGET) {
            names_client = true;
        } else if let Ok(level) = directive.parse::<LevelFilter>() {
            // A bare level is the default of every target, the client's included.
            default_shows_debug |= level >= LevelFilter::DEBUG;
        }
    }
    if names_client || default_shows_debug {
        directives.to_string()
    } else if directives.trim().is_empty() {
        format!("{AMQP_CLIENT_TARGET}=off")
    } else {
        format!("{directives},{AMQP_CLIENT_TARGET}=off")
    }
}

#[cfg(test)]
mod tests {
    use super::quiet_amqp_client;

    #[test]
    fn the_amqp_client_is_silenced_below_debug() {
        assert_eq!(quiet_amqp_client("info"), "info,lapin=off");
        assert_eq!(
            quiet_amqp_client("warn,quota_keeper=info"),
            "warn,quota_keeper=info,lapin=off"
        );
        assert_eq!(quiet_amqp_client(""), "lapin=off");
        assert_eq!(
            quiet_amqp_client("info,quota_keeper=trace"),
            "info,quota_keeper=trace,lapin=off"
        );
    }

    #[test]
    fn debug_or_a_directive_for_the_client_keeps_its_lines() {
        assert_eq!(quiet_amqp_client("debug"), "debug");
        assert_eq!(quiet_amqp_client("trace,sqlx=warn"), "trace,sqlx=warn");
        assert_eq!(quiet_amqp_client("info,lapin=error"), "info,lapin=error");
    }
}
