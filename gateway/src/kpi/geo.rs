//! Communes, cities and where a device is: the 2025 commune-level units shipped in the binary
//! (gateway/data/geo, sources in its README), optional commune populations and boundaries from
//! the operator.
//!
//! Attribution order: the registry's commune code; else, for a device with coordinates only, the
//! commune whose boundary contains it (when boundaries are loaded), else the nearest commune
//! centroid (an approximation, flagged as such); else unassigned.

use std::collections::HashMap;
use std::path::Path;

/// The shipped commune table (source in gateway/data/geo/README.md); device-sim places devices
/// with it too.
pub const COMMUNES_CSV: &str = include_str!("../../data/geo/vn-communes-2025.csv");
const CITIES_CSV: &str = include_str!("../../data/geo/city-population-2025.csv");

/// Grid cell of the spatial index, in degrees (~11 km): a few urban communes per cell.
const CELL_DEG: f64 = 0.1;
/// Kilometres per degree of latitude (mean Earth radius 6371 km).
const KM_PER_DEG: f64 = 111.195;

#[derive(Debug, Clone)]
pub struct Commune {
    pub province: String,
    pub code: String,
    pub name: String,
    pub lat: f64,
    pub lon: f64,
    pub area_km2: f64,
    pub population: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct City {
    pub code: String,
    pub name: String,
    pub population: Option<u64>,
    pub area_km2: f64,
}

/// How a device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// By its registered commune code.
    Registered(u32),
    /// Inside a loaded commune boundary.
    Boundary(u32),
    /// Nearest commune centroid: an approximation.
    Centroid(u32),
    Unassigned,
}

impl Attribution {
    pub fn commune(self) -> Option<u32> {
        match self {
            Attribution::Registered(i) | Attribution::Boundary(i) | Attribution::Centroid(i) => {
                Some(i)
            }
            Attribution::Unassigned => None,
        }
    }
}

pub struct Geo {
    communes: Vec<Commune>,
    /// Five-digit code → index into `communes` (direct table: codes are < 100000).
    by_code: Vec<u32>,
    cities: Vec<City>,
    centroids: Grid,
    boundaries: Option<Boundaries>,
    max_centroid_km: f64,
}

const NONE: u32 = u32::MAX;

impl Geo {
    /// The shipped tables, with optional operator files.
    pub fn load(
        commune_population: Option<&Path>,
        boundaries: Option<&Path>,
        max_centroid_km: f64,
    ) -> anyhow::Result<Geo> {
        let mut geo = Geo::embedded(max_centroid_km);
        if let Some(path) = commune_population {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("kpi.commune_population_file {}: {e}", path.display())
            })?;
            let n = geo.set_populations(&text).map_err(|e| {
                anyhow::anyhow!("kpi.commune_population_file {}: {e}", path.display())
            })?;
            tracing::info!(communes = n, "commune populations loaded");
        }
        if let Some(path) = boundaries {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("kpi.boundaries_file {}: {e}", path.display()))?;
            let n = geo
                .set_boundaries(&text)
                .map_err(|e| anyhow::anyhow!("kpi.boundaries_file {}: {e}", path.display()))?;
            tracing::info!(communes = n, "commune boundaries loaded");
        }
        Ok(geo)
    }

    /// Only the shipped tables.
    pub fn embedded(max_centroid_km: f64) -> Geo {
        let mut communes = Vec::new();
        let mut rows = csv::Reader::from_reader(COMMUNES_CSV.as_bytes());
        for row in rows.records() {
            let r = row.expect("shipped commune table parses");
            let num = |i: usize| r[i].parse::<f64>().expect("shipped commune table numbers");
            communes.push(Commune {
                province: r[0].to_string(),
                code: r[2].to_string(),
                name: r[3].to_string(),
                lat: num(5),
                lon: num(6),
                // A few units of the source have no area; 0 means unknown (no density).
                area_km2: r[7].parse().unwrap_or(0.0),
                population: None,
            });
        }
        let mut by_code = vec![NONE; 100_000];
        for (i, c) in communes.iter().enumerate() {
            by_code[c.code.parse::<usize>().expect("five-digit code")] = i as u32;
        }
        let mut cities = Vec::new();
        let mut rows = csv::Reader::from_reader(CITIES_CSV.as_bytes());
        for row in rows.records() {
            let r = row.expect("shipped city table parses");
            cities.push(City {
                code: r[0].to_string(),
                name: r[1].to_string(),
                population: r[2].parse().ok(),
                area_km2: r[3].parse().unwrap_or(0.0),
            });
        }
        // Provinces without an official population row still get a name and an area.
        let mut seen: HashMap<String, usize> = cities
            .iter()
            .enumerate()
            .map(|(i, c)| (c.code.clone(), i))
            .collect();
        let mut names = csv::Reader::from_reader(COMMUNES_CSV.as_bytes());
        let mut area: HashMap<String, f64> = HashMap::new();
        for c in &communes {
            *area.entry(c.province.clone()).or_default() += c.area_km2;
        }
        for row in names.records() {
            let r = row.expect("shipped commune table parses");
            if !seen.contains_key(&r[0]) {
                seen.insert(r[0].to_string(), cities.len());
                cities.push(City {
                    code: r[0].to_string(),
                    name: r[1].to_string(),
                    population: None,
                    area_km2: area[&r[0]],
                });
            }
        }
        let centroids = Grid::build(
            communes
                .iter()
                .enumerate()
                .map(|(i, c)| (i as u32, (c.lon, c.lat, c.lon, c.lat))),
        );
        Geo {
            communes,
            by_code,
            cities,
            centroids,
            boundaries: None,
            max_centroid_km,
        }
    }

    pub fn communes(&self) -> &[Commune] {
        &self.communes
    }

    pub fn commune(&self, i: u32) -> &Commune {
        &self.communes[i as usize]
    }

    pub fn city(&self, code: &str) -> Option<&City> {
        self.cities.iter().find(|c| c.code == code)
    }

    /// The boundary rings (lon, lat) of a commune from the configured boundaries file; empty
    /// without one.
    pub fn boundary_rings(&self, commune: u32) -> Vec<&[(f64, f64)]> {
        self.boundaries
            .iter()
            .flat_map(|b| &b.shapes)
            .filter(|s| s.commune == commune)
            .flat_map(|s| s.rings.iter().map(Vec::as_slice))
            .collect()
    }

    pub fn has_boundaries(&self) -> bool {
        self.boundaries.is_some()
    }

    pub fn by_code(&self, code: &str) -> Option<u32> {
        if code.len() != 5 {
            return None;
        }
        let i = *self.by_code.get(code.parse::<usize>().ok()?)?;
        (i != NONE).then_some(i)
    }

    /// Where a device belongs; see the module doc for the order.
    pub fn attribute(&self, commune_code: &str, location: Option<(f64, f64)>) -> Attribution {
        if let Some(i) = self.by_code(commune_code) {
            return Attribution::Registered(i);
        }
        let Some((lat, lon)) = location else {
            return Attribution::Unassigned;
        };
        if let Some(b) = &self.boundaries {
            if let Some(i) = b.containing(lat, lon) {
                return Attribution::Boundary(i);
            }
        }
        match self.nearest_centroid(lat, lon) {
            Some(i) => Attribution::Centroid(i),
            None => Attribution::Unassigned,
        }
    }

    /// The nearest commune centroid within `max_centroid_km`: rings of grid cells around the
    /// point, stopping once no unvisited cell can hold anything nearer. This runs for every
    /// coordinates-only device in every KPI computation, hence no trigonometry per candidate.
    pub fn nearest_centroid(&self, lat: f64, lon: f64) -> Option<u32> {
        let metric = Metric::at(lat);
        let max_rings = (self.max_centroid_km / (CELL_DEG * KM_PER_DEG * metric.cos_lat))
            .ceil()
            .min(1000.0) as i32;
        let mut best: Option<(f64, u32)> = None;
        for ring in 0..=max_rings {
            self.centroids.ring(lon, lat, ring, |i| {
                let c = &self.communes[i as usize];
                let d2 = metric.km2(lat, lon, c.lat, c.lon);
                if best.is_none_or(|(bd, bi)| d2 < bd || (d2 == bd && i < bi)) {
                    best = Some((d2, i));
                }
            });
            // Every cell beyond this ring is at least `ring` cells away along some axis.
            let beyond_km = ring as f64 * CELL_DEG * KM_PER_DEG * metric.cos_lat;
            if best.is_some_and(|(d2, _)| d2 <= beyond_km * beyond_km) {
                break;
            }
        }
        best.filter(|(d2, _)| *d2 <= self.max_centroid_km * self.max_centroid_km)
            .map(|(_, i)| i)
    }

    /// Reads `commune_code,population`; returns how many communes got one.
    fn set_populations(&mut self, csv_text: &str) -> anyhow::Result<usize> {
        let mut rows = csv::Reader::from_reader(csv_text.as_bytes());
        let headers = rows.headers()?.clone();
        let col = |name: &str| {
            headers
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| anyhow::anyhow!("no {name:?} column"))
        };
        let (code_col, pop_col) = (col("commune_code")?, col("population")?);
        let mut n = 0;
        for (line, row) in rows.records().enumerate() {
            let r = row?;
            let code = r.get(code_col).unwrap_or("").trim();
            let i = self.by_code(code).ok_or_else(|| {
                anyhow::anyhow!("row {}: unknown commune code {code:?}", line + 2)
            })?;
            let pop: u64 = r.get(pop_col).unwrap_or("").trim().parse().map_err(|_| {
                anyhow::anyhow!("row {}: population is not a whole number", line + 2)
            })?;
            self.communes[i as usize].population = Some(pop);
            n += 1;
        }
        Ok(n)
    }

    /// Reads a GeoJSON FeatureCollection; returns how many communes got a boundary.
    fn set_boundaries(&mut self, geojson: &str) -> anyhow::Result<usize> {
        let doc: serde_json::Value = serde_json::from_str(geojson)?;
        let features = doc["features"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("not a GeoJSON FeatureCollection"))?;
        let mut shapes = Vec::new();
        for (n, f) in features.iter().enumerate() {
            let props = &f["properties"];
            let code = ["commune_code", "code", "ma_xa"]
                .iter()
                .find_map(|k| match &props[*k] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(format!("{:05}", n.as_u64()?)),
                    _ => None,
                })
                .ok_or_else(|| {
                    anyhow::anyhow!("feature {n}: no commune_code, code or ma_xa property")
                })?;
            let commune = self
                .by_code(&code)
                .ok_or_else(|| anyhow::anyhow!("feature {n}: unknown commune code {code:?}"))?;
            let geom = &f["geometry"];
            let polygons: Vec<&serde_json::Value> = match geom["type"].as_str() {
                Some("Polygon") => vec![&geom["coordinates"]],
                Some("MultiPolygon") => geom["coordinates"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default(),
                other => anyhow::bail!("feature {n}: geometry {other:?} is not a (Multi)Polygon"),
            };
            for p in polygons {
                let rings = parse_rings(p)
                    .ok_or_else(|| anyhow::anyhow!("feature {n}: malformed polygon coordinates"))?;
                shapes.push(Shape::new(commune, rings));
            }
        }
        let communes: std::collections::HashSet<u32> = shapes.iter().map(|s| s.commune).collect();
        self.boundaries = Some(Boundaries::new(shapes));
        Ok(communes.len())
    }
}

/// Equirectangular distances around one point: within tens of kilometres as good as the
/// haversine, and the cosine is computed once per point, not per candidate.
struct Metric {
    cos_lat: f64,
}

impl Metric {
    fn at(lat: f64) -> Metric {
        Metric {
            cos_lat: lat.to_radians().cos().max(1e-6),
        }
    }

    /// Squared distance in km².
    fn km2(&self, lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
        let dx = (lon2 - lon1) * self.cos_lat * KM_PER_DEG;
        let dy = (lat2 - lat1) * KM_PER_DEG;
        dx * dx + dy * dy
    }
}

/// Items by the grid cells their bounding box covers.
struct Grid {
    cells: HashMap<(i32, i32), Vec<u32>>,
}

fn cell(v: f64) -> i32 {
    (v / CELL_DEG).floor() as i32
}

impl Grid {
    fn build(items: impl Iterator<Item = (u32, (f64, f64, f64, f64))>) -> Grid {
        let mut cells: HashMap<(i32, i32), Vec<u32>> = HashMap::new();
        for (i, (min_x, min_y, max_x, max_y)) in items {
            for cx in cell(min_x)..=cell(max_x) {
                for cy in cell(min_y)..=cell(max_y) {
                    cells.entry((cx, cy)).or_default().push(i);
                }
            }
        }
        Grid { cells }
    }

    /// Every item in the cells exactly `ring` cells (Chebyshev) from the point's cell.
    fn ring(&self, x: f64, y: f64, ring: i32, mut f: impl FnMut(u32)) {
        let (cx, cy) = (cell(x), cell(y));
        for dx in -ring..=ring {
            for dy in -ring..=ring {
                if dx.abs() != ring && dy.abs() != ring {
                    continue;
                }
                if let Some(items) = self.cells.get(&(cx + dx, cy + dy)) {
                    items.iter().copied().for_each(&mut f);
                }
            }
        }
    }
}

/// One polygon (outer ring and holes) of a commune, as (lon, lat) rings.
struct Shape {
    commune: u32,
    bbox: (f64, f64, f64, f64),
    rings: Vec<Vec<(f64, f64)>>,
}

impl Shape {
    fn new(commune: u32, rings: Vec<Vec<(f64, f64)>>) -> Shape {
        let mut bbox = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for &(x, y) in rings.iter().flatten() {
            bbox = (bbox.0.min(x), bbox.1.min(y), bbox.2.max(x), bbox.3.max(y));
        }
        Shape {
            commune,
            bbox,
            rings,
        }
    }

    /// Even-odd rule over all rings, so holes are outside.
    fn contains(&self, x: f64, y: f64) -> bool {
        let (min_x, min_y, max_x, max_y) = self.bbox;
        if x < min_x || x > max_x || y < min_y || y > max_y {
            return false;
        }
        let mut inside = false;
        for ring in &self.rings {
            let mut j = ring.len() - 1;
            for i in 0..ring.len() {
                let ((xi, yi), (xj, yj)) = (ring[i], ring[j]);
                if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                    inside = !inside;
                }
                j = i;
            }
        }
        inside
    }
}

fn parse_rings(polygon: &serde_json::Value) -> Option<Vec<Vec<(f64, f64)>>> {
    polygon
        .as_array()?
        .iter()
        .map(|ring| {
            let points: Option<Vec<(f64, f64)>> = ring
                .as_array()?
                .iter()
                .map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .collect();
            points.filter(|p| p.len() >= 3)
        })
        .collect::<Option<Vec<_>>>()
        .filter(|r| !r.is_empty())
}

struct Boundaries {
    shapes: Vec<Shape>,
    grid: Grid,
}

impl Boundaries {
    fn new(shapes: Vec<Shape>) -> Boundaries {
        let grid = Grid::build(shapes.iter().enumerate().map(|(i, s)| (i as u32, s.bbox)));
        Boundaries { shapes, grid }
    }

    fn containing(&self, lat: f64, lon: f64) -> Option<u32> {
        let mut found = None;
        self.grid.ring(lon, lat, 0, |i| {
            let s = &self.shapes[i as usize];
            if found.is_none() && s.contains(lon, lat) {
                found = Some(s.commune);
            }
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_tables() {
        let geo = Geo::embedded(25.0);
        assert_eq!(geo.communes().len(), 3321);
        let hanoi = geo.communes().iter().filter(|c| c.province == "01").count();
        let hcmc = geo.communes().iter().filter(|c| c.province == "79").count();
        assert_eq!((hanoi, hcmc), (126, 168));
        let city = geo.city("01").unwrap();
        assert_eq!(city.population, Some(8_807_523));
        assert_eq!(city.name, "Thành phố Hà Nội");
        assert!(geo.city("79").unwrap().population.is_some());
        assert_eq!(geo.city("31").unwrap().population, None);
        assert_eq!(
            geo.commune(geo.by_code("00004").unwrap()).name,
            "Phường Ba Đình"
        );
        assert_eq!(geo.by_code("99999"), None);
        assert_eq!(geo.by_code("4"), None);
    }

    #[test]
    fn attribution_order() {
        let geo = Geo::embedded(25.0);
        let ba_dinh = geo.by_code("00004").unwrap();
        let hoan_kiem = geo.by_code("00070").unwrap();
        // The registered code wins over coordinates.
        assert_eq!(
            geo.attribute("00004", Some((21.032, 105.85))),
            Attribution::Registered(ba_dinh)
        );
        // Coordinates only: the nearest centroid (Hoàn Kiếm's is 21.032, 105.85).
        assert_eq!(
            geo.attribute("", Some((21.0322, 105.8503))),
            Attribution::Centroid(hoan_kiem)
        );
        // An unknown code falls back to the coordinates.
        assert_eq!(
            geo.attribute("99999", Some((21.0386, 105.838))),
            Attribution::Centroid(ba_dinh)
        );
        assert_eq!(geo.attribute("", None), Attribution::Unassigned);
        // The Gulf of Guinea is far from every commune.
        assert_eq!(geo.attribute("", Some((0.0, 0.0))), Attribution::Unassigned);
    }

    #[test]
    fn nearest_centroid_matches_a_full_scan() {
        let geo = Geo::embedded(25.0);
        let mut checked = 0;
        for k in 0..4000 {
            let lat = 8.5 + (k as f64 * 0.0397) % 15.0;
            let lon = 102.2 + (k as f64 * 0.0713) % 7.5;
            let metric = Metric::at(lat);
            let scan = geo
                .communes()
                .iter()
                .enumerate()
                .map(|(i, c)| (metric.km2(lat, lon, c.lat, c.lon), i as u32))
                .filter(|(d2, _)| *d2 <= 25.0 * 25.0)
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, i)| i);
            assert_eq!(geo.nearest_centroid(lat, lon), scan, "{lat},{lon}");
            checked += scan.is_some() as usize;
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn boundaries_replace_the_centroid_approximation() {
        let mut geo = Geo::embedded(25.0);
        // A square around Ba Đình's centroid with a hole, and a MultiPolygon for Ngọc Hà.
        let geojson = r#"{"type":"FeatureCollection","features":[
          {"type":"Feature","properties":{"commune_code":"00004"},"geometry":{"type":"Polygon",
           "coordinates":[[[105.80,21.00],[105.90,21.00],[105.90,21.10],[105.80,21.10],[105.80,21.00]],
                          [[105.84,21.04],[105.86,21.04],[105.86,21.06],[105.84,21.06],[105.84,21.04]]]}},
          {"type":"Feature","properties":{"code":8},"geometry":{"type":"MultiPolygon",
           "coordinates":[[[[105.84,21.04],[105.86,21.04],[105.86,21.06],[105.84,21.06],[105.84,21.04]]]]}}]}"#;
        assert_eq!(geo.set_boundaries(geojson).unwrap(), 2);
        let ba_dinh = geo.by_code("00004").unwrap();
        let ngoc_ha = geo.by_code("00008").unwrap();
        // Next to Hoàn Kiếm's centroid, but inside Ba Đình's polygon.
        assert_eq!(
            geo.attribute("", Some((21.032, 105.85))),
            Attribution::Boundary(ba_dinh)
        );
        // In the hole: the other feature.
        assert_eq!(
            geo.attribute("", Some((21.05, 105.85))),
            Attribution::Boundary(ngoc_ha)
        );
        // Outside every polygon: back to the centroid approximation.
        assert!(matches!(
            geo.attribute("", Some((20.9, 105.85))),
            Attribution::Centroid(_)
        ));
        assert!(geo
            .set_boundaries(r#"{"features":[{"properties":{"code":"12345"}}]}"#)
            .is_err());
    }

    #[test]
    fn commune_populations() {
        let mut geo = Geo::embedded(25.0);
        assert_eq!(
            geo.set_populations("commune_code,name,population\n00004,Ba Đình,65000\n")
                .unwrap(),
            1
        );
        assert_eq!(
            geo.commune(geo.by_code("00004").unwrap()).population,
            Some(65_000)
        );
        assert!(geo
            .set_populations("commune_code,population\n12345,1\n")
            .is_err());
        assert!(geo
            .set_populations("commune_code,population\n00004,many\n")
            .is_err());
        assert!(geo.set_populations("code,pop\n").is_err());
    }
}
