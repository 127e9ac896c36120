// shoal dashboard: plain JS, no framework, no build step. Every value from
// the mesh (names, NACK errors, tags) is outside text: it goes into the page
// as text nodes, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
// Distinct, calm hues for services and split backends; readable on both themes.
const PALETTE = ["#0f766e", "#7c3aed", "#2563eb", "#c2410c", "#be185d", "#4d7c0f", "#0369a1", "#a16207"];

const state = { paused: false, timer: null, view: "", selectedTrace: "", traceQuery: "", selectedSpan: "" };

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "width" && tag !== "img") el.style.width = v;
    else if (k === "bg") el.style.background = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

async function api(name) {
  const r = await fetch(`/api/${name}`, { credentials: "same-origin", cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  return { status: r.status, ok: r.ok, body };
}

function colorOf(name, known) {
  const i = known.indexOf(name);
  if (i >= 0) return PALETTE[i % PALETTE.length];
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)}h`;
  return `${(seconds / 86400).toFixed(1)}d`;
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  // Envoy's histograms bottom out at 0: "under a millisecond".
  if (v === 0) return "<1 ms";
  if (v < 1) return `${v.toFixed(2)} ms`;
  if (v < 1000) return `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`;
  return `${(v / 1000).toFixed(2)} s`;
}

function splitName(key) {
  const [ns, name] = key.includes("/") ? key.split("/", 2) : ["", key];
  return { ns, name };
}

function header(title, sub) {
  return [h("h1", {}, title), h("p", { class: "sub" }, sub)];
}

function empty(title, text) {
  return h("div", { class: "empty" }, h("strong", {}, title), text);
}

function failure(res) {
  const why = (res.body && res.body.error) || `HTTP ${res.status}`;
  return h("div", { class: "error-box" }, "The control plane did not answer: ", why);
}

function statusClass(s) { return s.replace(" ", "-"); }

// ---------------------------------------------------------------- Proxies

async function viewProxies() {
  const res = await api("syncz");
  if (!res.ok) return [header("Proxies", ""), failure(res)];
  const proxies = res.body;
  const types = ["CDS", "LDS", "EDS", "RDS", "SDS"].filter(
    (t) => t !== "SDS" || proxies.some((p) => p.types.some((x) => x.type === "SDS" && x.status !== "NOT SENT")));
  const worst = (p) => {
    const all = p.types.map((x) => x.status);
    return all.includes("NACKED") ? "bad" : all.includes("STALE") ? "warn" : "ok";
  };
  const counts = { ok: 0, warn: 0, bad: 0 };
  proxies.forEach((p) => counts[worst(p)]++);
  setBadge("badge-proxies", counts.bad ? counts.bad : "", counts.bad ? "bad" : "");
  const rows = [];
  for (const p of proxies) {
    const by = Object.fromEntries(p.types.map((x) => [x.type, x]));
    const admin = p.admin_port ? `127.0.0.1:${p.admin_port}` : (p.pod ? `pod ${p.pod}` : "");
    rows.push(h("tr", { "data-proxy": p.id },
      h("td", { class: "nowrap" }, h("span", { class: `dot ${worst(p)}` }), h("span", { class: "mono" }, p.id)),
      h("td", {}, p.cluster),
      h("td", {}, p.identity || h("span", { class: "faint" }, "–")),
      h("td", {}, p.mode),
      types.map((t) => {
        const st = by[t] ? by[t].status : "NOT SENT";
        return h("td", { "data-type": t }, h("span", { class: `pill ${statusClass(st)}`, title: by[t] ? `sent ${by[t].sent}, acked ${by[t].acked}` : "" }, st));
      }),
      h("td", { class: "muted nowrap" }, p.mesh.replace("mesh version ", "v")),
      h("td", { class: "num" }, ago(p.connected_s)),
      h("td", { class: "mono muted", title: admin ? `shoal dashboard envoy ${p.id}` : "" }, admin || "–"),
    ));
    const nacks = p.types.filter((x) => x.error);
    if (nacks.length) {
      rows.push(h("tr", { class: "nack-row", "data-proxy-error": p.id },
        h("td", { colspan: 7 + types.length },
          nacks.map((x) => h("div", { class: "nack" }, `${x.type} version ${x.sent} rejected: ${x.error}`)))));
    }
  }
  return [
    header("Proxies", "Every connected Envoy and where it stands, per xDS type: SYNCED (acknowledged what the control plane wants it to have), STALE (a push is on its way), NACKED (rejected, with Envoy's reason)."),
    h("div", { class: "summary" },
      stat(proxies.length, "connected"), stat(counts.ok, "in sync", "ok"),
      stat(counts.warn, "catching up", counts.warn ? "warn" : ""), stat(counts.bad, "rejecting config", counts.bad ? "bad" : "")),
    proxies.length === 0 ? empty("No proxies connected", "Start a sidecar with `shoal bootstrap` and `envoy -c`, or `shoal demo`.") :
      h("div", { class: "panel" }, h("table", { id: "proxies" },
        h("thead", {}, h("tr", {}, h("th", {}, "Proxy"), h("th", {}, "Cluster"), h("th", {}, "Identity"), h("th", {}, "Mode"),
          types.map((t) => h("th", {}, t)), h("th", {}, "Mesh"), h("th", { class: "num" }, "Up"), h("th", {}, "Envoy admin"))),
        h("tbody", {}, rows))),
  ];
}

function stat(value, label, cls) {
  return h("div", { class: `stat ${cls || ""}` }, h("b", {}, value), h("span", {}, label));
}

function setBadge(id, value, cls) {
  const el = document.getElementById(id);
  if (!el) return;
  el.textContent = value === "" ? "" : String(value);
  el.className = `badge ${cls || ""}`;
}

// ---------------------------------------------------------------- Services

function matchText(m) {
  if (m.kind === "present") return `${m.name} present`;
  const op = { exact: "=", prefix: "starts with", regex: "~" }[m.kind] || m.kind;
  return `${m.name} ${op} ${m.value}`;
}

function policyChips(p) {
  const out = [];
  if (p.timeout_s != null) out.push(`timeout ${p.timeout_s}s`);
  if (p.retry) out.push(`retry ×${p.retry.attempts} on ${p.retry.retry_on}`);
  if (p.fault && p.fault.abort_status) out.push(`abort ${p.fault.abort_status} ${p.fault.abort_percent}%`);
  if (p.fault && p.fault.delay_s) out.push(`delay ${p.fault.delay_s}s ${p.fault.delay_percent}%`);
  if (p.mirror) out.push(`mirror → ${p.mirror.service} ${p.mirror.percent}%`);
  return out.map((t) => h("span", { class: "chip" }, t));
}

function ruleView(rule, palette) {
  const total = rule.backends.reduce((a, b) => a + b.weight, 0) || 1;
  const conditions = [...rule.headers.map((m) => `header ${matchText(m)}`), ...rule.query.map((m) => `query ${matchText(m)}`)];
  if (rule.path && !(rule.path.kind === "segments" && rule.path.value === "/")) {
    conditions.push(`path ${rule.path.kind === "segments" ? "prefix" : rule.path.kind} ${rule.path.value}`);
  }
  if (rule.method) conditions.push(`method ${rule.method}`);
  return h("div", { class: "rule", "data-rule": conditions.length ? "match" : "default" },
    h("div", { class: "when" }, conditions.length ? ["when ", conditions.map((c, i) => [i ? " and " : "", h("b", {}, c)])] : "otherwise (every other request)"),
    h("div", { class: "split" }, rule.backends.map((b) => {
      const pct = (100 * b.weight) / total;
      return h("div", { width: `${pct}%`, bg: palette(b.service), title: `${b.service}: ${pct.toFixed(1)}%` }, pct >= 8 ? `${Math.round(pct * 10) / 10}%` : "");
    })),
    h("div", { class: "legend" }, rule.backends.map((b) => h("span", { class: "backend", "data-weight": String(Math.round((1000 * b.weight) / total) / 10) },
      h("i", { bg: palette(b.service) }), h("span", { class: "mono" }, b.service), " ", h("b", {}, `${Math.round((1000 * b.weight) / total) / 10}%`)))),
    h("div", { class: "policies" }, [...policyChips(rule), ...gatewayChips(rule)]));
}

function gatewayChips(rule) {
  const out = [];
  if (rule.name) out.push(`rule ${rule.name}`);
  if (rule.status) out.push(`answers ${rule.status}`);
  if (rule.redirect) {
    const r = rule.redirect;
    out.push(`redirect ${r.status}${r.scheme ? ` ${r.scheme}://` : ""}${r.hostname ? ` ${r.hostname}` : ""}${r.port ? `:${r.port}` : ""}${r.path ? ` path ${r.path}` : ""}`);
  }
  if (rule.rewrite) out.push(`rewrite${rule.rewrite.hostname ? ` host ${rule.rewrite.hostname}` : ""}${rule.rewrite.path ? ` path ${rule.rewrite.path}` : ""}`);
  for (const [key, label] of [["request_headers", "request"], ["response_headers", "response"]]) {
    const c = rule[key];
    if (!c) continue;
    for (const [n, v] of Object.entries(c.set)) out.push(`${label} ${n} = ${v}`);
    for (const [n, v] of Object.entries(c.add)) out.push(`${label} ${n} += ${v}`);
    for (const n of c.remove) out.push(`${label} −${n}`);
  }
  for (const m of rule.mirrors || []) out.push(`mirror → ${m.service} ${m.percent}%`);
  for (const b of rule.backends) if (b.missing) out.push(`${b.service} unreachable: its share answers 500`);
  return out.map((t) => h("span", { class: "chip" }, t));
}

function attachedView(a, palette) {
  const whom = a.consumer ? `callers in ${a.consumer}` : "every caller";
  const where = a.port ? `port ${a.port}` : "every port";
  return h("div", { class: "attached", "data-attached": a.origin },
    h("div", { class: "when" }, h("span", { class: "pill src" }, a.origin), ` routes ${whom}, ${where}; a request no rule matches is answered 404`),
    a.rules.map((r) => ruleView(r, palette)));
}

async function viewServices() {
  const res = await api("services");
  if (!res.ok) return [header("Services", ""), failure(res)];
  const services = res.body.services;
  const names = Object.keys(services);
  setMeshVersion(res.body.version);
  const cards = names.map((key) => {
    const svc = services[key];
    const { ns, name } = splitName(key);
    const routing = svc.routing;
    const ready = svc.endpoints.filter((e) => !e.includes("not ready")).length;
    const palette = (n) => colorOf(n, names);
    return h("section", { class: "panel svc", "data-service": key },
      h("header", {}, h("h3", {}, name), h("span", { class: "ns" }, ns), h("span", { class: "spacer" }),
        routing ? h("span", { class: "pill src", title: "where these routes come from" }, routing.source || "routes") : h("span", { class: "pill idle" }, "no routes")),
      h("div", { class: "kv" },
        h("span", {}, "Ports"), h("span", {}, svc.ports.map((p) => h("span", { class: "chip" }, p))),
        h("span", {}, "Endpoints"), h("span", {},
          h("span", { class: `dot ${svc.endpoints.length === 0 ? "bad" : ready < svc.endpoints.length ? "warn" : "ok"}` }),
          `${ready} of ${svc.endpoints.length} ready  `,
          h("div", {}, svc.endpoints.map((e) => h("span", { class: "chip" }, e))))),
      routing ? [routing.rules.map((r) => ruleView(r, palette)), h("div", { class: "policies" }, policyChips(routing)), (routing.attached || []).map((a) => attachedView(a, palette))] : null);
  });
  return [
    header("Services", "Each Service with its ports and endpoints, and how calls to it are routed: rules in order, their weighted backends, and the annotation, TrafficRoute or Gateway API route they came from."),
    names.length ? h("div", { class: "services" }, cards) : empty("No Services", "The registry has no Services yet."),
  ];
}

function setMeshVersion(v) {
  const el = document.getElementById("mesh-version");
  if (el && v !== undefined) el.textContent = `mesh version ${v}`;
}

// ---------------------------------------------------------------- Graph

function layout(nodes, edges) {
  // Columns by longest path from a Service nobody calls (cycles cut).
  const out = new Map(nodes.map((n) => [n.id, []]));
  const indeg = new Map(nodes.map((n) => [n.id, 0]));
  for (const e of edges) { out.get(e.source).push(e.target); indeg.set(e.target, indeg.get(e.target) + 1); }
  const depth = new Map();
  const visit = (id, d, seen) => {
    if (seen.has(id)) return;
    if ((depth.get(id) ?? -1) >= d) return;
    depth.set(id, d);
    seen.add(id);
    for (const t of out.get(id)) visit(t, d + 1, seen);
    seen.delete(id);
  };
  nodes.filter((n) => indeg.get(n.id) === 0).forEach((n) => visit(n.id, 0, new Set()));
  nodes.forEach((n) => { if (!depth.has(n.id)) visit(n.id, 0, new Set()); });
  const columns = [];
  for (const n of nodes) {
    const d = depth.get(n.id);
    (columns[d] = columns[d] || []).push(n);
  }
  return columns.filter(Boolean);
}

async function viewGraph() {
  const [res, services] = await Promise.all([api("graph"), api("services")]);
  if (!res.ok) return [header("Service graph", ""), failure(res)];
  const { nodes, edges, source } = res.body;
  const eps = services.ok ? services.body.services : {};
  // Columns follow the calls; a route only places a backend nobody calls directly.
  const called = new Set(edges.filter((e) => e.kind === "traffic").map((e) => e.target));
  const columns = layout(nodes, edges.filter((e) => e.kind === "traffic" || !called.has(e.target)));
  const W = 220, H = 58, GX = 240, GY = 46, PAD = 30;
  const pos = new Map();
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  columns.forEach((col, ci) => {
    const offset = ((tallest - col.length) * (H + GY)) / 2;
    col.forEach((n, ri) => pos.set(n.id, { x: PAD + ci * (W + GX), y: PAD + offset + ri * (H + GY) }));
  });
  const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * GX + 200;
  const height = PAD * 2 + tallest * H + (tallest - 1) * GY + 10;
  const svg = s("svg", { class: "graph", viewBox: `0 0 ${Math.max(width, 600)} ${height}`, role: "img", "aria-label": "service graph" });
  const defs = s("defs", {});
  for (const [id, cls] of [["arrow", "traffic"], ["arrow-route", "route"], ["arrow-bad", "bad"]]) {
    defs.append(s("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", class: `arrowhead ${cls}`, fill: cls === "route" ? "var(--route)" : cls === "bad" ? "var(--bad)" : "var(--accent)" })));
  }
  svg.append(defs);
  const labels = [];
  const traffic = new Set(edges.filter((e) => e.kind === "traffic").flatMap((e) => [e.source, e.target]));
  const routed = new Set(edges.filter((e) => e.kind === "route").map((e) => e.source));
  // Two edges between one pair (traffic and route) bend apart.
  const pairCount = new Map();
  for (const e of edges) {
    const a = pos.get(e.source), b = pos.get(e.target);
    if (!a || !b) continue;
    const pair = `${e.source}>${e.target}`;
    const nth = pairCount.get(pair) || 0;
    pairCount.set(pair, nth + 1);
    const forward = b.x > a.x;
    const down = b.y > a.y;
    const x1 = forward ? a.x + W : a.x + W - 30, y1 = forward ? a.y + H / 2 : down ? a.y + H : a.y;
    const x2 = forward ? b.x : b.x + W - 30, y2 = forward ? b.y + H / 2 : down ? b.y : b.y + H;
    const bend = nth * 26;
    const mx = (x1 + x2) / 2;
    const d = forward ? `M${x1},${y1} C${mx},${y1 + bend} ${mx},${y2 + bend} ${x2},${y2}` : `M${x1},${y1} C${x1 + 50 + bend},${(y1 + y2) / 2} ${x2 + 50 + bend},${(y1 + y2) / 2} ${x2},${y2}`;
    const bad = e.kind === "traffic" && e.errors > 0;
    svg.append(s("path", { d, class: `edge ${e.kind}${bad ? " errors" : ""}`, "marker-end": `url(#${e.kind === "route" ? "arrow-route" : bad ? "arrow-bad" : "arrow"})`, "data-edge": `${e.source}>${e.target}`, "data-kind": e.kind, "data-requests": e.kind === "traffic" ? e.requests : null }));
    let text;
    if (e.kind === "route") {
      text = [`${e.weight}%${e.headers && e.headers.length ? " · " + e.headers.map(matchText).join(", ") : ""}`];
    } else {
      const rate = e.rps === null ? "" : ` · ${e.rps.toFixed(1)} rps`;
      const errs = e.error_rate === null ? `${e.errors} err` : `${(100 * e.error_rate).toFixed(1)}% err`;
      text = [`${e.requests} req${rate} · ${errs}`, `p50 ${ms(e.p50_ms)} · p99 ${ms(e.p99_ms)}`];
    }
    labels.push({ x: forward ? mx : Math.max(x1, x2) + 38 + bend, y: (y1 + y2) / 2 + (forward ? bend * 0.75 : (nth - 0.5) * 28), anchor: forward ? "middle" : "start", text, cls: e.kind === "route" ? "route" : bad ? "bad" : "traffic", edge: e });
  }
  for (const n of nodes) {
    const p = pos.get(n.id);
    const { ns, name } = splitName(n.id);
    const endpoints = eps[n.id] ? eps[n.id].endpoints.length : null;
    svg.append(s("g", { class: `node${traffic.has(n.id) ? " traffic" : ""}${routed.has(n.id) ? " routed" : ""}`, transform: `translate(${p.x},${p.y})`, "data-node": n.id },
      s("rect", { width: W, height: H, rx: 10 }),
      s("circle", { cx: 18, cy: 21, r: 5, fill: colorOf(n.id, nodes.map((x) => x.id)) }),
      s("text", { x: 32, y: 25, class: "name" }, name),
      s("text", { x: 32, y: 43, class: "ns" }, ns),
      endpoints === null ? null : s("text", { x: W - 12, y: 43, class: "eps", "text-anchor": "end" }, `${endpoints} endpoint${endpoints === 1 ? "" : "s"}`)));
  }
  for (const l of labels) {
    const w = Math.max(...l.text.map((t) => t.length)) * 6.7 + 14;
    const hgt = l.text.length * 14 + 8;
    const left = l.anchor === "start" ? l.x : l.x - w / 2;
    svg.append(s("g", { class: `label ${l.cls}`, transform: `translate(${left},${l.y - hgt / 2})`, "data-label": `${l.edge.source}>${l.edge.target}` },
      s("rect", { width: w, height: hgt, rx: 5 }),
      l.text.map((t, i) => s("text", { x: 7, y: 15 + i * 14 }, t))));
  }
  const trafficEdges = edges.filter((e) => e.kind === "traffic");
  return [
    header("Service graph", "Services as nodes; an edge where one calls another, with its request rate, error rate and latency."),
    nodes.length ? h("div", { class: "panel graph-wrap" }, svg) : empty("No Services", "The registry has no Services yet."),
    h("div", { class: "graph-legend" }, h("span", {}, "calls, measured by the caller's sidecar"), h("span", { class: "route" }, "routing configuration: share of calls sent to each backend")),
    h("p", { class: "source-note", id: "graph-source" },
      ...graphSource(source),
      trafficEdges.length ? "" : h("b", {}, "No traffic data yet: no sidecar has sent a request to a mesh Service.")),
  ];
}

// ---------------------------------------------------------------- Certificates

function graphSource(source) {
  const when = new Date(source.at * 1000).toLocaleTimeString();
  if (source.kind === "prometheus") {
    return [
      `Where the numbers come from: Prometheus at ${source.url}, queried at ${when}: the request metrics the callers' sidecars count (envoy_shoal_requests_total and envoy_shoal_request_duration_milliseconds, reporter="source"). `,
      `Requests and p50/p99 are over the counters' lifetime, rates over the last ${source.window}; a sidecar Prometheus does not scrape is not counted. `,
      source.error ? h("b", { class: "source-error" }, `Prometheus did not answer: ${source.error}. Only the routing configuration is drawn. `) : "",
    ];
  }
  return [
    `Where the numbers come from: the sidecars' own Envoy stats (outbound clusters: upstream_rq_total, upstream_rq_5xx, upstream_rq_time), scraped by this dashboard from the Envoy admin of ${source.scraped} of ${source.proxies} proxies at ${when}. `,
    "Rates are over the last minute of scrapes (the first view shows totals); p50 is the request-weighted mean of the callers' medians, p99 the worst caller's. ",
    source.unreachable ? `${source.unreachable} proxies are not on this host or do not say where their admin is: their calls are not counted (shoal dashboard --prometheus reads them all). ` : "",
  ];
}

function expiry(notAfter, lifetimeS) {
  const left = (Date.parse(notAfter) - Date.now()) / 1000;
  const frac = lifetimeS ? Math.max(0, Math.min(1, left / lifetimeS)) : 1;
  const cls = left <= 0 ? "bad" : frac < 0.2 ? "warn" : "";
  return h("span", { class: "expiry" },
    h("span", { class: `bar ${cls}` }, h("i", { width: `${Math.round(frac * 100)}%` })),
    left <= 0 ? h("span", { class: "pill bad" }, "expired") : `in ${ago(left)}`,
    h("span", { class: "faint mono" }, notAfter));
}

async function viewCertificates() {
  const res = await api("ca");
  if (res.status === 404) return [header("Certificates", ""), empty("No CA", "This control plane runs without mTLS (--insecure-xds).")];
  if (!res.ok) return [header("Certificates", ""), failure(res)];
  const ca = res.body;
  const rootLife = (r) => (Date.parse(r.not_after) - Date.parse(r.not_before)) / 1000;
  const older = Object.entries(ca.proxies_on_older_certificates || {});
  return [
    header("Certificates", `The mesh CA of trust domain ${ca.trust_domain}: its roots, and each workload identity's certificate, when it expires and when it renews.`),
    h("div", { class: "summary" },
      stat(ca.roots.length, "trusted roots"), stat(ca.workloads.length, "workload identities"),
      stat(ago(ca.workload_ttl_s), "workload lifetime"), stat(ca.renewals, "renewals so far"),
      stat(older.length, "on older certificates", older.length ? "warn" : "ok")),
    h("h2", {}, "Roots"),
    h("div", { class: "panel" }, h("table", { id: "roots" },
      h("thead", {}, h("tr", {}, h("th", {}, "Subject"), h("th", {}, "Serial"), h("th", {}, "Role"), h("th", {}, "Expires"))),
      h("tbody", {},
        ca.roots.map((r) => h("tr", {}, h("td", {}, r.subject), h("td", { class: "mono" }, r.serial.slice(0, 16)),
          h("td", {}, r.serial === ca.signer.serial ? h("span", { class: "pill ok" }, "signing") : h("span", { class: "pill idle" }, "trusted")),
          h("td", {}, expiry(r.not_after, rootLife(r))))),
        (ca.retired || []).map((r) => h("tr", {}, h("td", {}, r.subject), h("td", { class: "mono" }, r.serial.slice(0, 16)),
          h("td", {}, h("span", { class: "pill warn" }, "retired")), h("td", {}, `client certificates trusted until ${r.trusted_until}`)))))),
    h("h2", {}, "Workload certificates"),
    ca.workloads.length === 0 ? empty("No workload certificates yet", "A certificate is issued when a proxy of that identity connects.") :
      h("div", { class: "panel" }, h("table", { id: "workloads" },
        h("thead", {}, h("tr", {}, h("th", {}, "Identity"), h("th", {}, "Serial"), h("th", {}, "Expires"), h("th", {}, "Renews"), h("th", {}, "Held by"))),
        h("tbody", {}, ca.workloads.map((w) => h("tr", { "data-identity": w.identity },
          h("td", { class: "mono" }, w.identity), h("td", { class: "mono muted" }, w.serial.slice(0, 16)),
          h("td", {}, expiry(w.not_after, ca.workload_ttl_s)),
          h("td", { class: "muted" }, `in ${ago(Math.max(0, (Date.parse(w.renew_at) - Date.now()) / 1000))}`),
          h("td", {}, w.proxies.length ? w.proxies.map((p) => h("span", { class: "chip" }, p)) : h("span", { class: "faint" }, "no proxy yet"))))))),
    older.length ? [h("h2", {}, "Proxies on older certificates"), h("div", { class: "panel" }, h("table", {}, h("tbody", {},
      older.map(([serial, ps]) => h("tr", {}, h("td", { class: "mono" }, serial === "none" ? "no certificate yet" : serial.slice(0, 16)), h("td", {}, ps.map((p) => h("span", { class: "chip" }, p))))))))] : null,
  ];
}

// ---------------------------------------------------------------- Traces

function traceFields(t) {
  return {
    id: t.traceId ?? t.trace_id ?? t.id ?? "",
    // /debug/traces: rootService is the root span's service, root its name.
    root: t.rootService ?? t.root_service ?? t.service ?? "",
    name: t.rootName ?? t.root_name ?? t.root ?? t.name ?? "",
    start: t.start ?? t.timestamp ?? 0,
    duration: t.duration ?? 0,
    spans: t.spanCount ?? t.span_count ?? (Array.isArray(t.spans) ? t.spans.length : t.spans) ?? 0,
    services: t.services ?? [],
    error: Boolean(t.error),
  };
}

function micros(v) { return ms(v / 1000); }

function startTime(v) {
  // Zipkin timestamps are µs since the epoch; a list may give seconds.
  const millis = v > 1e14 ? v / 1000 : v > 1e11 ? v : v * 1000;
  return new Date(millis).toLocaleTimeString();
}

async function viewTraces() {
  const res = await api("traces");
  if (res.status === 404) {
    return [header("Traces", "Requests followed across services."),
      empty("Tracing is not enabled", "This control plane has no trace collector (/debug/traces is not served). Start it with tracing on, and send requests through the mesh.")];
  }
  if (!res.ok) return [header("Traces", ""), failure(res)];
  const list = (Array.isArray(res.body) ? res.body : res.body.traces || []).map(traceFields);
  const q = state.traceQuery.trim().toLowerCase();
  const shown = q ? list.filter((t) => [t.id, t.root, t.name, ...t.services].join(" ").toLowerCase().includes(q)) : list;
  const longest = Math.max(1, ...shown.map((t) => t.duration));
  const search = h("input", { type: "search", id: "trace-search", placeholder: "Search by trace id, service or operation", value: state.traceQuery,
    oninput: (ev) => { state.traceQuery = ev.target.value; rerender(true); } });
  const detail = h("div", { id: "trace-detail" });
  // The waterfall follows the search: a trace it hides is not the one shown.
  if (shown.length && !shown.some((t) => t.id === state.selectedTrace)) {
    state.selectedTrace = shown[0].id;
    state.selectedSpan = "";
  }
  if (state.selectedTrace) loadTrace(state.selectedTrace, detail);
  return [
    header("Traces", "Requests followed across services, newest first. Choose one to see its spans as a waterfall."),
    h("div", { class: "toolbar" }, search, h("span", { class: "muted" }, `${shown.length} of ${list.length} traces`)),
    list.length === 0 ? empty("No traces yet", "Send requests through the mesh; sampled requests appear here.") :
      h("div", { class: "traces-layout" },
        h("div", { class: "panel traces-list" }, h("table", { id: "traces" },
          h("thead", {}, h("tr", {}, h("th", {}, "Trace"), h("th", {}, "Root service"), h("th", {}, "Started"), h("th", {}, "Duration"), h("th", { class: "num" }, "Spans"))),
          h("tbody", {}, shown.map((t) => h("tr", { class: `clickable${t.id === state.selectedTrace ? " selected" : ""}`, "data-trace": t.id,
            onclick: () => { state.selectedTrace = t.id; state.selectedSpan = ""; rerender(true); } },
            h("td", { class: "mono" }, t.id.slice(0, 16)),
            h("td", {}, t.error ? h("span", { class: "dot bad" }) : h("span", { class: "dot ok" }), t.root, t.name ? h("span", { class: "muted" }, `  ${t.name}`) : null),
            h("td", { class: "muted" }, t.start ? startTime(t.start) : "–"),
            h("td", {}, h("span", { class: "durbar", width: `${Math.max(2, (80 * t.duration) / longest)}px` }), micros(t.duration)),
            h("td", { class: "num" }, t.spans)))))),
        detail),
  ];
}

async function loadTrace(id, into) {
  const res = await api(`traces/${encodeURIComponent(id)}`);
  into.replaceChildren();
  if (!res.ok) { into.append(failure(res)); return; }
  const spans = Array.isArray(res.body) ? res.body : res.body.spans || [];
  into.append(waterfall(id, spans));
}

function waterfall(id, spans) {
  if (!spans.length) return empty("Empty trace", "The collector holds no spans of this trace.");
  const start = Math.min(...spans.map((x) => x.timestamp || 0));
  const end = Math.max(...spans.map((x) => (x.timestamp || 0) + (x.duration || 0)));
  const total = Math.max(1, end - start);
  const byParent = new Map();
  const ids = new Set(spans.map((x) => x.id));
  for (const sp of spans) {
    const parent = sp.parentId && ids.has(sp.parentId) ? sp.parentId : "";
    if (!byParent.has(parent)) byParent.set(parent, []);
    byParent.get(parent).push(sp);
  }
  // Depth-first, children by start time: the shape of the request.
  const ordered = [];
  const walk = (parent, depth) => {
    for (const sp of (byParent.get(parent) || []).sort((a, b) => (a.timestamp || 0) - (b.timestamp || 0))) {
      ordered.push({ sp, depth });
      walk(sp.id, depth + 1);
    }
  };
  walk("", 0);
  const serviceOf = (sp) => (sp.localEndpoint && sp.localEndpoint.serviceName) || "unknown";
  const services = [...new Set(ordered.map((o) => serviceOf(o.sp)))];
  const ticks = [0, 0.25, 0.5, 0.75, 1];
  const tagsBox = h("div", { class: "tags", id: "span-tags" });
  const showTags = (sp) => {
    state.selectedSpan = sp.id;
    tagsBox.replaceChildren(h("h2", {}, `${serviceOf(sp)} · ${sp.name || ""}`),
      h("table", {}, h("tbody", {},
        [["span id", sp.id], ["parent", sp.parentId || "(root)"], ["kind", sp.kind || ""], ["start", `+${micros((sp.timestamp || 0) - start)}`], ["duration", micros(sp.duration || 0)],
          ...Object.entries(sp.tags || {})].map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, String(v)))))));
    document.querySelectorAll(".wf-row").forEach((r) => r.classList.toggle("selected", r.dataset.span === sp.id));
  };
  const grid = h("div", { class: "wf-grid", id: "waterfall" },
    h("div", { class: "wf-axis" }, h("div", {}, "Service · operation"),
      h("div", {}, h("div", { class: "wf-ticks" }, ticks.map((t) => { const el = h("span", {}, micros(t * total)); el.style.left = `${t * 100}%`; if (t === 0) el.style.transform = "none"; if (t === 1) el.style.transform = "translateX(-100%)"; return el; })))),
    ordered.map(({ sp, depth }) => {
      const left = (100 * ((sp.timestamp || 0) - start)) / total;
      const width = (100 * (sp.duration || 0)) / total;
      const isError = sp.tags && (sp.tags.error !== undefined || /^5/.test(String(sp.tags["http.status_code"] || "")));
      const bar = h("div", { class: `wf-bar${isError ? " error" : ""}`, bg: colorOf(serviceOf(sp), services), title: `${micros(sp.duration || 0)}` });
      bar.style.left = `${left}%`;
      bar.style.width = `${Math.max(width, 0.3)}%`;
      const dur = h("span", { class: "wf-dur" }, micros(sp.duration || 0));
      if (left + width > 82) { dur.style.right = `${100 - left + 0.8}%`; } else { dur.style.left = `calc(${left + width}% + 6px)`; }
      const name = h("div", { class: "wf-name" }, h("span", { class: "svc-tag" }, serviceOf(sp)), h("span", { class: "op" }, sp.name || ""));
      name.style.paddingLeft = `${12 + depth * 14}px`;
      return h("div", { class: "wf-row", "data-span": sp.id, "data-service": serviceOf(sp), onclick: () => showTags(sp) },
        name, h("div", {}, h("div", { class: "wf-track" }, bar, dur)));
    }));
  const panel = h("section", { class: "panel waterfall" },
    h("div", { class: "wf-head" }, h("h3", {}, `Trace ${id.slice(0, 16)}`),
      h("span", { class: "muted" }, `${spans.length} spans across ${services.length} services · ${micros(total)}`),
      h("span", { class: "legend" }, services.map((name) => h("span", {}, h("i", { bg: colorOf(name, services) }), name)))),
    grid, tagsBox);
  const chosen = ordered.find((o) => o.sp.id === state.selectedSpan) || ordered[0];
  queueMicrotask(() => showTags(chosen.sp));
  return panel;
}

// ---------------------------------------------------------------- Pushes and problems

async function viewPushes() {
  const res = await api("pushes");
  if (!res.ok) return [header("Pushes", ""), failure(res)];
  return [
    header("Pushes", "The last pushes of configuration to proxies, newest first: why each happened and what changed."),
    res.body.length === 0 ? empty("No pushes yet", "") : h("div", { class: "panel" }, h("table", { id: "pushes" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Push"), h("th", { class: "num" }, "Mesh"), h("th", {}, "Why"), h("th", {}, "What changed"), h("th", { class: "num" }, "Proxies"), h("th", { class: "num" }, "Built in"), h("th", { class: "num" }, "Debounced"))),
      h("tbody", {}, res.body.map((p) => h("tr", {},
        h("td", { class: "num" }, p.push), h("td", { class: "num muted" }, p.mesh_version),
        h("td", {}, Object.entries(p.reasons).map(([k, v]) => h("span", { class: "chip" }, v > 1 ? `${k} ×${v}` : k))),
        h("td", {}, p.changed), h("td", { class: "num" }, p.proxies), h("td", { class: "num" }, `${p.build_ms} ms`), h("td", { class: "num muted" }, `${p.debounce_ms} ms`)))))),
  ];
}

function problemsBadge(found) {
  const errors = found.filter((p) => p.severity === "Error").length;
  setBadge("badge-problems", found.length || "", errors ? "bad" : "warn");
}

async function viewProblems() {
  const res = await api("problems");
  if (!res.ok) return [header("Problems", ""), failure(res)];
  problemsBadge(res.body);
  return [
    header("Problems", "What shoal analyze finds: each problem with its code, the object and field at fault, what it does to traffic, and the fix. The last good configuration of a refused object stays in force."),
    res.body.length === 0 ? h("div", { class: "empty" }, h("strong", {}, "No problems"), "Every manifest was understood, and no analyzer found a misconfiguration.") :
      h("div", { class: "panel" }, h("table", { id: "problems" },
        h("thead", {}, h("tr", {}, h("th", {}, "Severity"), h("th", {}, "Code"), h("th", {}, "Object"), h("th", {}, "Reason and fix"))),
        h("tbody", {}, res.body.map((p) => h("tr", { "data-code": p.code },
          h("td", {}, h("span", { class: `dot ${p.severity === "Error" ? "bad" : "warn"}` }), p.severity),
          h("td", {}, h("span", { class: "mono" }, p.code), h("div", { class: "muted" }, p.name)),
          h("td", {}, h("div", {}, p.object), p.field ? h("div", { class: "mono muted" }, p.field) : null, p.source ? h("div", { class: "muted" }, p.source) : null),
          h("td", {}, h("div", {}, p.reason), h("div", { class: "muted" }, `Fix: ${p.fix.replace(/`/g, "")}`))))))),
  ];
}

// ---------------------------------------------------------------- Shell

const VIEWS = { graph: viewGraph, services: viewServices, proxies: viewProxies, certificates: viewCertificates, traces: viewTraces, pushes: viewPushes, problems: viewProblems };

let rendering = 0;
async function rerender(userAction) {
  const view = (location.hash.replace(/^#\//, "") || "graph").split("?")[0];
  const render = VIEWS[view] || viewGraph;
  const ticket = ++rendering;
  const live = document.getElementById("live");
  let content;
  try {
    content = await render();
    live.classList.toggle("down", false);
  } catch (err) {
    content = [h("div", { class: "error-box" }, `Could not load this view: ${err}`)];
    live.classList.toggle("down", true);
  }
  if (ticket !== rendering) return;
  const main = document.getElementById("main");
  // Keep the search box focused across refreshes.
  const focused = document.activeElement && document.activeElement.id;
  const caret = focused === "trace-search" ? document.activeElement.selectionStart : null;
  main.replaceChildren(...[content].flat(Infinity).filter(Boolean));
  main.dataset.view = view;
  main.dataset.ready = String(ticket);
  if (focused === "trace-search") {
    const box = document.getElementById("trace-search");
    box.focus();
    if (caret !== null) box.setSelectionRange(caret, caret);
  }
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  if (!userAction) refreshBadges();
}

async function refreshBadges() {
  const [syncz, problems] = await Promise.all([api("syncz"), api("problems")]);
  if (syncz.ok) {
    const bad = syncz.body.filter((p) => p.types.some((x) => x.status === "NACKED")).length;
    setBadge("badge-proxies", bad || syncz.body.length, bad ? "bad" : "ok");
  }
  if (problems.ok) problemsBadge(problems.body);
}

function schedule() {
  clearTimeout(state.timer);
  if (state.paused) return;
  // The traces view refreshes only when asked: a waterfall that moves while read is no use.
  state.timer = setTimeout(async () => {
    if (location.hash !== "#/traces") await rerender(false);
    schedule();
  }, REFRESH_MS);
}

function initTheme() {
  const saved = localStorage.getItem("shoal-theme");
  const dark = saved ? saved === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  document.getElementById("theme").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("shoal-theme", next);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initTheme();
  document.getElementById("pause").addEventListener("click", (ev) => {
    state.paused = !state.paused;
    ev.target.textContent = state.paused ? "Resume" : "Pause";
    document.getElementById("live").classList.toggle("paused", state.paused);
    document.querySelector("#live span").textContent = state.paused ? "paused" : "live";
    schedule();
  });
  window.addEventListener("hashchange", () => rerender(true));
  rerender(false);
  schedule();
  api("services").then((r) => { if (r.ok) setMeshVersion(r.body.version); });
});
