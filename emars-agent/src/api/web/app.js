// EMARS web page: a read-only view of the agent's JSON API, drawn with the DOM and SVG (no
// framework, nothing fetched from elsewhere). Routes: #/ (functions), #/f/NAME (one function).
'use strict';

const MIB = 1048576;
const REFRESH_MS = 5000;
const SVG = 'http://www.w3.org/2000/svg';

function bytes(b) {
  if (b === null || b === undefined) return '–';
  if (b >= 1 << 30) return (b / (1 << 30)).toFixed(2) + ' GiB';
  return (b / MIB).toFixed(1) + ' MiB';
}

function when(ms) {
  if (!ms) return '–';
  return new Date(ms).toLocaleString();
}

// Elements are built with textContent only: names come from cgroup paths and labels.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function get(path) {
  const r = await fetch(path, { headers: { Accept: 'application/json' } });
  if (!r.ok) {
    const e = new Error(path + ': HTTP ' + r.status);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

const optional = (p) => p.catch(() => null);

// Where a function's requests are counted from (`requests_source`), and each source's count
// in an hour bucket.
const SOURCES = {
  platform: { label: 'platform: invocations', hour: (h) => h.invocations },
  kernel_requests: { label: 'kernel: HTTP requests', hour: (h) => h.requests },
  kernel_connections: { label: 'kernel: TCP connections', hour: (h) => h.connections },
  execs: { label: 'execs', hour: (h) => h.execs },
};
const source = (name) => SOURCES[name] || SOURCES.execs;

// Up to `max` instances of a listing, page after page (each at most 10000 records), following
// the answer's `next` cursor.
async function instancePages(path, max) {
  const out = [];
  let cursor = '';
  while (out.length < max) {
    const page = await get(`${path}&limit=${Math.min(max - out.length, 10000)}${cursor}`);
    out.push(...page.instances);
    if (!page.next) break;
    cursor = '&cursor=' + encodeURIComponent(page.next);
  }
  return out;
}

function table(headers, rows, id) {
  const t = el('table', id ? { id } : {});
  t.append(el('tr', {}, ...headers.map((h, i) => el('th', i === 0 ? { class: 'text' } : {}, h))));
  for (const r of rows) t.append(r);
  return t;
}

function meter(value, limit) {
  const m = el('span', { class: 'meter' });
  if (!limit) return m;
  const share = Math.min(1, value / limit);
  if (share > 0.9) m.classList.add('hot');
  const bar = el('span');
  // Through the CSSOM: the page's CSP allows no inline style attributes.
  bar.style.width = `${(share * 100).toFixed(1)}%`;
  m.append(bar);
  m.title = `${(share * 100).toFixed(0)}% of memory.max`;
  return m;
}

async function overview() {
  const [fns, recs] = await Promise.all([
    get('/v1/functions'),
    optional(get('/v1/recommendations')),
  ]);
  const rec = new Map(((recs && recs.recommendations) || []).map((r) => [r.function, r]));
  const rows = fns.functions.map((f) => {
    const r = rec.get(f.name);
    return el('tr', { 'data-function': f.name },
      el('td', {}, el('a', { href: '#/f/' + encodeURIComponent(f.name) }, f.name)),
      el('td', { class: 'num', 'data-col': 'live' }, f.live_instances),
      el('td', { class: 'num', 'data-col': 'instances' }, f.instances),
      el('td', { class: 'num' }, bytes(f.peak_percentiles.p50)),
      el('td', { class: 'num', 'data-col': 'p95' }, bytes(f.peak_percentiles.p95)),
      el('td', { class: 'num' }, bytes(f.peak_bytes)),
      el('td', { class: 'num', 'data-col': 'max' }, r ? bytes(r.max_bytes) : '–'),
      el('td', { class: 'num' }, r ? bytes(r.high_bytes) : '–'),
      el('td', { class: 'num', 'data-col': 'oom' }, f.oom_kills),
      el('td', { class: 'num', 'data-col': 'requests', 'data-source': f.requests_source }, f.requests_per_hour),
      el('td', { class: 'text', 'data-col': 'source' }, source(f.requests_source).label));
  });
  const mode = recs ? recs.mode : 'observe';
  return [
    el('h1', {}, `Functions (${fns.functions.length})`),
    el('p', { class: 'muted' }, mode === 'enforce'
      ? `Policy mode: ${mode}. Peaks are the kernel's watermark of each instance; limits are what a new instance gets.`
      : `Policy mode: ${mode}: no limits are written. Peaks are the kernel's watermark of each instance; limits are what enforce mode would give a new instance.`),
    fns.functions.length
      ? table(['function', 'live', 'instances', 'peak p50', 'peak p95', 'peak max', 'memory.max', 'memory.high', 'OOM kills', 'requests/h (busiest)', 'counted from'], rows, 'functions')
      : el('p', { class: 'muted', id: 'functions' }, 'No function seen yet.'),
  ];
}

// Instance peaks in 30 bins, with the recommended memory.max and memory.high drawn on them.
function peakHistogram(peaks, rec) {
  // T: a band above the bars for the limits' labels, so that no bar runs under them.
  const W = 720, H = 236, L = 40, B = 30, T = 34;
  const top = Math.max(1, ...peaks, rec ? rec.max_bytes : 0) * 1.05;
  const bins = new Array(30).fill(0);
  for (const p of peaks) bins[Math.min(29, Math.floor((p / top) * 30))] += 1;
  const most = Math.max(1, ...bins);
  const s = svg('svg', { id: 'peak-histogram', viewBox: `0 0 ${W} ${H}`, width: W, height: H, 'data-instances': peaks.length });
  const x = (b) => L + ((W - L - 10) * b) / top;
  const y = (n) => H - B - ((H - B - T) * n) / most;
  const bw = (W - L - 10) / 30;
  bins.forEach((n, i) => {
    if (!n) return;
    s.append(svg('rect', { x: L + i * bw + 1, y: y(n), width: bw - 2, height: H - B - y(n), fill: '#3f6fb5', 'data-count': n }));
  });
  s.append(svg('line', { x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: '#9ca3af' }));
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    s.append(svg('text', { x: x(v), y: H - B + 16, 'text-anchor': i === 4 ? 'end' : 'middle' }, bytes(v)));
  }
  s.append(svg('text', { x: 4, y: T + 4 }, String(most)));
  if (rec) {
    for (const [key, value, colour] of [['max', rec.max_bytes, '#c62828'], ['high', rec.high_bytes, '#ef8f00']]) {
      s.append(svg('line', { x1: x(value), y1: key === 'max' ? 4 : 18, x2: x(value), y2: H - B, stroke: colour, 'stroke-width': 2, 'stroke-dasharray': '5 3', 'data-limit': key }));
      // Labels in the band above the bars, to the left of their line in the right half.
      const right = x(value) > W / 2;
      s.append(svg('text', { x: x(value) + (right ? -4 : 4), y: key === 'max' ? 13 : 27, fill: colour, class: 'limit', 'text-anchor': right ? 'end' : 'start' }, `memory.${key} ${bytes(value)}`));
    }
  }
  return s;
}

// Peak (line) and requests (bars, counted from `from`: a key of SOURCES) per hour over the
// retained hours.
function hoursChart(hours, from) {
  const W = 720, H = 180, L = 40, B = 24, T = 10;
  const s = svg('svg', { id: 'hours', viewBox: `0 0 ${W} ${H}`, width: W, height: H, 'data-hours': hours.length, 'data-source': from });
  if (!hours.length) return s;
  const maxPeak = Math.max(1, ...hours.map((h) => h.peak_bytes));
  const req = (h) => source(from).hour(h) || 0;
  const maxReq = Math.max(1, ...hours.map(req));
  const step = (W - L - 10) / hours.length;
  hours.forEach((h, i) => {
    const bh = ((H - B - T) * req(h)) / maxReq;
    s.append(svg('rect', { x: L + i * step, y: H - B - bh, width: Math.max(1, step - 1), height: bh, fill: '#d6e0f0' }));
  });
  const pts = hours.map((h, i) => `${L + i * step + step / 2},${H - B - ((H - B - T) * h.peak_bytes) / maxPeak}`);
  s.append(svg('polyline', { points: pts.join(' '), fill: 'none', stroke: '#3f6fb5', 'stroke-width': 2 }));
  for (const p of pts) {
    const [cx, cy] = p.split(',');
    s.append(svg('circle', { cx, cy, r: 3, fill: '#3f6fb5' }));
  }
  s.append(svg('text', { x: 4, y: T + 10 }, bytes(maxPeak)));
  s.append(svg('text', { x: W - 10, y: T + 10, 'text-anchor': 'end' }, `${maxReq} requests/h (${source(from).label})`));
  s.append(svg('text', { x: L, y: H - 6 }, new Date(hours[0].hour_start_ms).toLocaleString()));
  s.append(svg('text', { x: W - 10, y: H - 6, 'text-anchor': 'end' }, new Date(hours[hours.length - 1].hour_start_ms).toLocaleString()));
  return s;
}

async function functionPage(name) {
  const enc = encodeURIComponent(name);
  // Every live instance, and the newest 2000 ended ones for the peak histogram.
  const [f, live, ended, rec, audit] = await Promise.all([
    get('/v1/functions/' + enc),
    instancePages(`/v1/functions/${enc}/instances?live=true`, 50000),
    instancePages(`/v1/functions/${enc}/instances?live=false&order=newest`, 2000),
    optional(get(`/v1/functions/${enc}/recommendation`)),
    optional(get('/v1/audit?limit=1000')),
  ]);
  const card = (label, value, col) => el('div', { class: 'card', 'data-card': col }, label, el('b', {}, value));
  const cards = el('div', { class: 'cards' },
    card('instances', `${f.instances} (${f.live_instances} live)`, 'instances'),
    card('peak p50 / p95', `${bytes(f.peak_percentiles.p50)} / ${bytes(f.peak_percentiles.p95)}`, 'p95'),
    card('peak max', bytes(f.peak_bytes), 'max'),
    card('memory.max / high', rec ? `${bytes(rec.max_bytes)} / ${bytes(rec.high_bytes)}` : '–', 'limits'),
    card('OOM kills', f.oom_kills, 'oom'),
    card('execs / invocations', `${f.execs} / ${f.invocations}`, 'invocations'),
    card('HTTP requests / connections (kernel)', `${f.requests} / ${f.connections}`, 'kernel'),
    card(`requests/h (${source(f.requests_source).label})`, f.requests_per_hour, 'requests'));
  // Usage now (read from the cgroup at this request) against memory.max; no meter where the
  // usage could not be read (the cgroup went meanwhile).
  const liveRows = live.map((i) => el('tr', { 'data-instance': i.instance },
    el('td', {}, i.instance),
    el('td', { class: 'text' }, when(i.started_at_ms)),
    el('td', { class: 'num', 'data-col': 'usage' }, bytes(i.usage_bytes)),
    el('td', { class: 'num', 'data-col': 'peak' }, bytes(i.peak_bytes)),
    el('td', { class: 'num' }, bytes(i.limits.max_bytes)),
    el('td', { class: 'num' }, bytes(i.limits.high_bytes)),
    el('td', { class: 'num', 'data-col': 'requests' }, i.requests || 0),
    el('td', { class: 'num', 'data-col': 'connections' }, i.connections || 0),
    el('td', {}, i.usage_bytes == null ? '' : meter(i.usage_bytes, i.limits.max_bytes))));
  const writes = ((audit && audit.audit) || []).filter((w) => w.function === name);
  const auditRows = writes.map((w) => el('tr', { 'data-reason': w.reason },
    el('td', {}, when(w.at_ms)),
    el('td', { class: 'text' }, w.instance),
    el('td', { class: 'text' }, w.reason),
    el('td', { class: 'text' }, w.outcome),
    el('td', { class: 'num' }, `${bytes(w.old.max_bytes)} → ${bytes(w.new.max_bytes)}`),
    el('td', { class: 'num' }, `${bytes(w.old.high_bytes)} → ${bytes(w.new.high_bytes)}`),
    el('td', { class: 'text wrap' }, w.signal || w.error || '')));
  return [
    el('h1', {}, name),
    cards,
    el('h2', {}, `Instance peaks (${ended.length} ended)`),
    peakHistogram(ended.map((i) => i.peak_bytes).filter((p) => p > 0), rec),
    el('h2', {}, `Peak and requests per hour (requests: ${source(f.requests_source).label})`),
    hoursChart(f.hours, f.requests_source),
    el('h2', {}, `Live instances (${live.length})`),
    live.length ? table(['instance', 'started', 'usage now', 'peak', 'memory.max', 'memory.high', 'HTTP requests', 'connections', 'usage / max'], liveRows, 'live') : el('p', { class: 'muted', id: 'live' }, 'None running.'),
    el('h2', {}, `Limit writes and reactive actions (${writes.length})`),
    writes.length ? table(['at', 'instance', 'reason', 'outcome', 'memory.max', 'memory.high', 'signal / error'], auditRows, 'audit') : el('p', { class: 'muted', id: 'audit' }, 'None.'),
  ];
}

async function render() {
  const view = document.getElementById('view');
  const hash = location.hash || '#/';
  let parts;
  try {
    parts = hash.startsWith('#/f/') ? await functionPage(decodeURIComponent(hash.slice(4))) : await overview();
  } catch (e) {
    parts = [el('p', { class: 'error' }, e.status === 404 ? 'No such function.' : String(e))];
  }
  view.replaceChildren(...parts);
  view.setAttribute('data-ready', hash);
  document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
}

async function header() {
  try {
    const i = await get('/v1/info');
    document.getElementById('host').textContent = `kernel ${i.kernel}, cgroup ${i.cgroup_mode}, ${i.events_received} events, ${i.events_lost} lost`;
  } catch (e) {
    document.getElementById('host').textContent = 'agent unreachable';
  }
}

window.addEventListener('hashchange', render);
header();
render();
setInterval(() => { header(); render(); }, REFRESH_MS);
