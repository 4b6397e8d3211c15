//! What an agency's request may see: its filter checked against, and narrowed to, its scope.
//!
//! The rule: naming something outside the scope is an error that says what was refused
//! (PERMISSION_DENIED); leaving a field empty means "all of my scope", never more.

use tonic::Status;

use crate::proto::{BoundingBox, Filter, Location, Reading};
use crate::registry::agencies::Agency;
use crate::registry::{DeviceEntry, Registry};

/// A checked filter. `None` in a field means "no restriction" (only possible where the scope is
/// unrestricted too). Sets are small, so they are vectors scanned linearly: faster than hashing.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    tenants: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    device_ids: Option<Vec<String>>,
    quantities: Option<Vec<String>>,
    commune_codes: Option<Vec<String>>,
    bbox: Option<BoundingBox>,
}

fn non_empty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

fn contains(set: &Option<Vec<String>>, value: &str) -> bool {
    set.as_ref().is_none_or(|s| s.iter().any(|x| x == value))
}

impl Selection {
    pub fn new(
        agency: &Agency,
        filter: Option<Filter>,
        registry: &Registry,
    ) -> Result<Selection, Status> {
        let f = filter.unwrap_or_default();
        let refuse = |what: String| {
            Status::permission_denied(format!(
                "{what} is outside agency {:?}'s scope",
                agency.name
            ))
        };
        let tenants = match non_empty(f.tenants) {
            Some(ts) => {
                if let Some(t) = ts.iter().find(|t| !agency.may_read_tenant(t)) {
                    return Err(refuse(format!("tenant {t:?}")));
                }
                Some(ts)
            }
            None => (!agency.all_tenants()).then(|| agency.tenants.clone()),
        };
        let kinds = match non_empty(f.kinds) {
            Some(ks) => {
                if let Some(k) = ks.iter().find(|k| !agency.may_read_kind(k)) {
                    return Err(refuse(format!("device kind {k:?}")));
                }
                Some(ks)
            }
            None => (!agency.all_kinds()).then(|| agency.kinds.clone()),
        };
        let device_ids = non_empty(f.device_ids);
        for id in device_ids.iter().flatten() {
            // An unknown device is refused like an out-of-scope one: the answer must not tell an
            // agency which device ids exist outside its scope.
            match registry.get(id) {
                Some(d) if agency.may_read_tenant(d.tenant()) && agency.may_read_kind(d.kind()) => {
                }
                _ => return Err(refuse(format!("device {id:?}"))),
            }
        }
        if let Some(b) = &f.bbox {
            let finite = [b.min_lat, b.min_lon, b.max_lat, b.max_lon]
                .iter()
                .all(|v| v.is_finite());
            if !finite || b.min_lat > b.max_lat || b.min_lon > b.max_lon {
                return Err(Status::invalid_argument(
                    "bbox: min_lat <= max_lat and min_lon <= max_lon, finite",
                ));
            }
        }
        Ok(Selection {
            tenants,
            kinds,
            device_ids,
            quantities: non_empty(f.quantities),
            commune_codes: non_empty(f.commune_codes),
            bbox: f.bbox,
        })
    }

    fn in_bbox(&self, location: Option<&Location>) -> bool {
        match (&self.bbox, location) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(b), Some(l)) => {
                (b.min_lat..=b.max_lat).contains(&l.lat) && (b.min_lon..=b.max_lon).contains(&l.lon)
            }
        }
    }

    pub fn matches(&self, r: &Reading) -> bool {
        contains(&self.tenants, &r.tenant)
            && contains(&self.kinds, &r.kind)
            && contains(&self.device_ids, &r.device_id)
            && contains(&self.quantities, &r.quantity)
            && contains(&self.commune_codes, &r.commune_code)
            && self.in_bbox(r.location.as_ref())
    }

    /// The device-level part of the filter (everything but quantities), on registry data.
    pub fn matches_device(&self, d: &DeviceEntry) -> bool {
        contains(&self.tenants, d.tenant())
            && contains(&self.kinds, d.kind())
            && contains(&self.device_ids, d.id())
            && contains(&self.commune_codes, d.commune_code())
            && self.in_bbox(d.location().as_ref())
    }

    /// Like [`Self::matches_device`] but without the position: history must find devices whose
    /// readings carry their own positions (mobile sensors) even if the registry has none.
    pub fn may_have_readings(&self, d: &DeviceEntry) -> bool {
        contains(&self.tenants, d.tenant())
            && contains(&self.kinds, d.kind())
            && contains(&self.device_ids, d.id())
            && contains(&self.commune_codes, d.commune_code())
    }
}
