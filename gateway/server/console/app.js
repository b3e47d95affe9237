// mqgate web console: a single-page app over mqgate's API (/api/mqgate/...) and
// RabbitMQ's management API (/api/...). Plain JavaScript, no build step, no libraries.
//
// Every call sends HTTP basic auth with the credentials kept in sessionStorage; a 401
// sends the user back to the login form. Data from the broker is only ever inserted
// as text (textContent / text nodes / attribute values): never as HTML.
'use strict';

(function () {
  const AUTH_KEY = 'mqgate.console.auth';
  const USER_KEY = 'mqgate.console.user';
  const REFRESH_MS = 5000;
  // The admin listener may sit behind a proxy under a prefix: the API is beside /console/.
  const BASE = location.pathname.replace(/\/console(\/.*)?$/, '');

  // ------------------------------------------------------------------ DOM helpers

  /** An element with attributes and children; strings become text nodes, never HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === 'class') el.className = v;
        else if (k === 'text') el.textContent = String(v);
        else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
        else if (k === 'value') el.value = String(v);
        else if (k === 'checked' || k === 'disabled' || k === 'selected') el[k] = !!v;
        else el.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const byId = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting

  const nf = new Intl.NumberFormat('en-US');
  function num(v) {
    if (v === null || v === undefined || v === '' || Number.isNaN(Number(v))) return '–';
    return nf.format(Number(v));
  }
  function rate(v) {
    if (v === null || v === undefined || Number.isNaN(Number(v))) return '–';
    const n = Number(v);
    if (n === 0) return '0/s';
    if (n < 10) return n.toFixed(2) + '/s';
    if (n < 1000) return n.toFixed(1) + '/s';
    return nf.format(Math.round(n)) + '/s';
  }
  function bytes(v) {
    if (v === null || v === undefined || Number.isNaN(Number(v))) return '–';
    let n = Number(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : 1)) + ' ' + units[i];
  }
  const pad = (n) => String(n).padStart(2, '0');
  function localStamp(d, sep) {
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}${sep || ' '}` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function time(ms) {
    if (ms === null || ms === undefined || ms === '') return '–';
    const d = new Date(Number(ms));
    return Number.isNaN(d.getTime()) ? String(ms) : localStamp(d);
  }
  function dur(ms) {
    let s = Math.round(Math.abs(ms) / 1000);
    const d = Math.floor(s / 86400); s %= 86400;
    const hh = Math.floor(s / 3600); s %= 3600;
    const m = Math.floor(s / 60); s %= 60;
    if (d) return `${d}d ${hh}h`;
    if (hh) return `${hh}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }
  function relative(ms) {
    const diff = Number(ms) - Date.now();
    return diff >= 0 ? 'in ' + dur(diff) : dur(diff) + ' ago';
  }
  function plural(n, word) { return `${num(n)} ${word}${Number(n) === 1 ? '' : 's'}`; }

  /** A readable gloss of mqgate's internal topic and group names. */
  function describe(name) {
    let m = /^%(DLQ|RETRY)%(.*)$/.exec(name);
    if (m) {
      const inner = describe(m[2]) || m[2];
      return (m[1] === 'DLQ' ? 'dead letters of ' : 'retries of ') + inner;
    }
    m = /^%AMQP%([^/]*)\/(.*)$/.exec(name);
    if (m) {
      let vhost = m[1];
      try { vhost = decodeURIComponent(m[1]); } catch (_) { /* keep it raw */ }
      return `AMQP queue “${m[2]}” on vhost ${vhost}`;
    }
    m = /^%MQTTSHARE%(.*)$/.exec(name);
    if (m) return `MQTT shared subscription ${m[1]}`;
    m = /^%MQTT%(.*)$/.exec(name);
    if (m) return `MQTT session of client ${m[1]}`;
    return '';
  }
  function nameCell(name, extra) {
    const d = describe(name);
    return [h('span', { class: 'n' }, name), d ? h('span', { class: 'sub' }, d) : null, extra || null];
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  function basic(user, password) {
    const bytesUtf8 = new TextEncoder().encode(`${user}:${password}`);
    let bin = '';
    for (const b of bytesUtf8) bin += String.fromCharCode(b);
    return btoa(bin);
  }

  function errorText(status, statusText, data, text) {
    const parts = [];
    if (data && typeof data === 'object' && !Array.isArray(data)) {
      if (data.error !== undefined) parts.push(String(data.error));
      if (data.reason !== undefined && String(data.reason) !== String(data.error)) parts.push(String(data.reason));
    }
    if (!parts.length && text) parts.push(text.slice(0, 400));
    return `${status}${statusText ? ' ' + statusText : ''}: ${parts.join(' — ') || 'no details'}`;
  }

  /** One HTTP call with the session's credentials (or `auth`); JSON in and out. */
  async function request(method, path, body, auth) {
    const headers = { Accept: 'application/json' };
    const cred = auth || sessionStorage.getItem(AUTH_KEY);
    if (cred) headers.Authorization = 'Basic ' + cred;
    let payload;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 20000);
    let res;
    try {
      // credentials: 'omit' keeps the browser from prompting for a password on a 401.
      res = await fetch(BASE + path, {
        method, headers, body: payload, credentials: 'omit', cache: 'no-store', signal: ctl.signal,
      });
    } catch (e) {
      throw new ApiError(0, e && e.name === 'AbortError'
        ? `${method} ${path}: no answer in 20 s`
        : `${method} ${path}: the broker cannot be reached (${e && e.message ? e.message : e})`);
    } finally {
      clearTimeout(timer);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    return { status: res.status, statusText: res.statusText, data, text, ok: res.ok };
  }

  /** An authenticated API call: the JSON answer, or an ApiError (a 401 logs out). */
  async function api(method, path, body) {
    const cred = sessionStorage.getItem(AUTH_KEY);
    if (!cred) throw new ApiError(401, 'Not logged in.');
    const r = await request(method, path, body, cred);
    if (r.status === 401) {
      // Only if these are still the session's credentials: a late answer to a call made
      // with older ones must not end a session logged in since.
      if (sessionStorage.getItem(AUTH_KEY) === cred) unauthorized(r.data);
      throw new ApiError(401, errorText(r.status, r.statusText, r.data, r.text), r.data);
    }
    if (!r.ok) {
      throw new ApiError(r.status, `${method} ${path} → ${errorText(r.status, r.statusText, r.data, r.text)}`, r.data);
    }
    return r.data;
  }
  const get = (path) => api('GET', path);
  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ session

  let loginNotice = null; // { kind, text } shown once on the login form
  let afterLogin = null; // the route to go back to after logging in again

  function loggedIn() { return !!sessionStorage.getItem(AUTH_KEY); }

  function unauthorized(data) {
    if (!loggedIn()) return;
    sessionStorage.removeItem(AUTH_KEY); // the user name stays, to fill in the form
    const reason = data && (data.reason || data.error);
    loginNotice = {
      kind: 'warn',
      text: `The broker refused the session's credentials (401${reason ? ': ' + reason : ''}). Log in again.`,
    };
    const cur = location.hash;
    if (cur && !cur.startsWith('#/login')) afterLogin = cur;
    if (location.hash !== '#/login') location.hash = '#/login';
    else render();
  }

  function logout() {
    sessionStorage.removeItem(AUTH_KEY); // the user name stays, to fill in the form
    loginNotice = { kind: 'ok', text: 'Logged out.' };
    afterLogin = null;
    if (location.hash !== '#/login') location.hash = '#/login';
    else render();
  }

  // ------------------------------------------------------------------ page plumbing

  let ctx = null; // the current page: { alive, timers }
  let lastUpdated = null;

  function newCtx() {
    if (ctx) {
      ctx.alive = false;
      for (const t of ctx.timers) clearInterval(t);
    }
    ctx = { alive: true, timers: [] };
    return ctx;
  }

  function autoRefreshOn() {
    const box = byId('auto-refresh');
    return !box || box.checked;
  }

  function stamp() {
    lastUpdated = new Date();
    const el = byId('updated');
    if (el) el.textContent = 'updated ' + localStamp(lastUpdated).slice(11);
  }

  function message(e) {
    if (e instanceof ApiError) return e.message;
    return 'Unexpected error in the console: ' + (e && e.message ? e.message : String(e));
  }

  /** A page's frame: title, actions, two error boxes (loading and actions), body. */
  function shell(view, title, subtitle) {
    const loadErr = h('div', { id: 'page-error', class: 'error', 'data-test': 'error', role: 'alert', hidden: true });
    const actionErr = h('div', { id: 'action-error', class: 'error', 'data-test': 'error', role: 'alert', hidden: true });
    const actions = h('div', { class: 'page-actions' });
    const body = h('div', { class: 'page-body' });
    const head = h('div', { class: 'page-head' },
      h('h1', { id: 'page-title' }, title),
      subtitle ? h('span', { class: 'muted', id: 'page-subtitle' }, subtitle) : null,
      actions);
    view.replaceChildren(head, loadErr, actionErr, body);
    return {
      body,
      actions,
      head,
      fail(e) {
        if (e && e.status === 401) return;
        loadErr.textContent = message(e);
        loadErr.hidden = false;
      },
      ok() { loadErr.hidden = true; loadErr.textContent = ''; },
      actionFail(e) {
        if (e && e.status === 401) return;
        actionErr.textContent = message(e);
        actionErr.hidden = false;
      },
      actionOk() { actionErr.hidden = true; actionErr.textContent = ''; },
    };
  }

  /** Run `load` now and (unless `manual`) every 5 s while the page is shown. */
  function poll(c, s, load, manual) {
    let busy = false;
    const run = async () => {
      if (busy || !c.alive) return;
      busy = true;
      try {
        await load();
        if (c.alive) { s.ok(); stamp(); byId('view').dataset.state = 'loaded'; }
      } catch (e) {
        if (c.alive) { s.fail(e); byId('view').dataset.state = 'error'; }
      } finally {
        busy = false;
      }
    };
    run();
    if (!manual) {
      c.timers.push(setInterval(() => { if (autoRefreshOn() && !document.hidden) run(); }, REFRESH_MS));
    }
    s.actions.append(h('button', { type: 'button', id: 'refresh', class: 'small', onclick: run }, 'Refresh'));
    return run;
  }

  function cmp(a, b) {
    const na = a === null || a === undefined;
    const nb = b === null || b === undefined;
    if (na || nb) return na && nb ? 0 : na ? 1 : -1;
    if (typeof a === 'number' && typeof b === 'number') return a - b;
    return String(a).localeCompare(String(b), 'en', { numeric: true });
  }

  /**
   * A table in `box` (replacing what it held). columns: { key, label, num, cell(row),
   * value(row) for sorting, test, cls, sortable }. sort: a { key, dir } kept by the
   * caller so the order survives refreshes.
   */
  function renderTable(box, spec) {
    const st = spec.sort;
    const rows = spec.rows.slice();
    if (st && st.key) {
      const col = spec.columns.find((c) => c.key === st.key);
      if (col) {
        const val = col.value || ((r) => r[col.key]);
        rows.sort((a, b) => cmp(val(a), val(b)) * st.dir);
      }
    }
    const tr = h('tr');
    for (const c of spec.columns) {
      const sortable = !!st && c.sortable !== false;
      const th = h('th', { class: [c.num ? 'num' : '', sortable ? 'sortable' : ''].join(' ').trim() || null, scope: 'col' }, c.label);
      if (sortable) {
        if (st.key === c.key) {
          th.append(st.dir > 0 ? ' ▲' : ' ▼');
          th.setAttribute('aria-sort', st.dir > 0 ? 'ascending' : 'descending');
        }
        th.addEventListener('click', () => {
          if (st.key === c.key) st.dir = -st.dir;
          else { st.key = c.key; st.dir = c.num ? -1 : 1; }
          renderTable(box, spec);
        });
      }
      tr.append(th);
    }
    const tbody = h('tbody');
    if (!rows.length) {
      tbody.append(h('tr', { class: 'empty' }, h('td', { colspan: spec.columns.length }, spec.empty || 'Nothing here.')));
    }
    for (const r of rows) {
      const row = h('tr', spec.rowAttrs ? spec.rowAttrs(r) : null);
      for (const c of spec.columns) {
        const content = c.cell ? c.cell(r) : c.num ? num(r[c.key]) : r[c.key];
        row.append(h('td', { class: [c.num ? 'num' : '', c.cls || ''].join(' ').trim() || null, 'data-test': c.test || null }, content));
      }
      tbody.append(row);
    }
    box.replaceChildren(h('div', { class: 'table-wrap' },
      h('table', { id: spec.id || null, class: 'grid', 'data-test': spec.test || null }, h('thead', null, tr), tbody)));
  }

  function notice(el, kind, text) {
    el.className = 'notice ' + kind;
    el.textContent = text;
    el.hidden = false;
  }

  function filterBox(id, placeholder, onInput) {
    return h('input', { type: 'search', id, class: 'filter', placeholder, 'aria-label': placeholder, oninput: onInput });
  }

  // ------------------------------------------------------------------ login

  function showLogin(view) {
    document.body.classList.add('logged-out');
    document.title = 'mqgate · log in';
    const msg = h('div', { id: 'login-message', 'data-test': 'login-message', hidden: true });
    if (loginNotice) notice(msg, loginNotice.kind, loginNotice.text);
    loginNotice = null;
    const err = h('div', { id: 'login-error', class: 'error', 'data-test': 'login-error', role: 'alert', hidden: true });
    const user = h('input', { id: 'login-user', name: 'username', autocomplete: 'username', required: true, value: sessionStorage.getItem(USER_KEY) || '' });
    const pass = h('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
    const submit = h('button', { id: 'login-submit', type: 'submit', class: 'primary' }, 'Log in');
    const form = h('form', { id: 'login-form', method: 'post', action: '#', novalidate: true },
      h('label', null, 'User', user),
      h('label', null, 'Password', pass),
      submit);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      err.hidden = true;
      if (!user.value) { err.textContent = 'Enter a user name.'; err.hidden = false; user.focus(); return; }
      submit.disabled = true;
      submit.textContent = 'Logging in…';
      const auth = basic(user.value, pass.value);
      try {
        const r = await request('GET', '/api/whoami', undefined, auth);
        if (r.status === 401) throw new ApiError(401, 'Login failed: ' + errorText(r.status, r.statusText, r.data, r.text));
        if (!r.ok || !r.data) throw new ApiError(r.status, 'The broker did not accept the login: ' + errorText(r.status, r.statusText, r.data, r.text));
        const tags = Array.isArray(r.data.tags) ? r.data.tags : String(r.data.tags || '').split(',');
        if (!tags.includes('administrator')) {
          throw new ApiError(403, `User ${r.data.name} is not an administrator (tags: ${tags.join(', ') || 'none'}): mqgate's API needs the administrator tag.`);
        }
        sessionStorage.setItem(AUTH_KEY, auth);
        sessionStorage.setItem(USER_KEY, String(r.data.name || user.value));
        const to = afterLogin || '#/overview';
        afterLogin = null;
        location.hash = to;
      } catch (e) {
        err.textContent = message(e);
        err.hidden = false;
        pass.select();
      } finally {
        submit.disabled = false;
        submit.textContent = 'Log in';
      }
    });
    view.replaceChildren(h('div', { class: 'login-card' },
      h('h1', null, 'mqgate console'),
      h('div', { class: 'muted' }, 'Log in with a broker user tagged administrator.'),
      msg, err, form));
    (user.value ? pass : user).focus();
  }

  // ------------------------------------------------------------------ overview

  const rateHistory = []; // { t, publish, deliver, ack } rates sampled by the overview page

  function card(id, label, value, sub) {
    return h('div', { class: 'card', 'data-test': 'stat' },
      h('div', { class: 'label' }, label),
      h('div', { class: 'value', id }, value),
      h('div', { class: 'sub', id: id + '-sub' }, sub || ''));
  }

  function sparkChart(samples) {
    const NS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('viewBox', '0 0 600 100');
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', 'message rates over the last minutes');
    const axis = document.createElementNS(NS, 'line');
    axis.setAttribute('class', 'axis');
    axis.setAttribute('x1', '0'); axis.setAttribute('x2', '600');
    axis.setAttribute('y1', '99'); axis.setAttribute('y2', '99');
    svg.append(axis);
    const max = Math.max(1, ...samples.flatMap((s) => [s.publish, s.deliver, s.ack]));
    for (const key of ['publish', 'deliver', 'ack']) {
      const pts = samples.map((s, i) => {
        const x = samples.length < 2 ? 600 : (i / (samples.length - 1)) * 600;
        const y = 98 - (s[key] / max) * 94;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      if (pts.length === 1) pts.unshift('0,' + pts[0].split(',')[1]);
      const line = document.createElementNS(NS, 'polyline');
      line.setAttribute('class', 'series-' + key);
      line.setAttribute('points', pts.join(' '));
      svg.append(line);
    }
    return h('div', { class: 'chart', id: 'rates-chart' },
      h('div', { class: 'legend' },
        ['publish', 'deliver', 'ack'].map((k) => h('span', null, h('span', { class: 'sw series-' + k }), k)),
        h('span', { class: 'muted' }, `peak ${rate(max)}, last ${dur(REFRESH_MS * Math.max(samples.length - 1, 0))}`)),
      svg);
  }

  function pageOverview(c, view) {
    const s = shell(view, 'Overview');
    const cards = h('div', { class: 'cards', id: 'overview-cards' });
    const chart = h('div');
    const health = h('div', { id: 'health', hidden: true });
    s.body.append(health, cards, chart);
    poll(c, s, async () => {
      const [rmq, mq, nodes, hl] = await Promise.all([
        get('/api/overview'),
        get('/api/mqgate/overview'),
        get('/api/nodes'),
        request('GET', '/api/mqgate/health'),
      ]);
      if (!c.alive) return;
      const ms = rmq.message_stats || {};
      const ot = rmq.object_totals || {};
      const qt = rmq.queue_totals || {};
      const store = mq.store || {};
      const conns = mq.connections || {};
      const node = Array.isArray(nodes) && nodes.length ? nodes[0] : {};
      const r = (k) => (ms[k + '_details'] ? ms[k + '_details'].rate : null);
      rateHistory.push({ t: Date.now(), publish: r('publish') || 0, deliver: r('deliver_get') || 0, ack: r('ack') || 0 });
      while (rateHistory.length > 60) rateHistory.shift();

      const hs = hl.data || {};
      if (hl.status === 200 && hs.status === 'ok') {
        health.hidden = true;
      } else {
        notice(health, 'warn', `Store ${hs.status || 'status unknown'}${hs.reason ? ': ' + hs.reason : ''}` +
          (hs.since_ms ? ` (since ${time(hs.since_ms)})` : '') + ' — durable publishes are refused until it recovers.');
      }
      cards.replaceChildren(
        card('stat-publish-rate', 'Publish', rate(r('publish')), `${num(ms.publish)} since start`),
        card('stat-deliver-rate', 'Deliver', rate(r('deliver_get')), `${num(ms.deliver_get)} since start`),
        card('stat-ack-rate', 'Ack', rate(r('ack')), `${num(ms.ack)} since start`),
        card('stat-connections', 'Connections', num((conns.amqp || 0) + (conns.mqtt || 0)),
          `AMQP ${num(conns.amqp)} · MQTT ${num(conns.mqtt)} · ${plural(ot.channels || 0, 'channel')}`),
        card('stat-queues', 'AMQP queues', num(ot.queues),
          `${num(qt.messages_ready)} ready · ${num(qt.messages_unacknowledged)} unacked · ${plural(ot.consumers || 0, 'consumer')}`),
        card('stat-topics', 'Topics', num(store.topics), `${num(mq.mqtt_sessions)} MQTT sessions`),
        card('stat-memory', 'Memory', bytes(node.mem_used), 'resident set of the broker'),
        card('stat-store-size', 'Store size', bytes(store.log_bytes), 'commit log'),
        card('stat-store-messages', 'Stored messages', num(store.messages), `${num(store.timers)} timers stored`),
        card('stat-delayed', 'Delayed pending', num(mq.delayed_pending), 'delayed, retries, scheduled'),
        card('stat-version', 'Version', String(mq.version || rmq.product_version || '–'),
          node.uptime ? `up ${dur(node.uptime)} · ${rmq.node || ''}` : String(rmq.node || '')),
      );
      chart.replaceChildren(sparkChart(rateHistory));
    });
  }

  // ------------------------------------------------------------------ topics & queues

  const topicSort = { key: 'name', dir: 1 };
  const queueSort = { key: 'name', dir: 1 };

  function pageTopics(c, view) {
    const s = shell(view, 'Topics & queues');
    const tFilter = filterBox('topic-filter', 'Filter topics', () => drawTopics());
    const internal = h('input', { type: 'checkbox', id: 'topic-internal', checked: true, onchange: () => drawTopics() });
    const qFilter = filterBox('queue-filter', 'Filter queues', () => drawQueues());
    const topicsBox = h('div', { id: 'topics-box' });
    const queuesBox = h('div', { id: 'queues-box' });
    s.body.append(
      h('section', { class: 'panel' },
        h('h2', null, 'AMQP queues ', h('span', { class: 'muted' }, 'from the management API; rates over the last 5 s')),
        h('div', { class: 'toolbar' }, qFilter),
        queuesBox),
      h('section', { class: 'panel' },
        h('h2', null, 'Topics ', h('span', { class: 'muted' }, 'offset-addressed queues: min = oldest stored, next = offset of the next message')),
        h('div', { class: 'toolbar' }, tFilter,
          h('label', null, internal, 'show retry and dead-letter topics')),
        topicsBox));

    let topics = [];
    let details = new Map();
    let queues = [];

    function visibleTopics() {
      const f = tFilter.value.trim().toLowerCase();
      return topics.filter((t) => (internal.checked || !/^%(RETRY|DLQ)%/.test(t.name)) &&
        (!f || t.name.toLowerCase().includes(f) || describe(t.name).toLowerCase().includes(f)));
    }

    function drawTopics() {
      const rows = visibleTopics();
      renderTable(topicsBox, {
        id: 'topics-table',
        sort: topicSort,
        rows,
        empty: topics.length ? 'No topic matches.' : 'No topics yet.',
        rowAttrs: (t) => ({ 'data-test': 'topic-row', 'data-name': t.name }),
        columns: [
          { key: 'name', label: 'Topic', cls: 'name', cell: (t) => nameCell(t.name) },
          { key: 'queues', label: 'Queues', num: true, test: 'topic-queues' },
          { key: 'messages', label: 'Messages', num: true, test: 'topic-messages' },
          {
            key: 'offsets', label: 'Queue offsets (min → next: messages)', sortable: false,
            cell: (t) => {
              const d = details.get(t.name);
              if (!d) return h('span', { class: 'muted' }, '…');
              if (d.error) return h('span', { class: 'muted' }, d.error);
              return h('div', { class: 'chips' }, (d.offsets || []).map((o) =>
                h('span', { class: 'chip', 'data-test': 'queue-offsets', 'data-queue': o.queue, title: `queue ${o.queue}: min ${o.min}, next ${o.next}` },
                  `#${o.queue} ${num(o.min)} → ${num(o.next)}: ${num(o.messages)}`)));
            },
          },
        ],
      });
    }

    function drawQueues() {
      const f = qFilter.value.trim().toLowerCase();
      const rows = queues.filter((q) => !f || q.name.toLowerCase().includes(f) || q.vhost.toLowerCase().includes(f));
      renderTable(queuesBox, {
        id: 'queues-table',
        sort: queueSort,
        rows,
        empty: queues.length ? 'No queue matches.' : 'No AMQP queues.',
        rowAttrs: (q) => ({ 'data-test': 'queue-row', 'data-name': q.name, 'data-vhost': q.vhost }),
        columns: [
          { key: 'vhost', label: 'Vhost', cls: 'name' },
          {
            key: 'name', label: 'Queue', cls: 'name',
            cell: (q) => [h('span', null, q.name), h('span', { class: 'sub' }, features(q))],
          },
          { key: 'messages_ready', label: 'Ready', num: true, test: 'queue-ready' },
          { key: 'messages_unacknowledged', label: 'Unacked', num: true, test: 'queue-unacked' },
          { key: 'messages', label: 'Total', num: true, test: 'queue-messages' },
          { key: 'consumers', label: 'Consumers', num: true, test: 'queue-consumers' },
          {
            key: 'publish_rate', label: 'Publish', num: true, test: 'queue-publish-rate',
            value: (q) => pubRate(q), cell: (q) => rate(pubRate(q)),
          },
          {
            key: 'deliver_rate', label: 'Deliver', num: true,
            value: (q) => delRate(q), cell: (q) => rate(delRate(q)),
          },
          {
            key: 'group', label: 'Group', sortable: false,
            cell: (q) => (q.mqgate && q.mqgate.group
              ? h('a', { href: '#/groups/' + enc(q.mqgate.group), 'data-test': 'queue-group-link' }, 'group')
              : ''),
          },
        ],
      });
    }
    const pubRate = (q) => (q.message_stats && q.message_stats.publish_details ? q.message_stats.publish_details.rate : null);
    const delRate = (q) => (q.message_stats && q.message_stats.deliver_get_details ? q.message_stats.deliver_get_details.rate : null);
    function features(q) {
      const a = q.arguments || {};
      const out = [];
      if (q.durable) out.push('durable'); else out.push('transient');
      if (q.exclusive) out.push('exclusive');
      if (q.auto_delete) out.push('auto-delete');
      for (const [k, v] of Object.entries(a)) out.push(`${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`);
      return out.join(' · ');
    }

    poll(c, s, async () => {
      const [t, q] = await Promise.all([get('/api/mqgate/topics'), get('/api/queues')]);
      if (!c.alive) return;
      topics = Array.isArray(t) ? t : [];
      queues = Array.isArray(q) ? q : [];
      // The list carries each topic's queue offsets: one call, however many topics.
      details = new Map(topics.map((tp) => [tp.name, { offsets: tp.offsets || [] }]));
      drawQueues();
      drawTopics();
    });
  }

  // ------------------------------------------------------------------ consumer groups

  const groupSort = { key: 'lag', dir: -1 };

  function pageGroups(c, view) {
    const s = shell(view, 'Consumer groups');
    const filter = filterBox('group-filter', 'Filter groups', () => draw());
    const box = h('div', { id: 'groups-box' });
    s.body.append(h('div', { class: 'toolbar' }, filter), box);
    let groups = [];
    function draw() {
      const f = filter.value.trim().toLowerCase();
      renderTable(box, {
        id: 'groups-table',
        sort: groupSort,
        rows: groups.filter((g) => !f || g.name.toLowerCase().includes(f) || describe(g.name).toLowerCase().includes(f)),
        empty: groups.length ? 'No group matches.' : 'No consumer groups yet.',
        rowAttrs: (g) => ({ 'data-test': 'group-row', 'data-name': g.name }),
        columns: [
          {
            key: 'name', label: 'Group', cls: 'name',
            cell: (g) => nameCell(g.name).map((x, i) => (i === 0
              ? h('a', { href: '#/groups/' + enc(g.name), 'data-test': 'group-link' }, g.name) : x)),
          },
          { key: 'members', label: 'Members', num: true, test: 'group-members' },
          {
            key: 'lag', label: 'Lag', num: true, test: 'group-lag',
            cell: (g) => h('span', { class: g.lag > 1000 ? 'lag-high' : null }, num(g.lag)),
          },
          {
            key: 'dead', label: 'Dead letters', num: true, test: 'group-dlq',
            cell: (g) => (g.dead === null ? h('span', { class: 'muted' }, '–')
              : h('a', { href: '#/dlq/' + enc(g.name) }, num(g.dead))),
          },
        ],
      });
    }
    poll(c, s, async () => {
      const [g, topics] = await Promise.all([get('/api/mqgate/groups'), get('/api/mqgate/topics')]);
      if (!c.alive) return;
      const dead = new Map((topics || []).filter((t) => t.name.startsWith('%DLQ%')).map((t) => [t.name.slice(5), t.messages]));
      groups = (Array.isArray(g) ? g : []).map((x) => ({ ...x, dead: dead.has(x.name) ? dead.get(x.name) : null }));
      draw();
    });
  }

  function pageGroup(c, view, name) {
    const s = shell(view, 'Consumer group', '');
    s.head.querySelector('#page-title').replaceChildren(
      h('a', { href: '#/groups', id: 'back-to-groups' }, 'Consumer groups'), ' / ', h('span', { id: 'group-name', class: 'mono' }, name));
    const gloss = describe(name);
    if (gloss) s.head.insertBefore(h('span', { class: 'muted' }, gloss), s.actions);

    const summary = h('div', { class: 'cards', id: 'group-summary' });
    const queuesBox = h('div', { id: 'group-queues-box' });
    const membersBox = h('div', { id: 'group-members-box' });
    const dlqLink = h('div', { id: 'group-dlq', class: 'muted' });

    // Reset: to a time (datetime-local, seconds), to the first or the last offset.
    const mode = h('select', { id: 'reset-mode', 'aria-label': 'reset to' },
      h('option', { value: 'time' }, 'a time'),
      h('option', { value: 'first' }, 'first (replay everything stored)'),
      h('option', { value: 'last' }, 'last (skip everything stored)'));
    const when = h('input', { type: 'datetime-local', id: 'reset-time', step: '1', 'aria-label': 'time' });
    when.value = localStamp(new Date(Date.now() - 3600 * 1000), 'T');
    mode.addEventListener('change', () => { when.disabled = mode.value !== 'time'; });
    const go = h('button', { type: 'submit', id: 'reset-submit', class: 'primary' }, 'Reset');
    const result = h('div', { id: 'reset-result', 'data-test': 'reset-result', hidden: true });
    const form = h('form', { id: 'reset-form', class: 'toolbar', action: '#', method: 'post' },
      h('label', null, 'Move the group to', mode), when, go);

    s.body.append(
      summary,
      h('section', { class: 'panel' },
        h('h2', null, 'Reset ', h('span', { class: 'muted' },
          'replay or skip: every queue of the group continues from the first message stored at or after the time, the first or the last offset; live members continue from there at once')),
        form, result),
      h('section', { class: 'panel' }, h('h2', null, 'Queues'), queuesBox),
      h('section', { class: 'panel' }, h('h2', null, 'Members'), membersBox),
      dlqLink);

    let group = null;
    const qSort = { key: 'queue', dir: 1 };

    function draw(g) {
      group = g;
      summary.replaceChildren(
        card('group-lag', 'Lag', num(g.lag), 'messages not yet consumed'),
        card('group-members-count', 'Members', num((g.members || []).length), ''),
        card('group-skipped', 'Skipped', num(g.skipped), 'deleted by retention before read'),
        card('group-inflight', 'In flight', num((g.queues || []).reduce((a, q) => a + (q.in_flight || 0), 0)), 'delivered, not settled'));
      renderTable(queuesBox, {
        id: 'group-queues-table',
        sort: qSort,
        rows: g.queues || [],
        empty: 'No queues.',
        rowAttrs: (q) => ({ 'data-test': 'group-queue-row', 'data-queue': q.queue }),
        columns: [
          { key: 'queue', label: 'Queue', cls: 'name' },
          { key: 'member', label: 'Member', cls: 'name', cell: (q) => q.member || h('span', { class: 'muted' }, '–') },
          { key: 'committed', label: 'Committed', num: true, test: 'gq-committed' },
          { key: 'next', label: 'Next', num: true, test: 'gq-next' },
          { key: 'lag', label: 'Lag', num: true, test: 'gq-lag' },
          { key: 'ready', label: 'Ready', num: true },
          { key: 'in_flight', label: 'In flight', num: true },
        ],
      });
      renderTable(membersBox, {
        id: 'group-members-table',
        rows: g.members || [],
        empty: 'No members connected.',
        rowAttrs: () => ({ 'data-test': 'group-member-row' }),
        columns: [
          { key: 'id', label: 'Member', cls: 'name' },
          { key: 'unacked', label: 'Unacked', num: true },
          { key: 'prefetch', label: 'Prefetch', num: true },
          { key: 'queues', label: 'Queues', cell: (m) => (m.queues || []).join(', ') || h('span', { class: 'muted' }, '–') },
        ],
      });
    }

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      s.actionOk();
      let to;
      let label;
      if (mode.value === 'time') {
        const d = new Date(when.value);
        if (!when.value || Number.isNaN(d.getTime())) {
          s.actionFail(new ApiError(0, 'Pick a date and time to reset to.'));
          return;
        }
        to = d.getTime();
        label = localStamp(d);
      } else {
        to = mode.value;
        label = mode.value === 'first' ? 'the first offset' : 'the last offset';
      }
      if (!window.confirm(`Reset group ${name} to ${label}? Its members continue from there: messages may be delivered again, or skipped.`)) return;
      const before = group ? group.lag : null;
      go.disabled = true;
      try {
        const g = await api('POST', `/api/mqgate/groups/${enc(name)}/reset`, { to });
        if (!c.alive) return;
        draw(g);
        notice(result, 'ok', `Reset to ${label} at ${localStamp(new Date()).slice(11)}: lag ${before === null ? '?' : num(before)} → ${num(g.lag)}.`);
        result.dataset.lag = String(g.lag);
      } catch (e) {
        s.actionFail(e);
      } finally {
        go.disabled = false;
      }
    });

    poll(c, s, async () => {
      const [g, topics] = await Promise.all([get('/api/mqgate/groups/' + enc(name)), get('/api/mqgate/topics')]);
      if (!c.alive) return;
      draw(g);
      const dlq = (topics || []).find((t) => t.name === '%DLQ%' + name);
      dlqLink.replaceChildren(dlq
        ? h('span', null, 'Dead letters: ', h('a', { href: '#/dlq/' + enc(name), id: 'group-dlq-link' }, plural(dlq.messages, 'message')), ' stored in its DLQ.')
        : 'This group has no dead-letter queue.');
    });
  }

  // ------------------------------------------------------------------ DLQ

  function pageDlq(c, view, groupArg) {
    const s = shell(view, 'Dead-letter queues');
    const picker = h('select', { id: 'dlq-group', 'aria-label': 'consumer group' });
    const info = h('div', { id: 'dlq-info', class: 'toolbar' });
    const fromIn = h('input', { type: 'number', id: 'dlq-from', min: '0', value: '0', 'aria-label': 'from offset', class: 'mono' });
    const limitIn = h('select', { id: 'dlq-limit', 'aria-label': 'page size' },
      [20, 50, 100, 500].map((n) => h('option', { value: n }, String(n))));
    limitIn.value = '50';
    const prev = h('button', { type: 'button', id: 'dlq-prev', class: 'small' }, '← Prev');
    const next = h('button', { type: 'button', id: 'dlq-next', class: 'small' }, 'Next →');
    const reload = h('button', { type: 'button', id: 'dlq-reload', class: 'small' }, 'Show');
    const resendSel = h('button', { type: 'button', id: 'dlq-resend-selected', class: 'primary', disabled: true }, 'Resend selected');
    const rangeFrom = h('input', { type: 'number', id: 'dlq-range-from', min: '0', value: '0', 'aria-label': 'resend from offset', class: 'mono' });
    const resendRange = h('button', { type: 'button', id: 'dlq-resend-range' }, 'Resend all from offset');
    const cancelRange = h('button', { type: 'button', id: 'dlq-cancel', class: 'small', hidden: true }, 'Stop');
    const bar = h('progress', { id: 'dlq-progress', max: '1', value: '0' });
    const barText = h('span', { id: 'dlq-progress-text', class: 'mono' });
    const progress = h('div', { class: 'progress', id: 'dlq-progress-box', hidden: true }, bar, barText, cancelRange);
    const result = h('div', { id: 'dlq-result', 'data-test': 'dlq-result', hidden: true });
    const box = h('div', { id: 'dlq-box' });

    s.body.append(
      h('div', { class: 'toolbar' }, h('label', null, 'Group', picker)),
      info,
      h('section', { class: 'panel' },
        h('h2', null, 'Resend ', h('span', { class: 'muted' }, 'publishes dead letters again to the queue they failed in, with a fresh failure count; the DLQ keeps its copy')),
        h('div', { class: 'toolbar' }, resendSel, h('span', { class: 'muted' }, 'or'), resendRange, rangeFrom),
        progress, result),
      h('section', { class: 'panel' },
        h('div', { class: 'toolbar' },
          h('label', null, 'From offset', fromIn), h('label', null, 'Show', limitIn), reload, prev, next),
        box));

    const group = groupArg || '';
    const selected = new Set();
    let page = [];
    let dlqTopic = null; // { name, messages, min, next }
    let running = null; // { stop }

    function updateSelButton() {
      resendSel.disabled = !selected.size || !!running;
      resendSel.textContent = selected.size ? `Resend selected (${selected.size})` : 'Resend selected';
    }

    async function loadInfo() {
      const [topics, groups] = await Promise.all([get('/api/mqgate/topics'), get('/api/mqgate/groups')]);
      if (!c.alive) return;
      const dlqs = (topics || []).filter((t) => t.name.startsWith('%DLQ%'))
        .map((t) => ({ group: t.name.slice(5), messages: t.messages }))
        .sort((a, b) => cmp(a.group, b.group));
      const opts = [h('option', { value: '' }, dlqs.length ? '— pick a group —' : '— no group has dead letters —')];
      for (const d of dlqs) opts.push(h('option', { value: d.group, selected: d.group === group }, `${d.group} (${num(d.messages)})`));
      if (group && !dlqs.some((d) => d.group === group)) opts.push(h('option', { value: group, selected: true }, `${group} (no DLQ)`));
      const focused = document.activeElement === picker;
      if (!focused) {
        picker.replaceChildren(...opts);
        picker.value = group;
      }
      if (!group) {
        info.replaceChildren(h('span', { class: 'muted' }, dlqs.length
          ? 'Pick a consumer group to browse its dead letters.' : 'No dead letters: no consumer group has a DLQ.'));
        return;
      }
      const g = (groups || []).find((x) => x.name === group);
      const t = (topics || []).find((x) => x.name === '%DLQ%' + group);
      if (t) {
        const o = (t.offsets || [])[0] || { min: 0, next: 0 };
        dlqTopic = { name: t.name, messages: t.messages, min: o.min, next: o.next };
      } else {
        dlqTopic = null;
      }
      if (!c.alive) return;
      info.replaceChildren(
        h('span', null, 'Dead letters stored: ', h('b', { id: 'dlq-count' }, num(dlqTopic ? dlqTopic.messages : 0)),
          dlqTopic ? h('span', { class: 'muted' }, ` (offsets ${num(dlqTopic.min)} to ${num(Math.max(dlqTopic.next - 1, 0))})`) : ''),
        h('span', { class: 'muted' }, '·'),
        h('span', null, 'Group lag (messages waiting in its queues): ', h('b', { id: 'dlq-group-lag' }, g ? num(g.lag) : '–'),
          ' ', h('a', { href: '#/groups/' + enc(group), id: 'dlq-group-link' }, 'group details')));
    }

    async function loadPage() {
      if (!group) { box.replaceChildren(); return; }
      const from = Math.max(0, parseInt(fromIn.value, 10) || 0);
      const limit = parseInt(limitIn.value, 10) || 50;
      const msgs = await get(`/api/mqgate/dlq/${enc(group)}?from=${from}&limit=${limit}`);
      if (!c.alive) return;
      page = Array.isArray(msgs) ? msgs : [];
      for (const o of [...selected]) if (!page.some((m) => m.offset === o)) selected.delete(o);
      drawPage();
      prev.disabled = from === 0;
      next.disabled = page.length < limit;
    }

    function drawPage() {
      const all = h('input', {
        type: 'checkbox', id: 'dlq-select-all', 'aria-label': 'select all shown',
        checked: page.length > 0 && page.every((m) => selected.has(m.offset)),
        onchange: (ev) => {
          for (const m of page) { if (ev.target.checked) selected.add(m.offset); else selected.delete(m.offset); }
          drawPage();
        },
      });
      renderTable(box, {
        id: 'dlq-table',
        rows: page,
        empty: 'No dead letters at or after this offset.',
        rowAttrs: (m) => ({ 'data-test': 'dlq-row', 'data-offset': m.offset, 'data-id': m.id }),
        columns: [
          {
            key: 'sel', label: all,
            cell: (m) => h('input', {
              type: 'checkbox', 'data-test': 'dlq-select', 'data-offset': m.offset, 'aria-label': 'select offset ' + m.offset,
              checked: selected.has(m.offset),
              onchange: (ev) => { if (ev.target.checked) selected.add(m.offset); else selected.delete(m.offset); updateSelButton(); },
            }),
          },
          { key: 'offset', label: 'Offset', num: true, test: 'dlq-offset' },
          { key: 'stored_at', label: 'Dead since', cell: (m) => [time(m.stored_at), h('span', { class: 'sub' }, `id ${m.id}`)] },
          { key: 'failures', label: 'Failures', num: true, cell: (m) => num((m.properties || {}).DLQ_FAILURES ?? m.reconsume_times) },
          {
            key: 'origin', label: 'Origin queue', cls: 'name',
            cell: (m) => [(m.properties || {}).ORIGIN_QUEUE || '–', h('span', { class: 'sub' }, `address ${m.topic}`)],
          },
          { key: 'keys', label: 'Keys', cell: (m) => (m.keys || []).join(' ') || h('span', { class: 'muted' }, '–') },
          { key: 'size', label: 'Size', num: true, cell: (m) => bytes(m.size) },
          { key: 'body', label: 'Body', cls: 'body', test: 'dlq-body', cell: bodyCell },
        ],
      });
      // The header checkbox is a node, not a label string: renderTable put it in place.
      updateSelButton();
    }

    function bodyCell(m) {
      const body = String(m.body ?? '');
      const short = body.length > 200 ? body.slice(0, 200) + '…' : body;
      const props = Object.entries(m.properties || {});
      return [
        h('div', { class: 'preview', 'data-test': 'dlq-preview' }, short || h('span', { class: 'muted' }, '(empty)')),
        h('details', null,
          h('summary', null, 'message'),
          h('pre', null, body + (m.body_truncated ? '\n… (first 4 KiB of ' + bytes(m.size) + ')' : '')),
          h('dl', { class: 'kv' },
            ['producer_group', 'born_at', 'reconsume_times', 'tags'].map((k) => [h('dt', null, k), h('dd', null, k === 'born_at' ? time(m[k]) : String(m[k] ?? '–'))]),
            props.map(([k, v]) => [h('dt', null, k), h('dd', { class: 'mono' }, v)]))),
      ];
    }

    picker.addEventListener('change', () => { location.hash = '#/dlq' + (picker.value ? '/' + enc(picker.value) : ''); });
    const show = () => loadPage().then(() => s.ok(), (e) => s.fail(e));
    reload.addEventListener('click', show);
    limitIn.addEventListener('change', show);
    prev.addEventListener('click', () => {
      fromIn.value = String(Math.max(0, (parseInt(fromIn.value, 10) || 0) - (parseInt(limitIn.value, 10) || 50)));
      show();
    });
    next.addEventListener('click', () => {
      const last = page.length ? page[page.length - 1].offset : (parseInt(fromIn.value, 10) || 0);
      fromIn.value = String(last + 1);
      show();
    });

    async function lagNow() {
      try {
        const g = await get('/api/mqgate/groups/' + enc(group));
        return g.lag;
      } catch (e) {
        if (e.status === 401) throw e;
        return null;
      }
    }

    resendSel.addEventListener('click', async () => {
      const offsets = [...selected].sort((a, b) => a - b);
      if (!offsets.length) return;
      s.actionOk();
      resendSel.disabled = true;
      try {
        const before = await lagNow();
        const r = await api('POST', `/api/mqgate/dlq/${enc(group)}/resend`, { offsets });
        const after = await lagNow();
        if (!c.alive) return;
        selected.clear();
        notice(result, 'ok', `Resent ${plural(r.resent, 'message')} (offset${offsets.length === 1 ? '' : 's'} ${offsets.join(', ')}) to ${offsets.length === 1 ? 'its' : 'their'} origin queue. ` +
          `Group lag ${before === null ? '?' : num(before)} → ${after === null ? '?' : num(after)}.`);
        result.dataset.resent = String(r.resent);
        await Promise.all([loadInfo(), loadPage()]);
      } catch (e) {
        s.actionFail(e);
      } finally {
        updateSelButton();
      }
    });

    resendRange.addEventListener('click', async () => {
      if (!group || running) return;
      s.actionOk();
      let from = Math.max(0, parseInt(rangeFrom.value, 10) || 0);
      try {
        await loadInfo();
      } catch (e) {
        s.actionFail(e);
        return;
      }
      const end = dlqTopic ? dlqTopic.next : 0;
      const start = dlqTopic ? Math.max(from, dlqTopic.min) : from;
      const total = Math.max(0, end - start);
      if (!total) {
        notice(result, 'warn', `Nothing to resend: no dead letters at or after offset ${num(from)}.`);
        return;
      }
      if (!window.confirm(`Resend ${plural(total, 'dead letter')} of ${group} from offset ${num(from)} to the queues they failed in?`)) return;
      const job = { stop: false };
      running = job;
      resendRange.disabled = true;
      updateSelButton();
      cancelRange.hidden = false;
      progress.hidden = false;
      result.hidden = true;
      bar.max = total;
      bar.value = 0;
      barText.textContent = `0 / ${num(total)} resent`;
      // Pages of about 1/50th of the range (at least 50, at most 1000): visible progress.
      const limit = Math.min(1000, Math.max(50, Math.ceil(total / 50)));
      let done = 0;
      let last = null;
      const before = await lagNow().catch(() => null);
      try {
        while (!job.stop && c.alive) {
          const r = await api('POST', `/api/mqgate/dlq/${enc(group)}/resend`, { from, limit });
          const n = Number(r.resent) || 0;
          if (!n || r.last_offset === null || r.last_offset === undefined) break;
          done += n;
          last = r.last_offset;
          from = r.last_offset + 1;
          bar.max = Math.max(total, done);
          bar.value = done;
          barText.textContent = `${num(done)} / ${num(Math.max(total, done))} resent`;
        }
        const after = await lagNow();
        if (!c.alive) return;
        notice(result, job.stop ? 'warn' : 'ok',
          `${job.stop ? 'Stopped: resent' : 'Resent'} ${plural(done, 'message')}${last !== null ? ` (through offset ${num(last)})` : ''}. ` +
          `Group lag ${before === null ? '?' : num(before)} → ${after === null ? '?' : num(after)}.`);
        result.dataset.resent = String(done);
        rangeFrom.value = String(from);
      } catch (e) {
        s.actionFail(e);
        notice(result, 'warn', `Resent ${plural(done, 'message')} before the error; offset ${num(from)} onwards were not resent.`);
      } finally {
        running = null;
        resendRange.disabled = false;
        cancelRange.hidden = true;
        updateSelButton();
        if (c.alive) await Promise.all([loadInfo(), loadPage()]).catch((e) => s.fail(e));
      }
    });
    cancelRange.addEventListener('click', () => { if (running) running.stop = true; });

    // The count and lag refresh every 5 s; the table only on demand (selections stay).
    poll(c, s, async () => {
      await loadInfo();
      if (!page.length && group && !box.firstChild) {
        if (dlqTopic) {
          fromIn.value = String(dlqTopic.min);
          rangeFrom.value = String(dlqTopic.min);
        }
        await loadPage();
      }
    });
  }

  // ------------------------------------------------------------------ delayed

  function pageDelayed(c, view) {
    const s = shell(view, 'Delayed messages');
    const topic = h('input', { type: 'search', id: 'delayed-topic', placeholder: 'address (exchange or MQTT topic)', class: 'filter' });
    const key = h('input', { type: 'search', id: 'delayed-key', placeholder: 'key (x-keys)' });
    const apply = h('button', { type: 'submit', id: 'delayed-apply', class: 'small' }, 'Filter');
    const more = h('button', { type: 'button', id: 'delayed-more', class: 'small', hidden: true }, 'More');
    const info = h('div', { class: 'toolbar', id: 'delayed-info' });
    const result = h('div', { id: 'delayed-result', 'data-test': 'delayed-result', hidden: true });
    const box = h('div', { id: 'delayed-box' });
    const form = h('form', { class: 'toolbar', action: '#', method: 'get' }, topic, key, apply);
    s.body.append(form, info, result, box, h('div', { class: 'toolbar' }, more));

    let items = [];
    let nextId = null;
    let pending = null;
    let want = 100; // how many to keep loaded across refreshes
    const sort = { key: 'due', dir: 1 };

    function query(after, limit) {
      const p = new URLSearchParams();
      if (topic.value.trim()) p.set('topic', topic.value.trim());
      if (key.value.trim()) p.set('key', key.value.trim());
      if (after) p.set('after', after);
      p.set('limit', String(limit));
      return '/api/mqgate/delayed?' + p.toString();
    }

    function draw() {
      info.replaceChildren(
        h('span', null, `${plural(items.length, 'message')} shown${nextId ? ' (more after)' : ''}`),
        h('span', { class: 'muted' }, '·'),
        h('span', { class: 'muted' }, 'timers stored, every address: ', h('b', { id: 'delayed-pending' }, num(pending)),
          ' (a cancelled one counts until its due time)'));
      more.hidden = !nextId;
      renderTable(box, {
        id: 'delayed-table',
        sort,
        rows: items,
        empty: 'No pending delayed messages.',
        rowAttrs: (d) => ({ 'data-test': 'delayed-row', 'data-id': d.id }),
        columns: [
          { key: 'due', label: 'Due', num: true, cell: (d) => [time(d.due), h('span', { class: 'sub' }, relative(d.due))] },
          { key: 'kind', label: 'Kind', cell: (d) => h('span', { class: 'badge' + (d.kind === 'retry' ? ' warn' : '') }, d.kind) },
          { key: 'topic', label: 'Address', cls: 'name' },
          { key: 'route', label: 'Released to', cls: 'name' },
          { key: 'keys', label: 'Keys', cell: (d) => (d.keys || []).join(' ') || h('span', { class: 'muted' }, '–') },
          { key: 'producer_group', label: 'Producer group', cls: 'name' },
          { key: 'size', label: 'Size', num: true, cell: (d) => bytes(d.size) },
          { key: 'born_timestamp', label: 'Published', num: true, cell: (d) => time(d.born_timestamp) },
          { key: 'id', label: 'ID', cls: 'name' },
          {
            key: 'cancel', label: '', sortable: false,
            cell: (d) => h('button', {
              type: 'button', class: 'small danger', 'data-test': 'delayed-cancel', 'data-id': d.id,
              onclick: () => cancel(d),
            }, 'Cancel'),
          },
        ],
      });
    }

    async function cancel(d) {
      if (!window.confirm(`Cancel delayed message ${d.id} (due ${time(d.due)}, to ${d.route})? It will never be delivered.`)) return;
      s.actionOk();
      try {
        await api('DELETE', '/api/mqgate/delayed/' + enc(d.id));
        notice(result, 'ok', `Cancelled ${d.id}.`);
        await run();
      } catch (e) {
        s.actionFail(e);
      }
    }

    const load = async () => {
      const r = await get(query(null, Math.min(1000, want)));
      if (!c.alive) return;
      items = r.items || [];
      nextId = r.next || null;
      pending = r.pending;
      draw();
    };
    const run = poll(c, s, load);
    form.addEventListener('submit', (ev) => { ev.preventDefault(); want = 100; run(); });
    more.addEventListener('click', async () => {
      try {
        const r = await get(query(nextId, 100));
        if (!c.alive) return;
        items = items.concat(r.items || []);
        nextId = r.next || null;
        pending = r.pending;
        want = items.length;
        draw();
      } catch (e) {
        s.fail(e);
      }
    });
  }

  // ------------------------------------------------------------------ connections

  function pageConnections(c, view) {
    const s = shell(view, 'Connections');
    const result = h('div', { id: 'conn-result', 'data-test': 'conn-result', hidden: true });
    const box = h('div', { id: 'conn-box' });
    s.body.append(result, box);
    const sort = { key: 'connected_at', dir: -1 };
    let rows = [];

    function draw() {
      renderTable(box, {
        id: 'conn-table',
        sort,
        rows,
        empty: 'No open connections.',
        rowAttrs: (r) => ({ 'data-test': 'conn-row', 'data-protocol': r.protocol, 'data-id': r.id }),
        columns: [
          { key: 'protocol', label: 'Protocol', cell: (r) => h('span', { class: 'badge' }, r.protocol) },
          { key: 'id', label: 'ID', cls: 'name', test: 'conn-id' },
          { key: 'peer', label: 'Peer', cls: 'name' },
          { key: 'user', label: 'User', cell: (r) => r.user || h('span', { class: 'muted' }, 'anonymous') },
          { key: 'detail', label: 'Vhost / version', cls: 'name' },
          { key: 'client', label: 'Client', cell: (r) => r.client || h('span', { class: 'muted' }, '–') },
          { key: 'channels', label: 'Channels', num: true },
          { key: 'connected_at', label: 'Connected', num: true, cell: (r) => [time(r.connected_at), h('span', { class: 'sub' }, 'for ' + dur(Date.now() - r.connected_at))] },
          {
            key: 'close', label: '', sortable: false,
            cell: (r) => h('button', {
              type: 'button', class: 'small danger', 'data-test': 'conn-close', 'data-protocol': r.protocol, 'data-id': r.id,
              onclick: () => closeConn(r),
            }, 'Close'),
          },
        ],
      });
    }

    async function closeConn(r) {
      if (!window.confirm(`Close ${r.protocol.toUpperCase()} connection ${r.id} from ${r.peer}${r.user ? ' (' + r.user + ')' : ''}?`)) return;
      s.actionOk();
      try {
        await api('DELETE', `/api/mqgate/connections/${enc(r.protocol)}/${enc(r.id)}`);
        notice(result, 'ok', `Closed ${r.protocol} connection ${r.id} (${r.peer}).`);
        await run();
        // The connection's task ends a moment after the close is sent: look again.
        setTimeout(() => { if (c.alive) run(); }, 700);
      } catch (e) {
        s.actionFail(e);
      }
    }

    const run = poll(c, s, async () => {
      const [mine, rabbit] = await Promise.all([get('/api/mqgate/connections'), get('/api/connections')]);
      if (!c.alive) return;
      const extra = new Map();
      for (const x of Array.isArray(rabbit) ? rabbit : []) {
        if (x.mqgate) extra.set(`${x.mqgate.protocol}/${x.mqgate.id}`, x);
      }
      rows = (Array.isArray(mine) ? mine : []).map((m) => {
        const x = extra.get(`${m.protocol}/${m.id}`) || {};
        const cp = x.client_properties || {};
        const client = [cp.connection_name, cp.product, cp.version].filter(Boolean).join(' ');
        return { ...m, channels: x.channels ?? null, client };
      });
      draw();
    });
  }

  // ------------------------------------------------------------------ cluster

  function pageCluster(c, view) {
    const s = shell(view, 'Cluster');
    const box = h('div', { id: 'cluster-box' });
    s.body.append(box);
    poll(c, s, async () => {
      const v = await get('/api/mqgate/cluster');
      if (!c.alive) return;
      const kv = (pairs) => h('dl', { class: 'kv' }, pairs.map(([k, val, id]) => [h('dt', null, k), h('dd', { id: id || null }, val)]));
      if (!v.replicated) {
        box.replaceChildren(
          h('section', { class: 'panel' },
            kv([
              ['Store backend', String(v.backend), 'cluster-backend'],
              ['Replicated', h('span', { class: 'badge' }, 'no'), 'cluster-replicated'],
            ]),
            h('p', { class: 'muted' }, 'This broker keeps its log on local disk: a single node, no replicas, no standby. ' +
              'Set store.backend = "jetstream" to replicate the log to a NATS JetStream cluster.')));
        return;
      }
      const me = v.this_node || {};
      const roleBadge = (role) => h('span', { class: 'badge ' + (role === 'owner' ? 'ok' : role === 'stepped_down' ? 'bad' : '') }, String(role || '–'));
      const sections = [
        h('section', { class: 'panel' },
          kv([
            ['Store backend', String(v.backend), 'cluster-backend'],
            ['Replicated', h('span', { class: 'badge ok' }, 'yes'), 'cluster-replicated'],
            ['Stream', String(v.stream ?? '–')],
            ['This node', String(v.node ?? '–'), 'cluster-node'],
            ['Role', roleBadge(me.role), 'cluster-role'],
            ['Epoch', me.epoch !== undefined ? num(me.epoch) : '–'],
            me.reason !== undefined ? ['Stepped down because', String(me.reason)] : null,
            ['Owner', v.owner ? String(v.owner.node) : h('span', { class: 'badge bad' }, 'none'), 'cluster-owner'],
            ['Lease revision', v.owner ? num(v.owner.lease_revision) : '–'],
            ['Stream sequences', `${num(v.first_seq)} … ${num(v.last_seq)}`],
            ['Applied here', num(v.applied), 'cluster-applied'],
          ].filter(Boolean))),
        h('section', { class: 'panel' }, h('h2', null, 'Gateways'), h('div', { id: 'cluster-nodes' })),
        h('section', { class: 'panel' }, h('h2', null, 'Stream replicas'), h('div', { id: 'cluster-replicas' })),
      ];
      box.replaceChildren(...sections);
      renderTable(box.querySelector('#cluster-nodes'), {
        id: 'cluster-nodes-table',
        rows: v.nodes || [],
        empty: 'No gateway has reported.',
        rowAttrs: (n) => ({ 'data-test': 'cluster-node-row', 'data-node': n.node }),
        columns: [
          { key: 'node', label: 'Node', cls: 'name', cell: (n) => [String(n.node), n.node === v.node ? h('span', { class: 'sub' }, 'this node') : null] },
          { key: 'role', label: 'Role', cell: (n) => roleBadge(n.role) },
          { key: 'applied', label: 'Applied', num: true },
          { key: 'lag', label: 'Lag', num: true },
        ],
      });
      renderTable(box.querySelector('#cluster-replicas'), {
        id: 'cluster-replicas-table',
        rows: v.replicas || [],
        empty: 'No replicas reported.',
        rowAttrs: (p) => ({ 'data-test': 'cluster-replica-row', 'data-name': p.name }),
        columns: [
          { key: 'name', label: 'Replica', cls: 'name' },
          { key: 'leader', label: 'Leader', cell: (p) => (p.leader ? h('span', { class: 'badge ok' }, 'leader') : '') },
          { key: 'current', label: 'Current', cell: (p) => (p.current ? 'yes' : h('span', { class: 'badge warn' }, 'no')) },
          { key: 'offline', label: 'Offline', cell: (p) => (p.offline ? h('span', { class: 'badge bad' }, 'offline') : 'no') },
          { key: 'lag', label: 'Lag', num: true },
        ],
      });
    });
  }

  // ------------------------------------------------------------------ router

  const PAGES = {
    overview: (c, v) => pageOverview(c, v),
    topics: (c, v) => pageTopics(c, v),
    groups: (c, v, args) => (args.length ? pageGroup(c, v, args[0]) : pageGroups(c, v)),
    dlq: (c, v, args) => pageDlq(c, v, args[0]),
    delayed: (c, v) => pageDelayed(c, v),
    connections: (c, v) => pageConnections(c, v),
    cluster: (c, v) => pageCluster(c, v),
  };
  const TITLES = {
    overview: 'Overview', topics: 'Topics & queues', groups: 'Consumer groups', dlq: 'DLQ',
    delayed: 'Delayed', connections: 'Connections', cluster: 'Cluster',
  };

  function route() {
    const raw = location.hash.replace(/^#\/?/, '');
    const parts = raw.split('/').filter((p, i) => p !== '' || i === 0).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    return { page: parts[0] || 'overview', args: parts.slice(1) };
  }

  function render() {
    const c = newCtx();
    const view = byId('view');
    const { page, args } = route();
    view.dataset.state = 'loading';
    if (!loggedIn() || page === 'login') {
      if (loggedIn() && page === 'login') { location.hash = '#/overview'; return; }
      if (page !== 'login') {
        afterLogin = location.hash || null;
        location.hash = '#/login';
        return;
      }
      showLogin(view);
      return;
    }
    document.body.classList.remove('logged-out');
    byId('whoami').textContent = sessionStorage.getItem(USER_KEY) || '';
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === page);
    const fn = PAGES[page];
    document.title = `mqgate · ${TITLES[page] || 'not found'}`;
    if (!fn) {
      const s = shell(view, 'Not found');
      s.fail(new ApiError(404, `There is no page “${page}”.`));
      return;
    }
    try {
      fn(c, view, args);
    } catch (e) {
      shell(view, TITLES[page]).fail(e);
    }
  }

  async function start() {
    byId('logout').addEventListener('click', logout);
    byId('auto-refresh').addEventListener('change', (ev) => {
      if (ev.target.checked) render();
    });
    window.addEventListener('hashchange', render);
    if (loggedIn()) {
      // Credentials from earlier in this tab's session: still good?
      try {
        const r = await request('GET', '/api/whoami');
        if (r.status === 401) {
          unauthorized(r.data); // on to the login form, with the reason
          return;
        }
      } catch (_) {
        // The broker is unreachable: the page shows that error itself.
      }
    }
    render();
  }

  start();
})();
