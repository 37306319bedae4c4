//! `Application::build`: the one startup path of `main` and the tests (database, actors, AMQP, HTTP).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use sea_orm::DatabaseConnection;
use tracing_actix_web::TracingLogger;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use actix::{Actor, Addr};

use crate::actors::registry::KeyRegistry;
use crate::actors::scheduler::Scheduler;
use crate::alerts::{AlertPublisher, Alerts};
use crate::amqp::control::Forwarder;
use crate::amqp::ownership::Ownership;
use crate::amqp::AmqpService;
use crate::clock::SharedClock;
use crate::db;
use crate::http::{self, AppState};
use crate::ingest::{BatchWriter, BatchWriterHandle, DatabaseStore};
use crate::owners::Owners;
use crate::readiness::{BrokerState, Readiness};
use crate::settings::Settings;

/// From the stop signal to exit, every step included: inside the 10 s the SPEC allows.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(9);
/// Kept back from the consumers' share for the writer's last commit and the HTTP stop.
const WRITER_AND_HTTP_RESERVE: Duration = Duration::from_secs(3);
/// Kept back from the writer's share for the HTTP stop.
const HTTP_RESERVE: Duration = Duration::from_secs(1);
/// Longest a client may take to send a request's head (actix's `client_request_timeout`; the
/// body has `http::body::BODY_READ_TIMEOUT`). Answered 408.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A built, listening application.
pub struct Application {
    port: u16,
    server: Server,
    db: DatabaseConnection,
    registry: KeyRegistry,
    scheduler: Addr<Scheduler>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
    amqp_task: Option<JoinHandle<()>>,
    /// A writer handle held until the consumers stop, so the writer runs without a broker too.
    hold_writer: BatchWriterHandle,
    writer_task: JoinHandle<()>,
    /// Cancelled once the writers have committed their last batch.
    alerts_stop: CancellationToken,
    alerts_task: Option<JoinHandle<()>>,
}

impl Application {
    /// Connects the database (applying migrations), starts the actors and binds HTTP.
    pub async fn build(settings: Settings, clock: SharedClock) -> anyhow::Result<Application> {
        // Bound first: a port in use must stop the start before any actor or task exists (an
        // actor started and then dropped with the failed start panicked outside the runtime).
        let listener = TcpListener::bind(&settings.http.bind)
            .with_context(|| format!("Failed to bind HTTP on {}", settings.http.bind))?;
        // Validated again here: tests build settings without `Settings::load`.
        let thresholds = settings.alerts.thresholds().map_err(|outside| {
            anyhow::anyhow!(
                "invalid setting alerts.thresholds_percent: {outside} is not between 1 and 1000"
            )
        })?;
        // First: every family is registered at 0 and what is built below records into it.
        let metrics = crate::metrics::prometheus_handle();
        let alerts = Alerts::new(thresholds);
        alerts.register_metrics();
        let db = db::connect_and_migrate(&settings.database)
            .await
            .context("Failed to open the database and apply migrations")?;
        if settings.admin.password.is_none() {
            tracing::warn!(
                "admin routes are disabled (503): set admin.password in config.toml or QUOTA__ADMIN__PASSWORD"
            );
        }
        let readiness = Arc::new(Readiness::new(if settings.amqp.enabled {
            BrokerState::Down("connecting".into())
        } else {
            BrokerState::NotConfigured
        }));
        let core = Core::start(&settings, &db, &clock, &readiness, alerts);
        let shutdown = CancellationToken::new();
        let broker = settings
            .amqp
            .enabled
            .then(|| Broker::start(&settings, &core, &readiness, &clock, shutdown.clone()));
        let state = web::Data::new(AppState {
            db: db.clone(),
            clock,
            admin_password: settings.admin.password.clone(),
            max_body_bytes: settings.http.max_body_bytes,
            metrics,
            readiness: readiness.clone(),
            registry: core.registry.clone(),
            owners: Owners::new(
                core.registry.clone(),
                broker
                    .as_ref()
                    .map(|broker| (broker.forwarder.clone(), broker.ownership.clone())),
            ),
            ownership: broker.as_ref().map(|broker| broker.ownership.clone()),
        });
        let port = listener
            .local_addr()
            .context("Failed to read the bound address")?
            .port();
        let server = serve_http(listener, state, &settings)?;
        tracing::info!(port, database = %redact(&settings.database.url), "quota-keeper listening");
        Ok(Application {
            port,
            server,
            db,
            registry: core.registry,
            scheduler: core.scheduler,
            readiness,
            shutdown,
            amqp_task: broker.map(|broker| broker.task),
            // Kept until the consumers have stopped (and even without a broker): holds granted
            // over HTTP reach the writer through the registry's weak handle meanwhile.
            hold_writer: core.writer,
            writer_task: core.writer_task,
            alerts_stop: core.alerts_stop,
            alerts_task: core.alerts_task,
        })
    }

    /// The bound HTTP port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn registry(&self) -> &KeyRegistry {
        &self.registry
    }

    pub fn scheduler(&self) -> Addr<Scheduler> {
        self.scheduler.clone()
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Serves until SIGTERM or SIGINT, then stops gracefully.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(wait_for_shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then stops gracefully.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = actix_web::rt::spawn(self.server);
        shutdown.await;
        tracing::info!("shutdown requested: stop consuming, commit, acknowledge");
        let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
        self.shutdown.cancel();
        if let Some(amqp_task) = self.amqp_task {
            if tokio::time::timeout_at(deadline - WRITER_AND_HTTP_RESERVE, amqp_task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "consumers did not stop in time; unacknowledged events will be redelivered"
                );
            }
        }
        // The consumers and this one held the last writer handles: the writer commits what it
        // has and ends.
        drop(self.hold_writer);
        if tokio::time::timeout_at(deadline - HTTP_RESERVE, self.writer_task)
            .await
            .is_err()
        {
            tracing::warn!("the last batch was not committed in time; it will be redelivered");
        }
        // The last batch's alerts, if the broker takes them in time; else they wait in the outbox.
        self.alerts_stop.cancel();
        if let Some(alerts_task) = self.alerts_task {
            let _ = tokio::time::timeout_at(deadline - HTTP_RESERVE, alerts_task).await;
        }
        // Requests in progress may finish within the budget; then the server stops regardless.
        if tokio::time::timeout_at(deadline, handle.stop(true))
            .await
            .is_err()
        {
            handle.stop(false).await;
        }
        let _ = server.await;
        self.registry.shutdown();
        let _ = self.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The parts that run with or without a broker: key actors, scheduler, batch writer, alerts.
struct Core {
    registry: KeyRegistry,
    scheduler: Addr<Scheduler>,
    writer: BatchWriterHandle,
    writer_task: JoinHandle<()>,
    /// Cancelled once the writers have committed their last batch.
    alerts_stop: CancellationToken,
    alerts_task: Option<JoinHandle<()>>,
}

impl Core {
    fn start(
        settings: &Settings,
        db: &DatabaseConnection,
        clock: &SharedClock,
        readiness: &Arc<Readiness>,
        alerts: Alerts,
    ) -> Core {
        let registry = KeyRegistry::start(
            db.clone(),
            clock.clone(),
            settings.check.unknown_key,
            Duration::from_secs(settings.actors.idle_timeout_secs),
            settings.actors.arbiters,
            alerts.clone(),
        );
        let scheduler = Scheduler {
            db: db.clone(),
            clock: clock.clone(),
            registry: registry.clone(),
            interval: Duration::from_millis(settings.scheduler.interval_ms),
            event_retention: chrono::Duration::days(i64::from(
                settings.ingest.event_retention_days,
            )),
        }
        .start();
        let (writer, writer_task) = BatchWriter {
            store: DatabaseStore {
                db: db.clone(),
                alerts: alerts.clone(),
            },
            listener: registry.clone(),
            clock: clock.clone(),
            readiness: readiness.clone(),
            settings: settings.ingest.clone(),
        }
        .spawn();
        // Weak: the writer still ends once the consumers' handles are gone (graceful stop).
        registry.attach_hold_writer(writer.downgrade());
        // Alerts are recorded with or without a broker; only an instance with one sends them.
        let alerts_stop = CancellationToken::new();
        let alerts_task = settings.amqp.enabled.then(|| {
            AlertPublisher {
                db: db.clone(),
                clock: clock.clone(),
                alerts,
                amqp_url: crate::amqp::with_heartbeat(
                    &settings.amqp.url,
                    settings.amqp.heartbeat_secs,
                ),
                max_backoff: Duration::from_millis(settings.amqp.reconnect_max_backoff_ms),
                stop: alerts_stop.clone(),
            }
            .spawn()
        });
        Core {
            registry,
            scheduler,
            writer,
            writer_task,
            alerts_stop,
            alerts_task,
        }
    }
}

/// The broker session: consumers of every shard, and what it knows of owners.
struct Broker {
    ownership: Arc<Ownership>,
    forwarder: Forwarder,
    task: JoinHandle<()>,
}

impl Broker {
    fn start(
        settings: &Settings,
        core: &Core,
        readiness: &Arc<Readiness>,
        clock: &SharedClock,
        shutdown: CancellationToken,
    ) -> Broker {
        let ownership = Arc::new(Ownership::new(
            uuid::Uuid::new_v4().simple().to_string(),
            settings.amqp.shards,
        ));
        let forwarder = Forwarder::default();
        let task = tokio::spawn(
            AmqpService {
                settings: settings.amqp.clone(),
                registry: core.registry.clone(),
                writer: core.writer.clone(),
                readiness: readiness.clone(),
                clock: clock.clone(),
                shutdown,
                ownership: ownership.clone(),
                forwarder: forwarder.clone(),
            }
            .run(),
        );
        Broker {
            ownership,
            forwarder,
            task,
        }
    }
}

/// The HTTP server on `listener`, not yet polled.
fn serve_http(
    listener: TcpListener,
    state: web::Data<AppState>,
    settings: &Settings,
) -> anyhow::Result<Server> {
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(http::json_error_bodies())
            .wrap(TracingLogger::default())
            .app_data(state.clone())
            .configure(http::routes)
            .default_service(web::to(|| async {
                http::errors::json_error(actix_web::http::StatusCode::NOT_FOUND, "no such route")
            }))
    })
    // Signals are handled by `run_until_stopped`, which flushes before the server stops.
    .disable_signals()
    .client_request_timeout(REQUEST_HEAD_TIMEOUT)
    .shutdown_timeout(5);
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(server
        .listen(listener)
        .context("Failed to listen for HTTP")?
        .run())
}

async fn wait_for_shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the service");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
