// Overview: devices by state, protocol and kind; active alerts by severity; ingest rate as a live
// chart; refusals by reason; sink lag; store commit latency. One server-sent event stream feeds
// all of it.

import { t } from "../i18n.js";
import { h, live, fmtNum, fmtTime, table, card, tzDate } from "../ui.js";
import { SEVERITIES } from "./alerts.js";

function counts(label) {
  return [
    [label[0], label[1]],
    [t("ov.registered"), (g) => fmtNum(g.registered), { class: "num" }],
    [t("ov.active"), (g) => fmtNum(g.active), { class: "num" }],
    [t("ov.silent"), (g) => fmtNum(g.silent), { class: "num" }],
    [t("ov.disabled"), (g) => fmtNum(g.disabled), { class: "num" }],
    [t("ov.online"), (g) => fmtNum(g.online), { class: "num" }],
  ];
}

const protoName = (p) => (p === "none" ? t("proto.none") : p);

function refusalTable(rows, id, empty) {
  if (!rows.length) return h("p", { class: "muted", id }, t(empty));
  return table([
    [t("col.protocol"), (r) => r.protocol],
    [t("col.reason"), (r) => h("code", {}, r.reason)],
    [t("col.count"), (r) => fmtNum(r.count), { class: "num" }],
  ], rows, { id });
}

export function render(root) {
  const cards = h("div", { class: "cards" });
  const alerts = h("div", { class: "cards", id: "overview-alerts" });
  const chartBox = h("div", { class: "chart" });
  const rates = h("p", { class: "muted" });
  const byProtocol = h("div");
  const byKind = h("div");
  const refused = h("div");
  const auth = h("div");
  const sinks = h("div");
  const store = h("div", { class: "cards" });
  const cluster = h("section", { id: "cluster", hidden: true });
  const stamp = h("span", { class: "muted live-stamp" });
  root.append(
    h("h1", {}, t("nav.overview"), " ", h("span", { class: "badge" }, t("live")), " ", stamp),
    cards,
    h("section", {}, h("h2", {}, h("a", { href: "#/alerts" }, t("ov.alerts"))), alerts),
    h("section", {}, h("h2", {}, t("ov.ingest")), rates, chartBox),
    h("div", { class: "cols" },
      h("section", {}, h("h2", {}, t("ov.by_protocol")), byProtocol),
      h("section", {}, h("h2", {}, t("ov.by_kind")), byKind)),
    h("div", { class: "cols" },
      h("section", {}, h("h2", {}, t("ov.refused")), refused),
      h("section", {}, h("h2", {}, t("ov.auth_failures")), auth)),
    h("div", { class: "cols" },
      h("section", {}, h("h2", {}, t("ov.sinks")), sinks),
      h("section", {}, h("h2", {}, t("ov.store")), store)),
    cluster,
  );

  let chart = null;
  const draw = (hist) => {
    const data = [hist.time_ms.map((ms) => ms / 1000), hist.readings_per_s, hist.messages_per_s];
    if (!chart) {
      chart = new uPlot({
        width: Math.max(320, chartBox.clientWidth || 800), height: 220, tzDate,
        series: [{ label: t("col.time") }, { label: t("ov.readings_per_s"), stroke: "#0b5cad", width: 2 },
          { label: t("ov.messages_per_s"), stroke: "#d9822b", width: 2 }],
        axes: [{}, { size: 60 }],
      }, data, chartBox);
    } else {
      chart.setData(data);
    }
  };

  const update = (o) => {
    const d = o.devices;
    stamp.textContent = fmtTime(o.time_ms);
    cards.replaceChildren(
      card(t("ov.registered"), fmtNum(d.registered), "devices.registered"),
      card(t("ov.active"), fmtNum(d.active), "devices.active"),
      card(t("ov.silent"), fmtNum(d.silent), "devices.silent"),
      card(t("ov.disabled"), fmtNum(d.disabled), "devices.disabled"),
      card(t("ov.online"), fmtNum(d.online), "devices.online"),
      card(t("ov.readings_total"), fmtNum(o.ingest.readings_total), "ingest.readings_total"),
    );
    const al = o.alerts_active || {};
    alerts.replaceChildren(...SEVERITIES.map((s) => h("a", { href: "#/alerts", class: "card-link" },
      card(t("al.sev." + s), fmtNum(al[s] || 0), `alerts.active.${s}`))));
    rates.replaceChildren(
      h("span", { "data-metric": "ingest.readings_per_s" }, fmtNum(o.ingest.readings_per_s, 1)),
      ` ${t("ov.readings_per_s")} · `,
      h("span", { "data-metric": "ingest.messages_per_s" }, fmtNum(o.ingest.messages_per_s, 1)),
      ` ${t("ov.messages_per_s")}`);
    draw(o.ingest.history);
    byProtocol.replaceChildren(table(counts([t("col.protocol"), (g) => protoName(g.name)]),
      d.by_protocol, { id: "by-protocol" }));
    byKind.replaceChildren(table(counts([t("col.kind"), (g) => g.name]), d.by_kind, { id: "by-kind" }));
    refused.replaceChildren(refusalTable(o.refused, "refused", "ov.nothing_refused"));
    auth.replaceChildren(refusalTable(o.auth_failures, "auth-failures", "ov.no_auth_failures"));
    sinks.replaceChildren(o.sinks.length ? table([
      [t("col.name"), (s) => `${s.name} (${s.kind})`],
      [t("col.lag_readings"), (s) => fmtNum(s.lag_readings), { class: "num" }],
      [t("col.lag_seconds"), (s) => fmtNum(s.lag_seconds, 1), { class: "num" }],
      [t("col.last_success"), (s) => fmtTime(s.last_success_ms)],
    ], o.sinks, { id: "sinks" }) : h("p", { class: "muted" }, t("ov.no_sinks")));
    const ms = (v) => (v === null || v === undefined ? t("none") : `${fmtNum(v, 2)} ms`);
    store.replaceChildren(
      card(t("ov.commit_mean"), ms(o.store.commit_mean_ms), "store.commit_mean_ms"),
      card(t("ov.commit_p99"), ms(o.store.commit_p99_ms), "store.commit_p99_ms"),
      card(t("ov.commits_total"), fmtNum(o.store.commits_total), "store.commits_total"),
      card(t("ov.queue_depth"), fmtNum(o.store.queue_depth), "store.queue_depth"),
      card(t("ov.last_reading_id"), fmtNum(o.store.last_reading_id), "store.last_reading_id"),
      card(t("ov.commit_errors"), fmtNum(o.store.commit_errors_total), "store.commit_errors_total"),
    );
    const c = o.cluster || {};
    cluster.hidden = c.backend !== "jetstream";
    if (!cluster.hidden) {
      const leases = (c.sink_leases || []).map((l) => `${l.sink} → ${l.node}`).join(", ");
      cluster.replaceChildren(
        h("h2", {}, t("ov.cluster")),
        h("p", { class: "muted" }, `${t("ov.stream")}: ${c.stream || t("none")} (R${c.replicas ?? "?"}) · `
          + `${t("ov.leader")}: ${c.leader || t("none")} · ${t("ov.forwarding")}: ${leases || t("none")}`),
        c.healthy ? "" : h("p", { class: "error", id: "cluster-problem" }, c.problem),
        table([
          [t("col.name"), (n) => (n.this_node ? `${n.name} ★` : n.name)],
          [t("col.state"), (n) => h("span", { class: `state ${n.healthy ? "active" : "silent"}` },
            n.healthy ? t("ov.healthy") : n.problem || t("ov.unhealthy"))],
          [t("ov.lag_messages"), (n) => fmtNum(n.lag_messages), { class: "num" }],
          [t("ov.seen"), (n) => fmtTime(n.seen_time_ms)],
          [t("ov.version"), (n) => n.version],
        ], c.nodes, { id: "cluster-nodes" }));
    }
    root.dataset.updated = String(o.time_ms);
  };

  const es = live("/overview", { overview: update });
  const resize = () => chart && chart.setSize({ width: Math.max(320, chartBox.clientWidth), height: 220 });
  window.addEventListener("resize", resize);
  return () => { es.close(); window.removeEventListener("resize", resize); if (chart) chart.destroy(); };
}
