//! `CheckOutcome`: how a check was decided. Each edge turns it into its own form in one place:
//! the reply's `status` (here, `wire_status`), the HTTP status (`src/http/check.rs`) and the
//! metric label (`src/metrics.rs`).

/// How a check was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The key may make the request.
    Allowed,
    /// The quota (or, for an unlimited key, the counter's ceiling) leaves no room for it.
    QuotaReached,
    /// The database does not know the key; `allowed` is what `check.unknown_key` says.
    UnknownKey { allowed: bool },
    /// The request could not be understood.
    Malformed,
    /// The key's state could not be read (not resident, and the database or its owner is down).
    Unavailable,
}

impl CheckOutcome {
    /// Every outcome, for exhaustive tests of the mappings.
    #[cfg(test)]
    pub(crate) const ALL: [CheckOutcome; 6] = [
        CheckOutcome::Allowed,
        CheckOutcome::QuotaReached,
        CheckOutcome::UnknownKey { allowed: true },
        CheckOutcome::UnknownKey { allowed: false },
        CheckOutcome::Malformed,
        CheckOutcome::Unavailable,
    ];

    /// Whether the key may make the request.
    pub fn allowed(self) -> bool {
        match self {
            CheckOutcome::Allowed => true,
            CheckOutcome::UnknownKey { allowed } => allowed,
            CheckOutcome::QuotaReached | CheckOutcome::Malformed | CheckOutcome::Unavailable => {
                false
            }
        }
    }

    /// Whether the answer comes from the key's stored state (the reply's `known`).
    pub fn known(self) -> bool {
        matches!(self, CheckOutcome::Allowed | CheckOutcome::QuotaReached)
    }

    /// The reply's `status` (SPEC §2.2).
    pub(crate) fn wire_status(self) -> u16 {
        match self {
            CheckOutcome::Allowed | CheckOutcome::UnknownKey { allowed: true } => 200,
            CheckOutcome::QuotaReached => 429,
            CheckOutcome::UnknownKey { allowed: false } => 404,
            CheckOutcome::Malformed => 400,
            CheckOutcome::Unavailable => 503,
        }
    }

    /// The outcome a received reply's `status` and `known` stand for (a reply from the key's
    /// owner, or read by the `check` command); `None` for a status no check answers with.
    pub(crate) fn from_wire(status: u16, known: bool) -> Option<CheckOutcome> {
        match (status, known) {
            (200, true) => Some(CheckOutcome::Allowed),
            (200, false) => Some(CheckOutcome::UnknownKey { allowed: true }),
            (429, _) => Some(CheckOutcome::QuotaReached),
            (404, _) => Some(CheckOutcome::UnknownKey { allowed: false }),
            (400, _) => Some(CheckOutcome::Malformed),
            (503, _) => Some(CheckOutcome::Unavailable),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_survives_the_wire() {
        for outcome in CheckOutcome::ALL {
            assert_eq!(
                CheckOutcome::from_wire(outcome.wire_status(), outcome.known()),
                Some(outcome)
            );
        }
    }

    #[test]
    fn the_wire_statuses_are_those_of_the_spec() {
        let statuses: Vec<u16> = CheckOutcome::ALL.map(CheckOutcome::wire_status).to_vec();
        assert_eq!(statuses, [200, 429, 200, 404, 400, 503]);
        assert_eq!(CheckOutcome::from_wire(302, true), None);
        assert_eq!(CheckOutcome::from_wire(0, false), None);
    }

    #[test]
    fn only_an_allowed_outcome_allows() {
        let allowing: Vec<CheckOutcome> = CheckOutcome::ALL
            .into_iter()
            .filter(|outcome| outcome.allowed())
            .collect();
        assert_eq!(
            allowing,
            [
                CheckOutcome::Allowed,
                CheckOutcome::UnknownKey { allowed: true }
            ]
        );
    }
}
