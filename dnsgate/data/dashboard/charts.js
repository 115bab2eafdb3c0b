// dnsgate dashboard charts: hand-drawn SVG, shared by the public and the admin page.
// No library and no external resource: the pages run under a strict Content-Security-Policy, and a
// few line, bar and column charts are less code than a bundled library would be to keep up to date.
// Every chart is drawn at the width it is shown at (its viewBox is its size in CSS pixels), so text
// keeps its CSS size on a phone as on a desktop, and is drawn again when the width changes.
"use strict";

const Charts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const drawn = new Map(); // svg -> function drawing it again (after a resize)

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function h(name, attrs, text) {
    const node = document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return String(Math.round(n * 100) / 100);
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 5, 8, 10]) if (v <= m * p) return m * p;  // ticks at quarters: round numbers
    return 10 * p;
  }

  function timeLabel(t, span) {
    const d = new Date(t * 1000);
    if (span > 2 * 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
    if (span > 12 * 3600) return d.toLocaleString([], { weekday: "short", hour: "2-digit", minute: "2-digit" });
    if (span > 600) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  // Clears the svg, sizes it to its width on screen and `height` px; remembers how to draw it again.
  function start(svg, height, redraw) {
    drawn.set(svg, redraw);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = Math.max(240, Math.round(svg.parentElement.clientWidth || 600));
    svg.setAttribute("viewBox", `0 0 ${W} ${height}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", height);
    return W;
  }

  function empty(svg, W, H, text) {
    svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, text));
  }

  function yAxis(svg, W, L, R, y, max) {
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4;
      svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, fmt(v)));
    }
  }

  function xLabels(svg, W, H, x, t0, t1) {
    const span = Math.max(t1 - t0, 1);
    const marks = W < 480 ? [0, 1] : [0, 0.5, 1];
    for (const frac of marks) {
      const t = t0 + span * frac;
      svg.appendChild(el("text", { x: x(t), y: H - 6, class: "axis",
        "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle" }, timeLabel(t, span)));
    }
  }

  // Lines over time. points: [{t, ...}]; series: [{key, label, cls, value(point)}].
  function lines(svg, points, series, opts) {
    const H = (opts && opts.height) || 220;
    const W = start(svg, H, () => lines(svg, points, series, opts));
    const L = 44, R = 8, T = 10, B = 24;
    if (points.length < 2) return empty(svg, W, H, (opts && opts.empty) || "collecting samples…");
    const max = niceMax(Math.max(0, ...points.flatMap(p => series.map(s => s.value(p) || 0))));
    const t0 = points[0].t, t1 = points[points.length - 1].t, span = Math.max(t1 - t0, 1);
    const x = t => L + (W - L - R) * (t - t0) / span;
    const y = v => T + (H - T - B) * (1 - v / max);
    yAxis(svg, W, L, R, y, max);
    xLabels(svg, W, H, x, t0, t1);
    for (const s of series) {
      const d = points.map((p, i) => (i ? "L" : "M") + x(p.t).toFixed(1) + "," + y(s.value(p) || 0).toFixed(1)).join(" ");
      svg.appendChild(el("path", { d, class: "line " + s.cls, "data-series": s.key }));
    }
  }

  // Stacked columns over time. buckets: [{t, parts: {key: n}}]; keys: [{key, label, cls}].
  function columns(svg, buckets, keys, opts) {
    const H = (opts && opts.height) || 220;
    const W = start(svg, H, () => columns(svg, buckets, keys, opts));
    const L = 44, R = 8, T = 10, B = 24;
    const total = b => keys.reduce((n, k) => n + (b.parts[k.key] || 0), 0);
    if (!buckets.length || !buckets.some(b => total(b) > 0)) return empty(svg, W, H, (opts && opts.empty) || "nothing yet");
    const step = opts.step, t0 = opts.since, t1 = opts.until, span = Math.max(t1 - t0, 1);
    const max = Math.max(4, niceMax(Math.max(...buckets.map(total))));  // counts: whole-number ticks
    const x = t => L + (W - L - R) * (t - t0) / span;
    const y = v => T + (H - T - B) * (1 - v / max);
    yAxis(svg, W, L, R, y, max);
    xLabels(svg, W, H, x, t0, t1);
    const bw = Math.max(1, (W - L - R) * step / span - 1);
    for (const b of buckets) {
      let base = 0;
      for (const k of keys) {
        const n = b.parts[k.key] || 0;
        if (!n) continue;
        const rect = el("rect", { x: x(b.t), y: y(base + n), width: bw, height: Math.max(0.5, y(base) - y(base + n)),
          class: "bar " + k.cls, "data-kind": k.key, "data-count": n });
        rect.appendChild(el("title", {}, `${k.label}: ${n}`));
        svg.appendChild(rect);
        base += n;
      }
    }
  }

  // Horizontal bars, one row each: [{label, parts: [{value, cls, attrs}], note}]. Labels above the
  // bar on a narrow screen, beside it on a wide one.
  function bars(svg, rows, opts) {
    const narrow = (svg.parentElement.clientWidth || 600) < 480;
    const rowH = narrow ? 44 : 30;
    const H = Math.max(60, 8 + rows.length * rowH);
    const W = start(svg, H, () => bars(svg, rows, opts));
    if (!rows.length) return empty(svg, W, H, (opts && opts.empty) || "nothing yet");
    const L = narrow ? 4 : Math.min(200, W * 0.35), R = 96;
    const max = Math.max(1e-9, opts && opts.max || Math.max(...rows.map(r => r.parts.reduce((n, p) => n + (p.value || 0), 0))));
    rows.forEach((r, i) => {
      const top = 4 + i * rowH;
      const barY = narrow ? top + 20 : top + 6, barH = narrow ? 16 : 18;
      svg.appendChild(el("text", narrow ? { x: L, y: top + 14, class: "label-text" }
        : { x: L - 8, y: barY + 13, "text-anchor": "end", class: "label-text" }, r.label));
      let x = L;
      for (const p of r.parts) {
        const w = (W - L - R) * (p.value || 0) / max;
        svg.appendChild(el("rect", { x, y: barY, width: Math.max(w, 0), height: barH, rx: 2, class: "bar " + p.cls, ...(p.attrs || {}) }));
        x += w;
      }
      svg.appendChild(el("text", { x: x + 6, y: barY + 13, class: "axis" }, r.note));
    });
  }

  function legend(container, items) {
    container.replaceChildren(...items.map(i => {
      const span = h("span", { class: "legend-item" });
      span.append(h("span", { class: "key " + i.cls, "aria-hidden": "true" }), i.label);
      return span;
    }));
  }

  // The outcomes /v1/stats samples, drawn over time: disjoint but for the trackers allowed by
  // consent, which were also answered from the cache or forwarded (so lines, not stacked areas).
  const OUTCOME_LINES = [
    { key: "queries", label: "all queries", cls: "c-all", value: p => p.queries },
    { key: "forwarded", label: "forwarded", cls: "c-fwd", value: p => p.outcomes && p.outcomes.forwarded },
    { key: "cached", label: "from cache", cls: "c-cache", value: p => p.outcomes && p.outcomes.cached },
    { key: "sinkholed", label: "trackers gated (blocked)", cls: "c-gated", value: p => p.sinkholed },
    { key: "allowed", label: "trackers allowed (consent)", cls: "c-allowed", value: p => p.allowed },
    { key: "failed", label: "failed", cls: "c-failed", value: p => p.outcomes && p.outcomes.failed },
  ];

  let timer = null;
  window.addEventListener("resize", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { for (const redraw of drawn.values()) redraw(); }, 150);
  });

  return { el, h, fmt, lines, columns, bars, legend, timeLabel, OUTCOME_LINES };
})();
