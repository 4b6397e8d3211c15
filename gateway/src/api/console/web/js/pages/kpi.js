// KPI: connections per resident of the city and of every commune against the year's target; the
// communes as an SVG map coloured by attainment (boundaries when configured, else centroids);
// a sortable table and the CSV download.

import { t } from "../i18n.js";
import { h, api, fmtNum, fmtSmall, fmtTime } from "../ui.js";

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** Red (0 %) → amber (50 %) → green (≥ 100 %) on a 0..1 scale. */
function colour(x) {
  const v = Math.max(0, Math.min(1, x));
  const hue = v * 120;
  return `hsl(${hue.toFixed(0)}, 70%, ${(48 - v * 8).toFixed(0)}%)`;
}

function mapSvg(geo, byCode, mode, maxDensity) {
  const communes = geo.communes;
  const pts = communes.flatMap((c) => (c.rings.length ? c.rings.flat() : [[c.lon, c.lat]]));
  const lons = pts.map((p) => p[0]);
  const lats = pts.map((p) => p[1]);
  const [minLon, maxLon, minLat, maxLat] = [Math.min(...lons), Math.max(...lons), Math.min(...lats), Math.max(...lats)];
  const k = Math.cos(((minLat + maxLat) / 2) * Math.PI / 180);
  const W = 640;
  const pad = 16;
  const scale = (W - 2 * pad) / Math.max(1e-6, (maxLon - minLon) * k);
  const H = Math.round((maxLat - minLat) * scale + 2 * pad);
  const x = (lon) => pad + (lon - minLon) * k * scale;
  const y = (lat) => pad + (maxLat - lat) * scale;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "map", role: "img", id: "kpi-map" });
  for (const c of communes) {
    const f = (byCode.get(c.code) || {}).figures || {};
    let fill = "#e3e6ea";
    if (mode === "attainment" && f.attainment_percent !== undefined && f.attainment_percent !== null) {
      fill = colour(f.attainment_percent / 100);
    } else if (mode === "density" && f.active > 0) {
      fill = colour(Math.sqrt(f.active_per_km2 / maxDensity));
    }
    const title = s("title", {}, `${c.name} (${c.code}): ${fmtNum(f.active || 0)} / ${fmtNum(f.registered || 0)}`
      + (f.attainment_percent != null ? ` · ${fmtNum(f.attainment_percent, 1)} %` : ""));
    const attrs = { fill, "data-code": c.code, class: "commune" };
    if (c.rings.length) {
      const d = c.rings.map((r) => "M" + r.map(([lon, lat]) => `${x(lon).toFixed(1)},${y(lat).toFixed(1)}`).join("L") + "Z").join("");
      svg.append(s("path", { ...attrs, d, "fill-rule": "evenodd" }, title));
    } else {
      // The radius of a disc of the commune's area, shrunk so neighbours overlap less.
      const km = Math.sqrt((c.area_km2 || 1) / Math.PI);
      const r = Math.min(12, Math.max(2.5, km * (scale / 111) * 0.7));
      svg.append(s("circle", { ...attrs, cx: x(c.lon).toFixed(1), cy: y(c.lat).toFixed(1), r: r.toFixed(1) }, title));
    }
  }
  return svg;
}

function legend(mode) {
  const stops = [0, 0.25, 0.5, 0.75, 1];
  const swatches = stops.map((v) => {
    const el = h("span", { class: "swatch" }, mode === "attainment" ? `${v * 100} %` : "");
    el.style.background = colour(v); // CSSOM, allowed by the page's style-src 'self'
    return el;
  });
  return h("div", { class: "legend" },
    h("span", {}, t(mode === "attainment" ? "kpi.legend.attainment" : "kpi.legend.density")),
    ...swatches, h("span", { class: "swatch none" }, t("kpi.legend.none")));
}

const columns = [
  ["code", "col.code", (c) => c.code],
  ["name", "col.name", (c) => c.name],
  ["registered", "kpi.registered", (c) => c.figures.registered],
  ["active", "kpi.active", (c) => c.figures.active],
  ["silent", "state.silent", (c) => c.figures.silent],
  ["disabled", "state.disabled", (c) => c.figures.disabled],
  ["population", "col.population", (c) => c.figures.population ?? null],
  ["per_resident", "col.per_resident", (c) => c.figures.connections_per_resident ?? null],
  ["attainment", "col.attainment", (c) => c.figures.attainment_percent ?? null],
  ["per_km2", "col.per_km2", (c) => c.figures.active_per_km2],
];

function sortedTable(communes) {
  let key = "code";
  let dir = 1;
  const tbody = h("tbody");
  const fill = () => {
    const get = columns.find(([k]) => k === key)[2];
    const rows = [...communes].sort((a, b) => {
      const [va, vb] = [get(a), get(b)];
      if (va === vb) return a.code.localeCompare(b.code);
      if (va === null) return 1;
      if (vb === null) return -1;
      return (typeof va === "string" ? va.localeCompare(vb, "vi") : va - vb) * dir;
    });
    tbody.replaceChildren(...rows.map((c) => h("tr", { "data-code": c.code },
      ...columns.map(([k, , get2]) => {
        const v = get2(c);
        const text = typeof v === "string" ? v
          : k === "per_resident" ? fmtSmall(v)
          : k === "attainment" ? (v === null ? t("none") : `${fmtSmall(v)} %`)
          : k === "per_km2" ? fmtNum(v, 2) : fmtNum(v);
        return h("td", { class: typeof v === "string" ? null : "num" }, text);
      }))));
    for (const th of thead.querySelectorAll("th")) {
      th.dataset.sort = th.dataset.key === key ? (dir > 0 ? "asc" : "desc") : "";
    }
  };
  const thead = h("thead", {}, h("tr", {}, ...columns.map(([k, label]) =>
    h("th", { "data-key": k, class: "sortable", onclick: () => {
      dir = key === k ? -dir : (k === "code" || k === "name" ? 1 : -1);
      key = k;
      fill();
    } }, t(label)))));
  fill();
  return h("table", { id: "kpi-table" }, thead, tbody);
}

export async function render(root) {
  root.append(h("p", { class: "muted" }, t("loading")));
  const [r, geo] = await Promise.all([api("/kpi"), api("/kpi/map")]);
  root.replaceChildren();
  const city = r.city;
  const byCode = new Map(r.communes.map((c) => [c.code, c]));
  const mode = r.communes.some((c) => c.figures.attainment_percent != null) ? "attainment" : "density";
  const maxDensity = Math.max(1e-9, ...r.communes.map((c) => c.figures.active_per_km2 || 0));
  const proj = (r.projections || []).map((p) => h("li", {},
    `${p.year}: ${fmtNum(p.per_resident, 2)} / ${t("kpi.per_resident").toLowerCase()} — `,
    t("status." + p.status), p.projected_date ? ` (${p.projected_date})` : "",
    ` · ${t("kpi.needed")}: ${fmtNum(p.devices_still_needed)}`));
  root.append(
    h("h1", {}, `${t("kpi.title")} — ${r.city_name}`),
    h("p", { class: "muted" }, `${r.date} · ${fmtTime(r.computed_time_ms)}`),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.per_resident")),
        h("div", { class: "value", "data-metric": "kpi.per_resident" }, fmtSmall(city.connections_per_resident))),
      h("div", { class: "card" }, h("div", { class: "label" }, `${t("kpi.target")} ${r.target_year}`),
        h("div", { class: "value" }, fmtNum(city.target_per_resident, 2))),
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.attainment")),
        h("div", { class: "value", "data-metric": "kpi.attainment" },
          city.attainment_percent == null ? t("none") : `${fmtSmall(city.attainment_percent)} %`)),
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.active")),
        h("div", { class: "value", "data-metric": "kpi.active" }, fmtNum(city.active))),
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.registered")),
        h("div", { class: "value", "data-metric": "kpi.registered" }, fmtNum(city.registered))),
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.population")),
        h("div", { class: "value" }, fmtNum(city.population))),
      h("div", { class: "card" }, h("div", { class: "label" }, t("kpi.needed")),
        h("div", { class: "value" }, fmtNum(city.devices_needed)))),
    h("section", {}, h("h2", {}, t("kpi.projection")),
      h("p", { class: "muted" }, `${t("kpi.growth")}: ${fmtNum(r.growth_per_day, 1)}`),
      h("ul", {}, proj)),
    h("section", { class: "map-box" }, h("h2", {}, t("kpi.map")),
      h("p", { class: "muted" }, t(geo.attribution === "boundaries" ? "kpi.boundaries" : "kpi.centroids")),
      mapSvg(geo, byCode, mode, maxDensity), legend(mode)),
    h("section", {},
      h("h2", {}, h("span", { id: "commune-count" }, String(r.communes.length)), ` ${t("kpi.communes")} `,
        h("a", { href: "/console/api/kpi.csv", download: "", class: "button", id: "kpi-csv" }, t("kpi.csv"))),
      h("div", { class: "scroll" }, sortedTable(r.communes))),
  );
}
