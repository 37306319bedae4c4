//! Shared readiness of the dependencies, written by their owners, read by `/readyz` and exported
//! as the gauge `quota_ready`.

use std::sync::Mutex;

/// What `/readyz` reports for the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerState {
    /// The application runs without a broker (tests of the HTTP layer alone).
    NotConfigured,
    /// Not consuming yet or any more; the text says why.
    Down(String),
    Consuming,
}

/// Readiness flags shared between the AMQP consumers, the batch writer and `/readyz`.
#[derive(Debug)]
pub struct Readiness {
    broker: Mutex<BrokerState>,
    /// Set by the batch writer when a commit fails, cleared on the next success.
    database_error: Mutex<Option<String>>,
}

impl Readiness {
    pub fn new(broker: BrokerState) -> Readiness {
        let readiness = Readiness {
            broker: Mutex::new(broker),
            database_error: Mutex::new(None),
        };
        readiness.export();
        readiness
    }

    /// Whether the broker is consumed (or not configured) and the last commit succeeded; `/readyz`
    /// also pings the database, which this does not.
    pub fn is_ready(&self) -> bool {
        matches!(
            self.broker(),
            BrokerState::NotConfigured | BrokerState::Consuming
        ) && self.database_error().is_none()
    }

    /// Sets `quota_ready` from the current flags: alerts see "not ready" without scraping `/readyz`.
    fn export(&self) {
        let ready = if self.is_ready() { 1.0 } else { 0.0 };
        metrics::gauge!(crate::metrics::READY).set(ready);
    }

    pub fn broker(&self) -> BrokerState {
        self.broker
            .lock()
            .expect("readiness mutex is never held across a panic")
            .clone()
    }

    pub fn set_broker(&self, state: BrokerState) {
        *self
            .broker
            .lock()
            .expect("readiness mutex is never held across a panic") = state;
        self.export();
    }

    pub fn database_error(&self) -> Option<String> {
        self.database_error
            .lock()
            .expect("readiness mutex is never held across a panic")
            .clone()
    }

    pub fn set_database_error(&self, error: Option<String>) {
        *self
            .database_error
            .lock()
            .expect("readiness mutex is never held across a panic") = error;
        self.export();
    }
}
