//! One key's quota state, the check decision, rollover and the denial text of SPEC §1.

use chrono::{DateTime, SecondsFormat, Utc};

use super::window::{next_window_start, window_ending_at, Window};

/// The quota state of one key as the service sees it: committed plus pending usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// `None` means unlimited.
    pub quota: Option<i64>,
    /// Tokens counted in the current window.
    pub used: i64,
    /// End of the current window.
    pub reset_at: DateTime<Utc>,
}

/// A window that has just been closed by a rollover, with its total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedWindow {
    pub window: Window,
    pub tokens: i64,
}

/// The outcome of a check against a known key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `None` for unlimited keys.
    pub remaining: Option<i64>,
}

impl QuotaState {
    /// Rolls the state into the window containing `now` if its window has lapsed; returns the closed window.
    /// Months in which nothing ran are skipped: the new window is the one containing `now`.
    pub fn roll_over_if_lapsed(&mut self, now: DateTime<Utc>) -> Option<ClosedWindow> {
        if now < self.reset_at {
            return None;
        }
        let closed = ClosedWindow {
            window: window_ending_at(self.reset_at),
            tokens: self.used,
        };
        self.used = 0;
        self.reset_at = next_window_start(now);
        Some(closed)
    }

    /// Allowed unless the quota is set and reached, or the estimate would exceed it, or the
    /// counter is at its ceiling.
    pub fn decide(&self, estimate: Option<i64>) -> Decision {
        let at_ceiling = self.at_ceiling(estimate);
        let Some(quota) = self.quota else {
            return Decision {
                allowed: !at_ceiling,
                remaining: None,
            };
        };
        let over_estimate = estimate.is_some_and(|tokens| self.used.saturating_add(tokens) > quota);
        Decision {
            allowed: self.used < quota && !over_estimate && !at_ceiling,
            remaining: Some((quota - self.used).max(0)),
        }
    }
}

impl QuotaState {
    /// Whether the counter is at `i64::MAX`, or the estimate would take it past: no more usage
    /// could be counted, so even an unlimited key is denied (the one exception to "unlimited keys
    /// are always allowed", README "Choices").
    pub fn at_ceiling(&self, estimate: Option<i64>) -> bool {
        self.used == i64::MAX
            || estimate.is_some_and(|tokens| self.used.checked_add(tokens).is_none())
    }
}

/// The denial text of a key whose counter is at its ceiling.
pub fn ceiling_detail(used: i64, reset_at: DateTime<Utc>) -> String {
    format!(
        "API key token counter is at its maximum ({used}); no more usage can be counted. Resets at {}.",
        format_instant(reset_at)
    )
}

/// RFC 3339 with whole seconds and `Z`, as the SPEC prints instants.
pub fn format_instant(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The SPEC's denial text: `API key monthly token quota reached (USED/QUOTA). Resets at RESET_AT.`
pub fn denial_detail(used: i64, quota: i64, reset_at: DateTime<Utc>) -> String {
    format!(
        "API key monthly token quota reached ({used}/{quota}). Resets at {}.",
        format_instant(reset_at)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn state(quota: Option<i64>, used: i64) -> QuotaState {
        QuotaState {
            quota,
            used,
            reset_at: at("2026-12-01T00:00:00Z"),
        }
    }

    #[test]
    fn denied_exactly_at_the_quota() {
        assert!(state(Some(1000), 999).decide(None).allowed);
        let at_quota = state(Some(1000), 1000).decide(None);
        assert!(!at_quota.allowed);
        assert_eq!(at_quota.remaining, Some(0));
        assert_eq!(state(Some(1000), 1500).decide(None).remaining, Some(0));
    }

    #[test]
    fn estimate_must_fit_in_what_remains() {
        assert!(state(Some(1000), 200).decide(Some(800)).allowed);
        assert!(!state(Some(1000), 200).decide(Some(801)).allowed);
        assert!(state(Some(1000), 0).decide(Some(0)).allowed);
    }

    #[test]
    fn unlimited_keys_are_allowed_below_the_ceiling() {
        let d = state(None, i64::MAX - 1).decide(Some(1));
        assert!(d.allowed);
        assert_eq!(d.remaining, None);
    }

    #[test]
    fn a_key_at_its_ceiling_is_denied() {
        assert!(!state(None, i64::MAX).decide(None).allowed);
        assert!(!state(None, i64::MAX - 1).decide(Some(2)).allowed);
        assert!(!state(Some(i64::MAX), i64::MAX - 1).decide(Some(2)).allowed);
        assert!(!state(Some(i64::MAX), i64::MAX).decide(None).allowed);
    }

    #[test]
    fn rollover_skips_months_without_traffic() {
        let mut s = state(Some(10), 7);
        let closed = s.roll_over_if_lapsed(at("2027-03-15T08:00:00Z")).unwrap();
        assert_eq!(closed.tokens, 7);
        assert_eq!(closed.window.start, at("2026-11-01T00:00:00Z"));
        assert_eq!(closed.window.end, at("2026-12-01T00:00:00Z"));
        assert_eq!(s.used, 0);
        assert_eq!(s.reset_at, at("2027-04-01T00:00:00Z"));
    }

    #[test]
    fn no_rollover_before_the_window_ends() {
        let mut s = state(Some(10), 7);
        assert_eq!(s.roll_over_if_lapsed(at("2026-11-30T23:59:59Z")), None);
        assert_eq!(s.used, 7);
        assert!(s.roll_over_if_lapsed(at("2026-12-01T00:00:00Z")).is_some());
    }

    #[test]
    fn denial_text_matches_the_spec() {
        assert_eq!(
            denial_detail(1000, 1000, at("2026-12-01T00:00:00Z")),
            "API key monthly token quota reached (1000/1000). Resets at 2026-12-01T00:00:00Z."
        );
    }
}
