//! Threshold alerts (SPEC §2.4): which configured shares of a quota a change of usage or of the
//! quota makes a key reach, and the alert's identity and wire body.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::quota::format_instant;
use super::window::window_ending_at;

/// Smallest and largest configurable threshold, in percent of the quota.
pub const THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

/// The configured thresholds, ascending and without repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds(Vec<u32>);

impl Thresholds {
    /// Sorts and dedupes `percents`; `Err` names the first value outside `THRESHOLD_RANGE`.
    pub fn new(percents: &[u32]) -> Result<Thresholds, u32> {
        if let Some(&outside) = percents.iter().find(|p| !THRESHOLD_RANGE.contains(p)) {
            return Err(outside);
        }
        let mut sorted = percents.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Ok(Thresholds(sorted))
    }

    pub fn percents(&self) -> &[u32] {
        &self.0
    }

    /// The thresholds reached at `used` under `quota` but not at `used_before` under
    /// `quota_before`, ascending. An unlimited key (`None`) reaches nothing.
    pub fn crossed(
        &self,
        quota_before: Option<i64>,
        used_before: i64,
        quota: Option<i64>,
        used: i64,
    ) -> Vec<u32> {
        self.0
            .iter()
            .copied()
            .filter(|&percent| {
                reached(quota, used, percent) && !reached(quota_before, used_before, percent)
            })
            .collect()
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds(vec![80, 100])
    }
}

/// Whether `used` is at least `percent` % of `quota`, exactly (in 128 bits, no rounding).
pub fn reached(quota: Option<i64>, used: i64, percent: u32) -> bool {
    match quota {
        // A quota is at least 1; a non-positive one (never stored) reaches nothing.
        Some(quota) if quota > 0 => {
            i128::from(used) * 100 >= i128::from(quota) * i128::from(percent)
        }
        _ => false,
    }
}

/// `"<api_key_id>:<period_start>:<percent>"`: the same for every copy of one alert.
pub fn alert_id(api_key_id: i64, period_start: DateTime<Utc>, percent: u32) -> String {
    format!("{api_key_id}:{}:{percent}", format_instant(period_start))
}

/// The routing key of an alert on `quota.alerts`: `<percent>.<api_key_id>`.
pub fn routing_key(api_key_id: i64, percent: u32) -> String {
    format!("{percent}.{api_key_id}")
}

/// One alert as recorded when its crossing commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub api_key_id: i64,
    pub username: String,
    pub threshold_percent: u32,
    pub token_quota_monthly: i64,
    pub tokens_used_this_month: i64,
    pub period_start: DateTime<Utc>,
    pub quota_reset_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
}

/// A committed change of one key's quota or counter within one window: what alerts it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterChange<'a> {
    pub api_key_id: i64,
    pub username: &'a str,
    pub quota_before: Option<i64>,
    pub used_before: i64,
    pub quota: Option<i64>,
    pub used: i64,
    /// End of the window the change is in (after any rollover).
    pub reset_at: DateTime<Utc>,
}

impl CounterChange<'_> {
    /// One alert per threshold the change crosses, ascending, stamped `occurred_at`.
    pub fn alerts(&self, thresholds: &Thresholds, occurred_at: DateTime<Utc>) -> Vec<Alert> {
        let Some(quota) = self.quota else {
            return Vec::new();
        };
        let period_start = window_ending_at(self.reset_at).start;
        thresholds
            .crossed(self.quota_before, self.used_before, self.quota, self.used)
            .into_iter()
            .map(|threshold_percent| Alert {
                api_key_id: self.api_key_id,
                username: self.username.to_string(),
                threshold_percent,
                token_quota_monthly: quota,
                tokens_used_this_month: self.used,
                period_start,
                quota_reset_at: self.reset_at,
                occurred_at,
            })
            .collect()
    }
}

/// The JSON body of SPEC §2.4.
#[derive(Clone, Debug, Serialize)]
pub struct AlertMessage<'a> {
    pub alert_id: String,
    pub api_key_id: i64,
    pub username: &'a str,
    pub threshold_percent: u32,
    pub token_quota_monthly: i64,
    pub tokens_used_this_month: i64,
    pub period_start: String,
    pub quota_reset_at: String,
    pub occurred_at: String,
}

impl Alert {
    pub fn message(&self) -> AlertMessage<'_> {
        AlertMessage {
            alert_id: alert_id(self.api_key_id, self.period_start, self.threshold_percent),
            api_key_id: self.api_key_id,
            username: &self.username,
            threshold_percent: self.threshold_percent,
            token_quota_monthly: self.token_quota_monthly,
            tokens_used_this_month: self.tokens_used_this_month,
            period_start: format_instant(self.period_start),
            quota_reset_at: format_instant(self.quota_reset_at),
            occurred_at: format_instant(self.occurred_at),
        }
    }

    pub fn routing_key(&self) -> String {
        routing_key(self.api_key_id, self.threshold_percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn default_crossed(before: i64, after: i64, quota: i64) -> Vec<u32> {
        Thresholds::default().crossed(Some(quota), before, Some(quota), after)
    }

    #[test]
    fn thresholds_are_sorted_deduped_and_bounded() {
        assert_eq!(
            Thresholds::new(&[100, 80, 100]).unwrap().percents(),
            &[80, 100]
        );
        assert_eq!(Thresholds::new(&[80, 0]), Err(0));
        assert_eq!(Thresholds::new(&[1001]), Err(1001));
        assert!(Thresholds::new(&[]).unwrap().percents().is_empty());
    }

    #[test]
    fn each_threshold_is_crossed_once_on_the_way_up() {
        assert_eq!(default_crossed(0, 799, 1000), Vec::<u32>::new());
        assert_eq!(default_crossed(799, 800, 1000), vec![80]);
        assert_eq!(default_crossed(800, 999, 1000), Vec::<u32>::new());
        assert_eq!(default_crossed(999, 1000, 1000), vec![100]);
        assert_eq!(default_crossed(1000, 5000, 1000), Vec::<u32>::new());
    }

    #[test]
    fn one_jump_past_both_crosses_both_in_order() {
        assert_eq!(default_crossed(0, 1200, 1000), vec![80, 100]);
    }

    #[test]
    fn shares_are_exact_without_rounding() {
        // 80 % of 7 is 5.6: 5 has not reached it, 6 has.
        assert_eq!(default_crossed(0, 5, 7), Vec::<u32>::new());
        assert_eq!(default_crossed(5, 6, 7), vec![80]);
        let huge = Thresholds::new(&[1000]).unwrap();
        assert_eq!(
            huge.crossed(Some(i64::MAX), 0, Some(i64::MAX), i64::MAX),
            Vec::<u32>::new()
        );
        assert!(reached(Some(1), i64::MAX, 1000));
    }

    #[test]
    fn unlimited_keys_never_reach_a_threshold() {
        let thresholds = Thresholds::default();
        assert!(thresholds.crossed(None, 0, None, i64::MAX).is_empty());
        // Clearing the quota crosses nothing either.
        assert!(thresholds.crossed(Some(10), 5, None, 5).is_empty());
    }

    #[test]
    fn lowering_the_quota_below_usage_crosses_what_it_now_reaches() {
        let thresholds = Thresholds::default();
        assert_eq!(
            thresholds.crossed(Some(5000), 900, Some(1000), 900),
            vec![80]
        );
        assert_eq!(
            thresholds.crossed(Some(5000), 900, Some(900), 900),
            vec![80, 100]
        );
        assert_eq!(thresholds.crossed(None, 900, Some(500), 900), vec![80, 100]);
        assert!(thresholds
            .crossed(Some(1000), 900, Some(5000), 900)
            .is_empty());
    }

    #[test]
    fn a_change_names_its_window_by_its_start() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let change = CounterChange {
            api_key_id: 7,
            username: "bob",
            quota_before: Some(100),
            used_before: 0,
            quota: Some(100),
            used: 120,
            reset_at: at("2027-01-01T00:00:00Z"),
        };
        let alerts = change.alerts(&Thresholds::default(), at("2026-12-31T23:00:00Z"));
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].period_start, at("2026-12-01T00:00:00Z"));
        assert_eq!(alerts[0].message().alert_id, "7:2026-12-01T00:00:00Z:80");
        assert_eq!(alerts[1].threshold_percent, 100);
        assert_eq!(alerts[1].tokens_used_this_month, 120);
        let unlimited = CounterChange {
            quota: None,
            quota_before: None,
            ..change
        };
        assert!(unlimited
            .alerts(&Thresholds::default(), at("2026-12-31T23:00:00Z"))
            .is_empty());
    }

    #[test]
    fn the_body_matches_the_spec() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let alert = Alert {
            api_key_id: 42,
            username: "alice".into(),
            threshold_percent: 80,
            token_quota_monthly: 5000,
            tokens_used_this_month: 4012,
            period_start: at("2026-11-01T00:00:00Z"),
            quota_reset_at: at("2026-12-01T00:00:00Z"),
            occurred_at: at("2026-11-23T10:15:02.123Z"),
        };
        assert_eq!(alert.routing_key(), "80.42");
        assert_eq!(
            serde_json::to_value(alert.message()).unwrap(),
            serde_json::json!({"alert_id": "42:2026-11-01T00:00:00Z:80", "api_key_id": 42,
                "username": "alice", "threshold_percent": 80, "token_quota_monthly": 5000,
                "tokens_used_this_month": 4012, "period_start": "2026-11-01T00:00:00Z",
                "quota_reset_at": "2026-12-01T00:00:00Z", "occurred_at": "2026-11-23T10:15:02Z"})
        );
    }

    proptest! {
        /// Usage going up in any steps crosses every threshold it ends at or above exactly once,
        /// in ascending order, and nothing else.
        #[test]
        fn steps_up_cross_each_reached_threshold_once(
            quota in 1i64..1_000_000,
            steps in proptest::collection::vec(0i64..400_000, 1..20),
            percents in proptest::collection::vec(1u32..=1000, 0..6),
        ) {
            let thresholds = Thresholds::new(&percents).unwrap();
            let mut used = 0i64;
            let mut fired = Vec::new();
            for step in steps {
                let crossed = thresholds.crossed(Some(quota), used, Some(quota), used + step);
                prop_assert!(crossed.windows(2).all(|pair| pair[0] < pair[1]));
                fired.extend(crossed);
                used += step;
            }
            let expected: Vec<u32> = thresholds
                .percents()
                .iter()
                .copied()
                .filter(|&p| reached(Some(quota), used, p))
                .collect();
            prop_assert_eq!(fired, expected);
        }

        #[test]
        fn reached_agrees_with_the_real_share(quota in 1i64..1_000_000_000, used in 0i64..10_000_000_000, percent in 1u32..=1000) {
            let share = used as f64 * 100.0 / quota as f64;
            // Away from the exact boundary, floating point agrees.
            if (share - f64::from(percent)).abs() > 1e-6 {
                prop_assert_eq!(reached(Some(quota), used, percent), share >= f64::from(percent));
            }
        }
    }
}
