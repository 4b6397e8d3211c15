//! The OMA/IPSO objects whose values become readings, and what their resources mean.

/// How a resource's value is encoded where the format does not say (TLV, plain text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Integer,
}

/// One observed resource: `/object/instance/resource` → a quantity of the reading schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub object: u16,
    pub resource: u16,
    pub quantity: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
}

const fn k(
    object: u16,
    resource: u16,
    quantity: &'static str,
    unit: &'static str,
    kind: Kind,
) -> Known {
    Known {
        object,
        resource,
        quantity,
        unit,
        kind,
    }
}

/// IPSO sensor value (5700) of the smart objects the city's devices use, and the device battery.
/// Units are the IPSO defaults; a SenML value with its own unit keeps that unit.
pub const KNOWN: &[Known] = &[
    k(3303, 5700, "temperature", "Cel", Kind::Float),
    k(3304, 5700, "humidity", "%RH", Kind::Float),
    k(3301, 5700, "lux", "lx", Kind::Float),
    k(3316, 5700, "voltage", "V", Kind::Float),
    k(3328, 5700, "power", "W", Kind::Float),
    k(3330, 5700, "distance", "m", Kind::Float),
    k(3323, 5700, "pressure", "hPa", Kind::Float),
    k(3300, 5700, "sensor_value", "", Kind::Float),
    k(3, 9, "battery", "%EL", Kind::Integer),
];

pub fn known(object: u16, resource: u16) -> Option<&'static Known> {
    KNOWN
        .iter()
        .find(|k| k.object == object && k.resource == resource)
}

/// The resource the server observes on an instance of `object`, if it is a known one.
pub fn observed_resource(object: u16) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.object == object)
}

/// Whether a resource is a Boolean in the IPSO reusable resources (the same id means the same
/// resource in every object): 5500 Digital Input State, 5550 Digital Output State, 5850 On/Off.
pub fn is_boolean(resource: u16) -> bool {
    matches!(resource, 5500 | 5550 | 5850)
}

/// A resource path `/o/i/r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    pub object: u16,
    pub instance: u16,
    pub resource: u16,
}

impl Path {
    /// Parses "/3303/0/5700" (leading slash optional); `None` for anything else.
    pub fn parse(s: &str) -> Option<Path> {
        let mut it = s.strip_prefix('/').unwrap_or(s).split('/');
        let p = Path {
            object: it.next()?.parse().ok()?,
            instance: it.next()?.parse().ok()?,
            resource: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(p)
    }

    /// The reading's quantity: the known name (suffixed with the instance beyond the first),
    /// otherwise the path itself.
    pub fn quantity(self) -> (String, &'static str) {
        match known(self.object, self.resource) {
            Some(k) if self.instance == 0 => (k.quantity.to_string(), k.unit),
            Some(k) => (format!("{}_{}", k.quantity, self.instance), k.unit),
            None => (self.to_string(), ""),
        }
    }

    pub fn kind(self) -> Kind {
        known(self.object, self.resource).map_or(Kind::Float, |k| k.kind)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}/{}/{}", self.object, self.instance, self.resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_quantities() {
        let p = Path::parse("/3303/0/5700").unwrap();
        assert_eq!(p.quantity(), ("temperature".to_string(), "Cel"));
        assert_eq!(
            Path::parse("3303/1/5700").unwrap().quantity().0,
            "temperature_1"
        );
        assert_eq!(Path::parse("/3/0/9").unwrap().kind(), Kind::Integer);
        assert_eq!(Path::parse("/9999/0/1").unwrap().quantity().0, "/9999/0/1");
        for bad in ["/3303/0", "/3303/0/5700/1", "/a/0/1", ""] {
            assert_eq!(Path::parse(bad), None, "{bad}");
        }
        assert_eq!(observed_resource(3).unwrap().resource, 9);
    }
}
