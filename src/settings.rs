//! Typed settings: `config.toml` (or `--config PATH`), then `QUOTA__SECTION__KEY` environment overrides.

use std::net::SocketAddr;
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::alerts::{Thresholds, THRESHOLD_RANGE};

/// An invalid or unreadable setting, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid setting {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("invalid settings: {0}")]
    Unreadable(#[from] config::ConfigError),
}

/// Largest batch whose statements stay within the databases' bound-parameter limits.
pub const MAX_BATCH_SIZE: usize = 8_000;
/// Most batch writers: past the cores of any sensible database host, more only contend.
pub const MAX_WRITERS: usize = 16;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub admin: AdminSettings,
    pub scheduler: SchedulerSettings,
    pub check: CheckSettings,
    pub ingest: IngestSettings,
    pub actors: ActorSettings,
    pub alerts: AlertSettings,
    pub log: LogSettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://…` (embedded) or `postgres://…`.
    pub url: String,
    /// Upper bound of the connection pool.
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "sqlite://quota.db?mode=rwc".into(),
            max_connections: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// `false` runs without a broker: HTTP only, no usage ingestion (tests of the HTTP layer).
    pub enabled: bool,
    pub url: String,
    /// Number of shard queues; fixed per cluster (changing it moves keys between queues).
    pub shards: u16,
    /// Unacknowledged deliveries per shard channel; must exceed `ingest.batch_size`.
    pub prefetch: u16,
    /// Heartbeat in seconds: how fast a hung peer is noticed.
    pub heartbeat_secs: u16,
    /// Longest wait between reconnection attempts.
    pub reconnect_max_backoff_ms: u64,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            enabled: true,
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            shards: 16,
            prefetch: 10_000,
            heartbeat_secs: 5,
            reconnect_max_backoff_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free port.
    pub bind: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            bind: "127.0.0.1:8080".into(),
            max_body_bytes: 16 * 1024,
            workers: 0,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// HTTP Basic password of user `admin`; unset → admin routes answer 503. A secret: its
    /// `Debug` prints `[REDACTED]`, so settings can be logged.
    pub password: Option<SecretString>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    /// How often lapsed windows are rolled over.
    pub interval_ms: u64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            interval_ms: 60_000,
        }
    }
}

/// What a check of a key the database does not know answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownKeyPolicy {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckSettings {
    pub unknown_key: UnknownKeyPolicy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Events per database transaction at most.
    pub batch_size: usize,
    /// Longest time an event waits before its batch is flushed.
    pub flush_interval_ms: u64,
    /// Batch writers committing at once on PostgreSQL (SQLite has one). Each owns the keys whose
    /// id modulo `writers` is its number, so one key's batches still commit one after another.
    pub writers: usize,
    /// How long processed event ids are kept for deduplication.
    pub event_retention_days: u32,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            batch_size: 1_000,
            flush_interval_ms: 200,
            writers: 2,
            event_retention_days: 8,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorSettings {
    /// A key actor with no traffic and nothing pending for this long stops.
    pub idle_timeout_secs: u64,
    /// Threads that run key actors, each with its own broker connection; 0 means one per two
    /// cores (at least one).
    pub arbiters: usize,
}

impl Default for ActorSettings {
    fn default() -> Self {
        ActorSettings {
            idle_timeout_secs: 600,
            arbiters: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// Shares of a key's quota, in percent (1–1000), whose first crossing in a window is
    /// published to `quota.alerts`. Read as signed so a negative value is named, not a parse error.
    pub thresholds_percent: Vec<i64>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            thresholds_percent: Thresholds::default()
                .percents()
                .iter()
                .map(|&percent| i64::from(percent))
                .collect(),
        }
    }
}

impl AlertSettings {
    /// The validated thresholds; `Err` with the offending value.
    pub fn thresholds(&self) -> Result<Thresholds, i64> {
        let percents = self
            .thresholds_percent
            .iter()
            .map(|&percent| u32::try_from(percent).map_err(|_| percent))
            .collect::<Result<Vec<u32>, i64>>()?;
        Thresholds::new(&percents).map_err(i64::from)
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `quota_keeper=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Loads `path` if it exists (it must exist when `required`), then the environment, then validates.
    pub fn load(path: &Path, required: bool) -> Result<Settings, SettingsError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(path).required(required))
            .add_source(
                config::Environment::with_prefix("QUOTA")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // `QUOTA__ALERTS__THRESHOLDS_PERCENT=50,90`; no other key is a list.
                    .list_separator(",")
                    .with_list_parse_key("alerts.thresholds_percent"),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> SettingsError {
            SettingsError::Invalid {
                key,
                problem: problem.into(),
            }
        }
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with sqlite: or postgres://",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if !(self.amqp.url.starts_with("amqp://") || self.amqp.url.starts_with("amqps://")) {
            return Err(invalid("amqp.url", "must start with amqp://"));
        }
        // Parsed as the client will parse it, so a malformed URL stops the start instead of
        // being retried forever as if the broker were down.
        if let Err(problem) = self.amqp.url.parse::<lapin::uri::AMQPUri>() {
            return Err(invalid(
                "amqp.url",
                format!("is not a valid AMQP URL: {problem}"),
            ));
        }
        if !(1..=999).contains(&self.amqp.shards) {
            return Err(invalid("amqp.shards", "must be between 1 and 999"));
        }
        if self.http.bind.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.bind",
                format!(
                    "{:?} is not an address such as 127.0.0.1:8080",
                    self.http.bind
                ),
            ));
        }
        if self.http.max_body_bytes < 256 {
            return Err(invalid("http.max_body_bytes", "must be at least 256"));
        }
        if self
            .admin
            .password
            .as_ref()
            .is_some_and(|password| password.expose_secret().is_empty())
        {
            return Err(invalid(
                "admin.password",
                "must not be empty (leave it unset to disable admin routes)",
            ));
        }
        if self.scheduler.interval_ms == 0 {
            return Err(invalid("scheduler.interval_ms", "must be at least 1"));
        }
        // Three bound parameters per event in one INSERT; SQLite allows 32,766 per statement.
        if !(1..=MAX_BATCH_SIZE).contains(&self.ingest.batch_size) {
            return Err(invalid(
                "ingest.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        if usize::from(self.amqp.prefetch) <= self.ingest.batch_size {
            return Err(invalid(
                "amqp.prefetch",
                "must be greater than ingest.batch_size, or batches never fill",
            ));
        }
        if self.ingest.flush_interval_ms == 0 {
            return Err(invalid("ingest.flush_interval_ms", "must be at least 1"));
        }
        if !(1..=MAX_WRITERS).contains(&self.ingest.writers) {
            return Err(invalid(
                "ingest.writers",
                format!("must be between 1 and {MAX_WRITERS}"),
            ));
        }
        // Each writer holds a connection while it commits; key loads and admin requests need one
        // too. (SQLite always runs one writer.)
        let postgres = self.database.url.starts_with("postgres");
        if postgres && self.ingest.writers >= self.database.max_connections as usize {
            return Err(invalid(
                "ingest.writers",
                "must be less than database.max_connections",
            ));
        }
        if self.ingest.event_retention_days == 0 {
            return Err(invalid("ingest.event_retention_days", "must be at least 1"));
        }
        if self.actors.idle_timeout_secs == 0 {
            return Err(invalid("actors.idle_timeout_secs", "must be at least 1"));
        }
        // Empty would record nothing, silently; an operator who does not want alerts binds no queue.
        if self.alerts.thresholds_percent.is_empty() {
            return Err(invalid(
                "alerts.thresholds_percent",
                "must name at least one percent",
            ));
        }
        if let Err(outside) = self.alerts.thresholds() {
            return Err(invalid(
                "alerts.thresholds_percent",
                format!(
                    "{outside} is not between {} and {}",
                    THRESHOLD_RANGE.start(),
                    THRESHOLD_RANGE.end()
                ),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_spec() {
        let settings = Settings::default();
        settings.validate().unwrap();
        assert_eq!(settings.database.url, "sqlite://quota.db?mode=rwc");
        assert_eq!(settings.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(settings.http.bind, "127.0.0.1:8080");
        assert!(settings.admin.password.is_none());
        assert_eq!(settings.scheduler.interval_ms, 60_000);
        assert_eq!(settings.check.unknown_key, UnknownKeyPolicy::Allow);
    }

    #[test]
    fn the_admin_password_never_prints() {
        let mut settings = Settings::default();
        settings.admin.password = Some("hunter2-secret".into());
        assert!(!format!("{settings:?}").contains("hunter2-secret"));
    }

    #[test]
    fn a_malformed_broker_url_is_refused_naming_the_key() {
        let mut settings = Settings::default();
        for url in ["amqp://:::", "amqp://guest:guest@127.0.0.1:99999/%2f"] {
            settings.amqp.url = url.into();
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains("amqp.url"), "{url}: {error}");
        }
        settings.amqp.url = "amqp://guest:guest@127.0.0.1:5672/qk_vhost?heartbeat=5".into();
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn alert_thresholds_default_to_80_and_100_and_stay_within_1_to_1000() {
        let mut settings = Settings::default();
        assert_eq!(settings.alerts.thresholds().unwrap().percents(), &[80, 100]);
        for outside in [0, -80, 1001] {
            settings.alerts.thresholds_percent = vec![80, outside];
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains("alerts.thresholds_percent"), "{error}");
        }
        settings.alerts.thresholds_percent = vec![];
        assert!(settings.validate().is_err());
        settings.alerts.thresholds_percent = vec![1000, 1, 50];
        assert_eq!(
            settings.alerts.thresholds().unwrap().percents(),
            &[1, 50, 1000]
        );
    }

    #[test]
    fn alert_thresholds_come_from_the_environment_as_a_comma_separated_list() {
        // A file path that does not exist: only the environment counts.
        std::env::set_var("QUOTA__ALERTS__THRESHOLDS_PERCENT", "50,90");
        let loaded = Settings::load(Path::new("/nonexistent/quota-keeper.toml"), false);
        std::env::remove_var("QUOTA__ALERTS__THRESHOLDS_PERCENT");
        assert_eq!(loaded.unwrap().alerts.thresholds_percent, vec![50, 90]);
    }

    #[test]
    fn prefetch_must_exceed_batch_size() {
        let mut settings = Settings::default();
        settings.amqp.prefetch = 500;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("amqp.prefetch"), "{error}");
    }

    #[test]
    fn writers_leave_a_connection_for_key_loads() {
        let mut settings = Settings::default();
        settings.database.max_connections = 2;
        assert!(settings.validate().is_ok(), "SQLite runs one writer");
        settings.database.url = "postgres://postgres@127.0.0.1/quota".into();
        settings.database.max_connections = 4;
        settings.ingest.writers = 4;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("ingest.writers"), "{error}");
        settings.ingest.writers = 3;
        assert!(settings.validate().is_ok());
        settings.ingest.writers = 0;
        assert!(settings.validate().is_err());
    }

    #[test]
    fn batch_size_stays_within_the_bound_parameter_limits() {
        let mut settings = Settings::default();
        settings.ingest.batch_size = MAX_BATCH_SIZE + 1;
        settings.amqp.prefetch = u16::MAX;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("ingest.batch_size"), "{error}");
    }
}
