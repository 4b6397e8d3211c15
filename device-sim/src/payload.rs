//! Telemetry payloads: an air-quality JSON reading padded to a target size.

use std::fmt::Write;

/// Builds `{"temperature":..,"humidity":..,"pm2_5":..,"seq":N,"ts":MS}` and pads it with
/// insignificant JSON whitespace to `target` bytes, so the gateway decodes the same three
/// quantities whatever the size. Payloads larger than the target are left as they are.
pub fn reading(buf: &mut String, seq: u64, ts_ms: u64, target: usize) {
    buf.clear();
    // Values move a little with seq so consecutive readings are not identical.
    let temperature = 20.0 + (seq % 100) as f64 / 10.0;
    let humidity = 40 + seq % 40;
    let pm2_5 = 10 + seq % 70;
    let _ = write!(
        buf,
        r#"{{"temperature":{temperature:.1},"humidity":{humidity},"pm2_5":{pm2_5},"seq":{seq},"ts":{ts_ms}"#
    );
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
        reading(&mut buf, 123, 1_795_414_849_000, 100);
        assert_eq!(buf.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["seq"], 123);
        assert_eq!(v["ts"], 1_795_414_849_000u64);
        assert!(v["pm2_5"].is_number());
    }

    #[test]
    fn small_target_is_not_truncated() {
        let mut buf = String::new();
        reading(&mut buf, 1, 2, 10);
        assert!(serde_json::from_str::<serde_json::Value>(&buf).is_ok());
    }
}
