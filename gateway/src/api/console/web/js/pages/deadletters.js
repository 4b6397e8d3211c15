// Dead letters: what the gateway refused and why, newest first, filtered by device.

import { t } from "../i18n.js";
import { h, api, fmtNum, fmtTime, table } from "../ui.js";

/** The first bytes of a refused payload, shown as text (never as HTML), cut for the table. */
function payload(d) {
  const text = d.payload.length > 160 ? d.payload.slice(0, 160) + "…" : d.payload;
  return h("code", { class: d.payload_encoding === "hex" ? "hex" : "", title: d.payload_encoding }, text);
}

export function deadLetterTable(rows) {
  if (!rows.length) return h("p", { class: "muted" }, t("dl.none"));
  return table([
    [t("col.time"), (d) => fmtTime(d.received_time_ms)],
    [t("col.device"), (d) => h("a", { href: "#/devices/" + encodeURIComponent(d.device_id) }, d.device_id)],
    [t("col.protocol"), (d) => d.protocol],
    [t("col.reason"), (d) => h("code", {}, d.reason)],
    [t("col.detail"), (d) => d.detail],
    [t("col.address"), (d) => d.address],
    [t("col.payload"), payload],
    [t("col.size"), (d) => fmtNum(d.payload_size), { class: "num" }],
  ], rows, { id: "dead-letters", class: "wrap" });
}

export function render(root) {
  const filter = h("input", { type: "search", placeholder: t("dl.filter"), "aria-label": t("dl.filter") });
  const list = h("div");
  const more = h("button", { type: "button", hidden: true }, t("more"));
  root.append(h("h1", {}, t("nav.deadletters")), h("form", { class: "filters" }, filter), list, more);
  let rows = [];
  let before = 0;
  let generation = 0;
  const load = async (reset) => {
    const gen = reset ? ++generation : generation;
    const q = new URLSearchParams({ limit: "100" });
    if (filter.value.trim()) q.set("device", filter.value.trim());
    if (!reset && before) q.set("before", String(before));
    const r = await api("/deadletters?" + q.toString());
    if (gen !== generation) return;
    rows = reset ? r.dead_letters : rows.concat(r.dead_letters);
    before = r.next_before || 0;
    more.hidden = !r.next_before;
    list.replaceChildren(deadLetterTable(rows));
  };
  let timer = null;
  filter.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => load(true), 300); });
  filter.form.addEventListener("submit", (e) => { e.preventDefault(); load(true); });
  more.addEventListener("click", () => load(false));
  return load(true).then(() => () => clearTimeout(timer));
}
