// dnsgate admin dashboard: reads the admin API with the session cookie the login set (reads only:
// the cookie authorizes no change). /v1/top: aggregates from the query and consent logs over the
// chosen window; /v1/stats: the live upstream numbers; /v1/queries: the query log, searched and paged.
"use strict";

const { h, fmt, lines, columns, bars, legend, OUTCOME_LINES } = Charts;
const LIVE_MS = 5000;  // the live chart: /v1/stats, from memory
// The window's aggregates scan the query log (about 2 s over a million rows): refreshed less often
// the longer the window.
const REFRESH_MS = { "1h": 15000, "6h": 30000, "24h": 60000, "7d": 300000 };
const OUTCOMES = ["forwarded", "cached", "sinkholed", "servfail", "formerr", "notimp", "refused", "dropped", "local", "stale"];
const KINDS = [
  { key: "allowed", label: "trackers allowed (consent)", cls: "c-allowed" },
  { key: "gated", label: "trackers gated (blocked)", cls: "c-gated" },
  { key: "cached", label: "from cache", cls: "c-cache" },
  { key: "forwarded", label: "forwarded", cls: "c-fwd" },
  { key: "blocked", label: "blocked by a list", cls: "c-warn" },
  { key: "local", label: "answered locally", cls: "c-all" },
  { key: "failed", label: "failed", cls: "c-failed" },
];
const CHANGES = [
  { key: "grant", label: "grant", cls: "c-allowed" }, { key: "refuse", label: "refuse", cls: "c-gated" },
  { key: "withdraw", label: "withdraw", cls: "c-warn" }, { key: "expire", label: "expire", cls: "c-all" },
  { key: "reset", label: "reset", cls: "c-failed" }, { key: "profile_change", label: "profile change", cls: "c-fwd" },
];
const TYPE_CLASSES = ["c-fwd", "c-cache", "c-allowed", "c-warn", "c-failed", "c-all"];

const $ = id => document.getElementById(id);
const seconds = iso => Date.parse(iso) / 1000;

function when(iso) {
  const d = new Date(iso);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString()
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store", credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {  // the session ended (logout elsewhere, idle, restart)
    window.location.assign("/dashboard/login");
    throw new Error("logged out");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function cell(text, cls) {
  return h("td", cls ? { class: cls } : {}, text === null || text === undefined ? "–" : String(text));
}

function fillTable(id, rows, render, emptyText) {
  const body = $(id).tBodies[0];
  if (!rows.length) {
    const td = h("td", { colspan: $(id).tHead.rows[0].cells.length, class: "muted" }, emptyText);
    body.replaceChildren(h("tr", {}, undefined));
    body.firstChild.append(td);
    return;
  }
  body.replaceChildren(...rows.map(r => { const tr = h("tr"); tr.append(...render(r, tr)); return tr; }));
}

function consentText(c) {
  if (!c) return "–";
  if (!c.choice) return "no choice (profile default)";
  const parts = [];
  if (c.granted.length) parts.push("granted " + c.granted.join(", "));
  if (c.refused.length) parts.push("refused " + c.refused.join(", "));
  return parts.join("; ") || "a choice granting nothing";
}

function drawTop(t) {
  const since = seconds(t.since), until = seconds(t.until);
  const note = $("mode-note");
  note.hidden = t.mode === "full";
  note.textContent = t.mode === "anonymous" ? "The query log is anonymous: clients are pseudonyms, and their consent cannot be looked up."
    : t.mode === "gated-only" ? "The query log keeps only queries for gated names: the other counts are empty." : "";
  const timeline = t.timeline.map(r => ({ t: seconds(r.t), kinds: r.kinds, types: r.types }));
  columns($("chart-kinds"), timeline.map(r => ({ t: r.t, parts: r.kinds })), KINDS,
          { height: 220, step: t.step, since, until, empty: "no queries in this window" });
  const typeTotals = {};
  for (const r of timeline) for (const [k, n] of Object.entries(r.types)) typeTotals[k] = (typeTotals[k] || 0) + n;
  const types = Object.entries(typeTotals).sort((a, b) => b[1] - a[1]).slice(0, 6)
    .map(([key], i) => ({ key, label: key, cls: TYPE_CLASSES[i] }));
  legend($("legend-qtypes"), types);
  columns($("chart-qtypes"), timeline.map(r => ({ t: r.t, parts: r.types })), types,
          { height: 180, step: t.step, since, until, empty: "no queries in this window" });
  columns($("chart-changes"), t.consent_changes.map(r => ({ t: seconds(r.t), parts: r.actions })), CHANGES,
          { height: 180, step: t.step, since, until, empty: "no consent changes in this window" });
  fillTable("top-names", t.names, r => [cell(r.name, "name"), cell(fmt(r.queries), "num")], "no queries in this window");
  fillTable("top-gated", t.gated_names, r => [cell(r.name, "name"), cell(r.vendor), cell(fmt(r.blocked), "num"),
                                              cell(fmt(r.allowed), "num")], "no gated queries in this window");
  fillTable("top-clients", t.clients, (r, tr) => {
    tr.dataset.client = r.client;
    const show = h("button", { type: "button", class: "small" }, "Gated queries");
    show.setAttribute("aria-label", `gated queries of ${r.client}`);
    show.addEventListener("click", () => {
      for (const input of $("search").elements) if (input.name) input.value = "";
      $("f-client").value = r.client;
      $("f-gated").value = "true";
      search();
      $("log").scrollIntoView();
    });
    const action = h("td");
    action.append(show);
    return [cell(r.client, "client"), cell(fmt(r.queries), "num"), cell(fmt(r.blocked), "num"), cell(fmt(r.allowed), "num"),
            cell(r.consent ? r.consent.profile : null), cell(consentText(r.consent)), action];
  }, "no clients in this window");
}

function drawUpstreams(upstreams) {
  const rows = [];
  const maxMs = Math.max(1, ...upstreams.map(u => u.p99_ms || 0));
  for (const u of upstreams) {
    rows.push({ label: u.server, note: u.share === null ? "no queries" : `${Math.round(u.share * 100)}% (${fmt(u.queries)}, ${fmt(u.errors)} err)`,
                parts: [{ value: u.share || 0, cls: "c-fwd", attrs: { "data-upstream": u.server, "data-share": u.share } }] });
    for (const [name, v, cls] of [["p50", u.p50_ms, "c-allowed"], ["p90", u.p90_ms, "c-cache"], ["p99", u.p99_ms, "c-warn"]]) {
      rows.push({ label: `${name} latency`, note: v === null ? "–" : `${fmt(v)} ms`,
                  parts: [{ value: (v || 0) / maxMs, cls, attrs: { "data-upstream": u.server, "data-quantile": name } }] });
    }
  }
  bars($("chart-upstreams"), rows, { max: 1, empty: "no upstreams" });
}

async function refresh() {
  try {
    drawTop(await getJson(`/v1/top?since=${encodeURIComponent($("window").value)}&limit=10`));
    const updated = $("updated");
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    updated.dataset.refreshes = String(Number(updated.dataset.refreshes || 0) + 1);
  } catch (err) {
    $("updated").textContent = "cannot read dnsgate: " + err.message;
  }
}

async function live() {
  try {
    const s = await getJson("/v1/stats");
    lines($("chart-live"), s.series, OUTCOME_LINES, { height: 200 });
    drawUpstreams(s.upstreams);
  } catch (err) {
    $("updated").textContent = "cannot read dnsgate: " + err.message;
  }
}

let refreshing = null;

function schedule() {
  clearInterval(refreshing);
  refreshing = setInterval(refresh, REFRESH_MS[$("window").value] || 60000);
}

// ---- The query log: search and paging (newest first; "Older" pages back by entry id)

let pages = [];  // the `before` id of each page shown so far (null: the newest)

function filters() {
  const q = new URLSearchParams();
  for (const [key, value] of new FormData($("search"))) if (String(value).trim()) q.set(key, String(value).trim());
  return q;
}

async function showClient(client) {
  const panel = $("client-consent");
  if (!client) { panel.hidden = true; panel.replaceChildren(); return; }
  try {
    const v = await getJson(`/v1/clients/${encodeURIComponent(client)}/consent`);
    panel.dataset.client = v.client;
    panel.dataset.profile = v.profile.name;
    const list = h("dl", { class: "facts" });
    list.append(h("dt", {}, "profile"), h("dd", { "data-field": "profile" }, v.profile.name));
    list.append(h("dt", {}, "choice"), h("dd", { "data-field": "choice" },
      v.choice ? `made ${new Date(v.choice.made_at).toLocaleString()}, until ${new Date(v.choice.expires_at).toLocaleString()}` : "none"));
    for (const [category, d] of Object.entries(v.by_category)) {
      list.append(h("dt", {}, category), h("dd", { "data-category": category, "data-allowed": d.allowed },
        `${d.allowed ? "allowed" : "blocked"}${d.by_choice ? " by its choice" : " by the profile"}`));
    }
    panel.replaceChildren(h("h3", {}, `Consent of ${v.client}`), list);
    panel.hidden = false;
  } catch (err) {
    panel.replaceChildren(h("p", { class: "error" }, `consent of ${client}: ${err.message}`));
    panel.hidden = false;
  }
}

async function loadPage() {
  const q = filters();
  const before = pages[pages.length - 1];
  if (before) q.set("before", before);
  const PAGE = Number($("page-size").value);
  q.set("limit", String(PAGE + 1));  // one more: whether there is an older page
  const status = $("log-status");
  status.textContent = "searching…";
  try {
    const body = await getJson("/v1/queries?" + q.toString());
    const entries = body.entries.slice(0, PAGE);
    fillTable("log-table", entries, (e, tr) => {
      tr.dataset.id = e.id;
      tr.dataset.outcome = e.outcome;
      return [cell(when(e.at), "nowrap"), cell(e.client, "client"), cell(e.name, "name"), cell(e.type),
              cell(e.outcome), cell(e.vendor), cell(e.consent ? `${e.consent.category} (${e.consent.source})` : null)];
    }, "no entries match");
    $("older").disabled = body.entries.length <= PAGE;
    $("older").dataset.before = entries.length ? entries[entries.length - 1].id : "";
    $("newer").disabled = pages.length <= 1;
    status.textContent = `${entries.length} entries, page ${pages.length}` + (body.mode !== "full" ? ` (log mode: ${body.mode})` : "");
    status.dataset.count = String(entries.length);
  } catch (err) {
    status.textContent = "cannot search: " + err.message;
    status.dataset.count = "";
  }
}

function search() {
  pages = [null];
  showClient(filters().get("client"));
  return loadPage();
}

for (const o of OUTCOMES) $("f-outcome").append(h("option", { value: o }, o));
legend($("legend-kinds"), KINDS);
legend($("legend-live"), OUTCOME_LINES);
legend($("legend-changes"), CHANGES);
$("search").addEventListener("submit", event => { event.preventDefault(); search(); });
$("search").addEventListener("reset", () => setTimeout(search, 0));
$("older").addEventListener("click", () => { pages.push($("older").dataset.before); loadPage(); });
$("newer").addEventListener("click", () => { if (pages.length > 1) pages.pop(); loadPage(); });
$("window").addEventListener("change", () => { refresh(); schedule(); });
$("page-size").addEventListener("change", search);
refresh();
schedule();
live();
setInterval(live, LIVE_MS);
search();
