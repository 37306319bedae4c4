//! Monthly window maths in UTC: the window containing an instant and the start of the next one.

use chrono::{DateTime, Datelike, TimeZone, Utc};

/// A half-open monthly window `[start, end)` in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// 00:00:00 UTC on the 1st of the given month.
fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .expect("the 1st of a month at midnight UTC always exists and is unambiguous")
}

/// First instant of the month that contains `instant`.
pub fn window_start_containing(instant: DateTime<Utc>) -> DateTime<Utc> {
    month_start(instant.year(), instant.month())
}

/// First instant of the month after the one containing `instant` (December rolls to January).
pub fn next_window_start(instant: DateTime<Utc>) -> DateTime<Utc> {
    if instant.month() == 12 {
        month_start(instant.year() + 1, 1)
    } else {
        month_start(instant.year(), instant.month() + 1)
    }
}

/// The monthly window containing `instant`.
pub fn window_containing(instant: DateTime<Utc>) -> Window {
    Window {
        start: window_start_containing(instant),
        end: next_window_start(instant),
    }
}

/// Whether usage that occurred at `occurred_at` belongs to a window that closed before the one
/// ending at `current_window_end`: a late event, filed with that window's history. Usage of the
/// current window or a future one (SPEC §1) is not late.
pub fn is_late(occurred_at: DateTime<Utc>, current_window_end: DateTime<Utc>) -> bool {
    next_window_start(occurred_at) < current_window_end
}

/// The window that ends at `end` (a month start): the month just before it.
pub fn window_ending_at(end: DateTime<Utc>) -> Window {
    let last_instant = end - chrono::Duration::nanoseconds(1);
    Window {
        start: window_start_containing(last_instant),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn only_usage_of_a_closed_window_is_late() {
        let november_end = at("2026-12-01T00:00:00Z");
        assert!(is_late(at("2026-10-31T23:59:59Z"), november_end));
        assert!(!is_late(at("2026-11-01T00:00:00Z"), november_end));
        assert!(!is_late(at("2026-11-30T23:59:59Z"), november_end));
        assert!(
            !is_late(at("2027-02-10T00:00:00Z"), november_end),
            "future usage counts now"
        );
    }

    #[test]
    fn december_rolls_into_january_of_next_year() {
        assert_eq!(
            next_window_start(at("2026-12-31T23:59:59.999Z")),
            at("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn first_instant_of_a_month_belongs_to_that_month() {
        let w = window_containing(at("2026-03-01T00:00:00Z"));
        assert_eq!(w.start, at("2026-03-01T00:00:00Z"));
        assert_eq!(w.end, at("2026-04-01T00:00:00Z"));
    }

    #[test]
    fn february_of_a_leap_year() {
        let w = window_containing(at("2028-02-29T12:00:00Z"));
        assert_eq!(w.end, at("2028-03-01T00:00:00Z"));
    }

    #[test]
    fn window_ending_at_january_is_december() {
        let w = window_ending_at(at("2027-01-01T00:00:00Z"));
        assert_eq!(w.start, at("2026-12-01T00:00:00Z"));
    }

    proptest! {
        #[test]
        fn every_instant_lies_in_its_window(secs in 0i64..4_102_444_800, nanos in 0u32..1_000_000_000) {
            let instant = Utc.timestamp_opt(secs, nanos).unwrap();
            let w = window_containing(instant);
            prop_assert!(w.start <= instant && instant < w.end);
            prop_assert_eq!(w.start.day(), 1);
            prop_assert_eq!(w.end.day(), 1);
            prop_assert_eq!(w.start.time(), chrono::NaiveTime::MIN);
            let days = (w.end - w.start).num_days();
            prop_assert!((28..=31).contains(&days));
            prop_assert_eq!(window_ending_at(w.end), w);
            prop_assert_eq!(window_containing(w.end).start, w.end);
        }
    }
}
