//! Reservations (holds, SPEC §2.3): decoding the hold fields of a check, one key's live holds in
//! memory (grant, release, expiry), and the net effect of a batch's hold changes on the table.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::quota::format_instant;
use super::wire::{checked_identifier, Rejection, MAX_TOKEN_COUNT};

/// Largest `reserve`: the same bound as a usage event's tokens.
pub const MAX_RESERVE_TOKENS: i64 = MAX_TOKEN_COUNT;
/// Longest `reservation_id`, in characters.
pub const MAX_RESERVATION_ID_CHARS: usize = 128;
/// `ttl_secs` when the check gives none.
pub const DEFAULT_TTL_SECS: u32 = 900;
/// Longest `ttl_secs`: one day.
pub const MAX_TTL_SECS: u32 = 86_400;

/// The hold a check asks for: `reserve`, `reservation_id`, `ttl_secs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveRequest {
    pub id: String,
    pub tokens: i64,
    pub ttl_secs: u32,
}

/// A live hold as replies and `GET /keys/{id}/reservations` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    /// The `reservation_id` of the check that granted it.
    pub id: String,
    pub tokens: i64,
    /// RFC 3339 UTC, whole seconds: the hold is released at this instant unless settled first.
    pub expires_at: String,
}

/// The owner's answer to "which holds does this key have?", as it travels between instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReservationsReply {
    Listed { reservations: Vec<Reservation> },
    UnknownKey,
    Unavailable { detail: String },
}

impl ReservationsReply {
    /// From an actor's answer: the holds, `None` for an unknown key, or why it could not answer.
    pub fn from_answer<E: std::fmt::Display>(answer: Result<Option<Vec<Reservation>>, E>) -> Self {
        match answer {
            Ok(Some(reservations)) => ReservationsReply::Listed { reservations },
            Ok(None) => ReservationsReply::UnknownKey,
            Err(error) => ReservationsReply::Unavailable {
                detail: error.to_string(),
            },
        }
    }
}

/// The hold fields of a check body; `None` when it asks for no hold. `reservation_id` and
/// `ttl_secs` without `reserve`, or `reserve` without `reservation_id`, are refused.
pub(crate) fn optional_reserve(
    object: &Map<String, Value>,
) -> Result<Option<ReserveRequest>, Rejection> {
    let tokens = match object.get("reserve") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(tokens) if (1..=MAX_RESERVE_TOKENS).contains(&tokens) => Some(tokens),
            _ => {
                return Err(Rejection::new(format!(
                    "reserve must be an integer from 1 to 10^12, got {n}"
                )))
            }
        },
        Some(_) => return Err(Rejection::new("reserve must be an integer from 1 to 10^12")),
    };
    let id = optional_reservation_id(object)?;
    let ttl_secs = match object.get("ttl_secs") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ttl) if (1..=u64::from(MAX_TTL_SECS)).contains(&ttl) => {
                Some(u32::try_from(ttl).unwrap_or(MAX_TTL_SECS))
            }
            _ => {
                return Err(Rejection::new(format!(
                    "ttl_secs must be an integer from 1 to {MAX_TTL_SECS}, got {n}"
                )))
            }
        },
        Some(_) => {
            return Err(Rejection::new(format!(
                "ttl_secs must be an integer from 1 to {MAX_TTL_SECS}"
            )))
        }
    };
    match (tokens, id) {
        (None, None) if ttl_secs.is_none() => Ok(None),
        (None, _) => Err(Rejection::new(
            "reservation_id and ttl_secs need reserve (the tokens to hold)",
        )),
        (Some(_), None) => Err(Rejection::new("reserve needs a reservation_id")),
        (Some(tokens), Some(id)) => Ok(Some(ReserveRequest {
            id,
            tokens,
            ttl_secs: ttl_secs.unwrap_or(DEFAULT_TTL_SECS),
        })),
    }
}

/// `reservation_id`: absent or null → `None`; else a string of 1-128 characters without
/// control characters.
pub(crate) fn optional_reservation_id(
    object: &Map<String, Value>,
) -> Result<Option<String>, Rejection> {
    match object.get("reservation_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => {
            checked_identifier("reservation_id", id, MAX_RESERVATION_ID_CHARS).map(Some)
        }
        Some(_) => Err(Rejection::new("reservation_id must be a string")),
    }
}

/// When a hold granted at `now` for `ttl_secs` expires, in Unix seconds: rounded up to a whole
/// second, so it lives at least `ttl_secs` and its printed instant is exact.
pub fn expiry_of(now: DateTime<Utc>, ttl_secs: u32) -> i64 {
    let whole = now.timestamp() + i64::from(now.timestamp_subsec_nanos() > 0);
    whole + i64::from(ttl_secs)
}

/// The instant of Unix seconds `seconds` (expiries come from valid instants plus at most a day).
pub fn instant_of_secs(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// One live hold: 16 bytes beside its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub tokens: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Hold {
    pub fn view(&self, id: &str) -> Reservation {
        Reservation {
            id: id.to_string(),
            tokens: self.tokens,
            expires_at: format_instant(instant_of_secs(self.expires_at)),
        }
    }
}

/// One key's live holds. A key actor keeps them boxed behind an `Option`, so a key without holds
/// costs one pointer.
#[derive(Debug, Default)]
pub struct Holds {
    /// Boxed ids: 16 bytes per entry instead of a `String`'s 24.
    by_id: HashMap<Box<str>, Hold>,
    /// Sum of the holds' tokens; never wraps, since a grant is decided with checked arithmetic
    /// against `used + reserved`.
    reserved: i64,
    /// The earliest `expires_at` of any hold, so `expire` costs a comparison until one is due.
    earliest_expiry: i64,
}

impl Holds {
    pub fn reserved(&self) -> i64 {
        self.reserved
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<Hold> {
        self.by_id.get(id).copied()
    }

    /// The earliest instant (Unix seconds) at which a hold expires; `None` without holds.
    pub fn next_expiry(&self) -> Option<i64> {
        (!self.is_empty()).then_some(self.earliest_expiry)
    }

    /// Adds a hold (replacing one of the same id, whose tokens are no longer held).
    pub fn grant(&mut self, id: &str, hold: Hold) {
        if self.is_empty() || hold.expires_at < self.earliest_expiry {
            self.earliest_expiry = hold.expires_at;
        }
        if let Some(previous) = self.by_id.insert(id.into(), hold) {
            self.reserved -= previous.tokens;
        }
        self.reserved = self.reserved.saturating_add(hold.tokens);
    }

    /// Releases the hold `id`, if live; returns it.
    pub fn release(&mut self, id: &str) -> Option<Hold> {
        let hold = self.by_id.remove(id)?;
        self.reserved -= hold.tokens;
        // `earliest_expiry` may now be early: `expire` then finds nothing and recomputes it.
        Some(hold)
    }

    /// Releases every hold whose expiry is at or before `now` (Unix seconds); returns how many.
    pub fn expire(&mut self, now: i64) -> usize {
        if self.is_empty() || now < self.earliest_expiry {
            return 0;
        }
        let before = self.by_id.len();
        let mut released = 0;
        let mut earliest = i64::MAX;
        self.by_id.retain(|_, hold| {
            if hold.expires_at <= now {
                released += hold.tokens;
                false
            } else {
                earliest = earliest.min(hold.expires_at);
                true
            }
        });
        self.reserved -= released;
        self.earliest_expiry = earliest;
        before - self.by_id.len()
    }

    /// Every live hold, in id order.
    pub fn list(&self) -> Vec<Reservation> {
        let mut list: Vec<Reservation> =
            self.by_id.iter().map(|(id, hold)| hold.view(id)).collect();
        list.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        list
    }
}

/// A change to the `reservations` table, in the order the key's actor made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldChange {
    /// A hold granted: insert it (or replace one of the same id).
    Granted {
        api_key_id: i64,
        id: String,
        hold: Hold,
    },
    /// A usage event named the hold (settle or void): delete it.
    Released { api_key_id: i64, id: String },
}

/// The rows a batch leaves in the table, each (key, reservation id) in one list at most.
#[derive(Debug, PartialEq, Eq)]
pub struct NetHoldChanges<'a> {
    /// Rows to insert or replace.
    pub granted: Vec<(i64, &'a str, Hold)>,
    /// Rows to delete.
    pub released: Vec<(i64, &'a str)>,
}

/// What a batch leaves in the table: per (key, id) only the last change counts, so a hold
/// granted, settled and granted again within one batch ends as the second hold.
pub fn net_hold_changes<'a>(
    changes: impl IntoIterator<Item = &'a HoldChange>,
) -> NetHoldChanges<'a> {
    let mut last: HashMap<(i64, &str), Option<Hold>> = HashMap::new();
    for change in changes {
        match change {
            HoldChange::Granted {
                api_key_id,
                id,
                hold,
            } => last.insert((*api_key_id, id.as_str()), Some(*hold)),
            HoldChange::Released { api_key_id, id } => {
                last.insert((*api_key_id, id.as_str()), None)
            }
        };
    }
    let mut granted = Vec::new();
    let mut released = Vec::new();
    for ((key, id), outcome) in last {
        match outcome {
            Some(hold) => granted.push((key, id, hold)),
            None => released.push((key, id)),
        }
    }
    // Rows in one order, so two transactions touching the same rows wait rather than deadlock.
    granted.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    released.sort_unstable();
    NetHoldChanges { granted, released }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn object(json: &str) -> Map<String, Value> {
        match serde_json::from_str(json).unwrap() {
            Value::Object(object) => object,
            _ => unreachable!("the tests give objects"),
        }
    }

    #[test]
    fn decodes_a_hold_with_the_default_ttl() {
        let request = optional_reserve(&object(r#"{"reserve": 100, "reservation_id": "r1"}"#));
        assert_eq!(
            request.unwrap(),
            Some(ReserveRequest {
                id: "r1".into(),
                tokens: 100,
                ttl_secs: DEFAULT_TTL_SECS
            })
        );
        assert_eq!(optional_reserve(&object("{}")).unwrap(), None);
        let ttl = optional_reserve(&object(
            r#"{"reserve": 1, "reservation_id": "r", "ttl_secs": 86400}"#,
        ));
        assert_eq!(ttl.unwrap().unwrap().ttl_secs, 86_400);
    }

    #[test]
    fn refuses_every_bad_hold_with_a_reason() {
        let long_id = "x".repeat(129);
        let long = format!(r#"{{"reserve": 1, "reservation_id": "{long_id}"}}"#);
        for (body, reason) in [
            (r#"{"reserve": 1}"#, "needs a reservation_id"),
            (r#"{"reservation_id": "r"}"#, "need reserve"),
            (r#"{"ttl_secs": 5}"#, "need reserve"),
            (r#"{"reserve": 0, "reservation_id": "r"}"#, "1 to 10^12"),
            (r#"{"reserve": -5, "reservation_id": "r"}"#, "1 to 10^12"),
            (
                r#"{"reserve": 1000000000001, "reservation_id": "r"}"#,
                "1 to 10^12",
            ),
            (r#"{"reserve": 1.5, "reservation_id": "r"}"#, "1 to 10^12"),
            (r#"{"reserve": "1", "reservation_id": "r"}"#, "1 to 10^12"),
            (r#"{"reserve": 1, "reservation_id": ""}"#, "1-128"),
            (long.as_str(), "1-128"),
            (r#"{"reserve": 1, "reservation_id": 7}"#, "must be a string"),
            (r#"{"reserve": 1, "reservation_id": "a\u0000"}"#, "control"),
            (
                r#"{"reserve": 1, "reservation_id": "r", "ttl_secs": 0}"#,
                "ttl_secs",
            ),
            (
                r#"{"reserve": 1, "reservation_id": "r", "ttl_secs": 86401}"#,
                "ttl_secs",
            ),
            (
                r#"{"reserve": 1, "reservation_id": "r", "ttl_secs": -1}"#,
                "ttl_secs",
            ),
            (
                r#"{"reserve": 1, "reservation_id": "r", "ttl_secs": "9"}"#,
                "ttl_secs",
            ),
        ] {
            let error = optional_reserve(&object(body)).unwrap_err().to_string();
            assert!(
                error.contains(reason),
                "{body}: {error} should mention {reason}"
            );
        }
    }

    #[test]
    fn expiry_rounds_up_to_a_whole_second() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let whole = at("2026-11-25T10:00:00Z");
        assert_eq!(expiry_of(whole, 900), whole.timestamp() + 900);
        assert_eq!(
            expiry_of(at("2026-11-25T10:00:00.001Z"), 900),
            whole.timestamp() + 901
        );
    }

    #[test]
    fn grant_release_and_expire_keep_the_sum() {
        let mut holds = Holds::default();
        holds.grant(
            "a",
            Hold {
                tokens: 100,
                expires_at: 10,
            },
        );
        holds.grant(
            "b",
            Hold {
                tokens: 50,
                expires_at: 20,
            },
        );
        assert_eq!(holds.reserved(), 150);
        assert_eq!(holds.next_expiry(), Some(10));
        assert_eq!(holds.expire(9), 0);
        assert_eq!(holds.expire(10), 1);
        assert_eq!(holds.reserved(), 50);
        assert_eq!(holds.next_expiry(), Some(20));
        assert_eq!(holds.release("b").map(|hold| hold.tokens), Some(50));
        assert_eq!(holds.release("b"), None);
        assert!(holds.is_empty());
        assert_eq!(holds.reserved(), 0);
    }

    #[test]
    fn the_last_change_of_a_hold_wins() {
        let hold = |tokens| Hold {
            tokens,
            expires_at: 100,
        };
        let changes = [
            HoldChange::Granted {
                api_key_id: 1,
                id: "r".into(),
                hold: hold(10),
            },
            HoldChange::Released {
                api_key_id: 1,
                id: "r".into(),
            },
            HoldChange::Granted {
                api_key_id: 1,
                id: "r".into(),
                hold: hold(20),
            },
            HoldChange::Granted {
                api_key_id: 2,
                id: "s".into(),
                hold: hold(5),
            },
            HoldChange::Released {
                api_key_id: 2,
                id: "s".into(),
            },
            HoldChange::Released {
                api_key_id: 3,
                id: "t".into(),
            },
        ];
        let net = net_hold_changes(&changes);
        assert_eq!(net.granted, vec![(1, "r", hold(20))]);
        assert_eq!(net.released, vec![(2, "s"), (3, "t")]);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Grant(u8, i64, i64),
        Release(u8),
        Expire(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..8, 1..=MAX_RESERVE_TOKENS, 0i64..100)
                .prop_map(|(id, t, e)| Step::Grant(id, t, e)),
            (0u8..8).prop_map(Step::Release),
            (0i64..100).prop_map(Step::Expire),
        ]
    }

    proptest! {
        /// Whatever happens, `reserved` is the sum of the live holds and no expired hold survives
        /// an `expire` (the earliest-expiry shortcut never skips a due hold).
        #[test]
        fn reserved_is_always_the_sum_of_live_holds(steps in proptest::collection::vec(step(), 1..80)) {
            let mut holds = Holds::default();
            for step in steps {
                match step {
                    Step::Grant(id, tokens, expires_at) => holds.grant(&id.to_string(), Hold { tokens, expires_at }),
                    Step::Release(id) => { holds.release(&id.to_string()); }
                    Step::Expire(now) => {
                        holds.expire(now);
                        prop_assert!(holds.by_id.values().all(|hold| hold.expires_at > now));
                    }
                }
                let sum: i64 = holds.by_id.values().map(|hold| hold.tokens).sum();
                prop_assert_eq!(holds.reserved(), sum);
            }
        }
    }
}
