//! The device topic scheme: `devices/{device_id}/telemetry[/{format}]`.

/// What a publish topic says.
#[derive(Debug, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Telemetry claimed for `device_id`, with an optional format suffix.
    Telemetry {
        device_id: &'a str,
        format: Option<&'a str>,
    },
    /// Anything else: devices may publish telemetry only.
    Other,
}

pub fn parse(topic: &str) -> Topic<'_> {
    let mut levels = topic.split('/');
    match (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) {
        (Some("devices"), Some(id), Some("telemetry"), format, None) if !id.is_empty() => {
            Topic::Telemetry {
                device_id: id,
                format: format.filter(|f| !f.is_empty()),
            }
        }
        _ => Topic::Other,
    }
}

/// Whether a device may subscribe to `filter`: only below its own `devices/{id}/` prefix,
/// where commands and configuration for it will be published.
pub fn may_subscribe(device_id: &str, filter: &str) -> bool {
    filter
        .strip_prefix("devices/")
        .and_then(|rest| rest.strip_prefix(device_id))
        .is_some_and(|rest| {
            rest.starts_with('/')
                && !rest.contains('+')
                && (!rest.contains('#') || rest.ends_with("/#"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topics() {
        assert_eq!(
            parse("devices/a1/telemetry"),
            Topic::Telemetry {
                device_id: "a1",
                format: None
            }
        );
        assert_eq!(
            parse("devices/a1/telemetry/senml+cbor"),
            Topic::Telemetry {
                device_id: "a1",
                format: Some("senml+cbor")
            }
        );
        assert_eq!(
            parse("devices/a1/telemetry/"),
            Topic::Telemetry {
                device_id: "a1",
                format: None
            }
        );
        for other in [
            "devices//telemetry",
            "devices/a1",
            "devices/a1/status",
            "x/a1/telemetry",
            "devices/a1/telemetry/json/x",
            "",
        ] {
            assert_eq!(parse(other), Topic::Other, "{other}");
        }
    }

    #[test]
    fn subscriptions_stay_below_own_prefix() {
        assert!(may_subscribe("a1", "devices/a1/commands"));
        assert!(may_subscribe("a1", "devices/a1/#"));
        assert!(!may_subscribe("a1", "devices/a10/#"));
        assert!(!may_subscribe("a1", "devices/+/commands"));
        assert!(!may_subscribe("a1", "#"));
        assert!(!may_subscribe("a1", "devices/a1"));
    }
}
