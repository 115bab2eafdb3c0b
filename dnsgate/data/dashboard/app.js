// dnsgate dashboard: polls /v1/stats (same origin, aggregates only) and draws SVG charts.
// No libraries and no external resources: the page runs under a strict Content-Security-Policy.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clear(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
}

function fmt(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n * 100) / 100);
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function empty(svg, w, h, text) {
  svg.appendChild(el("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty" }, text));
}

function drawTraffic(svg, series) {
  clear(svg);
  const W = 800, H = 220, L = 48, R = 10, T = 10, B = 26;
  if (series.length < 2) return empty(svg, W, H, "collecting samples…");
  const max = niceMax(Math.max(...series.map(p => Math.max(p.queries, p.sinkholed, p.allowed))));
  const t0 = series[0].t, t1 = series[series.length - 1].t, span = Math.max(t1 - t0, 1);
  const x = t => L + (W - L - R) * (t - t0) / span;
  const y = v => T + (H - T - B) * (1 - v / max);
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4;
    svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, fmt(v)));
  }
  for (const frac of [0, 0.5, 1]) {
    const t = t0 + span * frac;
    const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    svg.appendChild(el("text", { x: x(t), y: H - 6, "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle", class: "axis" }, label));
  }
  const path = key => series.map((p, i) => (i ? "L" : "M") + x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1)).join(" ");
  svg.appendChild(el("path", { d: path("queries") + ` L${x(t1)},${y(0)} L${x(t0)},${y(0)} Z`, class: "area-q" }));
  svg.appendChild(el("path", { d: path("queries"), class: "line-q", "data-series": "queries" }));
  svg.appendChild(el("path", { d: path("sinkholed"), class: "line-b", "data-series": "sinkholed" }));
  svg.appendChild(el("path", { d: path("allowed"), class: "line-a", "data-series": "allowed" }));
}

function drawVendors(svg, vendors) {
  clear(svg);
  const W = 400, H = 200;
  const shown = vendors.filter(v => v.sinkholed + v.allowed > 0).slice(0, 5);
  if (!shown.length) return empty(svg, W, H, "no gated queries yet");
  const max = Math.max(...shown.map(v => v.sinkholed + v.allowed));
  const rowH = Math.min(36, (H - 10) / shown.length), L = 130, R = 60;
  shown.forEach((v, i) => {
    const y = 6 + i * rowH, bw = W - L - R;
    const wb = bw * v.sinkholed / max, wa = bw * v.allowed / max;
    svg.appendChild(el("text", { x: L - 8, y: y + rowH / 2 + 4, "text-anchor": "end", class: "label-text" }, v.name));
    svg.appendChild(el("rect", { x: L, y: y + 4, width: Math.max(wb, 0), height: rowH - 10, rx: 3, class: "bar-b", "data-vendor": v.id, "data-sinkholed": v.sinkholed }));
    svg.appendChild(el("rect", { x: L + wb, y: y + 4, width: Math.max(wa, 0), height: rowH - 10, rx: 3, class: "bar-a", "data-allowed": v.allowed }));
    svg.appendChild(el("text", { x: L + wb + wa + 6, y: y + rowH / 2 + 4, class: "axis" }, `${fmt(v.sinkholed)} / ${fmt(v.allowed)}`));
  });
}

function drawClients(svg, clients) {
  clear(svg);
  const W = 400, H = 200, cx = 100, cy = 100, r = 70, stroke = 26;
  const yes = clients.seen_with_consent, no = clients.seen_without_consent, total = yes + no;
  const circumference = 2 * Math.PI * r;
  svg.appendChild(el("circle", { cx, cy, r, fill: "none", stroke: "#2a333d", "stroke-width": stroke }));
  if (total > 0) {
    const segment = (value, offset, cls) => el("circle", {
      cx, cy, r, fill: "none", class: cls, "stroke-width": stroke, transform: `rotate(-90 ${cx} ${cy})`,
      "stroke-dasharray": `${circumference * value / total} ${circumference}`, "stroke-dashoffset": -circumference * offset / total,
    });
    const a = segment(yes, 0, "ring-a"); a.setAttribute("stroke", "#3fb950"); svg.appendChild(a);
    const b = segment(no, yes, "ring-b"); b.setAttribute("stroke", "#f85149"); svg.appendChild(b);
  }
  svg.appendChild(el("text", { x: cx, y: cy + 9, "text-anchor": "middle", class: "big", id: "clients-total" }, String(total)));
  svg.appendChild(el("text", { x: 210, y: 70, class: "label-text", id: "clients-with" }, `with consent: ${yes}`));
  svg.appendChild(el("text", { x: 210, y: 98, class: "label-text", id: "clients-without" }, `without consent: ${no}`));
  svg.appendChild(el("text", { x: 210, y: 126, class: "axis" }, `clients with a grant: ${clients.with_consent}`));
}

function drawUpstreams(svg, upstreams) {
  clear(svg);
  const W = 800, H = Math.max(80, 12 + 60 * upstreams.length), L = 170, R = 70;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!upstreams.length) return empty(svg, W, H, "no upstreams");
  const max = niceMax(Math.max(1, ...upstreams.map(u => u.p99_ms || 0)));
  const rowH = Math.min(60, (H - 10) / upstreams.length);
  upstreams.forEach((u, i) => {
    const y = 6 + i * rowH, bw = W - L - R;
    svg.appendChild(el("text", { x: L - 8, y: y + 16, "text-anchor": "end", class: "label-text" }, u.server));
    svg.appendChild(el("text", { x: L - 8, y: y + 32, "text-anchor": "end", class: "axis" }, `${u.queries} queries, ${u.errors} errors`));
    [["p50", u.p50_ms, "bar-a"], ["p90", u.p90_ms, "bar-q"], ["p99", u.p99_ms, "bar-w"]].forEach(([name, v, cls], j) => {
      const h = (rowH - 14) / 3, yy = y + 4 + j * h;
      svg.appendChild(el("rect", { x: L, y: yy, width: v ? bw * v / max : 0, height: h - 2, rx: 2, class: cls, "data-upstream": u.server, "data-quantile": name }));
      svg.appendChild(el("text", { x: L + (v ? bw * v / max : 0) + 6, y: yy + h - 3, class: "axis" }, v === null ? `${name} –` : `${name} ${fmt(v)} ms`));
    });
  });
}

async function refresh() {
  try {
    const response = await fetch("/v1/stats", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    document.getElementById("t-queries").textContent = fmt(s.totals.queries);
    document.getElementById("t-cached").textContent = fmt(s.totals.cached);
    document.getElementById("t-blocked").textContent = fmt(s.totals.gated_sinkholed);
    document.getElementById("t-allowed").textContent = fmt(s.totals.gated_allowed);
    drawTraffic(document.getElementById("chart-traffic"), s.series);
    drawVendors(document.getElementById("chart-vendors"), s.vendors);
    drawClients(document.getElementById("chart-clients"), s.clients);
    drawUpstreams(document.getElementById("chart-upstreams"), s.upstreams);
    const updated = document.getElementById("updated");
    updated.textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString();
    updated.dataset.refreshes = String(Number(updated.dataset.refreshes || 0) + 1);
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach dnsgate: " + err.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
