// The console's shell: sign-in, navigation (hash routes) and language. Pages are modules with
// `render(root, params)` returning an optional cleanup function (closing their live streams).
// Everything is built with DOM calls and textContent: nothing a device or an attacker sent is
// ever parsed as HTML.

import { t, lang, setLang } from "./i18n.js";
import { api, errorBox, hooks, session, SignedOut } from "./ui.js";
import * as overview from "./pages/overview.js";
import * as kpi from "./pages/kpi.js";
import * as devices from "./pages/devices.js";
import * as device from "./pages/device.js";
import * as deadletters from "./pages/deadletters.js";
import * as commands from "./pages/commands.js";
import * as alerts from "./pages/alerts.js";

const routes = [
  [/^#\/overview$/, overview, "overview"],
  [/^#\/kpi$/, kpi, "kpi"],
  [/^#\/devices$/, devices, "devices"],
  [/^#\/devices\/(.+)$/, device, "devices"],
  [/^#\/deadletters$/, deadletters, "deadletters"],
  [/^#\/commands(?:\/(.+))?$/, commands, "commands"],
  [/^#\/alerts(?:\/(.+))?$/, alerts, "alerts"],
];

// --- shell ---------------------------------------------------------------------------------

let cleanup = null;

function applyTexts() {
  document.documentElement.lang = lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  const other = lang === "vi" ? "English" : "Tiếng Việt";
  document.getElementById("lang").textContent = other;
  document.getElementById("lang2").textContent = other;
  if (session.role) {
    document.getElementById("who").textContent = `${session.name} (${t("role." + session.role)})`;
  }
}

function showSignIn() {
  if (cleanup) { cleanup(); cleanup = null; }
  session.role = session.csrf = null;
  document.getElementById("top").hidden = true;
  document.getElementById("page").replaceChildren();
  document.getElementById("signin").hidden = false;
  document.getElementById("token").focus();
}

function signedIn(s) {
  Object.assign(session, s);
  document.getElementById("signin").hidden = true;
  document.getElementById("top").hidden = false;
  applyTexts();
  if (!location.hash || location.hash === "#") location.hash = "#/overview";
  else route();
}

async function route() {
  if (!session.role) return;
  if (cleanup) { cleanup(); cleanup = null; }
  const hash = location.hash || "#/overview";
  const found = routes.map(([re, page, nav]) => [hash.match(re), page, nav]).find(([m]) => m);
  const root = document.getElementById("page");
  root.replaceChildren();
  if (!found) { location.hash = "#/overview"; return; }
  const [match, page, nav] = found;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("current", a.dataset.page === nav);
  }
  try {
    // An optional part that is absent stays undefined (decodeURIComponent would make it "undefined").
    const params = match.slice(1).map((p) => (p === undefined ? undefined : decodeURIComponent(p)));
    cleanup = (await page.render(root, params)) || null;
  } catch (e) {
    if (!(e instanceof SignedOut)) root.append(errorBox(e));
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const input = document.getElementById("token");
  const err = document.getElementById("signin-error");
  err.textContent = "";
  try {
    const s = await api("/session", { method: "POST", body: { token: input.value } });
    input.value = "";
    signedIn(s);
  } catch (e) {
    err.textContent = e.status === 429 ? t("signin.throttled")
      : e.status === 401 ? t("signin.wrong") : `${t("error")}: ${e.message}`;
  }
}

async function signOut() {
  try { await api("/session", { method: "DELETE" }); } catch (_) { /* signed out anyway */ }
  showSignIn();
}

function toggleLang() {
  setLang(lang === "vi" ? "en" : "vi");
  applyTexts();
  route();
}

async function start() {
  hooks.signedOut = showSignIn;
  applyTexts();
  document.getElementById("signin-form").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", signOut);
  document.getElementById("lang").addEventListener("click", toggleLang);
  document.getElementById("lang2").addEventListener("click", toggleLang);
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("/session"));
  } catch (_) {
    showSignIn();
  }
}

start();
