//! What one batch of new usage events does to the keys it names, decided from their stored rows
//! alone: increments, rollovers, late history and threshold alerts. No database, no clock.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::alerts::{Alert, CounterChange, Thresholds};
use super::quota::{format_instant, QuotaState};
use super::usage::UsageEvent;
use super::window::{is_late, window_containing, Window};

/// A key's counter as stored, for its actor to adopt once the batch committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommittedCounter {
    pub api_key_id: i64,
    pub used: i64,
    pub reset_at: DateTime<Utc>,
    /// `counter_version` of the row: an actor ignores counters older than what it has.
    pub version: i64,
}

/// What the plan needs of a key's stored row, read under the row's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredKey<'a> {
    pub username: &'a str,
    pub quota: Option<i64>,
    pub counter: CommittedCounter,
}

/// The writes a batch makes, and what it counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// Events counted (in a window, current or closed), zero-token ones included.
    pub counted: usize,
    /// Of those, events added to a closed window's history.
    pub late: usize,
    /// Events of keys without a row: not counted.
    pub unknown_key: usize,
    /// `used = used + delta` for keys still in their stored window, ascending by key.
    pub increments: Vec<(i64, i64)>,
    /// New counters of keys whose stored window lapsed: written as they are (the closed
    /// window's total goes to `history`).
    pub rolled: Vec<CommittedCounter>,
    /// Counters of known keys the batch leaves as stored (nothing new for the current window).
    pub unchanged: Vec<CommittedCounter>,
    /// Tokens to add to closed windows' history rows.
    pub history: BTreeMap<(i64, Window), i64>,
    /// Thresholds the increments cross, to record with the commit.
    pub alerts: Vec<Alert>,
}

/// Why the database must not take a batch: a total would pass `i64::MAX`. The event that
/// causes it is poison; the writer isolates it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanRefusal {
    #[error(
        "tokens_used_this_month of key {api_key_id} would pass {} ({used} + {delta})",
        i64::MAX
    )]
    CounterOverflow {
        api_key_id: i64,
        used: i64,
        delta: i64,
    },
    #[error("history of key {api_key_id} for {} would pass {} ({stored} + {tokens})", format_instant(window.start), i64::MAX)]
    HistoryOverflow {
        api_key_id: i64,
        window: Window,
        stored: i64,
        tokens: i64,
    },
}

/// Plans `fresh` (events whose ids were never counted before) at `now` against `keys`, the
/// stored rows of every key the batch names (duplicates' keys included: they report their
/// counter unchanged). A key whose window lapsed rolls over first; an event of a window that
/// closed goes to that window's history; the rest adds to the current counter (SPEC §1).
pub fn plan_batch(
    keys: &HashMap<i64, StoredKey<'_>>,
    fresh: &[&UsageEvent],
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<BatchPlan, PlanRefusal> {
    let mut plan = BatchPlan::default();
    // Tokens and events per key and window; keys ascending so concurrent writers lock alike.
    let mut per_key: BTreeMap<i64, BTreeMap<Window, (i64, usize)>> = BTreeMap::new();
    for event in fresh {
        if event.tokens == 0 {
            // A void of a hold: counted, adds nothing.
            plan.counted += 1;
            continue;
        }
        let (tokens, count) = per_key
            .entry(event.api_key_id)
            .or_default()
            .entry(window_containing(event.occurred_at))
            .or_default();
        *tokens += event.tokens;
        *count += 1;
    }
    for (&api_key_id, windows) in &per_key {
        let Some(key) = keys.get(&api_key_id) else {
            plan.unknown_key += windows.values().map(|(_, count)| count).sum::<usize>();
            continue;
        };
        plan_key(&mut plan, api_key_id, key, windows, now, thresholds)?;
    }
    let mut untouched: Vec<CommittedCounter> = keys
        .iter()
        .filter(|(api_key_id, _)| !per_key.contains_key(api_key_id))
        .map(|(_, key)| key.counter)
        .collect();
    untouched.sort_unstable_by_key(|counter| counter.api_key_id);
    plan.unchanged.extend(untouched);
    Ok(plan)
}

/// Plans the windows of one known key.
fn plan_key(
    plan: &mut BatchPlan,
    api_key_id: i64,
    key: &StoredKey<'_>,
    windows: &BTreeMap<Window, (i64, usize)>,
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<(), PlanRefusal> {
    let mut state = QuotaState {
        quota: key.quota,
        used: key.counter.used,
        reset_at: key.counter.reset_at,
    };
    let closed = state.roll_over_if_lapsed(now);
    if let Some(closed) = closed {
        *plan.history.entry((api_key_id, closed.window)).or_default() += closed.tokens;
    }
    let mut current_delta: i64 = 0;
    for (window, &(tokens, count)) in windows {
        plan.counted += count;
        if is_late(window.start, state.reset_at) {
            plan.late += count;
            // A window just closed may hold up to `i64::MAX` already.
            let archived = plan.history.entry((api_key_id, *window)).or_default();
            *archived = archived
                .checked_add(tokens)
                .ok_or(PlanRefusal::HistoryOverflow {
                    api_key_id,
                    window: *window,
                    stored: *archived,
                    tokens,
                })?;
        } else {
            current_delta += tokens;
        }
    }
    // Checked here rather than left to the database: SQLite turns an overflowing sum into a
    // float instead of failing, and the message names the key.
    let used = state
        .used
        .checked_add(current_delta)
        .ok_or(PlanRefusal::CounterOverflow {
            api_key_id,
            used: state.used,
            delta: current_delta,
        })?;
    if current_delta != 0 {
        // Before and after, read under the row lock: whichever instance commits the crossing
        // sees it, and only once.
        let change = CounterChange {
            api_key_id,
            username: key.username,
            quota_before: key.quota,
            used_before: state.used,
            quota: key.quota,
            used,
            reset_at: state.reset_at,
        };
        plan.alerts.extend(change.alerts(thresholds, now));
    }
    if closed.is_some() {
        plan.rolled.push(CommittedCounter {
            api_key_id,
            used,
            reset_at: state.reset_at,
            version: key.counter.version + 1,
        });
    } else if current_delta != 0 {
        plan.increments.push((api_key_id, current_delta));
    } else {
        plan.unchanged.push(key.counter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test instants are valid RFC 3339")
            .with_timezone(&Utc)
    }

    fn event(id: &str, api_key_id: i64, tokens: i64, occurred_at: &str) -> UsageEvent {
        UsageEvent {
            event_id: id.to_string(),
            api_key_id,
            tokens,
            occurred_at: at(occurred_at),
            reservation_id: None,
        }
    }

    fn key(api_key_id: i64, quota: Option<i64>, used: i64, reset_at: &str) -> StoredKey<'static> {
        StoredKey {
            username: "alice",
            quota,
            counter: CommittedCounter {
                api_key_id,
                used,
                reset_at: at(reset_at),
                version: 7,
            },
        }
    }

    fn plan(keys: &[StoredKey<'static>], events: &[UsageEvent], now: &str) -> BatchPlan {
        let keys = keys
            .iter()
            .map(|key| (key.counter.api_key_id, *key))
            .collect();
        let events: Vec<&UsageEvent> = events.iter().collect();
        plan_batch(&keys, &events, at(now), &Thresholds::default()).expect("the test's totals fit")
    }

    const NOV_END: &str = "2026-12-01T00:00:00Z";
    const NOW: &str = "2026-11-23T10:00:00Z";

    #[test]
    fn current_window_events_become_one_increment_per_key() {
        let plan = plan(
            &[key(2, None, 10, NOV_END), key(1, None, 0, NOV_END)],
            &[
                event("a", 2, 5, NOW),
                event("b", 1, 3, NOW),
                event("c", 2, 4, "2026-11-01T00:00:00Z"),
            ],
            NOW,
        );
        assert_eq!(plan.increments, vec![(1, 3), (2, 9)]);
        assert_eq!((plan.counted, plan.late, plan.unknown_key), (3, 0, 0));
        assert!(plan.rolled.is_empty() && plan.history.is_empty());
    }

    #[test]
    fn a_late_event_goes_to_its_closed_window_and_a_future_one_counts_now() {
        let plan = plan(
            &[key(1, None, 10, NOV_END)],
            &[
                event("late", 1, 5, "2026-10-31T23:59:59Z"),
                event("future", 1, 7, "2027-03-01T00:00:00Z"),
            ],
            NOW,
        );
        let october = window_containing(at("2026-10-15T00:00:00Z"));
        assert_eq!(plan.history, BTreeMap::from([((1, october), 5)]));
        assert_eq!(plan.increments, vec![(1, 7)]);
        assert_eq!((plan.counted, plan.late), (2, 1));
    }

    #[test]
    fn a_lapsed_key_rolls_over_and_archives_its_window() {
        // Stored in October's window; the batch commits in late November (skipping nothing).
        let plan = plan(
            &[key(1, Some(100), 40, "2026-11-01T00:00:00Z")],
            &[
                event("old", 1, 2, "2026-10-20T00:00:00Z"),
                event("new", 1, 3, NOW),
            ],
            NOW,
        );
        let october = window_containing(at("2026-10-15T00:00:00Z"));
        assert_eq!(plan.history, BTreeMap::from([((1, october), 42)]));
        assert_eq!(
            plan.rolled,
            vec![CommittedCounter {
                api_key_id: 1,
                used: 3,
                reset_at: at(NOV_END),
                version: 8
            }]
        );
        assert!(plan.increments.is_empty());
    }

    #[test]
    fn unknown_keys_are_counted_apart_and_untouched_keys_report_as_stored() {
        let stored = key(1, None, 10, NOV_END);
        let plan = plan(
            &[stored, key(3, None, 1, NOV_END)],
            &[event("a", 2, 5, NOW), event("b", 3, 0, NOW)],
            NOW,
        );
        assert_eq!(plan.unknown_key, 1);
        assert_eq!(plan.counted, 1, "the zero-token void counts, adds nothing");
        assert!(plan.increments.is_empty());
        let unchanged: Vec<i64> = plan.unchanged.iter().map(|c| c.api_key_id).collect();
        assert_eq!(unchanged, vec![1, 3]);
        assert_eq!(plan.unchanged[0], stored.counter);
    }

    #[test]
    fn a_counter_that_would_pass_the_ceiling_is_refused() {
        let keys = HashMap::from([(1, key(1, None, i64::MAX - 1, NOV_END))]);
        let events = [event("a", 1, 2, NOW)];
        let refused = plan_batch(&keys, &[&events[0]], at(NOW), &Thresholds::default());
        assert_eq!(
            refused,
            Err(PlanRefusal::CounterOverflow {
                api_key_id: 1,
                used: i64::MAX - 1,
                delta: 2
            })
        );
        assert!(refused
            .unwrap_err()
            .to_string()
            .starts_with("tokens_used_this_month of key 1 would pass"));
    }

    #[test]
    fn crossing_a_threshold_plans_its_alert() {
        let plan = plan(
            &[key(1, Some(100), 70, NOV_END)],
            &[event("a", 1, 15, NOW)],
            NOW,
        );
        let percents: Vec<u32> = plan.alerts.iter().map(|a| a.threshold_percent).collect();
        assert_eq!(percents, vec![80]);
        assert_eq!(plan.alerts[0].tokens_used_this_month, 85);
    }

    prop_compose! {
        /// Keys 1..=6 (6 has no row), in October's or November's window, and events of 2026-09
        /// to 2027-01 over them.
        fn batch()(
            rows in proptest::collection::vec((0i64..1_000, any::<bool>(), proptest::option::of(1i64..2_000)), 5),
            events in proptest::collection::vec((1i64..=6, 0i64..500, 0i64..150), 0..60),
        ) -> (Vec<StoredKey<'static>>, Vec<UsageEvent>) {
            let keys = rows.into_iter().enumerate().map(|(i, (used, lapsed, quota))| {
                key(i as i64 + 1, quota, used, if lapsed { "2026-11-01T00:00:00Z" } else { NOV_END })
            }).collect();
            let start = at("2026-09-01T00:00:00Z");
            let events = events.into_iter().enumerate().map(|(i, (key_id, tokens, day))| UsageEvent {
                event_id: format!("e{i}"),
                api_key_id: key_id,
                tokens,
                occurred_at: start + chrono::Duration::days(day),
                reservation_id: None,
            }).collect();
            (keys, events)
        }
    }

    proptest! {
        /// Every token of a known key lands exactly once: in the current counter or a closed
        /// window's history; a rolled key's old total moves to history whole.
        #[test]
        fn every_token_lands_once((keys, events) in batch()) {
            let plan = plan(&keys, &events, NOW);
            let known: i64 = events.iter().filter(|e| e.api_key_id <= 5).map(|e| e.tokens).sum();
            let rolled_before: i64 = plan.rolled.iter()
                .map(|c| keys[c.api_key_id as usize - 1].counter.used).sum();
            let landed: i64 = plan.increments.iter().map(|(_, delta)| delta).sum::<i64>()
                + plan.rolled.iter().map(|c| c.used).sum::<i64>()
                + plan.history.values().sum::<i64>();
            prop_assert_eq!(landed, known + rolled_before);
            let nonzero = |e: &&UsageEvent| e.tokens != 0;
            prop_assert_eq!(plan.unknown_key, events.iter().filter(nonzero).filter(|e| e.api_key_id == 6).count());
            prop_assert_eq!(plan.counted + plan.unknown_key, events.len());
        }

        /// Each known key reports exactly one counter source; nothing late lands in a window
        /// that is not closed; a rolled key's new window is the one containing now.
        #[test]
        fn each_key_is_written_one_way((keys, events) in batch()) {
            let plan = plan(&keys, &events, NOW);
            let mut reported: Vec<i64> = plan.increments.iter().map(|(k, _)| *k)
                .chain(plan.rolled.iter().map(|c| c.api_key_id))
                .chain(plan.unchanged.iter().map(|c| c.api_key_id))
                .collect();
            reported.sort_unstable();
            prop_assert_eq!(reported, vec![1, 2, 3, 4, 5]);
            prop_assert!(plan.increments.windows(2).all(|pair| pair[0].0 < pair[1].0));
            for (_, window) in plan.history.keys() {
                prop_assert!(window.end <= at(NOV_END) - chrono::Duration::days(30));
            }
            for counter in &plan.rolled {
                prop_assert_eq!(counter.reset_at, at(NOV_END));
            }
        }
    }
}
