//! The `quota-keeper` binary: parse the command line, load settings, run a command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quota_keeper::amqp::publish::{publish_usage, UsageMessage};
use quota_keeper::clock::SystemClock;
use quota_keeper::remote_check::{check_over_amqp, CheckVerdict};
use quota_keeper::settings::Settings;
use quota_keeper::startup::Application;

/// mimalloc: less memory per resident key actor than glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid setting or command line.
const EXIT_BAD_CONFIGURATION: u8 = 2;
/// Exit code of `check` when the key is denied (quota reached, or unknown under `deny`).
const EXIT_DENIED: u8 = 1;
/// Exit code of `check` when no decision came back (broker, timeout, malformed, unavailable).
const EXIT_CHECK_FAILED: u8 = 2;

#[derive(Parser)]
#[command(
    name = "quota-keeper",
    version,
    about = "Monthly token quota per API key for LLM gateways"
)]
struct Cli {
    /// Settings file; without it `config.toml` in the working directory is read if present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, declare the AMQP topology, consume and serve HTTP (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Publish one usage event to `quota.usage` with publisher confirms.
    Publish {
        /// The API key id.
        #[arg(long)]
        key: i64,
        /// Tokens used.
        #[arg(long)]
        tokens: i64,
        /// Idempotency key; a random UUID when absent.
        #[arg(long)]
        event_id: Option<String>,
        /// RFC 3339 instant of the usage; the service's receipt time when absent.
        #[arg(long)]
        occurred_at: Option<String>,
    },
    /// Ask a check over RabbitMQ and print the reply; exit 0 allowed, 1 denied, 2 on error.
    Check {
        /// The API key id.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        key: i64,
        /// Tokens the coming request is expected to use.
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        tokens: Option<i64>,
        /// How long to wait for the reply.
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, required) = match &cli.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    };
    let settings = match Settings::load(&path, required) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("quota-keeper: {error}");
            return ExitCode::from(EXIT_BAD_CONFIGURATION);
        }
    };
    quota_keeper::telemetry::init(&settings.log);
    let result: anyhow::Result<ExitCode> = actix_web::rt::System::new().block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let app = Application::build(settings, Arc::new(SystemClock)).await?;
                app.run_until_stopped().await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Migrate => {
                quota_keeper::db::connect_and_migrate(&settings.database).await?;
                tracing::info!("migrations applied");
                Ok(ExitCode::SUCCESS)
            }
            Command::Publish {
                key,
                tokens,
                event_id,
                occurred_at,
            } => {
                let message = UsageMessage {
                    event_id: event_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                    api_key_id: key,
                    tokens,
                    occurred_at,
                };
                publish_usage(&settings.amqp.url, &message).await?;
                println!("{}", serde_json::to_string(&message)?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Check {
                key,
                tokens,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                Ok(check(&settings.amqp.url, key, tokens, timeout).await)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "quota-keeper failed");
            eprintln!("quota-keeper: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `check` command: prints the reply JSON; the exit code says allowed, denied or failed.
async fn check(amqp_url: &str, key: i64, tokens: Option<i64>, timeout: Duration) -> ExitCode {
    match check_over_amqp(amqp_url, key, tokens, timeout).await {
        Ok(reply) => {
            println!("{}", reply.body);
            match reply.verdict() {
                CheckVerdict::Allowed => ExitCode::SUCCESS,
                CheckVerdict::Denied => ExitCode::from(EXIT_DENIED),
                CheckVerdict::Undecided => ExitCode::from(EXIT_CHECK_FAILED),
            }
        }
        Err(error) => {
            eprintln!("quota-keeper check: {error}");
            ExitCode::from(EXIT_CHECK_FAILED)
        }
    }
}
