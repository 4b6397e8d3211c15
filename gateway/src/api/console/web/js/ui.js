// Helpers every page uses: the session, API calls, live streams, DOM building, formatting in
// the city's time zone and the chosen language.

import { t, locale } from "./i18n.js";

/** Set by the shell: what to do when the session has ended. */
export const hooks = { signedOut: () => {} };

export const session = { role: null, name: null, csrf: null, time_zone: "Asia/Ho_Chi_Minh" };

/** Creates an element: h("td", {class: "num"}, "42", child, ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export class SignedOut extends Error {}

/** GET or POST JSON; a 401 shows the sign-in form. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  const r = await fetch("/console/api" + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401 && path !== "/session") {
    hooks.signedOut();
    throw new SignedOut();
  }
  const data = r.status === 204 ? {} : await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error(data.error || r.statusText);
    e.status = r.status;
    throw e;
  }
  return data;
}

/** An EventSource on a console stream; `signed_out` shows the sign-in form. */
export function live(path, handlers) {
  const es = new EventSource("/console/api/live" + path);
  for (const [event, fn] of Object.entries(handlers)) {
    es.addEventListener(event, (e) => fn(JSON.parse(e.data)));
  }
  es.addEventListener("signed_out", () => { es.close(); hooks.signedOut(); });
  return es;
}

export function fmtNum(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return t("none");
  return new Intl.NumberFormat(locale(), { maximumFractionDigits: digits }).format(n);
}

/** A small ratio (connections per resident, attainment) with three significant digits. */
export function fmtSmall(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return t("none");
  if (n === 0 || Math.abs(n) >= 1) return fmtNum(n, 2);
  return new Intl.NumberFormat(locale(), { maximumSignificantDigits: 3 }).format(n);
}

export function fmtTime(ms) {
  if (!ms) return t("none");
  return new Intl.DateTimeFormat(locale(), {
    timeZone: session.time_zone, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  }).format(new Date(ms));
}

/** A uPlot date formatter in the city's time zone (uPlot otherwise uses the browser's). */
export function tzDate(ts) {
  return uPlot.tzDate(new Date(ts * 1e3), session.time_zone);
}

/** A table: columns are [label, cell(row) -> node|string, {class}] */
export function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map(([label, , o = {}]) => h("th", { class: o.class }, label)))),
    h("tbody", {}, rows.map((row) => h("tr", {},
      columns.map(([, cell, o = {}]) => h("td", { class: o.class }, cell(row)))))));
}

export function card(label, value, key) {
  return h("div", { class: "card" },
    h("div", { class: "label" }, label),
    h("div", { class: "value", "data-metric": key }, value));
}

export function errorBox(e) {
  return h("p", { class: "error" }, `${t("error")}: ${e.message}`);
}
