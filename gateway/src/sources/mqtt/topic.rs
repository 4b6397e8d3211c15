//! The device topic scheme: `devices/{device_id}/telemetry[/{format}]`.

/// What a publish topic says.
#[derive(Debug, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Telemetry claimed for `device_id`, with an optional format suffix.
    Telemetry {
        device_id: &'a str,
        format: Option<&'a str>,
    },
    /// Another topic below `devices/{device_id}/`.
    OfDevice { device_id: &'a str },
    /// Anything else: devices may publish telemetry only.
    Other,
    /// Not a valid topic name at all: wildcards or U+0000 (MQTT 3.1.1 section 3.3.2-2 and
    /// 1.5.3-2, MQTT 5 sections 3.3.2.1 and 1.5.4), or empty. The connection must be closed.
    Invalid,
}

pub fn parse(topic: &str) -> Topic<'_> {
    if topic.is_empty() || topic.contains(['#', '+', '\0']) {
        return Topic::Invalid;
    }
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
        (Some("devices"), Some(id), Some(_), ..) if !id.is_empty() => {
            Topic::OfDevice { device_id: id }
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
            parse("devices/a1/telemetry/senml-cbor"),
            Topic::Telemetry {
                device_id: "a1",
                format: Some("senml-cbor")
            }
        );
        assert_eq!(
            parse("devices/a1/telemetry/"),
            Topic::Telemetry {
                device_id: "a1",
                format: None
            }
        );
        for other in ["devices//telemetry", "devices/a1", "x/a1/telemetry"] {
            assert_eq!(parse(other), Topic::Other, "{other}");
        }
        for of_device in ["devices/a1/status", "devices/a1/telemetry/json/x"] {
            assert_eq!(
                parse(of_device),
                Topic::OfDevice { device_id: "a1" },
                "{of_device}"
            );
        }
        for invalid in [
            "",
            "devices/a1/telemetry/#",
            "devices/+/telemetry",
            // '+' is a wildcard character anywhere in a topic name (MQTT-4.7.1-1), so the
            // canonical format names are spelled with '-' in topics.
            "devices/a1/telemetry/senml+cbor",
            "devices/a1/tele\0metry",
        ] {
            assert_eq!(parse(invalid), Topic::Invalid, "{invalid:?}");
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
