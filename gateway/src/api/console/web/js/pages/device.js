// One device: its registration and state, its latest readings as a chart and a table that grow
// live as readings are committed, enable/disable for the admin, and its dead letters.

import { t } from "../i18n.js";
import { h, api, live, session, fmtNum, fmtTime, table, tzDate, SignedOut } from "../ui.js";
import { stateBadge, protocolName } from "./devices.js";
import { deadLetterTable } from "./deadletters.js";

/** Readings kept per page (the chart's window). */
const KEEP = 2000;

function valueText(r) {
  if (typeof r.value === "number") return fmtNum(r.value, 3);
  if (typeof r.value === "boolean") return r.value ? "true" : "false";
  return r.value ?? t("none");
}

export async function render(root, [id]) {
  const info = h("div");
  const toggle = h("div", { class: "actions" });
  const latest = h("div");
  const picker = h("div", { class: "picker", id: "quantity-picker" });
  const chartBox = h("div", { class: "chart", id: "device-chart" });
  const dls = h("div");
  root.append(
    h("h1", {}, h("a", { href: "#/devices" }, t("nav.devices")), " / ", h("span", { id: "device-id" }, id),
      " ", h("span", { class: "badge" }, t("live"))),
    info, toggle,
    h("section", {}, h("h2", {}, t("dev.latest")), latest),
    h("section", {}, h("h2", {}, t("dev.chart")), picker, chartBox),
    h("section", {}, h("h2", {}, t("dev.deadletters")), dls));

  const showDevice = (d) => {
    info.replaceChildren(table([
      [t("col.name"), (x) => x.name || t("none")],
      [t("col.kind"), (x) => x.kind],
      [t("col.tenant"), (x) => x.tenant],
      [t("col.commune"), (x) => x.commune_code || t("none")],
      [t("dev.position"), (x) => (x.lat != null ? `${x.lat}, ${x.lon}` : t("none"))],
      [t("col.protocol"), (x) => protocolName(x.protocol)],
      [t("col.state"), stateBadge],
      [t("col.online"), (x) => (x.online ? t("yes") : t("no"))],
      [t("col.last_seen"), (x) => h("span", { id: "last-seen" }, fmtTime(x.last_seen_time_ms))],
      [t("dev.created"), (x) => fmtTime(x.created_time_ms)],
    ], [d], { class: "vertical", id: "device-info" }));
    const admin = session.role === "admin";
    const button = h("button", { type: "button", id: "toggle-enabled", disabled: !admin,
      class: d.enabled ? "danger" : "" }, d.enabled ? t("dev.disable") : t("dev.enable"));
    button.addEventListener("click", async () => {
      if (d.enabled && !confirm(t("dev.confirm_disable"))) return;
      button.disabled = true;
      try {
        showDevice(await api(`/devices/${encodeURIComponent(id)}/enabled`, { method: "POST", body: { enabled: !d.enabled } }));
      } catch (e) {
        if (!(e instanceof SignedOut)) toggle.append(h("p", { class: "error" }, e.message));
        button.disabled = false;
      }
    });
    toggle.replaceChildren(button, admin ? "" : h("span", { class: "muted" }, " " + t("dev.readonly")));
  };
  showDevice(await api(`/devices/${encodeURIComponent(id)}`));

  // Readings by id (the stream and the initial load may overlap: ids de-duplicate).
  const readings = new Map();
  let quantity = null;
  let chart = null;
  const numericQuantities = () => [...new Set([...readings.values()]
    .filter((r) => typeof r.value === "number").map((r) => r.quantity))].sort();

  const redraw = () => {
    const all = [...readings.values()].sort((a, b) => a.device_time_ms - b.device_time_ms || a.id - b.id);
    const byQuantity = new Map();
    for (const r of all) byQuantity.set(r.quantity, r);
    latest.replaceChildren(all.length ? table([
      [t("col.quantity"), (r) => r.quantity],
      [t("col.value"), (r) => h("span", { "data-quantity": r.quantity }, valueText(r)), { class: "num" }],
      [t("col.unit"), (r) => r.unit],
      [t("col.time"), (r) => fmtTime(r.device_time_ms)],
      [t("col.protocol"), (r) => r.protocol],
    ], [...byQuantity.values()].sort((a, b) => a.quantity.localeCompare(b.quantity)), { id: "latest" })
      : h("p", { class: "muted" }, t("dev.no_readings")));
    const qs = numericQuantities();
    if (!qs.includes(quantity)) quantity = qs[0] || null;
    picker.replaceChildren(...qs.map((q) => h("button", { type: "button", class: q === quantity ? "current" : "",
      onclick: () => { quantity = q; if (chart) { chart.destroy(); chart = null; } redraw(); } }, q)));
    if (!quantity) return;
    const series = all.filter((r) => r.quantity === quantity && typeof r.value === "number");
    const unit = series.length ? series[series.length - 1].unit : "";
    const data = [series.map((r) => r.device_time_ms / 1000), series.map((r) => r.value)];
    if (!chart) {
      chart = new uPlot({ width: Math.max(320, chartBox.clientWidth || 800), height: 240, tzDate,
        series: [{ label: t("col.time") }, { label: `${quantity}${unit ? ` (${unit})` : ""}`, stroke: "#0b5cad", width: 2,
          points: { show: series.length < 200 } }],
        axes: [{}, { size: 60 }] }, data, chartBox);
    } else {
      chart.setData(data);
    }
    chartBox.dataset.points = String(series.length);
  };

  const add = (rs) => {
    for (const r of rs) readings.set(r.id, r);
    if (readings.size > KEEP) {
      const ids = [...readings.keys()].sort((a, b) => a - b);
      for (const old of ids.slice(0, readings.size - KEEP)) readings.delete(old);
    }
    redraw();
  };
  const reload = async () => add((await api(`/devices/${encodeURIComponent(id)}/readings?limit=500`)).readings);

  // Open the stream first, load once it is ready: nothing committed in between is missed.
  const es = live(`/devices/${encodeURIComponent(id)}`, {
    ready: () => reload().catch(() => {}),
    readings: (rs) => {
      add(rs);
      const last = Math.max(...rs.map((r) => r.received_time_ms));
      const el = document.getElementById("last-seen");
      if (el) el.textContent = fmtTime(last);
    },
    resync: () => reload().catch(() => {}),
  });
  api(`/deadletters?device=${encodeURIComponent(id)}&limit=20`)
    .then((r) => dls.replaceChildren(deadLetterTable(r.dead_letters)))
    .catch(() => {});
  return () => { es.close(); if (chart) chart.destroy(); };
}
