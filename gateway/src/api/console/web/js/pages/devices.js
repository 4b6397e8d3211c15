// Devices: search by id or name, filter by tenant, kind, protocol and state, page on.

import { t } from "../i18n.js";
import { h, api, fmtTime, table } from "../ui.js";

const KINDS = ["air_quality", "noise", "water_level", "flood", "rain", "weather", "traffic",
  "parking", "street_light", "energy_meter", "water_meter", "fire_alarm", "waste_bin",
  "soil_moisture", "generic"];
const PROTOCOLS = ["mqtt", "coap", "lwm2m", "lorawan", "none"];
const STATES = ["active", "silent", "disabled", "online"];

export function stateBadge(d) {
  return h("span", { class: `state ${d.state}` }, t("state." + d.state));
}

export function protocolName(p) {
  return p === "none" ? t("proto.none") : p;
}

function select(name, values, label) {
  return h("select", { name, "aria-label": label },
    h("option", { value: "" }, `${label}: ${t("dev.all")}`),
    ...values.map((v) => h("option", { value: v }, name === "state" ? t("state." + v)
      : name === "protocol" ? protocolName(v) : v)));
}

export function render(root) {
  const params = new URLSearchParams(sessionStorage.getItem("citygw.devices") || "");
  const form = h("form", { class: "filters", id: "device-filters" },
    h("input", { name: "q", type: "search", placeholder: t("dev.search"), "aria-label": t("dev.search") }),
    h("input", { name: "tenant", placeholder: t("col.tenant"), "aria-label": t("col.tenant"), size: 10 }),
    select("kind", KINDS, t("col.kind")),
    select("protocol", PROTOCOLS, t("col.protocol")),
    select("state", STATES, t("col.state")));
  for (const el of form.elements) el.value = params.get(el.name) || "";
  const list = h("div");
  const more = h("button", { type: "button", hidden: true }, t("more"));
  root.append(h("h1", {}, t("nav.devices")), form, list, more);

  let after = null;
  let rows = [];
  let generation = 0;
  const load = async (reset) => {
    const gen = reset ? ++generation : generation;
    const q = new URLSearchParams();
    for (const el of form.elements) if (el.value) q.set(el.name, el.value);
    sessionStorage.setItem("citygw.devices", q.toString());
    if (!reset && after) q.set("after", after);
    const r = await api("/devices?" + q.toString());
    if (gen !== generation) return; // a newer search replaced this one
    rows = reset ? r.devices : rows.concat(r.devices);
    after = r.next_after;
    more.hidden = !after;
    list.replaceChildren(rows.length ? table([
      [t("col.id"), (d) => h("a", { href: "#/devices/" + encodeURIComponent(d.id) }, d.id)],
      [t("col.name"), (d) => d.name],
      [t("col.kind"), (d) => d.kind],
      [t("col.tenant"), (d) => d.tenant],
      [t("col.commune"), (d) => d.commune_code],
      [t("col.protocol"), (d) => protocolName(d.protocol)],
      [t("col.state"), stateBadge],
      [t("col.online"), (d) => (d.online ? t("yes") : t("no"))],
      [t("col.last_seen"), (d) => fmtTime(d.last_seen_time_ms)],
    ], rows, { id: "devices" }) : h("p", { class: "muted" }, t("dev.none_found")));
  };
  let timer = null;
  const later = () => { clearTimeout(timer); timer = setTimeout(() => load(true), 250); };
  form.addEventListener("input", later);
  form.addEventListener("change", later); // selects announce a choice with change only
  form.addEventListener("submit", (e) => { e.preventDefault(); load(true); });
  more.addEventListener("click", () => load(false));
  return load(true).then(() => () => clearTimeout(timer));
}
