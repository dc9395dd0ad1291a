//! Wall-clock time as the ledger and the budget store keep it: milliseconds since the Unix
//! epoch, in the signed 64-bit form their columns hold.

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in milliseconds since the Unix epoch: 0 for a time before it (a clock set wrong),
/// `i64::MAX` past what the columns hold.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    unix_ms(SystemTime::now())
}
