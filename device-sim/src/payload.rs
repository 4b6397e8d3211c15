//! Telemetry payloads: an air-quality JSON reading padded to a target size.

use std::fmt::Write;

/// Quantity carrying the publisher's wall clock (Unix microseconds) when `bench mqtt --stamp` is
/// on; `bench fanout` turns it into publish-to-subscriber latency.
pub const SENT_US: &str = "sent_us";

/// Builds `{"temperature":..,"humidity":..,"pm2_5":..,"seq":N,"ts":MS}` and pads it with
/// insignificant JSON whitespace to `target` bytes, so the gateway decodes the same three
/// quantities whatever the size. Payloads larger than the target are left as they are.
///
/// With `sent_us`, a fourth quantity `"sent_us":US` is added (the gateway stores it as a plain
/// number; Unix microseconds stay below 2^53 until the year 2255, so the f64 is exact).
pub fn reading(buf: &mut String, seq: u64, ts_ms: u64, sent_us: Option<u64>, target: usize) {
    buf.clear();
    // Values move a little with seq so consecutive readings are not identical.
    let temperature = 20.0 + (seq % 100) as f64 / 10.0;
    let humidity = 40 + seq % 40;
    let pm2_5 = 10 + seq % 70;
    let _ = write!(
        buf,
        r#"{{"temperature":{temperature:.1},"humidity":{humidity},"pm2_5":{pm2_5},"seq":{seq},"ts":{ts_ms}"#
    );
    if let Some(us) = sent_us {
        let _ = write!(buf, r#","{SENT_US}":{us}"#);
    }
    // +1 for the closing brace.
    let pad = target.saturating_sub(buf.len() + 1);
    buf.extend(std::iter::repeat_n(' ', pad));
    buf.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_to_target_and_valid_json() {
        let mut buf = String::new();
        reading(&mut buf, 123, 1_795_414_849_000, None, 100);
        assert_eq!(buf.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["seq"], 123);
        assert_eq!(v["ts"], 1_795_414_849_000u64);
        assert!(v["pm2_5"].is_number());
    }

    #[test]
    fn small_target_is_not_truncated() {
        let mut buf = String::new();
        reading(&mut buf, 1, 2, None, 10);
        assert!(serde_json::from_str::<serde_json::Value>(&buf).is_ok());
    }

    #[test]
    fn stamp_is_an_exact_number() {
        let mut buf = String::new();
        let us = 1_795_414_849_123_456u64;
        reading(&mut buf, 7, 1_795_414_849_123, Some(us), 100);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v[SENT_US].as_f64().unwrap() as u64, us);
    }
}
