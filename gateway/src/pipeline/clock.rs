//! Device clocks that cannot be right: a time far ahead of the gateway's (an RTC set to the wrong
//! year) or far behind it (a clock reset to 1970 or 2000 after a battery change).
//!
//! Such a reading is kept (it was measured), but stamped with its receive time instead: a reading
//! dated 2099 would never show in a "last hour" chart or a history query, and one dated 1970 would
//! sit before every retention window. Each replacement is counted in
//! `citygw_device_time_replaced_total{protocol,direction}`. Times within the window (readings a
//! device buffered while offline, a clock a few minutes off) are kept as sent.
//!
//! The gateway's own clock is not trusted for order: reading ids come from a counter, so a clock
//! stepping backwards changes receive times, never the order of ids.

/// How far a device's own timestamp may be from the receive time and still be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceClock {
    pub max_ahead_ms: i64,
    pub max_behind_ms: i64,
}

impl Default for DeviceClock {
    fn default() -> Self {
        DeviceClock {
            max_ahead_ms: 600_000,
            max_behind_ms: 3650 * 86_400_000,
        }
    }
}

impl DeviceClock {
    /// The device time to store for a reading received at `now_ms`.
    pub fn device_time(&self, claimed: Option<i64>, now_ms: i64, protocol: &'static str) -> i64 {
        let Some(t) = claimed else {
            return now_ms;
        };
        let direction = if t > now_ms.saturating_add(self.max_ahead_ms) {
            "future"
        } else if t < now_ms.saturating_sub(self.max_behind_ms) {
            "past"
        } else {
            return t;
        };
        metrics::counter!("citygw_device_time_replaced_total", "protocol" => protocol, "direction" => direction)
            .increment(1);
        now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_implausible_times_are_replaced() {
        let c = DeviceClock {
            max_ahead_ms: 1_000,
            max_behind_ms: 10_000,
        };
        let now = 1_780_000_000_000;
        assert_eq!(c.device_time(None, now, "mqtt"), now);
        assert_eq!(c.device_time(Some(now + 1_000), now, "mqtt"), now + 1_000);
        assert_eq!(c.device_time(Some(now + 1_001), now, "mqtt"), now);
        assert_eq!(c.device_time(Some(now - 10_000), now, "mqtt"), now - 10_000);
        assert_eq!(c.device_time(Some(now - 10_001), now, "mqtt"), now);
        assert_eq!(c.device_time(Some(0), now, "mqtt"), now);
        assert_eq!(
            c.device_time(Some(i64::MAX), i64::MAX - 5, "mqtt"),
            i64::MAX
        );
    }
}
