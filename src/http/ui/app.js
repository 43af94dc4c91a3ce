'use strict';
// The hub's fleet page: one table per view, paged, filtered and sorted by
// the hub; live through a long poll on the change feed, at most one
// refresh every 2 s. Everything is put into the page as text, never HTML.
const KEY = 'konsul-fleet-token';
const POLL_GAP_MS = 2000;
const $ = (id) => document.getElementById(id);
const st = { view: 'edges', offset: 0, limit: 50, sort: '', desc: false, q: '', edge: '',
  health: '', only: false, index: 0, data: null, skew: 0, open: '', busy: false };

const num = (v) => (v === null || v === undefined ? '' : String(v));
const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) : 'never');
function age(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() + st.skew - ms) / 1000));
  if (s < 90) return s + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}
function badge(text, cls) {
  const b = document.createElement('span');
  b.className = 'badge ' + (cls || '');
  b.textContent = text;
  return b;
}
const HEALTH = { ok: 'good', alerting: 'warn', low_battery: 'warn', offline: 'bad' };
const isStale = (e) => Date.now() + st.skew - e.last_seen_ms > st.data.stale_after_ms;
// Failed sync rounds since the edge started; the last error on hover.
function syncErrors(e) {
  if (!e.failed_rounds) return num(e.failed_rounds);
  const s = document.createElement('span');
  s.title = e.last_error;
  s.append(badge(e.failed_rounds, 'warn'), ` last ${age(e.last_error_ms)}: ${e.last_error.slice(0, 60)}`);
  return s;
}

// [key, title, render(row) -> text or node, numeric]
const VIEWS = {
  edges: { url: '/v1/edge/fleet/edges', sort: 'edge_id', only: ['stale', 'Stale only'],
    key: 'edge_id', click: (e) => { st.edge = e.edge_id; go('devices'); },
    rowClass: (e) => (isStale(e) ? 'stale click' : 'click'),
    cols: [['edge_id', 'Edge', (e) => e.edge_id], ['version', 'Version', (e) => num(e.version)],
      ['stale', 'Sync', (e) => (isStale(e) ? badge('stale', 'bad') : badge('in sync', 'good'))],
      ['last_seen_ms', 'Last sync', (e) => when(e.last_seen_ms)],
      ['age_ms', 'Age', (e) => age(e.last_seen_ms)],
      ['pending_changes', 'Pending', (e) => num(e.pending_changes), 1],
      ['failed_rounds', 'Sync errors', syncErrors, 1],
      ['applied', 'Changes applied', (e) => num(e.applied), 1],
      ['conflicts', 'Conflicts', (e) => num(e.conflicts), 1],
      ['devices', 'Devices', (e) => num(e.devices), 1],
      ['alerts', 'Active alerts', (e) => (e.alerts ? badge(e.alerts, 'bad') : '0'), 1],
      ['ota_state', 'Host OTA', (e) => (e.ota_state ? `${e.ota_state} ${e.ota_version}` : '')],
      ['ota_slot', 'Slot', (e) => e.ota_slot]] },
  devices: { url: '/v1/edge/fleet/devices', sort: 'id', key: 'id', health: true,
    cols: [['id', 'Device', (d) => d.id], ['edge', 'Edge', (d) => d.edge || '(hub)'],
      ['type', 'Type', (d) => d.type],
      ['health', 'Health', (d) => badge(d.health.replace('_', ' '), HEALTH[d.health])],
      ['last_seen_ms', 'Last seen', (d) => age(d.last_seen_ms)],
      ['battery', 'Battery', (d) => (d.battery === null ? '' : d.battery + ' %'), 1],
      ['firmware_version', 'Firmware', (d) => d.firmware_version],
      ['target_version', 'Target', (d) => d.target_version],
      ['update_status', 'Update', (d) => d.update_status],
      ['alerts', 'Alerts', (d) => num(d.alerts), 1]] },
  alerts: { url: '/v1/edge/fleet/alerts', sort: 'raised_at_ms', desc: true, key: 'device_id',
    only: ['active', 'Active only'],
    cols: [['raised_at_ms', 'Raised', (a) => when(a.raised_at_ms)],
      ['device_id', 'Device', (a) => a.device_id], ['edge', 'Edge', (a) => a.edge || '(hub)'],
      ['name', 'Alert', (a) => a.name],
      ['severity', 'Severity', (a) => badge(a.severity, a.severity === 'critical' ? 'bad' : 'warn')],
      ['message', 'Message', (a) => a.message],
      ['active', 'State', (a) => (a.active ? badge('active', 'bad') : 'cleared')]] },
  rollouts: { url: '/v1/edge/rollouts', local: true, sort: 'created_ms', desc: true, key: 'id',
    click: (r) => { st.open = r.id; detail(); }, rowClass: () => 'click',
    cols: [['id', 'Rollout', (r) => r.id], ['device_type', 'Type', (r) => r.device_type],
      ['version', 'Version', (r) => r.version], ['state', 'State', (r) => r.state],
      ['counts', 'Devices by state', (r) => Object.entries(r.counts || {}).map((c) => c.join(' ')).join(', ')],
      ['created_ms', 'Created', (r) => when(r.created_ms)], ['reason', 'Reason', (r) => r.reason]] },
  conflicts: { url: '/v1/edge/conflicts?limit=1000', local: true, sort: 'at_ms', desc: true, key: 'id',
    cols: [['at_ms', 'At', (c) => when(c.at_ms)], ['kind', 'Kind', (c) => c.kind],
      ['key', 'Key', (c) => c.key], ['edge', 'Edge', (c) => c.edge],
      ['winner', 'Winner', (c) => c.winner]] },
};

function token() { return sessionStorage.getItem(KEY) || ''; }
class HttpError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}
async function api(path, method) {
  const headers = { Accept: 'application/json' };
  if (token()) headers.Authorization = 'Bearer ' + token();
  const r = await fetch(path, { method: method || 'GET', headers, cache: 'no-store' });
  const text = await r.text();
  if (!r.ok) {
    let msg = text;
    try { msg = JSON.parse(text).message || JSON.parse(text).error || text; } catch (e) { /* text */ }
    throw new HttpError(r.status, msg);
  }
  return text ? JSON.parse(text) : null;
}

function ask(message) {
  $('main').hidden = true;
  $('login').hidden = false;
  $('signout').hidden = !token();
  $('login-error').textContent = message || '';
  $('token').focus();
}
function failed(e) {
  if (e.status === 401 || (e.status === 403 && !token())) {
    ask(token() ? 'The hub refused this token: ' + e.message : '');
    return;
  }
  $('status').textContent = (e.status === 403 ? 'Not allowed with this token: ' : 'Error: ') + e.message;
}

function query(v) {
  const p = new URLSearchParams();
  if (v.local) return v.url;
  p.set('offset', st.offset); p.set('limit', st.limit);
  p.set('sort', st.sort); if (st.desc) p.set('desc', '1');
  if (st.q) p.set('q', st.q);
  if (st.edge && st.view === 'devices') p.set('edge', st.edge);
  if (st.edge && st.view === 'alerts') p.set('edge', st.edge);
  if (st.health && v.health) p.set('health', st.health);
  if (st.only && v.only) p.set(v.only[0], '1');
  return v.url + '?' + p;
}

// The local views (rollouts, conflicts: short lists) page and sort here.
function localPage(v, list) {
  const q = st.q.toLowerCase();
  let rows = list.filter((r) => !q || JSON.stringify(r).toLowerCase().includes(q));
  const k = st.sort;
  rows.sort((a, b) => (a[k] > b[k] ? 1 : a[k] < b[k] ? -1 : 0) * (st.desc ? -1 : 1));
  return { total: rows.length, offset: st.offset, limit: st.limit,
    items: rows.slice(st.offset, st.offset + st.limit) };
}

async function refresh() {
  if (st.busy) { st.again = true; return; }
  st.busy = true;
  const v = VIEWS[st.view];
  const asked = st.view;
  try {
    const sent = Date.now();
    let data = await api(query(v));
    if (asked !== st.view) return;
    if (v.local) data = localPage(v, data);
    if (data.now_ms) st.skew = data.now_ms - (sent + Date.now()) / 2;
    st.data = data;
    $('status').textContent = '';
    $('login').hidden = true;
    $('main').hidden = false;
    $('signout').hidden = !token();
    render();
    if (st.view === 'rollouts') await hostRollouts();
    if (st.view === 'rollouts' && st.open) await detail();
  } catch (e) {
    failed(e);
  } finally {
    st.busy = false;
    if (st.again) { st.again = false; refresh(); }
  }
}

function cell(tr, content, numeric) {
  const td = document.createElement('td');
  if (numeric) td.className = 'num';
  if (content instanceof Node) td.append(content); else td.textContent = content;
  tr.append(td);
}

function render() {
  const v = VIEWS[st.view];
  const d = st.data;
  const head = document.createElement('tr');
  for (const [key, title] of v.cols) {
    const th = document.createElement('th');
    th.textContent = title;
    th.dataset.sort = key;
    if (st.sort === key) th.setAttribute('aria-sort', st.desc ? 'descending' : 'ascending');
    head.append(th);
  }
  $('grid').tHead.replaceChildren(head);
  const body = $('grid').tBodies[0];
  body.replaceChildren(...d.items.map((row) => {
    const tr = document.createElement('tr');
    tr.dataset.id = row[v.key];
    if (v.rowClass) tr.className = v.rowClass(row);
    if (v.click) tr.onclick = () => v.click(row);
    for (const [, , show, numeric] of v.cols) cell(tr, show(row), numeric);
    return tr;
  }));
  if (!d.items.length) {
    const tr = document.createElement('tr');
    const td = document.createElement('td');
    td.colSpan = v.cols.length;
    td.className = 'muted';
    td.textContent = 'Nothing to show.';
    tr.append(td);
    body.append(tr);
  }
  const last = Math.min(d.offset + d.items.length, d.total);
  $('range').textContent = d.total ? `${d.offset + 1}-${last} of ${d.total}` : '0 of 0';
  $('prev').disabled = d.offset === 0;
  $('next').disabled = last >= d.total;
}

async function command(id, cmd) {
  try {
    await api(`/v1/edge/rollouts/${encodeURIComponent(id)}/${cmd}`, 'POST');
    $('status').textContent = '';
    await refresh();
  } catch (e) {
    failed(e);
  }
}

function table(heads, rows) {
  const t = document.createElement('table');
  const h = document.createElement('tr');
  for (const x of heads) { const th = document.createElement('th'); th.textContent = x; h.append(th); }
  t.createTHead().append(h);
  const b = t.createTBody();
  for (const r of rows) {
    const tr = document.createElement('tr');
    tr.dataset.id = r[0];
    for (const c of r) cell(tr, c instanceof Node ? c : num(c));
    b.append(tr);
  }
  return t;
}
function bar(done, total) {
  const s = document.createElement('span');
  s.className = 'bar';
  s.title = `${done} of ${total}`;
  const i = document.createElement('i');
  i.style.width = (total ? Math.round((100 * done) / total) : 0) + '%';
  s.append(i);
  return s;
}
const summary = (counts) => Object.entries(counts || {}).map((c) => c.join(' ')).join(', ');

// Host (A/B) rollouts: a short list with each edge's latest report.
async function hostRollouts() {
  const box = $('host');
  let list;
  try {
    list = await api('/v1/edge/ota/rollouts');
  } catch (e) {
    box.hidden = true;
    return;
  }
  const h = document.createElement('h2');
  h.textContent = 'Host rollouts';
  const t = table(['Rollout', 'Version', 'Created', 'Edges by state', 'Edges'], list.map((r) => {
    const states = r.edge_states || [];
    const c = {};
    for (const e of states) c[e.state] = (c[e.state] || 0) + 1;
    return [r.id, r.version, when(r.created_ms), summary(c), states.map((e) =>
      `${e.node_id}: ${e.state}` + (e.last_error ? ` (${e.last_error})` : '')).join(', ')];
  }));
  t.id = 'host-rollouts';
  box.replaceChildren(h, list.length ? t : 'None.');
  box.hidden = st.view !== 'rollouts';
}

async function detail() {
  const box = $('detail');
  if (!st.open || st.view !== 'rollouts') { box.hidden = true; return; }
  let r;
  try {
    r = await api('/v1/edge/fleet/rollouts/' + encodeURIComponent(st.open));
  } catch (e) { failed(e); return; }
  const h = document.createElement('h2');
  h.textContent = `Rollout ${r.id}: ${r.device_type} ${r.version}, ${r.state}`;
  const tools = document.createElement('p');
  tools.id = 'rollout-state';
  tools.dataset.state = r.state;
  for (const cmd of ['pause', 'resume', 'abort']) {
    const b = document.createElement('button');
    b.type = 'button';
    b.id = 'rollout-' + cmd;
    b.textContent = cmd[0].toUpperCase() + cmd.slice(1);
    b.disabled = r.state === 'aborted' || r.state === 'complete' ||
      (cmd === 'pause' && r.state === 'paused') || (cmd === 'resume' && r.state === 'running');
    b.onclick = () => command(r.id, cmd);
    tools.append(b, ' ');
  }
  if (r.reason) tools.append(' ' + r.reason);
  const runs = new Map((r.edges || []).map((e) => [e.edge, e]));
  const edges = new Set([...runs.keys(), ...Object.keys(r.by_edge || {})]);
  const perEdge = table(['Edge', 'Run', 'Targets', 'Complete', 'Devices by state', 'Reason'],
    [...edges].sort().map((e) => {
      const c = (r.by_edge || {})[e] || {};
      const run = runs.get(e) || {};
      const total = Object.values(c).reduce((a, b) => a + b, 0);
      const done = c.complete || 0;
      const p = document.createElement('span');
      p.append(bar(done, total), ` ${done}/${total}`);
      return [e || '(hub)', run.state || '', run.targets ?? '', p, summary(c), run.reason || ''];
    }));
  perEdge.id = 'rollout-edges';
  const waves = table(['Wave', 'Devices by state'],
    Object.keys(r.by_wave || {}).sort((a, b) => a - b).map((w) => [+w + 1, summary(r.by_wave[w])]));
  const log = document.createElement('pre');
  log.textContent = (r.device_states || []).map((d) =>
    `${when(d.offered_ms)} ${d.device} (${d.edge || 'hub'}) wave ${d.wave + 1}: ${d.state}` +
    (d.progress ? ` ${d.progress}%` : '') + (d.error ? ` - ${d.error}` : '')).join('\n');
  const t = (s) => { const x = document.createElement('h3'); x.textContent = s; return x; };
  box.replaceChildren(h, tools, t('Per edge'), perEdge, t('Per wave'), waves, t('Devices'), log);
  box.hidden = false;
}

function go(view) {
  if (!VIEWS[view]) view = 'edges';
  if (location.hash !== '#' + view) { location.hash = view; return; }
  const v = VIEWS[view];
  if (st.view !== view) { st.q = ''; $('q').value = ''; st.only = false; $('only').checked = false; }
  if (view !== 'devices' && view !== 'alerts') st.edge = '';
  Object.assign(st, { view, offset: 0, sort: v.sort, desc: !!v.desc, data: null });
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('on', a.dataset.view === view);
  $('health').hidden = !v.health;
  $('only-label').hidden = !v.only;
  if (v.only) $('only-label').querySelector('span').textContent = v.only[1];
  $('chip').hidden = !st.edge;
  if (st.edge) {
    const x = document.createElement('button');
    x.type = 'button'; x.textContent = '\u00d7'; x.title = 'all edges';
    x.onclick = () => { st.edge = ''; $('chip').hidden = true; st.offset = 0; refresh(); };
    $('chip').replaceChildren('edge ' + st.edge, x);
  }
  $('detail').hidden = true;
  $('host').hidden = true;
  st.open = '';
  $('grid').tBodies[0].replaceChildren();
  refresh();
}

async function live() {
  for (;;) {
    if (!$('main').hidden) {
      try {
        // Edges sync without changing anything: the edges view also asks
        // again well within the staleness window.
        const wait = st.view === 'edges' && st.data && st.data.stale_after_ms
          ? Math.max(POLL_GAP_MS, Math.min(20000, st.data.stale_after_ms / 4)) : 20000;
        const r = await api(`/v1/edge/fleet/changes?index=${st.index}&wait_ms=${wait}`);
        st.index = r.index;
        $('live').textContent = 'live, updated ' + new Date().toLocaleTimeString();
        await refresh();
      } catch (e) {
        $('live').textContent = 'not connected: ' + e.message;
      }
    }
    await new Promise((ok) => setTimeout(ok, POLL_GAP_MS));
  }
}

function start() {
  $('login-form').onsubmit = (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    if (!t) { $('login-error').textContent = 'Paste a token first.'; return; }
    sessionStorage.setItem(KEY, t);
    $('token').value = '';
    refresh();
  };
  $('signout').onclick = () => { sessionStorage.removeItem(KEY); ask(''); };
  $('grid').tHead.onclick = (ev) => {
    const k = ev.target.dataset && ev.target.dataset.sort;
    if (!k) return;
    st.desc = st.sort === k ? !st.desc : false;
    st.sort = k; st.offset = 0; refresh();
  };
  let typing;
  $('q').oninput = () => {
    clearTimeout(typing);
    typing = setTimeout(() => { st.q = $('q').value.trim(); st.offset = 0; refresh(); }, 300);
  };
  $('health').onchange = () => { st.health = $('health').value; st.offset = 0; refresh(); };
  $('only').onchange = () => { st.only = $('only').checked; st.offset = 0; refresh(); };
  $('prev').onclick = () => { st.offset = Math.max(0, st.offset - st.limit); refresh(); };
  $('next').onclick = () => { st.offset += st.limit; refresh(); };
  window.onhashchange = () => go(location.hash.slice(1));
  // Ages and staleness move with the clock, not with the data.
  setInterval(() => { if (st.data && st.view === 'edges' && !$('main').hidden) render(); }, 1000);
  if (!token()) ask('');
  go(location.hash.slice(1) || 'edges');
  live();
}
start();
