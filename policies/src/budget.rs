//! Budget arithmetic: which scopes a paid call is charged to, calendar windows in a
//! configured time zone, conservative estimates, and the fit test.
//!
//! The storage layer owns atomicity: it reserves an estimate in every scope from
//! [`scopes_for`] in one transaction (all or nothing), then settles to the real cost. This
//! module only defines the scopes and the arithmetic, so every store agrees on them.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::money::{NanoUsd, PriceTable};

/// IANA time zone, re-exported so callers need no chrono-tz dependency.
pub use chrono_tz::Tz;

/// Who a budget belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    /// One API key (id from [`crate::team::key_id`]).
    Key,
    /// One team (by name).
    Team,
    /// The whole gateway.
    Global,
}

impl ScopeKind {
    /// Stable name for storage and metrics: `key`, `team`, `global`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Team => "team",
            Self::Global => "global",
        }
    }
}

/// The calendar period a budget covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// A calendar day in the configured time zone.
    Day,
    /// A calendar month in the configured time zone.
    Month,
}

impl Window {
    /// Stable name for storage and metrics: `day`, `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }
}

/// One budget counter: who, which kind of window, and which window.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// Key, team or global.
    pub kind: ScopeKind,
    /// Key id, team name, or `global`.
    pub id: String,
    /// Day or month.
    pub window: Window,
    /// `2026-11-28` for a day, `2026-11` for a month (see [`window_key`]).
    pub window_start: String,
}

impl Scope {
    /// One string naming the counter, e.g. `team/alpha/day/2026-11-28`; unique because ids
    /// contain no `/` (team names are `[A-Za-z0-9_.-]`, key ids are hex).
    pub fn storage_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.kind.as_str(),
            self.id,
            self.window.as_str(),
            self.window_start
        )
    }
}

/// Spend limits of one scope; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    /// Per calendar day.
    pub daily: Option<NanoUsd>,
    /// Per calendar month.
    pub monthly: Option<NanoUsd>,
}

/// Id of the global scope.
pub const GLOBAL_ID: &str = "global";

/// Parses an IANA time zone name such as `Europe/Berlin` or `UTC` (key: `timezone`).
pub fn parse_time_zone(name: &str) -> Result<Tz, PolicyError> {
    name.parse::<Tz>().map_err(|_| {
        PolicyError::invalid(
            "timezone",
            format!("`{name}` is not an IANA time zone name"),
        )
    })
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: window keys stay four-digit years.
const MIN_SECS: i64 = -62_135_596_800;
const MAX_SECS: i64 = 253_402_300_799;

/// The local calendar date of an instant (clamped to years 1..=9999).
fn local_date(now_unix_secs: i64, tz: Tz) -> NaiveDate {
    let secs = now_unix_secs.clamp(MIN_SECS, MAX_SECS);
    match DateTime::from_timestamp(secs, 0) {
        Some(utc) => utc.with_timezone(&tz).date_naive(),
        // Unreachable after the clamp; the epoch keeps this total without a panic.
        None => NaiveDate::default(),
    }
}

/// The window containing `now`: `YYYY-MM-DD` for a day, `YYYY-MM` for a month, on the
/// calendar of `tz` (so 23:30 UTC is already tomorrow in Europe/Berlin).
pub fn window_key(now_unix_secs: i64, tz: Tz, window: Window) -> String {
    let d = local_date(now_unix_secs, tz);
    match window {
        Window::Day => format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        Window::Month => format!("{:04}-{:02}", d.year(), d.month()),
    }
}

/// Unix seconds at which the window containing `now` ends (the next local midnight, or the
/// first local midnight of next month); for expiring counters and `Retry-After`.
pub fn window_end(now_unix_secs: i64, tz: Tz, window: Window) -> i64 {
    let d = local_date(now_unix_secs, tz);
    let next = match window {
        Window::Day => d.succ_opt(),
        Window::Month => {
            let (y, m) = if d.month() == 12 {
                (d.year() + 1, 1)
            } else {
                (d.year(), d.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1)
        }
    };
    let fallback = now_unix_secs.saturating_add(86_400);
    next.and_then(|next| day_start(next, tz))
        .unwrap_or(fallback)
}

/// Unix seconds at which the window containing `now` began (the last local midnight, or the
/// first local midnight of this month); for usage reports over the current window.
pub fn window_start(now_unix_secs: i64, tz: Tz, window: Window) -> i64 {
    let d = local_date(now_unix_secs, tz);
    let first = match window {
        Window::Day => Some(d),
        Window::Month => NaiveDate::from_ymd_opt(d.year(), d.month(), 1),
    };
    let fallback = now_unix_secs.saturating_sub(86_400);
    first
        .and_then(|first| day_start(first, tz))
        .unwrap_or(fallback)
}

/// The first instant of a local calendar day. Where a DST change skips local midnight, the
/// day starts at the first local hour that exists.
fn day_start(day: NaiveDate, tz: Tz) -> Option<i64> {
    (0..24).find_map(|hour| {
        let local = day.and_hms_opt(hour, 0, 0)?;
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.timestamp()),
            LocalResult::None => None,
        }
    })
}

/// Every limited scope a paid call of this key must fit in, with its limit: key, then
/// team, then global; day before month. Unlimited scopes are left out.
pub fn scopes_for(
    team: &str,
    team_limits: Limits,
    key_id: &str,
    key_limits: Limits,
    global: Limits,
    now_unix_secs: i64,
    tz: Tz,
) -> Vec<(Scope, NanoUsd)> {
    let day = window_key(now_unix_secs, tz, Window::Day);
    let month = window_key(now_unix_secs, tz, Window::Month);
    let mut scopes = Vec::new();
    for (kind, id, limits) in [
        (ScopeKind::Key, key_id, key_limits),
        (ScopeKind::Team, team, team_limits),
        (ScopeKind::Global, GLOBAL_ID, global),
    ] {
        for (window, start, limit) in [
            (Window::Day, &day, limits.daily),
            (Window::Month, &month, limits.monthly),
        ] {
            if let Some(limit) = limit {
                let scope = Scope {
                    kind,
                    id: id.to_owned(),
                    window,
                    window_start: start.clone(),
                };
                scopes.push((scope, limit));
            }
        }
    }
    scopes
}

/// Conservative cost of a call before it happens: all input tokens plus the full
/// `max_output_tokens`, rounded up. When the request sets no `max_tokens`, pass the most the
/// remote model may generate. Input is counted with our tokenizer, which can differ from the
/// remote's; settling to the real usage corrects it.
pub fn estimate_cost(price: &PriceTable, input_tokens: u64, max_output_tokens: u64) -> NanoUsd {
    price.cost(input_tokens, max_output_tokens)
}

/// Whether `amount` fits on top of what a scope has used (spent + reserved):
/// `used + amount <= limit`, without overflow.
pub fn fits(used: NanoUsd, limit: NanoUsd, amount: NanoUsd) -> bool {
    u128::from(used.0) + u128::from(amount.0) <= u128::from(limit.0)
}

/// One scope's counter as the storage layer keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BudgetState {
    /// Settled spend in the window.
    pub spent: NanoUsd,
    /// Estimates held by calls in flight.
    pub reserved: NanoUsd,
    /// The scope's limit.
    pub limit: NanoUsd,
}

impl BudgetState {
    /// Spent plus reserved.
    pub fn used(&self) -> NanoUsd {
        self.spent.saturating_add(self.reserved)
    }

    /// What is left for new reservations (zero when over the limit).
    pub fn remaining(&self) -> NanoUsd {
        self.limit.saturating_sub(self.used())
    }

    /// Whether a reservation of `amount` fits.
    pub fn fits(&self, amount: NanoUsd) -> bool {
        fits(self.used(), self.limit, amount)
    }

    /// The state after reserving `amount`, or `None` when it does not fit.
    pub fn reserve(&self, amount: NanoUsd) -> Option<Self> {
        self.fits(amount).then(|| Self {
            reserved: self.reserved.saturating_add(amount),
            ..*self
        })
    }

    /// The state after a call that reserved `reserved` actually cost `actual` (which may
    /// exceed the estimate; spend then passes the limit and later calls stop fitting).
    #[must_use]
    pub fn settle(&self, reserved: NanoUsd, actual: NanoUsd) -> Self {
        Self {
            spent: self.spent.saturating_add(actual),
            reserved: self.reserved.saturating_sub(reserved),
            limit: self.limit,
        }
    }

    /// The state after a reservation is given back unused (call failed or expired).
    #[must_use]
    pub fn release(&self, reserved: NanoUsd) -> Self {
        self.settle(reserved, NanoUsd::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-28T23:30:00Z.
    const LATE_SAT: i64 = 1_795_908_600;

    #[test]
    fn half_past_eleven_utc_is_the_next_day_in_berlin() {
        let berlin = parse_time_zone("Europe/Berlin").unwrap();
        assert_eq!(window_key(LATE_SAT, Tz::UTC, Window::Day), "2026-11-28");
        assert_eq!(window_key(LATE_SAT, berlin, Window::Day), "2026-11-29");
        assert_eq!(window_key(LATE_SAT, berlin, Window::Month), "2026-11");
        // And across a month boundary: 2026-11-30T23:30Z is December in Berlin.
        let end_of_nov = LATE_SAT + 2 * 86_400;
        assert_eq!(window_key(end_of_nov, Tz::UTC, Window::Month), "2026-11");
        assert_eq!(window_key(end_of_nov, berlin, Window::Month), "2026-12");
        // West of UTC the day starts later: still the 28th in New York at 03:00Z on the 29th.
        let ny = parse_time_zone("America/New_York").unwrap();
        assert_eq!(
            window_key(LATE_SAT + 3600 * 3 + 1800, ny, Window::Day),
            "2026-11-28"
        );
    }

    #[test]
    fn unknown_time_zone_names_the_key() {
        let err = parse_time_zone("Mars/Olympus").unwrap_err();
        assert_eq!(err.key(), "timezone");
    }

    #[test]
    fn window_end_is_the_next_local_midnight() {
        let berlin = parse_time_zone("Europe/Berlin").unwrap();
        // Next Berlin midnight after 2026-11-29T00:30+01:00 is 2026-11-29T23:00Z.
        assert_eq!(window_end(LATE_SAT, berlin, Window::Day), 1_795_993_200);
        assert_eq!(window_end(LATE_SAT, Tz::UTC, Window::Day), LATE_SAT + 1800);
        // Month: 2026-12-01T00:00Z.
        assert_eq!(
            window_end(LATE_SAT, Tz::UTC, Window::Month),
            LATE_SAT + 1800 + 2 * 86_400
        );
        // Across DST: 2026-03-29 in Berlin has 23 hours.
        let mar_28_noon = 1_774_699_200; // 2026-03-28T12:00Z
        let end_28 = window_end(mar_28_noon, berlin, Window::Day);
        assert_eq!(window_end(end_28, berlin, Window::Day) - end_28, 23 * 3600);
    }

    #[test]
    fn window_end_survives_a_zone_that_skips_midnight() {
        // America/Santiago skipped 2022-09-11T00:00 local (clocks went to 01:00).
        let santiago = parse_time_zone("America/Santiago").unwrap();
        let sept_10_noon_local = 1_662_825_600; // 2022-09-10T12:00-04:00 = 16:00Z
        let end = window_end(sept_10_noon_local, santiago, Window::Day);
        assert_eq!(window_key(end, santiago, Window::Day), "2022-09-11");
        assert_eq!(window_key(end - 1, santiago, Window::Day), "2022-09-10");
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        assert_eq!(window_key(i64::MIN, Tz::UTC, Window::Day), "0001-01-01");
        assert_eq!(window_key(i64::MAX, Tz::UTC, Window::Month), "9999-12");
        let _ = window_end(i64::MAX, Tz::UTC, Window::Month);
    }

    #[test]
    fn scopes_cover_key_team_and_global_limits_only() {
        let nano = NanoUsd;
        let scopes = scopes_for(
            "alpha",
            Limits {
                daily: Some(nano(10)),
                monthly: Some(nano(100)),
            },
            "0123456789ab",
            Limits {
                daily: None,
                monthly: Some(nano(50)),
            },
            Limits {
                daily: Some(nano(1000)),
                monthly: None,
            },
            LATE_SAT,
            Tz::UTC,
        );
        let keys: Vec<(String, NanoUsd)> =
            scopes.iter().map(|(s, l)| (s.storage_key(), *l)).collect();
        assert_eq!(
            keys,
            [
                ("key/0123456789ab/month/2026-11".to_owned(), nano(50)),
                ("team/alpha/day/2026-11-28".to_owned(), nano(10)),
                ("team/alpha/month/2026-11".to_owned(), nano(100)),
                ("global/global/day/2026-11-28".to_owned(), nano(1000)),
            ]
        );
        let none = scopes_for(
            "a",
            Limits::default(),
            "k",
            Limits::default(),
            Limits::default(),
            0,
            Tz::UTC,
        );
        assert!(none.is_empty());
    }

    #[test]
    fn estimate_counts_full_max_tokens_and_rounds_up() {
        let price = PriceTable {
            input_per_million: NanoUsd(150_000_000),
            output_per_million: NanoUsd(600_000_000),
        };
        assert_eq!(estimate_cost(&price, 1000, 256), NanoUsd(150_000 + 153_600));
        let tiny = PriceTable {
            input_per_million: NanoUsd(1),
            output_per_million: NanoUsd(1),
        };
        assert_eq!(estimate_cost(&tiny, 1, 1), NanoUsd(1));
    }

    #[test]
    fn fits_is_inclusive_and_overflow_safe() {
        assert!(fits(NanoUsd(60), NanoUsd(100), NanoUsd(40)));
        assert!(!fits(NanoUsd(60), NanoUsd(100), NanoUsd(41)));
        assert!(fits(NanoUsd::ZERO, NanoUsd::ZERO, NanoUsd::ZERO));
        assert!(!fits(NanoUsd::MAX, NanoUsd::MAX, NanoUsd(1)));
    }

    #[test]
    fn reserve_settle_release_keep_the_books() {
        let s = BudgetState {
            spent: NanoUsd(50),
            reserved: NanoUsd(0),
            limit: NanoUsd(100),
        };
        let r = s.reserve(NanoUsd(30)).unwrap();
        assert_eq!(r.used(), NanoUsd(80));
        assert_eq!(r.remaining(), NanoUsd(20));
        assert!(r.reserve(NanoUsd(21)).is_none(), "all or nothing");
        let settled = r.settle(NanoUsd(30), NanoUsd(12));
        assert_eq!(
            settled,
            BudgetState {
                spent: NanoUsd(62),
                reserved: NanoUsd(0),
                limit: NanoUsd(100)
            }
        );
        assert_eq!(r.release(NanoUsd(30)), s);
        let over = r.settle(NanoUsd(30), NanoUsd(70));
        assert_eq!(over.remaining(), NanoUsd::ZERO);
        assert!(!over.fits(NanoUsd(1)));
    }

    #[test]
    fn windows_start_at_local_midnight_and_the_first_of_the_month() {
        let tz = parse_time_zone("Europe/Berlin").unwrap_or(Tz::UTC);
        // 2026-11-28T12:00:00Z is 13:00 in Berlin (UTC+1).
        let now = 1_795_867_200;
        assert_eq!(window_start(now, tz, Window::Day), 1_795_820_400);
        assert_eq!(window_end(now, tz, Window::Day), 1_795_820_400 + 86_400);
        // 2026-11-01T00:00 Berlin is 2026-10-31T23:00Z.
        assert_eq!(window_start(now, tz, Window::Month), 1_793_487_600);
        assert_eq!(window_start(now, Tz::UTC, Window::Day), 1_795_824_000);
    }
}
