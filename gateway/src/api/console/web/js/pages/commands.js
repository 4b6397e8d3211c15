// Commands: what was asked of devices and what became of it (QUEUED → SENT → DELIVERED →
// SUCCEEDED | FAILED, or EXPIRED when its time to live passed), newest first, updated live as
// each change becomes durable. The admin sends one from here; a row opens its history.

import { t } from "../i18n.js";
import { h, api, live, session, fmtTime, table, SignedOut } from "../ui.js";

const STATES = ["QUEUED", "SENT", "DELIVERED", "SUCCEEDED", "FAILED", "EXPIRED"];

export function commandState(c) {
  return h("span", { class: `state ${c.state.toLowerCase()}` }, t("cmd.state." + c.state));
}

function payloadText(p) {
  if (!p) return "{}";
  if (p.params !== undefined) return JSON.stringify(p.params);
  if (p.raw_hex !== undefined) return `0x${p.raw_hex}`;
  if (p.lwm2m) return `${p.lwm2m.kind} ${p.lwm2m.path} ${p.lwm2m.value}`.trim();
  return "";
}

/** Commands as a table; rows carry data-id and data-state, and `open(c)` runs on a click. */
export function commandTable(rows, open) {
  const el = table([
    [t("col.time"), (c) => fmtTime(c.created_time_ms)],
    [t("col.device"), (c) => h("a", { href: "#/devices/" + encodeURIComponent(c.device_id) }, c.device_id)],
    [t("cmd.name"), (c) => h("code", {}, c.name)],
    [t("cmd.payload"), (c) => h("code", {}, payloadText(c.payload))],
    [t("col.state"), commandState],
    [t("cmd.transport"), (c) => c.transport],
    [t("cmd.by"), (c) => c.created_by],
    [t("cmd.updated"), (c) => fmtTime(c.updated_time_ms)],
    [t("cmd.outcome"), (c) => c.error || c.result],
  ], rows, { id: "commands", class: "wrap" });
  [...el.tBodies[0].rows].forEach((tr, i) => {
    tr.dataset.id = rows[i].id;
    tr.dataset.state = rows[i].state;
    if (open) { tr.classList.add("clickable"); tr.addEventListener("click", (e) => { if (e.target.tagName !== "A") open(rows[i]); }); }
  });
  return el;
}

function detail(c) {
  return h("section", { id: "command-detail" },
    h("h2", {}, `${t("cmd.command")} `, h("code", {}, c.id)),
    table([
      [t("col.state"), commandState],
      [t("cmd.expires"), (x) => fmtTime(x.expires_time_ms)],
      [t("cmd.result"), (x) => x.result || t("none")],
      [t("cmd.error"), (x) => x.error || t("none")],
    ], [c], { class: "vertical" }),
    h("h3", {}, t("cmd.history")),
    table([
      [t("col.state"), (e) => t("cmd.state." + e.state)],
      [t("col.time"), (e) => fmtTime(e.time_ms)],
      [t("cmd.by"), (e) => e.by],
      [t("col.detail"), (e) => e.detail],
    ], c.history, { id: "command-history" }));
}

function sendForm(device, onSent) {
  const status = h("p", { id: "send-status", class: "muted" });
  const form = h("form", { class: "filters send", id: "send-command" },
    h("input", { name: "device_id", required: true, placeholder: t("col.device"), "aria-label": t("col.device"), value: device || "" }),
    h("input", { name: "name", required: true, placeholder: t("cmd.name"), "aria-label": t("cmd.name"), pattern: "[A-Za-z0-9_.\\-]{1,64}", size: 12 }),
    h("input", { name: "params", placeholder: '{"on": true}', "aria-label": t("cmd.params"), size: 30 }),
    h("input", { name: "ttl_min", type: "number", min: 1, max: 43200, value: 60, "aria-label": t("cmd.ttl_min"), title: t("cmd.ttl_min"), size: 5 }),
    h("button", { type: "submit" }, t("cmd.send")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = form.elements;
    let params;
    try {
      params = f.params.value.trim() ? JSON.parse(f.params.value) : undefined;
      if (params !== undefined && (typeof params !== "object" || params === null || Array.isArray(params))) throw new Error();
    } catch (_) {
      status.className = "error";
      status.textContent = t("cmd.params_invalid");
      return;
    }
    try {
      const c = await api("/commands", { method: "POST", body: {
        device_id: f.device_id.value.trim(), name: f.name.value.trim(), params,
        ttl_s: Number(f.ttl_min.value || 60) * 60 } });
      status.className = "muted";
      status.textContent = `${t("cmd.sent")}: ${c.id}`;
      onSent(c);
    } catch (err) {
      if (err instanceof SignedOut) return;
      status.className = "error";
      status.textContent = `${t("error")}: ${err.message}`;
    }
  });
  return [h("h2", {}, t("cmd.send_title")), form, status];
}

export function render(root, [device]) {
  const filters = h("form", { class: "filters", id: "command-filters" },
    h("input", { name: "device", type: "search", placeholder: t("col.device"), "aria-label": t("col.device"), value: device || "" }),
    h("select", { name: "state", "aria-label": t("col.state") },
      h("option", { value: "" }, `${t("col.state")}: ${t("dev.all")}`),
      ...STATES.map((s) => h("option", { value: s }, t("cmd.state." + s)))));
  const list = h("div");
  const more = h("button", { type: "button", hidden: true }, t("more"));
  const opened = h("div");
  const byId = new Map();
  let openId = null;
  const show = () => {
    const rows = [...byId.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
    list.replaceChildren(rows.length ? commandTable(rows, (c) => { openId = c.id; show(); })
      : h("p", { class: "muted" }, t("cmd.none")));
    const o = openId && byId.get(openId);
    opened.replaceChildren(o ? detail(o) : "");
  };
  const matches = (c) => {
    const f = filters.elements;
    return (!f.device.value.trim() || c.device_id === f.device.value.trim())
      && (!f.state.value || c.state === f.state.value);
  };
  const admin = session.role === "admin";
  root.append(
    h("h1", {}, t("nav.commands"), " ", h("span", { class: "badge" }, t("live"))),
    admin ? h("section", {}, ...sendForm(device, (c) => { if (matches(c)) { byId.set(c.id, c); show(); } }))
      : h("p", { class: "muted", id: "commands-readonly" }, t("cmd.readonly")),
    filters, list, more, opened);

  let before = "";
  let generation = 0;
  const load = async (reset) => {
    const gen = reset ? ++generation : generation;
    const q = new URLSearchParams({ limit: "100" });
    const f = filters.elements;
    if (f.device.value.trim()) q.set("device", f.device.value.trim());
    if (f.state.value) q.set("state", f.state.value);
    if (!reset && before) q.set("before", before);
    const r = await api("/commands?" + q.toString());
    if (gen !== generation) return;
    if (reset) byId.clear();
    for (const c of r.commands) byId.set(c.id, c);
    before = r.commands.length ? r.commands[r.commands.length - 1].id : "";
    more.hidden = r.commands.length < 100;
    show();
  };
  let timer = null;
  filters.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => load(true).catch(() => {}), 300); });
  filters.addEventListener("submit", (e) => { e.preventDefault(); load(true).catch(() => {}); });
  more.addEventListener("click", () => load(false).catch(() => {}));

  // Open the stream first, load once it is ready: no change in between is missed.
  const es = live("/commands", {
    ready: () => load(true).catch(() => {}),
    command: (c) => { if (matches(c)) { byId.set(c.id, c); show(); } },
    resync: () => load(true).catch(() => {}),
  });
  return () => { es.close(); clearTimeout(timer); };
}
