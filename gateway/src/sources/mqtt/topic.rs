//! The device topic scheme: `devices/{device_id}/telemetry[/{format}]` from devices,
//! `devices/{device_id}/commands/{command_id}` to them and `.../result` for their answers.

/// What a publish topic says.
#[derive(Debug, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Telemetry claimed for `device_id`, with an optional format suffix.
    Telemetry {
        device_id: &'a str,
        format: Option<&'a str>,
    },
    /// A device's answer to a command.
    CommandResult {
        device_id: &'a str,
        command_id: &'a str,
    },
    /// Another topic below `devices/{device_id}/`.
    OfDevice { device_id: &'a str },
    /// Anything else: devices may publish telemetry and command results only.
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
        levels.next(),
    ) {
        (Some("devices"), Some(id), Some("telemetry"), format, None, None) if !id.is_empty() => {
            Topic::Telemetry {
                device_id: id,
                format: format.filter(|f| !f.is_empty()),
            }
        }
        (Some("devices"), Some(id), Some("commands"), Some(cmd), Some("result"), None)
            if !id.is_empty() && !cmd.is_empty() =>
        {
            Topic::CommandResult {
                device_id: id,
                command_id: cmd,
            }
        }
        (Some("devices"), Some(id), Some(_), ..) if !id.is_empty() => {
            Topic::OfDevice { device_id: id }
        }
        _ => Topic::Other,
    }
}

/// The topic a command is published on.
pub fn command(device_id: &str, command_id: &str) -> String {
    format!("devices/{device_id}/commands/{command_id}")
}

/// (device id, command id) of a command topic.
pub fn parse_command(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let command = rest.strip_prefix("commands/")?;
    (!device.is_empty() && !command.is_empty() && !command.contains('/'))
        .then_some((device, command))
}

/// Whether a device may subscribe to `filter`: only below its own `devices/{id}/` prefix,
/// where its commands are published. `+` and a final `#` may stand for levels below it.
pub fn may_subscribe(device_id: &str, filter: &str) -> bool {
    filter
        .strip_prefix("devices/")
        .and_then(|rest| rest.strip_prefix(device_id))
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| {
            let levels: Vec<&str> = rest.split('/').collect();
            let last = levels.len() - 1;
            levels.iter().enumerate().all(|(i, l)| {
                *l == "+" || (*l == "#" && i == last) || !(l.contains('+') || l.contains('#'))
            })
        })
}

/// Whether `filter` (one the device may hold) receives the device's commands.
pub fn receives_commands(device_id: &str, filter: &str) -> bool {
    matches(filter, &command(device_id, "x"))
}

/// MQTT topic filter matching (`+` one level, a final `#` the rest, section 4.7).
fn matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
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
        assert!(may_subscribe("a1", "devices/a1/commands/+"));
        assert!(may_subscribe("a1", "devices/a1/+/+"));
        assert!(may_subscribe("a1", "devices/a1/#"));
        assert!(!may_subscribe("a1", "devices/a10/#"));
        assert!(!may_subscribe("a1", "devices/+/commands"));
        assert!(!may_subscribe("a1", "devices/+/commands/+"));
        assert!(!may_subscribe("a1", "#"));
        assert!(!may_subscribe("a1", "devices/a1"));
        assert!(!may_subscribe("a1", "devices/a1/#/x"));
        assert!(!may_subscribe("a1", "devices/a1/commands/a+"));
        assert!(!may_subscribe("a1", "devices/a1+/x"));
    }

    #[test]
    fn command_topics() {
        assert_eq!(command("a1", "c-1"), "devices/a1/commands/c-1");
        assert_eq!(
            parse_command("devices/a1/commands/c-1"),
            Some(("a1", "c-1"))
        );
        assert_eq!(parse_command("devices/a1/commands/c-1/result"), None);
        assert_eq!(
            parse("devices/a1/commands/c-1/result"),
            Topic::CommandResult {
                device_id: "a1",
                command_id: "c-1"
            }
        );
        assert_eq!(
            parse("devices/a1/commands/c-1"),
            Topic::OfDevice { device_id: "a1" }
        );
        for f in [
            "devices/a1/commands/+",
            "devices/a1/#",
            "devices/a1/+/+",
            "devices/a1/commands/#",
        ] {
            assert!(receives_commands("a1", f), "{f}");
        }
        for f in [
            "devices/a1/commands",
            "devices/a1/telemetry",
            "devices/a1/+",
        ] {
            assert!(!receives_commands("a1", f), "{f}");
        }
    }
}
