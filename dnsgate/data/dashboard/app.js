// dnsgate dashboard: polls /v1/stats (same origin, aggregates only: no client and no name) and
// draws it with charts.js.
"use strict";

const REFRESH_MS = 2000;
const { fmt, lines, columns, bars, legend, OUTCOME_LINES } = Charts;

const TYPE_CLASSES = ["c-fwd", "c-cache", "c-allowed", "c-warn", "c-failed", "c-all"];
const CONSENT_KEYS = [
  { key: "grant", label: "grant", cls: "c-allowed" }, { key: "refuse", label: "refuse", cls: "c-gated" },
  { key: "withdraw", label: "withdraw", cls: "c-warn" }, { key: "expire", label: "expire", cls: "c-all" },
  { key: "reset", label: "reset", cls: "c-failed" }, { key: "profile_change", label: "profile change", cls: "c-fwd" },
];

function drawTypes(svg, series, types) {
  const top = Object.entries(types).sort((a, b) => b[1] - a[1]).slice(0, 5).map(([name]) => name);
  const shown = top.map((name, i) => ({ key: name, label: name, cls: TYPE_CLASSES[i], value: p => (p.types || {})[name] || 0 }));
  legend(document.getElementById("legend-types"), shown);
  lines(svg, series, shown, { height: 180 });
}

// Consent changes per minute over the samples kept.
function drawConsent(svg, series) {
  if (series.length < 2) return columns(svg, [], CONSENT_KEYS, { height: 160, empty: "collecting samples…" });
  const since = series[0].t, until = series[series.length - 1].t, step = 60;
  const buckets = new Map();
  for (const p of series) {
    const b = Math.floor((p.t - since) / step);
    const bucket = buckets.get(b) || { t: since + b * step, parts: {} };
    for (const [k, n] of Object.entries(p.consent || {})) bucket.parts[k] = (bucket.parts[k] || 0) + n;
    buckets.set(b, bucket);
  }
  columns(svg, [...buckets.values()], CONSENT_KEYS, { height: 160, step, since, until: Math.max(until, since + step),
                                                      empty: "no consent changes in the samples kept" });
}

function drawVendors(svg, vendors) {
  const shown = vendors.filter(v => v.sinkholed + v.allowed > 0).slice(0, 6);
  bars(svg, shown.map(v => ({
    label: v.name, note: `${fmt(v.sinkholed)} / ${fmt(v.allowed)}`,
    parts: [{ value: v.sinkholed, cls: "c-gated", attrs: { "data-vendor": v.id, "data-sinkholed": v.sinkholed } },
            { value: v.allowed, cls: "c-allowed", attrs: { "data-allowed": v.allowed } }],
  })), { empty: "no gated queries yet" });
}

function drawClients(c) {
  document.getElementById("clients-met").textContent = String(c.met_tracker);
  document.getElementById("clients-allowed").textContent = String(c.tracker_allowed);
  document.getElementById("clients-blocked").textContent = String(c.only_blocked);
  document.getElementById("clients-granting").textContent = String(c.choices_granting);
  const total = Math.max(1, c.met_tracker);
  document.getElementById("clients-bar-allowed").style.width = (100 * c.tracker_allowed / total) + "%";
  document.getElementById("clients-bar-blocked").style.width = (100 * c.only_blocked / total) + "%";
}

function drawUpstreams(svg, upstreams) {
  const rows = [];
  for (const u of upstreams) {
    rows.push({ label: u.server, note: u.share === null ? "no queries" : `${Math.round(u.share * 100)}% (${fmt(u.queries)}, ${fmt(u.errors)} err)`,
                parts: [{ value: u.share || 0, cls: "c-fwd", attrs: { "data-upstream": u.server, "data-share": u.share } }] });
    for (const [name, v, cls] of [["p50", u.p50_ms, "c-allowed"], ["p90", u.p90_ms, "c-cache"], ["p99", u.p99_ms, "c-warn"]]) {
      rows.push({ label: `${name} latency`, note: v === null ? "–" : `${fmt(v)} ms`,
                  parts: [{ value: v || 0, cls, attrs: { "data-upstream": u.server, "data-quantile": name } }], ms: true });
    }
  }
  const maxMs = Math.max(1, ...upstreams.map(u => u.p99_ms || 0));
  // shares are fractions of 1, latencies of the slowest p99: scale each kind on its own
  for (const r of rows) if (r.ms) r.parts[0].value = r.parts[0].value / maxMs;
  bars(svg, rows, { max: 1, empty: "no upstreams" });
}

let last = null;

async function refresh() {
  try {
    const response = await fetch("/v1/stats", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    last = s;
    document.getElementById("t-queries").textContent = fmt(s.totals.queries);
    document.getElementById("t-cached").textContent = fmt(s.totals.cached);
    document.getElementById("t-blocked").textContent = fmt(s.totals.gated_sinkholed);
    document.getElementById("t-allowed").textContent = fmt(s.totals.gated_allowed);
    lines(document.getElementById("chart-traffic"), s.series, OUTCOME_LINES, { height: 220 });
    drawTypes(document.getElementById("chart-types"), s.series, s.types);
    drawVendors(document.getElementById("chart-vendors"), s.vendors);
    drawClients(s.clients);
    drawUpstreams(document.getElementById("chart-upstreams"), s.upstreams);
    drawConsent(document.getElementById("chart-consent"), s.series);
    const updated = document.getElementById("updated");
    updated.textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
    updated.dataset.refreshes = String(Number(updated.dataset.refreshes || 0) + 1);
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach dnsgate: " + err.message;
  }
}

legend(document.getElementById("legend-traffic"), OUTCOME_LINES);
legend(document.getElementById("legend-consent"), CONSENT_KEYS);
refresh();
setInterval(refresh, REFRESH_MS);
