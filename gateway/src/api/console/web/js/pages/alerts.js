// Alerts: what the rules raised (ThingsBoard's lifecycle: active or cleared, acknowledged or
// not), newest first, updated live as each change becomes durable; counts of the active ones by
// severity; the admin acknowledges and clears from here; a row opens its history (who, when);
// the rules in force below, where the admin adds (TOML, as in the config file) and removes rules
// at run time.

import { t } from "../i18n.js";
import { h, api, live, session, fmtTime, fmtNum, table, card, SignedOut } from "../ui.js";

export const SEVERITIES = ["critical", "major", "minor", "warning"];
const STATES = ["ACTIVE_UNACK", "ACTIVE_ACK", "CLEARED_UNACK", "CLEARED_ACK"];
const isActive = (a) => a.state.startsWith("ACTIVE");

export function severityBadge(s) {
  return h("span", { class: `sev ${s}` }, t("al.sev." + s));
}

function stateBadge(a) {
  return h("span", { class: `state al-${a.state.toLowerCase()}` }, t("al.state." + a.state));
}

const commune = (a) => (a.commune_name ? `${a.commune_name} (${a.commune_code})` : a.commune_code || t("none"));
const byWhen = (time, by) => (time ? `${fmtTime(time)} · ${by}` : t("none"));

/** Acknowledge / clear buttons for the admin; none for a read-only operator. */
function actions(a, change) {
  if (session.role !== "admin") return "";
  const button = (what, label, cls) => h("button", {
    type: "button", class: `small ${cls}`, "data-action": what,
    onclick: (e) => { e.stopPropagation(); change(a, what); },
  }, label);
  return h("span", { class: "row-actions" },
    a.state.endsWith("_UNACK") ? button("ack", t("al.ack"), "") : "",
    isActive(a) ? button("clear", t("al.clear"), "danger") : "");
}

function alertTable(rows, open, change) {
  const el = table([
    [t("al.raised"), (a) => fmtTime(a.raised_time_ms)],
    [t("al.severity"), (a) => severityBadge(a.severity)],
    [t("al.rule"), (a) => h("code", {}, a.rule)],
    [t("col.device"), (a) => h("a", { href: "#/devices/" + encodeURIComponent(a.device_id) }, a.device_id)],
    [t("col.commune"), commune],
    [t("al.message"), (a) => a.message],
    [t("col.state"), stateBadge],
    [t("al.cleared"), (a) => byWhen(a.cleared_time_ms, a.cleared_by)],
    [t("al.acked"), (a) => byWhen(a.acked_time_ms, a.acked_by)],
    ["", (a) => actions(a, change)],
  ], rows, { id: "alerts", class: "wrap" });
  [...el.tBodies[0].rows].forEach((tr, i) => {
    const a = rows[i];
    Object.assign(tr.dataset, { id: a.id, state: a.state, severity: a.severity, rule: a.rule });
    tr.classList.add("clickable");
    if (isActive(a)) tr.classList.add("alert-active");
    tr.addEventListener("click", (e) => { if (e.target.tagName !== "A") open(a); });
  });
  return el;
}

function detail(a, change) {
  return h("section", { id: "alert-detail", "data-id": a.id, "data-state": a.state },
    h("h2", {}, `${t("al.alert")} `, h("code", {}, a.id), " ", actions(a, change)),
    table([
      [t("al.severity"), (x) => severityBadge(x.severity)],
      [t("col.state"), stateBadge],
      [t("al.rule"), (x) => h("code", {}, x.rule)],
      [t("col.device"), (x) => `${x.device_id} · ${x.kind} · ${x.tenant}`],
      [t("col.commune"), commune],
      [t("col.quantity"), (x) => (x.quantity ? `${x.quantity} = ${fmtNum(x.value, 3)}` : t("none"))],
      [t("al.message"), (x) => x.message],
      [t("al.commands"), (x) => (x.command_ids.length ? x.command_ids.map((id) =>
        h("a", { href: "#/commands", title: id }, h("code", {}, id.slice(0, 8)), " ")) : t("none"))],
    ], [a], { class: "vertical" }),
    h("h3", {}, t("al.history")),
    table([
      [t("col.time"), (e) => fmtTime(e.time_ms)],
      [t("col.state"), (e) => t("al.state." + e.state)],
      [t("al.by"), (e) => e.by],
      [t("col.detail"), (e) => e.detail],
    ], a.history, { id: "alert-history" }));
}

function rulesTable(rules, remove) {
  if (!rules.length) return h("p", { class: "muted", id: "rules" }, t("al.no_rules"));
  const origin = (r) => (r.origin === "api"
    ? `${t("al.origin.api")} · ${r.added_by} · ${fmtTime(r.added_time_ms)}` : t("al.origin.config"));
  const scope = (r) => ["tenant", "kind", "commune", "device"].filter((k) => r[k])
    .map((k) => `${k}=${r[k]}`).join(" ") || t("dev.all");
  const el = table([
    [t("col.name"), (r) => h("code", {}, r.name)],
    [t("al.severity"), (r) => severityBadge(r.severity)],
    [t("al.condition"), (r) => r.description],
    [t("al.scope"), scope],
    [t("al.action"), (r) => r.action_command || t("none")],
    [t("al.active_count"), (r) => fmtNum(r.active), { class: "num" }],
    [t("al.origin"), origin],
    ["", (r) => (session.role === "admin" && r.origin === "api" ? h("button", {
      type: "button", class: "small danger", "data-action": "remove", onclick: () => remove(r),
    }, t("al.remove")) : "")],
  ], rules, { id: "rules" });
  [...el.tBodies[0].rows].forEach((tr, i) => { tr.dataset.name = rules[i].name; });
  return el;
}

const EXAMPLE = 'name = "water-high"\nquantity = "water_level"\nabove = 2.5\nfor = "5m"\n'
  + 'clear = 2.3\nseverity = "major"\nkind = "water_level"';

/** The admin's form: one rule as a `[[rules]]` table, checked by the gateway like the config. */
function addRuleForm(onAdded) {
  const status = h("p", { class: "muted", id: "rule-status" });
  const form = h("form", { id: "add-rule", class: "add-rule" },
    h("label", { for: "rule-definition" }, t("al.add_rule_help")),
    h("textarea", { id: "rule-definition", name: "definition", rows: 7, cols: 60, required: true,
      spellcheck: "false", placeholder: EXAMPLE }),
    h("div", {}, h("button", { type: "submit" }, t("al.add_rule"))));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await api("/rules", { method: "POST", body: { definition: form.elements.definition.value } });
      status.className = "muted";
      status.textContent = `${t("al.rule_added")}: ${r.name}`;
      form.elements.definition.value = "";
      onAdded();
    } catch (err) {
      if (err instanceof SignedOut) return;
      status.className = "error";
      status.textContent = `${t("error")}: ${err.message}`;
    }
  });
  return [form, status];
}

export function render(root, [openParam]) {
  const filters = h("form", { class: "filters", id: "alert-filters" },
    h("select", { name: "state", "aria-label": t("col.state") },
      h("option", { value: "" }, `${t("col.state")}: ${t("dev.all")}`),
      h("option", { value: "active" }, t("al.active")),
      ...STATES.map((s) => h("option", { value: s }, t("al.state." + s)))),
    h("select", { name: "severity", "aria-label": t("al.severity") },
      h("option", { value: "" }, `${t("al.severity")}: ${t("dev.all")}`),
      ...SEVERITIES.map((s) => h("option", { value: s }, t("al.sev." + s)))),
    h("select", { name: "rule", "aria-label": t("al.rule") },
      h("option", { value: "" }, `${t("al.rule")}: ${t("dev.all")}`)),
    h("input", { name: "device", type: "search", placeholder: t("col.device"), "aria-label": t("col.device") }));
  const counts = h("div", { class: "cards", id: "alert-counts" });
  const status = h("p", { class: "muted", id: "alert-status" });
  const list = h("div");
  const more = h("button", { type: "button", hidden: true }, t("more"));
  const opened = h("div");
  const rulesBox = h("div");
  const byId = new Map();
  const active = new Map();
  let openId = openParam || null;

  const showCounts = () => {
    const n = Object.fromEntries(SEVERITIES.map((s) => [s, 0]));
    for (const a of active.values()) n[a.severity] = (n[a.severity] || 0) + 1;
    counts.replaceChildren(...SEVERITIES.map((s) =>
      card(`${t("al.active")} · ${t("al.sev." + s)}`, fmtNum(n[s]), `alerts.active.${s}`)));
  };
  const change = async (a, what) => {
    if (what === "clear" && !window.confirm(t("al.confirm_clear"))) return;
    try {
      const changed = await api(`/alerts/${encodeURIComponent(a.id)}/${what}`, { method: "POST" });
      status.className = "muted";
      status.textContent = "";
      upsert(changed);
    } catch (err) {
      if (err instanceof SignedOut) return;
      status.className = "error";
      status.textContent = `${t("error")}: ${err.message}`;
    }
  };
  const show = () => {
    const rows = [...byId.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
    list.replaceChildren(rows.length ? alertTable(rows, (a) => { openId = a.id; show(); }, change)
      : h("p", { class: "muted" }, t("al.none")));
    const o = openId && byId.get(openId);
    opened.replaceChildren(o ? detail(o, change) : "");
    root.dataset.alerts = String(rows.length);
  };
  const matches = (a) => {
    const f = filters.elements;
    return (!f.state.value || (f.state.value === "active" ? isActive(a) : a.state === f.state.value))
      && (!f.severity.value || a.severity === f.severity.value)
      && (!f.rule.value || a.rule === f.rule.value)
      && (!f.device.value.trim() || a.device_id === f.device.value.trim());
  };
  function upsert(a) {
    if (isActive(a)) active.set(a.id, a); else active.delete(a.id);
    showCounts();
    if (matches(a) || a.id === openId) byId.set(a.id, a); else byId.delete(a.id);
    show();
  }

  const admin = session.role === "admin";
  root.append(
    h("h1", {}, t("nav.alerts"), " ", h("span", { class: "badge" }, t("live"))),
    counts,
    admin ? "" : h("p", { class: "muted", id: "alerts-readonly" }, t("al.readonly")),
    filters, status, list, more, opened,
    h("section", { id: "rules-section" }, h("h2", {}, t("al.rules")), rulesBox,
      session.role === "admin" ? addRuleForm(() => loadRules().catch(() => {})) : ""));

  let before = "";
  let generation = 0;
  const load = async (reset) => {
    const gen = reset ? ++generation : generation;
    const q = new URLSearchParams({ limit: "100" });
    const f = filters.elements;
    for (const k of ["state", "severity", "rule"]) if (f[k].value) q.set(k, f[k].value);
    if (f.device.value.trim()) q.set("device", f.device.value.trim());
    if (!reset && before) q.set("before", before);
    const [r, act] = await Promise.all([api("/alerts?" + q.toString()),
      reset ? api("/alerts?state=active&limit=1000") : null]);
    if (gen !== generation) return;
    if (reset) {
      byId.clear();
      active.clear();
      for (const a of act.alerts) active.set(a.id, a);
      showCounts();
      if (openId && !r.alerts.some((a) => a.id === openId)) {
        const o = await api("/alerts/" + encodeURIComponent(openId)).catch(() => null);
        if (o) byId.set(o.id, o);
      }
    }
    for (const a of r.alerts) byId.set(a.id, a);
    before = r.alerts.length ? r.alerts[r.alerts.length - 1].id : "";
    more.hidden = r.alerts.length < 100;
    show();
  };
  const loadRules = async () => {
    const { rules } = await api("/rules");
    rulesBox.replaceChildren(rulesTable(rules, removeRule));
    const select = filters.elements.rule;
    const chosen = select.value;
    select.replaceChildren(h("option", { value: "" }, `${t("al.rule")}: ${t("dev.all")}`),
      ...rules.map((r) => h("option", { value: r.name }, r.name)));
    select.value = chosen;
  };
  const removeRule = async (r) => {
    if (!window.confirm(t("al.confirm_remove").replace("{name}", r.name))) return;
    try {
      await api(`/rules/${encodeURIComponent(r.name)}/remove`, { method: "POST" });
      await loadRules();
    } catch (err) {
      if (err instanceof SignedOut) return;
      status.className = "error";
      status.textContent = `${t("error")}: ${err.message}`;
    }
  };
  let timer = null;
  filters.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => load(true).catch(() => {}), 300); });
  filters.addEventListener("submit", (e) => { e.preventDefault(); load(true).catch(() => {}); });
  more.addEventListener("click", () => load(false).catch(() => {}));

  // Open the stream first, load once it is ready: no change in between is missed.
  let rulesTimer = null;
  const es = live("/alerts", {
    ready: () => { load(true).catch(() => {}); loadRules().catch(() => {}); },
    alert: (a) => {
      upsert(a);
      // The rules' active counts follow (once per burst).
      clearTimeout(rulesTimer);
      rulesTimer = setTimeout(() => loadRules().catch(() => {}), 500);
    },
    resync: () => load(true).catch(() => {}),
  });
  return () => { es.close(); clearTimeout(timer); clearTimeout(rulesTimer); };
}
