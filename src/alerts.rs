//! Threshold alerts (SPEC §2.4): the handle the committers wake the publisher with, and the
//! publisher, which sends the outbox's unpublished alerts to `quota.alerts` with publisher
//! confirms, oldest first, then marks them published.
//!
//! The publisher runs at start, after every commit that recorded an alert, and every second, so
//! a broker outage only delays alerts. Several instances may all run one: on PostgreSQL each
//! takes its alerts with `FOR UPDATE SKIP LOCKED` in a transaction that publishes, then marks and
//! commits, so no alert is sent twice unless the process dies between the broker's confirm and
//! the commit (the copy carries the same `alert_id`).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, TransactionTrait};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::topology::ALERTS_EXCHANGE;
use crate::amqp::PERSISTENT;
use crate::clock::SharedClock;
use crate::db::alerts::{mark_published, pending_count, prune_published, take_pending};
use crate::domain::alerts::{Alert, Thresholds};
use crate::domain::window::window_start_containing;
use crate::metrics as names;

/// Alerts taken per round (one transaction, one wait for confirms).
const ROUND_SIZE: u64 = 500;
/// How often the outbox is looked at without a wake-up, and the first pause after a failure.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for the broker's confirms of one round; past it the round is retried.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// On shutdown, the last round (alerts of the last batch) gets this long.
const LAST_ROUND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often published alerts of closed windows are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// What committers share with the publisher: the thresholds, and a way to wake it.
#[derive(Clone, Debug)]
pub struct Alerts {
    thresholds: Arc<Thresholds>,
    recorded: Arc<Notify>,
}

impl Alerts {
    pub fn new(thresholds: Thresholds) -> Alerts {
        Alerts {
            thresholds: Arc::new(thresholds),
            recorded: Arc::new(Notify::new()),
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// A commit recorded alerts: publish them now rather than at the next poll.
    pub fn wake_publisher(&self) {
        self.recorded.notify_one();
    }

    /// Creates `quota_alerts_published_total{threshold}` at 0 for every configured threshold.
    pub fn register_metrics(&self) {
        for percent in self.thresholds.percents() {
            metrics::counter!(names::ALERTS_PUBLISHED_TOTAL, "threshold" => percent.to_string())
                .increment(0);
        }
    }
}

/// Why a round did not publish everything it took.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("database: {0}")]
    Database(#[from] DbErr),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker refused {0} alert(s) (nack)")]
    Refused(usize),
}

/// A broker connection with a confirming channel, opened when there is something to send.
struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    async fn open(url: &str) -> Result<Link, lapin::Error> {
        let connection = Connection::connect(
            url,
            ConnectionProperties::default().with_connection_name("quota-keeper-alerts".into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Link {
            connection,
            channel,
        })
    }

    async fn close(self) {
        // A broker that is gone does not answer the close: the socket drops with the connection.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.connection.close(200, "alerts publisher done".into()),
        )
        .await;
    }

    /// Publishes `alerts` persistently, then waits for every confirm; returns the ids (row and
    /// revision) of those the broker took.
    async fn publish<Id: Copy>(&self, alerts: &[(Id, Alert)]) -> Result<Vec<Id>, RoundError> {
        let mut confirms = Vec::with_capacity(alerts.len());
        for (id, alert) in alerts {
            let message = alert.message();
            let body = serde_json::to_vec(&message)
                .expect("an alert message has only strings and integers");
            let confirm = self
                .channel
                .basic_publish(
                    ALERTS_EXCHANGE.into(),
                    alert.routing_key().as_str().into(),
                    // Not mandatory: an alert nobody has bound a queue for is not an error.
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(PERSISTENT)
                        .with_content_type("application/json".into())
                        .with_message_id(message.alert_id.as_str().into()),
                )
                .await?;
            confirms.push((*id, confirm));
        }
        let confirmed = async {
            let mut taken = Vec::with_capacity(confirms.len());
            for (id, confirm) in confirms {
                if confirm.await?.is_ack() {
                    taken.push(id);
                }
            }
            Ok::<_, lapin::Error>(taken)
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, confirmed)
            .await
            .map_err(|_| RoundError::ConfirmTimeout(CONFIRM_TIMEOUT))?
            .map_err(RoundError::from)
    }
}

/// The publisher task.
pub struct AlertPublisher {
    pub db: DatabaseConnection,
    pub clock: SharedClock,
    pub alerts: Alerts,
    /// The broker, heartbeat included.
    pub amqp_url: String,
    pub max_backoff: Duration,
    /// Cancelled once the batch writers have committed their last batch.
    pub stop: CancellationToken,
}

impl AlertPublisher {
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        let mut link: Option<Link> = None;
        let mut pause = POLL_INTERVAL;
        let mut next_prune = Instant::now();
        loop {
            match self.round(&mut link).await {
                // A full round: more may be waiting.
                Ok(sent) if sent as u64 == ROUND_SIZE => {
                    pause = Duration::ZERO;
                }
                Ok(_) => pause = POLL_INTERVAL,
                Err(error) => {
                    if let Some(broken) = link.take() {
                        broken.close().await;
                    }
                    pause = if pause.is_zero() {
                        POLL_INTERVAL
                    } else {
                        pause
                    };
                    tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "threshold alerts not published; retrying");
                    let retry = pause;
                    pause = (pause * 2).min(self.max_backoff.max(POLL_INTERVAL));
                    self.refresh_pending_gauge().await;
                    if self.wait(retry).await {
                        break;
                    }
                    continue;
                }
            }
            self.refresh_pending_gauge().await;
            if Instant::now() >= next_prune {
                self.prune().await;
                next_prune = Instant::now() + PRUNE_INTERVAL;
            }
            if self.stop.is_cancelled() || (!pause.is_zero() && self.wait(pause).await) {
                break;
            }
        }
        // The writers have committed their last batch: send its alerts if the broker lets us.
        match tokio::time::timeout(LAST_ROUND_TIMEOUT, self.round(&mut link)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::info!(%error, "last threshold alerts left in the outbox; the next instance to run sends them")
            }
            Err(_) => tracing::info!(
                "last threshold alerts left in the outbox; the next instance to run sends them"
            ),
        }
        if let Some(link) = link {
            link.close().await;
        }
    }

    /// Waits `pause`, or less when a commit recorded alerts; `true` when asked to stop.
    async fn wait(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => true,
            _ = self.alerts.recorded.notified() => false,
            _ = tokio::time::sleep(pause) => false,
        }
    }

    /// Publishes up to `ROUND_SIZE` pending alerts; returns how many were taken.
    async fn round(&self, link: &mut Option<Link>) -> Result<usize, RoundError> {
        let (taken, refused) = if self.db.get_database_backend() == DbBackend::Postgres {
            // Locked until marked: another instance skips them meanwhile.
            let txn = self.db.begin().await?;
            let outcome = self.publish_taken(&txn, link).await?;
            txn.commit().await?;
            outcome
        } else {
            // SQLite has one writer, and a read transaction turned into a write one fails if
            // another commit came between: no transaction, one publisher per database file.
            self.publish_taken(&self.db, link).await?
        };
        // Refused ones stay unpublished (the confirmed ones are marked): the retry sends them.
        if refused > 0 {
            return Err(RoundError::Refused(refused));
        }
        Ok(taken)
    }

    /// Takes pending alerts, publishes them and marks those the broker confirmed; returns how
    /// many were taken and how many the broker refused.
    async fn publish_taken(
        &self,
        db: &impl ConnectionTrait,
        link: &mut Option<Link>,
    ) -> Result<(usize, usize), RoundError> {
        let taken = take_pending(db, ROUND_SIZE).await?;
        if taken.is_empty() {
            return Ok((0, 0));
        }
        let alerts: Vec<((i64, i64), Alert)> = taken
            .into_iter()
            .map(|row| {
                let threshold_percent = u32::try_from(row.threshold_percent).map_err(|_| {
                    DbErr::Custom(format!(
                        "alert {} has a negative threshold {}",
                        row.id, row.threshold_percent
                    ))
                })?;
                Ok((
                    (row.id, row.revision),
                    Alert {
                        api_key_id: row.api_key_id,
                        username: row.username,
                        threshold_percent,
                        token_quota_monthly: row.token_quota_monthly,
                        tokens_used_this_month: row.tokens_used_this_month,
                        period_start: row.period_start,
                        quota_reset_at: row.quota_reset_at,
                        occurred_at: row.occurred_at,
                    },
                ))
            })
            .collect::<Result<_, DbErr>>()?;
        let open = match link.take() {
            Some(open) => open,
            None => Link::open(&self.amqp_url).await?,
        };
        let published = open.publish(&alerts).await;
        *link = Some(open);
        let confirmed = published?;
        let refused = alerts.len() - confirmed.len();
        mark_published(db, &confirmed, self.clock.now()).await?;
        let confirmed: std::collections::HashSet<(i64, i64)> = confirmed.into_iter().collect();
        for (id, alert) in &alerts {
            if confirmed.contains(id) {
                metrics::counter!(names::ALERTS_PUBLISHED_TOTAL, "threshold" => alert.threshold_percent.to_string())
                    .increment(1);
            }
        }
        Ok((alerts.len(), refused))
    }

    async fn refresh_pending_gauge(&self) {
        match pending_count(&self.db).await {
            Ok(pending) => metrics::gauge!(names::ALERTS_PENDING).set(pending as f64),
            Err(error) => tracing::debug!(%error, "cannot count pending alerts"),
        }
    }

    async fn prune(&self) {
        let current_window = window_start_containing(self.clock.now());
        match prune_published(&self.db, current_window).await {
            Ok(pruned) => tracing::debug!(pruned, "published alerts of closed windows pruned"),
            Err(error) => tracing::warn!(%error, "pruning published alerts failed"),
        }
    }
}
