// countersign reviewer UI. One file, no build step, no dependencies.
//
// Security rule of this file: prompt text, model names, callers, reasons and
// every other value from the API are attacker-controlled. They only ever
// reach the page as text nodes (textContent / Node.append(string)); this file
// never assigns HTML strings. The server's CSP forbids inline script as a
// second line of defence.
'use strict';

(() => {
  // Masked-value placeholders inserted by redaction: [EMAIL], <EMAIL_3f2a>.
  const MASK_RE = /\[[A-Z_]+\]|<[A-Z_]+_[0-9a-f]{4,}>/g;
  // Characters a reader does not see but a model reads (Unicode's
  // default-ignorable code points): zero-width, directional and joining
  // controls, Hangul fillers, variation selectors, and runs of Unicode tag
  // characters (which spell ASCII text invisibly). The filter reads them as
  // the model does; the page shows them, so a reviewer sees what the model
  // gets. The service's tests hold this to the filter's list
  // (countersign_core::renders_as_nothing).
  const HIDDEN_RE = /[\u{E0000}-\u{E007F}]+|[\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8\u{1BCA0}-\u{1BCA3}\u{1D173}-\u{1D17A}\u{E0080}-\u{E0FFF}]/gu;
  // Body fields that hold the prompt itself (shown as the conversation).
  const PROMPT_KEYS = new Set(['messages', 'input', 'prompt', 'contents', 'system', 'systemInstruction', 'instructions']);
  const STATUS_LABEL = {
    pending: 'Pending', approved: 'Approved', rejected: 'Rejected', expired: 'Expired', cancelled: 'Cancelled',
    abandoned: 'Abandoned',
  };

  const S = {
    me: null,
    csrf: '',
    page: null,
    pending: [],
    pendingLoaded: false,
    knownIds: null,
    selected: 0,
    review: null,
    reviewId: null,
    editing: null,
    armed: null,
    history: { items: [], done: false, loading: false },
    es: null,
    refreshTimer: null,
  };

  // ------------------------------------------------------------------ DOM

  const $ = (sel, root) => (root || document).querySelector(sel);

  // h('div', {class: 'x', onclick: fn}, 'text', node, [more]) — strings
  // become text nodes, never markup.
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === 'class') el.className = v;
        else if (k === 'dataset') Object.assign(el.dataset, v);
        else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
        else if (k === 'value') el.value = v;
        else el.setAttribute(k, v === true ? '' : String(v));
      }
    }
    add(el, children);
    return el;
  }

  function add(el, ...children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  function replace(el, ...children) {
    el.replaceChildren();
    return add(el, children);
  }

  // Text with masked placeholders wrapped in <span class="masked"> and
  // hidden characters made visible, built from text nodes.
  function maskedText(text) {
    const frag = document.createDocumentFragment();
    const s = String(text == null ? '' : text);
    let last = 0;
    for (const m of s.matchAll(MASK_RE)) {
      if (m.index > last) frag.append(shownText(s.slice(last, m.index)));
      frag.append(h('span', { class: 'masked', title: 'Masked value' }, m[0]));
      last = m.index + m[0].length;
    }
    if (last < s.length) frag.append(shownText(s.slice(last)));
    return frag;
  }

  // `s` with each hidden character as a visible marker: a run of tag
  // characters as the text it spells, any other as its code point. Every
  // place that shows what the model or the caller gets goes through it:
  // the conversation, an applied edit's diff (another reviewer's edit of a
  // review that needs two approvals), raw bodies, parameters, records.
  function shownText(s) {
    const frag = document.createDocumentFragment();
    let last = 0;
    for (const m of s.matchAll(HIDDEN_RE)) {
      if (m.index > last) frag.append(s.slice(last, m.index));
      const first = m[0].codePointAt(0);
      if (first >= 0xE0000 && first <= 0xE007F) {
        const spelled = Array.from(m[0], (c) => c.codePointAt(0))
          .filter((c) => c >= 0xE0020 && c <= 0xE007E)
          .map((c) => String.fromCodePoint(c - 0xE0000)).join('');
        frag.append(h('span', { class: 'hidden-chars', title: 'Invisible Unicode tag characters: the model reads them as this text' },
          `⟦hidden text: ${spelled}⟧`));
      } else {
        frag.append(h('span', { class: 'hidden-chars', title: 'An invisible character the model reads' },
          `⟦U+${first.toString(16).toUpperCase().padStart(4, '0')}⟧`));
      }
      last = m.index + m[0].length;
    }
    if (last < s.length) frag.append(s.slice(last));
    return frag;
  }

  // A rejected audit (a spot check forwarded already) is a flag: its caller
  // and rule are marked for follow-up.
  function badge(status, edited, mode) {
    const label = status === 'approved' && edited ? 'Approved · edited'
      : status === 'rejected' && mode === 'audit' ? 'Flagged' : (STATUS_LABEL[status] || status);
    return h('span', { class: `badge badge-${status}` }, label);
  }

  function kbd(k) { return h('kbd', null, k); }

  // ------------------------------------------------------------ formatting

  function fmtDuration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
    const hr = Math.floor(m / 60);
    if (hr < 48) return `${hr}h ${String(m % 60).padStart(2, '0')}m`;
    return `${Math.floor(hr / 24)}d ${hr % 24}h`;
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    const today = new Date();
    const sameDay = d.toDateString() === today.toDateString();
    return sameDay
      ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
      : d.toLocaleString([], { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  function fmtFull(ms) { return new Date(ms).toLocaleString(); }

  // Live-updating age ("3m 04s ago") and countdown elements; tick() refreshes them.
  function ageEl(since) {
    return h('span', { class: 'age', dataset: { since: String(since) }, title: fmtFull(since) }, `${fmtDuration(Date.now() - since)} ago`);
  }

  function countdownEl(created, expires) {
    const wrap = h('span', { class: 'countdown', dataset: { created: String(created), expires: String(expires) } });
    const text = h('span', { class: 'countdown-text' });
    const bar = h('span', { class: 'countdown-bar' }, h('span', { class: 'countdown-fill' }));
    add(wrap, text, bar);
    updateCountdown(wrap);
    return wrap;
  }

  function updateCountdown(el) {
    const created = Number(el.dataset.created);
    const expires = Number(el.dataset.expires);
    const left = expires - Date.now();
    const total = Math.max(1, expires - created);
    const text = el.querySelector('.countdown-text');
    const fill = el.querySelector('.countdown-fill');
    if (text) text.textContent = left > 0 ? `${fmtDuration(left)} left` : 'expiring…';
    if (fill) fill.style.width = `${Math.max(0, Math.min(100, (left / total) * 100)).toFixed(1)}%`;
    el.classList.toggle('urgent', left < Math.min(60000, total * 0.2));
    return left;
  }

  function tick() {
    for (const el of document.querySelectorAll('[data-since]')) {
      el.textContent = `${fmtDuration(Date.now() - Number(el.dataset.since))} ago`;
    }
    let lapsed = false;
    for (const el of document.querySelectorAll('.countdown')) {
      if (updateCountdown(el) <= -1500) lapsed = true;
    }
    // The server expires overdue reviews every second; pick that up.
    if (lapsed) scheduleRefresh(500);
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function goLogin() {
    const next = location.pathname + location.search;
    location.assign(`/login?next=${encodeURIComponent(next)}`);
  }

  async function api(path, opts) {
    const o = opts || {};
    const method = o.method || 'GET';
    const headers = { accept: 'application/json' };
    if (method !== 'GET') headers['x-csrf-token'] = S.csrf;
    let body;
    if (o.body !== undefined) {
      headers['content-type'] = 'application/json';
      body = JSON.stringify(o.body);
    }
    const res = await fetch(path, { method, headers, body, credentials: 'same-origin', cache: 'no-store' });
    let data = null;
    const type = res.headers.get('content-type') || '';
    if (type.includes('json')) {
      try { data = await res.json(); } catch (_) { data = null; }
    }
    if (res.status === 401) {
      goLogin();
      throw new ApiError(401, 'Signed out');
    }
    if (!res.ok) {
      const msg = data && data.error && data.error.message ? data.error.message : `${res.status} ${res.statusText}`;
      throw new ApiError(res.status, msg);
    }
    return data;
  }

  // ------------------------------------------------------------- feedback

  let toastTimer = null;
  function toast(message, kind) {
    const el = $('#toast');
    if (!el) return;
    el.textContent = message;
    el.className = `toast toast-${kind || 'info'}`;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 4000);
  }

  function setLive(state) {
    const el = $('#live');
    if (!el) return;
    el.dataset.state = state;
    el.textContent = state === 'live' ? 'Live' : state === 'offline' ? 'Reconnecting' : 'Connecting';
    el.title = state === 'live' ? 'Receiving updates as they happen' : 'Live updates interrupted; reconnecting';
  }

  function updateTitle() {
    const n = S.pending.length;
    const base = n ? `(${n}) countersign` : 'countersign';
    const suffix = { queue: '', review: ' · Review', history: ' · History', load: ' · Load' }[S.page] || '';
    document.title = base + suffix;
    const count = $('#nav-count');
    if (count) {
      count.textContent = String(n);
      count.hidden = n === 0;
    }
  }

  // ------------------------------------------------------------ live feed

  function connectEvents() {
    if (S.es) S.es.close();
    const es = new EventSource('/api/events');
    S.es = es;
    es.addEventListener('hello', () => {
      setLive('live');
      // (Re)connected: whatever happened while away, re-read it.
      scheduleRefresh(0);
    });
    es.addEventListener('review', (e) => {
      let ev = null;
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      onReviewEvent(ev);
    });
    es.addEventListener('resync', () => scheduleRefresh(0));
    es.addEventListener('error', () => {
      setLive('offline');
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        setTimeout(async () => {
          try {
            await api('/api/me');
            connectEvents();
          } catch (_) { /* api() redirects to sign-in on 401 */ }
        }, 3000);
      }
    });
  }

  function onReviewEvent(ev) {
    if (S.page === 'review' && ev && ev.id === S.reviewId) {
      loadReview(S.reviewId, { quiet: true });
    }
    scheduleRefresh(80);
  }

  function scheduleRefresh(delay) {
    clearTimeout(S.refreshTimer);
    S.refreshTimer = setTimeout(refresh, delay || 0);
  }

  async function refresh() {
    await refreshPending();
    if (S.page === 'history' && !S.history.paged) loadHistory(false);
  }

  async function refreshPending() {
    let data;
    try {
      data = await api('/api/reviews?status=pending&limit=500');
    } catch (e) {
      if (e.status !== 401) toast(`Could not load the queue: ${e.message}`, 'error');
      return;
    }
    const list = data.reviews.slice().sort((a, b) => a.expires_at_ms - b.expires_at_ms || a.created_at_ms - b.created_at_ms);
    const fresh = new Set();
    if (S.knownIds) for (const r of list) if (!S.knownIds.has(r.id)) fresh.add(r.id);
    S.knownIds = new Set(list.map((r) => r.id));
    S.pending = list;
    S.pendingLoaded = true;
    updateTitle();
    if (S.page === 'queue') renderQueue(fresh);
    if (S.page === 'review') renderQueuePosition();
  }

  // ---------------------------------------------------------------- queue

  function renderQueue(fresh) {
    const main = $('#main');
    const selectedId = S.pending[S.selected] ? S.pending[S.selected].id : null;
    const head = h('div', { class: 'page-head' },
      h('div', null,
        h('h1', null, 'Pending reviews'),
        h('p', { class: 'muted' }, 'Held requests wait here until someone decides. Soonest to expire first.')),
      h('div', { class: 'page-head-aside muted' }, S.pending.length === 1 ? '1 waiting' : `${S.pending.length} waiting`));
    if (!S.pending.length) {
      replace(main, head, h('div', { class: 'card empty' },
        h('div', { class: 'empty-mark', 'aria-hidden': 'true' }),
        h('h2', null, 'All clear'),
        h('p', { class: 'muted' }, 'No request is waiting for a decision. New ones appear here on their own.')));
      return;
    }
    if (selectedId) {
      const i = S.pending.findIndex((r) => r.id === selectedId);
      S.selected = i >= 0 ? i : Math.min(S.selected, S.pending.length - 1);
    } else {
      S.selected = Math.min(S.selected, S.pending.length - 1);
    }
    const rows = S.pending.map((r, i) => queueRow(r, i, fresh && fresh.has(r.id)));
    replace(main, head, h('div', { class: 'card queue', role: 'list', id: 'queue' },
      h('div', { class: 'qhead', 'aria-hidden': 'true' },
        h('span', null, 'Request'), h('span', null, 'Caller'), h('span', null, 'Route · policy'),
        h('span', null, 'Waiting'), h('span', null, 'Time left')),
      rows));
  }

  function policyChips(r) {
    const chips = [];
    if (r.kind && r.kind !== 'prompt') chips.push(h('span', { class: 'chip chip-hit', title: 'What is reviewed' }, r.kind === 'tool_call' ? 'tool call' : r.kind));
    if (r.mode === 'audit') chips.push(h('span', { class: 'chip', title: 'A spot check: forwarded already, looked at afterwards' }, 'audit'));
    if (r.rule) chips.push(h('span', { class: 'chip', title: 'Policy rule that asked for review' }, r.rule));
    if (r.required_approvals > 1) {
      chips.push(h('span', { class: 'chip', title: 'Approvals so far / needed' }, `${r.approval_count || 0}/${r.required_approvals} approvals`));
    }
    for (const hit of asList(r.policy_hits)) {
      chips.push(h('span', { class: 'chip chip-hit', title: 'Policy hit' }, hitLabel(hit)));
    }
    return chips;
  }

  function asList(v) {
    if (Array.isArray(v)) return v;
    if (v === null || v === undefined || v === '') return [];
    return [v];
  }

  function hitLabel(hit) {
    if (hit === null || hit === undefined) return '';
    if (typeof hit !== 'object') return String(hit);
    const name = hit.name || hit.rule || hit.kind || hit.type || hit.detector || '';
    const detail = hit.detail || hit.message || hit.match || hit.count || '';
    if (name && detail !== '') return `${name}: ${detail}`;
    return name || JSON.stringify(hit);
  }

  function queueRow(r, i, isNew) {
    const cls = ['qrow'];
    if (i === S.selected) cls.push('selected');
    if (isNew) cls.push('qrow-new');
    return h('a', { class: cls.join(' '), href: `/reviews/${encodeURIComponent(r.id)}`, role: 'listitem', dataset: { id: r.id } },
      h('span', { class: 'qcell qmain' },
        h('span', { class: 'qmodel' }, r.model || '(no model)', r.stream ? h('span', { class: 'tag' }, 'stream') : null),
        h('span', { class: 'qpreview' }, maskedText(r.preview || ''))),
      h('span', { class: 'qcell qcaller' },
        h('span', null, r.caller || '—'),
        asList(r.caller_groups).length ? h('span', { class: 'qsub' }, asList(r.caller_groups).join(', ')) : null),
      h('span', { class: 'qcell qroute' },
        h('span', null, r.route || '—'),
        h('span', { class: 'chips' }, policyChips(r))),
      h('span', { class: 'qcell qage' }, ageEl(r.created_at_ms)),
      h('span', { class: 'qcell qleft' }, countdownEl(r.created_at_ms, r.expires_at_ms)));
  }

  function selectRow(delta) {
    if (!S.pending.length) return;
    S.selected = Math.max(0, Math.min(S.pending.length - 1, S.selected + delta));
    const rows = document.querySelectorAll('.qrow');
    rows.forEach((row, i) => row.classList.toggle('selected', i === S.selected));
    const row = rows[S.selected];
    if (row) {
      row.scrollIntoView({ block: 'nearest' });
      row.focus({ preventScroll: true });
    }
  }

  // --------------------------------------------------------------- review

  function renderQueuePosition() {
    const el = $('#queue-pos');
    if (!el) return;
    const i = S.pending.findIndex((r) => r.id === S.reviewId);
    const n = S.pending.length;
    if (i >= 0) el.textContent = `${i + 1} of ${n} pending`;
    else el.textContent = n ? `${n} pending` : 'Queue empty';
  }

  async function loadReview(id, opts) {
    let r;
    try {
      r = await api(`/api/reviews/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 404) {
        replace($('#main'), h('div', { class: 'card empty' },
          h('h2', null, 'No such review'),
          h('p', { class: 'muted' }, 'It may have been removed, or the link is wrong.'),
          h('a', { class: 'btn', href: '/' }, 'Back to the queue')));
      } else if (e.status !== 401) {
        toast(`Could not load the review: ${e.message}`, 'error');
      }
      return;
    }
    const before = S.review;
    S.review = r;
    if (before && before.status === 'pending' && r.status !== 'pending' && opts && opts.quiet && !S.justDecided) {
      const by = r.reviewer ? ` by ${r.reviewer}` : '';
      toast(`This review was ${r.status}${by}.`, r.status === 'approved' ? 'ok' : 'warn');
    }
    S.justDecided = false;
    if (S.editing && r.status !== 'pending') S.editing = null;
    if (!before || before.id !== r.id) S.records = null;
    renderReview();
    loadRecords(r.id);
  }

  // The session records of this review (request as forwarded, and the
  // model's response), when the service keeps records. Optional: any
  // failure just leaves the card out.
  async function loadRecords(id, attempt) {
    let data;
    try {
      const res = await fetch(`/api/records?review_id=${encodeURIComponent(id)}&limit=20`, { credentials: 'same-origin', cache: 'no-store' });
      if (!res.ok) return;
      data = await res.json();
    } catch (_) { return; }
    const list = data && Array.isArray(data.records) ? data.records : [];
    // The response part is written when the model has answered: look again
    // a few times while it is missing.
    const n = attempt || 0;
    if (S.review && S.review.status === 'approved' && n < 5 && (!list.length || list.some((rec) => !rec || !rec.response))) {
      setTimeout(() => { if (S.reviewId === id) loadRecords(id, n + 1); }, 1500 * (n + 1));
    }
    const key = JSON.stringify(list);
    if (S.reviewId !== id || key === S.recordsKey) return;
    S.records = list;
    S.recordsKey = key;
    renderReview();
  }

  function renderReview() {
    const r = S.review;
    const main = $('#main');
    const keepReason = $('#reason') ? $('#reason').value : '';
    const keepEdit = $('#edit-body') ? $('#edit-body').value : null;
    // Re-rendering must not steal the caret from someone typing.
    const active = document.activeElement;
    const activeId = active && active.id ? active.id : null;
    const caret = active && typeof active.selectionStart === 'number' ? [active.selectionStart, active.selectionEnd] : null;

    const title = h('div', { class: 'review-head' },
      h('div', { class: 'crumbs' },
        h('a', { href: '/', class: 'back' }, '← Queue'),
        h('span', { class: 'muted', id: 'queue-pos' })),
      h('div', { class: 'title-row' },
        h('h1', null, r.model || '(no model)'),
        badge(r.status, r.edited, r.mode),
        r.status === 'pending' ? countdownEl(r.created_at_ms, r.expires_at_ms) : null),
      h('div', { class: 'subtitle muted' },
        h('span', null, r.caller || 'unknown caller'),
        h('span', { class: 'dot' }, '·'),
        h('span', null, r.route ? `route ${r.route}` : 'no route name'),
        h('span', { class: 'dot' }, '·'),
        h('span', null, 'received ', ageEl(r.created_at_ms))));

    const mainCol = h('div', { class: 'col-main' });
    if (S.editing) mainCol.append(editorCard());
    if (r.edited_body) mainCol.append(appliedEditCard(r));
    if (r.kind === 'tool_call') mainCol.append(toolCallsCard(r));
    if (r.kind === 'response') mainCol.append(answerCard(r));
    mainCol.append(...[conversationCard(r), parametersCard(r)].filter(Boolean));
    if (S.records && S.records.length) mainCol.append(recordsCard(S.records));

    const side = h('aside', { class: 'col-side' }, decisionCard(r), standingCard(r), assessorsCard(r), detailsCard(r));
    replace(main, title, h('div', { class: 'review-grid' }, mainCol, side));
    renderQueuePosition();
    const reason = $('#reason');
    if (reason && keepReason) reason.value = keepReason;
    const edit = $('#edit-body');
    if (edit && keepEdit !== null && S.editing && S.editing.stage === 'edit') edit.value = keepEdit;
    const again = activeId ? document.getElementById(activeId) : null;
    if (again && again !== document.activeElement) {
      again.focus({ preventScroll: true });
      if (caret && typeof again.setSelectionRange === 'function') again.setSelectionRange(caret[0], caret[1]);
    }
  }

  // The standing-approval card (standing.js): made once per state of the
  // review, so re-rendering keeps what the reviewer typed into it.
  function standingCard(r) {
    const key = `${r.id}:${r.status}:${r.approval_count || 0}`;
    if (S.standing && S.standing.key === key) return S.standing.card;
    const card = window.countersignStanding.reviewCard({ h, replace, api, toast, $ }, r, () => {
      loadReview(r.id);
      refreshPending();
    });
    S.standing = { key, card };
    return card;
  }

  function isToolLine(line) {
    return /^\[(tool_call|function_call|tool_result|function_result|tool_use|tool_output)\b/.test(line);
  }

  // A message's text: prose keeps its newlines; tool-call lines get their
  // own block; masked values are marked. All of it as text nodes.
  function messageBody(text) {
    const body = h('div', { class: 'msg-text' });
    const lines = String(text).split('\n');
    let run = [];
    const flush = () => {
      if (run.length) body.append(h('div', { class: 'msg-prose' }, maskedText(run.join('\n'))));
      run = [];
    };
    for (const line of lines) {
      if (isToolLine(line)) {
        flush();
        body.append(h('div', { class: 'tool-call' }, maskedText(line)));
      } else {
        run.push(line);
      }
    }
    flush();
    if (!String(text).length) body.append(h('div', { class: 'msg-prose muted' }, '(empty)'));
    return body;
  }

  function conversationCard(r) {
    if (r.body_purged_at_ms) {
      return h('section', { class: 'card' },
        h('h2', { class: 'card-title' }, 'Conversation'),
        h('p', { class: 'muted purged' },
          `The prompt and request body were removed by retention on ${new Date(r.body_purged_at_ms).toISOString().slice(0, 10)}.`));
    }
    const msgs = (r.prompt || []).map((m, i) => h('div', { class: `msg msg-${roleClass(m.role)}`, dataset: { index: String(i) } },
      h('div', { class: 'msg-role' }, m.role || 'message'),
      messageBody(m.text || '')));
    const count = msgs.length === 1 ? '1 message' : `${msgs.length} messages`;
    const how = isAnswerReview(r) ? 'the prompt the model answered'
      : r.edited_body ? 'as originally sent (the model received the edit)' : 'as the model will see it';
    return h('section', { class: 'card' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, 'Conversation'),
        h('span', { class: 'muted small' }, `${count} · ${how}`)),
      msgs.length ? h('div', { class: 'messages', id: 'messages' }, msgs) : h('p', { class: 'muted' }, 'This request has no prompt text.'));
  }

  // A review of the model's answer: the tool calls it would send to the
  // caller's agent, each with its arguments (text only, never markup).
  function toolCallsCard(r) {
    const calls = asList(r.tool_calls).map((c) => h('div', { class: 'msg msg-tool' },
      h('div', { class: 'msg-role' }, `tool call · ${c.name || '(no name)'}`),
      h('pre', { class: 'code' }, shownJson(prettyJson(c.arguments || '{}')))));
    return h('section', { class: 'card', id: 'tool-calls' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, 'Tool calls in the answer'),
        h('span', { class: 'muted small' }, 'held before they reach the caller; editing changes only their arguments')),
      calls.length ? h('div', { class: 'messages' }, calls) : h('p', { class: 'muted' }, 'No tool calls.'),
      rawAnswer(r));
  }

  // Whether the review is of the model's answer (its tool calls or its
  // text): its body is the answer the caller would get, not a request.
  function isAnswerReview(r) {
    return r.kind === 'tool_call' || r.kind === 'response';
  }

  // A review of the model's answer text: its texts as the filter read
  // them (masked as stored), as text only, never markup.
  function answerCard(r) {
    const texts = asList(r.answer).map((t, i) => h('div', { class: 'msg msg-assistant', dataset: { index: String(i) } },
      h('div', { class: 'msg-role' }, textLabel(i)),
      messageBody(t)));
    return h('section', { class: 'card', id: 'answer' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, 'Answer'),
        h('span', { class: 'muted small' }, 'held before it reaches the caller; masked as stored; editing changes only its texts')),
      texts.length ? h('div', { class: 'messages' }, texts) : h('p', { class: 'muted' }, 'This answer has no text; see the whole answer below.'),
      rawAnswer(r));
  }

  function textLabel(i) {
    return i === 0 ? 'assistant' : `assistant · text ${i + 1}`;
  }

  function rawAnswer(r) {
    if (r.body_purged_at_ms) return null;
    return h('details', { class: 'raw' },
      h('summary', null, 'The whole answer (JSON)'),
      h('pre', { class: 'code' }, shownJson(prettyJson(r.body))));
  }

  function roleClass(role) {
    return ['system', 'developer', 'user', 'assistant', 'tool', 'input'].includes(role) ? role : 'other';
  }

  function parseBody(text) {
    try {
      const v = JSON.parse(text);
      return v && typeof v === 'object' && !Array.isArray(v) ? v : null;
    } catch (_) { return null; }
  }

  function parametersCard(r) {
    if (r.body_purged_at_ms || isAnswerReview(r)) return null;
    const body = parseBody(r.body);
    const rows = [];
    if (body) {
      for (const [k, v] of Object.entries(body)) {
        if (PROMPT_KEYS.has(k) || k === 'model') continue;
        rows.push(h('div', { class: 'param' },
          h('dt', null, k),
          h('dd', null, paramValue(v, k))));
      }
    }
    const content = body === null
      ? h('p', { class: 'muted' }, 'The body is not a JSON object; see the raw request below.')
      : rows.length ? h('dl', { class: 'params' }, rows) : h('p', { class: 'muted' }, 'No parameters besides the prompt.');
    return h('section', { class: 'card' },
      h('h2', { class: 'card-title' }, 'Parameters'),
      content,
      h('details', { class: 'raw' },
        h('summary', null, 'Raw request body'),
        h('pre', { class: 'code' }, shownJson(prettyJson(r.body)))));
  }

  // Names of the tools in an OpenAI / Anthropic / Gemini style `tools` list.
  function toolNames(v) {
    if (!Array.isArray(v)) return [];
    const names = [];
    for (const t of v) {
      if (!t || typeof t !== 'object') continue;
      if (t.function && t.function.name) names.push(t.function.name);
      else if (t.name) names.push(t.name);
      else if (Array.isArray(t.functionDeclarations)) for (const f of t.functionDeclarations) if (f && f.name) names.push(f.name);
      else if (t.type) names.push(t.type);
    }
    return names;
  }

  function paramValue(v, key) {
    if (v === null || typeof v !== 'object') {
      return h('code', { class: 'scalar' }, shownText(JSON.stringify(v)));
    }
    const text = JSON.stringify(v, null, 2);
    if (text.length < 80) return h('code', { class: 'scalar' }, shownText(JSON.stringify(v)));
    const names = key === 'tools' ? toolNames(v) : [];
    const count = Array.isArray(v) ? `${v.length} item${v.length === 1 ? '' : 's'}` : `${Object.keys(v).length} field${Object.keys(v).length === 1 ? '' : 's'}`;
    const summary = names.length ? h('span', null, `${names.length} tool${names.length === 1 ? '' : 's'}: `,
      names.map((n, i) => [i ? ', ' : '', h('code', null, n)])) : count;
    return h('details', { class: 'param-details', open: !names.length && text.length < 600 },
      h('summary', null, summary),
      h('pre', { class: 'code' }, shownText(text)));
  }

  function detailRow(label, value) {
    if (value === null || value === undefined || value === '' || (Array.isArray(value) && !value.length)) return null;
    return h('div', { class: 'detail' }, h('dt', null, label), h('dd', null, value));
  }

  function chipList(list, cls) {
    return h('span', { class: 'chips' }, asList(list).map((x) => h('span', { class: `chip ${cls || ''}` }, typeof x === 'object' ? hitLabel(x) : String(x))));
  }

  // What the filter found besides the prompt, as one sentence:
  // "2 e-mail addresses masked, tool run_shell offered".
  const HIT_NOUNS = {
    email: ['e-mail address', 'e-mail addresses'], phone: ['phone number', 'phone numbers'],
    credit_card: ['card number', 'card numbers'], iban: ['IBAN', 'IBANs'], us_ssn: ['SSN', 'SSNs'],
    ipv4: ['IPv4 address', 'IPv4 addresses'], ipv6: ['IPv6 address', 'IPv6 addresses'],
    jwt: ['JWT', 'JWTs'], password_assignment: ['password', 'passwords'],
  };
  const ACTION_WORDS = { redact: 'masked', pseudonymize: 'pseudonymized', monitor: 'matched (monitor)', block: 'blocked', deny: 'denied' };

  function evidenceParts(ev) {
    if (!ev || typeof ev !== 'object') return [];
    const parts = [];
    for (const hit of asList(ev.hits)) {
      if (!hit || typeof hit !== 'object') continue;
      const n = Number(hit.count) || 0;
      const noun = HIT_NOUNS[hit.name];
      const what = noun ? noun[n === 1 ? 0 : 1] : `× ${String(hit.name)}`;
      parts.push(`${n} ${what} ${ACTION_WORDS[hit.action] || String(hit.action || '')}`.trim());
    }
    const tools = asList(ev.tools).map(String);
    if (tools.length) {
      parts.push([`tool${tools.length === 1 ? '' : 's'} `, tools.map((t, i) => [i ? ', ' : '', h('code', null, t)]), ' offered']);
    }
    if (ev.attachments) parts.push('attachments');
    if (typeof ev.prompt_chars === 'number' && ev.prompt_chars > 0) {
      parts.push(`${ev.prompt_chars.toLocaleString()} characters in ${ev.prompt_messages || 0} message${ev.prompt_messages === 1 ? '' : 's'}`);
    }
    return parts;
  }

  function evidenceLine(ev) {
    const parts = evidenceParts(ev);
    if (!parts.length) return null;
    return h('span', { class: 'evidence' }, parts.map((p, i) => [i ? ', ' : '', p]));
  }

  function labelChip(l) {
    const score = typeof l.score === 'number' ? ` ${l.score.toFixed(2)}` : '';
    return h('span', { class: `chip ${l.flagged ? 'chip-hit' : ''}`, title: l.flagged ? 'flagged by the assessor' : 'score' }, `${String(l.name)}${score}`);
  }

  // The assessors' report: each assessor's labels (or why it failed) and
  // what the rule made of them.
  function assessorsCard(r) {
    const report = r.assessment;
    if (!report || typeof report !== 'object') {
      if (!r.auto_decision) return null;
      return h('section', { class: 'card' }, h('h2', { class: 'card-title' }, 'Assessors'),
        h('p', { class: 'muted small' }, r.status === 'pending' ? 'Asking the assessors…' : 'No assessment was stored.'));
    }
    const out = report.outcome || {};
    const verdict = out.decision === 'for_people'
      ? h('p', { class: 'small assessment-why' }, 'Left for people: ', String(out.why || ''))
      : h('p', { class: 'small assessment-why' }, out.decision === 'approve' ? 'Approved automatically: ' : 'Rejected automatically: ', String(out.reason || ''));
    const rows = asList(report.assessments).filter((a) => a && typeof a === 'object').map((a) => {
      const labels = asList(a.labels).filter((l) => l && typeof l === 'object');
      const body = a.error
        ? h('span', { class: 'chip chip-hit' }, `failed: ${String(a.error)}`)
        : labels.length
          ? h('span', { class: 'chips' }, labels.map(labelChip))
          : h('span', { class: 'muted' }, a.flagged ? 'flagged' : 'nothing found');
      return detailRow(`${String(a.assessor)} (${String(a.kind)})`, body);
    });
    return h('section', { class: 'card' },
      h('h2', { class: 'card-title' }, 'Assessors'),
      verdict,
      rows.length ? h('dl', { class: 'details' }, rows) : null);
  }

  function detailsCard(r) {
    const masked = asList(r.masked).length ? chipList(r.masked.map((m) => (typeof m === 'object' ? (m.placeholder || m.kind || hitLabel(m)) : m)), 'chip-masked') : null;
    return h('section', { class: 'card' },
      h('h2', { class: 'card-title' }, 'Request'),
      h('dl', { class: 'details' },
        detailRow('Caller', r.caller || 'unknown'),
        detailRow('Groups', asList(r.caller_groups).length ? chipList(r.caller_groups) : null),
        detailRow('Route', r.route),
        detailRow('Model', r.model),
        detailRow('API', r.api),
        detailRow('Rule', r.rule),
        detailRow('Evidence', evidenceLine(r.evidence)),
        detailRow('Approvals', r.required_approvals > 1 ? `${r.approval_count || 0} of ${r.required_approvals}` : null),
        detailRow('Approvers', r.approver_group ? `group ${r.approver_group}` : null),
        detailRow('Policy hits', asList(r.policy_hits).length ? chipList(r.policy_hits, 'chip-hit') : null),
        detailRow('Masked', masked),
        detailRow('Endpoint', `${r.method || 'POST'} ${r.path}`),
        detailRow('Host', r.authority),
        detailRow('Streaming', r.stream ? 'yes' : 'no'),
        detailRow('Request id', h('code', null, r.request_id)),
        detailRow('Review id', h('code', null, r.id)),
        detailRow('Received', fmtFull(r.created_at_ms)),
        detailRow(r.status === 'pending' ? 'Expires' : 'Expiry was', fmtFull(r.expires_at_ms)),
        detailRow('Hold', fmtDuration(r.hold_timeout_ms))));
  }

  function recordsCard(records) {
    const items = records.map((rec) => {
      const resp = rec && typeof rec.response === 'object' ? rec.response : null;
      const status = resp ? (resp.status ?? resp.status_code ?? resp.outcome ?? 'recorded') : 'no response recorded';
      return h('div', { class: 'record' },
        h('dl', { class: 'details' },
          detailRow('Record', rec.record_id ? h('code', null, String(rec.record_id)) : null),
          detailRow('Recorded', typeof rec.created_at_ms === 'number' ? fmtFull(rec.created_at_ms) : null),
          detailRow('Response', String(status)),
          detailRow('Chain hash', rec.hash ? h('code', null, String(rec.hash).slice(0, 16) + '…') : null)),
        h('details', { class: 'raw' },
          h('summary', null, 'Full record (request and response)'),
          h('pre', { class: 'code' }, shownText(JSON.stringify(rec, null, 2)))));
    });
    return h('section', { class: 'card' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, 'Session record'),
        h('span', { class: 'muted small' }, records.length === 1 ? '1 entry' : `${records.length} entries`)),
      items);
  }

  // Approvals recorded so far (quorum reviews), when the API reports them.
  function approvalsList(r) {
    const list = asList(r.approvals).filter((a) => a && typeof a === 'object');
    if (!list.length) return null;
    return h('ul', { class: 'approvals' }, list.map((a) => h('li', { class: a.superseded_at_ms ? 'superseded' : null },
      h('span', { class: 'strong' }, a.reviewer || '?'),
      a.edited ? ' approved with an edit' : ' approved',
      typeof a.approved_at_ms === 'number' ? h('span', { class: 'muted' }, ` · ${fmtClock(a.approved_at_ms)}`) : null,
      a.superseded_at_ms ? h('span', { class: 'muted' }, ' · discarded by a later edit') : null,
      a.reason ? h('div', { class: 'muted reason-text' }, a.reason) : null)));
  }

  function decisionCard(r) {
    if (r.status !== 'pending') {
      const who = r.reviewer ? r.reviewer : r.status === 'expired' ? 'nobody (hold timeout)' : r.status === 'cancelled' ? 'the caller went away'
        : r.status === 'abandoned' ? 'nobody: the held request was gone, nothing was released' : '—';
      const next = S.pending.find((p) => p.id !== r.id);
      return h('section', { class: 'card decision decided' },
        h('h2', { class: 'card-title' }, 'Decision'),
        h('div', { class: 'decided-status' }, badge(r.status, r.edited, r.mode)),
        h('dl', { class: 'details' },
          detailRow('By', r.automatic ? [who, h('span', { class: 'muted' }, ' (automatic, not a person)')] : who),
          detailRow('When', r.decided_at_ms ? fmtFull(r.decided_at_ms) : null),
          detailRow('Reason', r.reason ? h('span', { class: 'reason-text' }, r.reason) : null)),
        asList(r.approvals).length > 1 ? approvalsList(r) : null,
        next ? h('a', { class: 'btn btn-block', href: `/reviews/${encodeURIComponent(next.id)}` }, 'Next pending review ', kbd('j')) : h('a', { class: 'btn btn-block', href: '/' }, 'Back to the queue'));
    }
    const armed = S.armed === r.id;
    const audit = r.mode === 'audit';
    const quorum = r.required_approvals > 1
      ? h('p', { class: 'muted small quorum' }, `Needs ${r.required_approvals} approvals from different reviewers${r.approver_group ? ` in ${r.approver_group}` : ''}; ${r.approval_count || 0} so far.`)
      : null;
    return h('section', { class: 'card decision' },
      h('h2', { class: 'card-title' }, 'Decision'),
      quorum,
      approvalsList(r),
      h('button', { type: 'button', class: `btn btn-primary btn-block${armed ? ' armed' : ''}`, id: 'approve', onclick: () => approve() },
        armed ? 'Press a again to approve' : 'Approve', ' ', kbd('a')),
      h('button', { type: 'button', class: 'btn btn-block', id: 'edit', onclick: () => openEditor() }, 'Edit, then approve ', kbd('e')),
      h('div', { class: 'reject-box' },
        h('label', { for: 'reason' }, 'Reason ', h('span', { class: 'muted' }, audit
          ? '(required to flag; marks the caller and rule for follow-up)' : '(required to reject; the caller sees it)')),
        h('textarea', { id: 'reason', rows: '3', maxlength: '2000', placeholder: 'e.g. contains customer data' }),
        h('button', { type: 'button', class: 'btn btn-danger btn-block', id: 'reject', onclick: () => reject() }, audit ? 'Flag for follow-up ' : 'Reject ', kbd('r'))),
      h('p', { class: 'form-error', id: 'decision-error', role: 'alert', hidden: true }));
  }

  // An edit's error goes next to the edit (the editor stays open, so the
  // reviewer can go back and fix it: an edit the gateway would refuse is
  // refused, and the review stays pending); other errors by the buttons.
  function showDecisionError(msg, action) {
    const el = (action === 'edit' && $('#edit-error')) || $('#decision-error') || $('#edit-error');
    if (el) {
      el.textContent = msg;
      el.hidden = false;
    } else {
      toast(msg, 'error');
    }
  }

  function reasonValue() {
    const el = $('#reason');
    return el ? el.value.trim() : '';
  }

  async function decide(action, body, doneMessage) {
    const id = S.review.id;
    S.justDecided = true;
    let result;
    try {
      result = await api(`/api/reviews/${encodeURIComponent(id)}/${action}`, { method: 'POST', body });
    } catch (e) {
      S.justDecided = false;
      if (e.status === 409) {
        toast(e.message, 'warn');
        await loadReview(id);
      } else if (e.status !== 401) {
        showDecisionError(e.message, action);
      }
      return false;
    }
    S.editing = null;
    S.armed = null;
    if (result && result.status === 'pending' && result.required_approvals > 1) {
      // A quorum review: this approval counts, more are needed.
      toast(`Your approval is recorded: ${result.approval_count || 0} of ${result.required_approvals}.`, 'ok');
    } else {
      toast(doneMessage, action === 'reject' ? 'warn' : 'ok');
    }
    await loadReview(id);
    refreshPending();
    return true;
  }

  // How many edits the page shows (its approvals marked edited, superseded
  // ones included). An approval says so: if another reviewer edited the
  // request since this page was read (the live feed was late or offline),
  // the service refuses it (409 edit_not_shown) and the page re-reads the
  // review, so nobody approves an edit they have not seen.
  function editsSeen(r) {
    return (r.approvals || []).filter((a) => a.edited).length;
  }

  function approve() {
    if (!S.review || S.review.status !== 'pending') return;
    const reason = reasonValue();
    const body = { edits_seen: editsSeen(S.review) };
    if (reason) body.reason = reason;
    decide('approve', body, 'Approved. The request is on its way.');
  }

  function armApprove() {
    if (!S.review || S.review.status !== 'pending' || S.editing) return;
    if (S.armed === S.review.id) {
      approve();
      return;
    }
    S.armed = S.review.id;
    renderReview();
    const btn = $('#approve');
    if (btn) btn.focus();
    setTimeout(() => {
      if (S.armed && S.review && S.armed === S.review.id && S.review.status === 'pending') {
        S.armed = null;
        renderReview();
      }
    }, 3000);
  }

  function reject() {
    if (!S.review || S.review.status !== 'pending') return;
    const reason = reasonValue();
    if (!reason) {
      showDecisionError('A rejection needs a reason.');
      const el = $('#reason');
      if (el) el.focus();
      return;
    }
    decide('reject', { reason }, S.review.mode === 'audit'
      ? 'Flagged: the caller and rule are marked for follow-up.' : 'Rejected. The caller was told why.');
  }

  // --------------------------------------------------------------- editor

  function openEditor() {
    if (!S.review || S.review.status !== 'pending') return;
    if (!S.editing) S.editing = { stage: 'edit', text: prettyJson(S.review.body) };
    renderReview();
    const ta = $('#edit-body');
    if (ta) {
      ta.focus();
      ta.setSelectionRange(0, 0);
      ta.scrollTop = 0;
    }
    window.scrollTo({ top: 0 });
  }

  function closeEditor() {
    S.editing = null;
    renderReview();
  }

  function editorCard() {
    const ed = S.editing;
    if (ed.stage === 'preview') {
      const lines = lineDiff(prettyJson(S.review.body).split('\n'), ed.text.split('\n'));
      return h('section', { class: 'card editor', id: 'editor' },
        h('div', { class: 'card-title-row' },
          h('h2', { class: 'card-title' }, 'Review your edit'),
          h('span', { class: 'muted small' }, diffStats(lines))),
        diffView(lines),
        h('p', { class: 'form-error', id: 'edit-error', role: 'alert', hidden: true }),
        h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'btn btn-primary', id: 'confirm-edit', onclick: confirmEdit }, 'Confirm edit & approve'),
          h('button', { type: 'button', class: 'btn', id: 'back-to-edit', onclick: () => { S.editing.stage = 'edit'; renderReview(); } }, 'Back to editing'),
          h('button', { type: 'button', class: 'btn btn-quiet', onclick: closeEditor }, 'Cancel')));
    }
    const [title, hint] = EDITOR_LABELS[S.review.kind] || EDITOR_LABELS.prompt;
    return h('section', { class: 'card editor', id: 'editor' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, title),
        h('span', { class: 'muted small' }, hint)),
      h('textarea', { id: 'edit-body', class: 'code-input', spellcheck: 'false', rows: String(Math.min(28, Math.max(8, ed.text.split('\n').length + 1))), value: ed.text }),
      h('p', { class: 'form-error', id: 'edit-error', role: 'alert', hidden: true }),
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'btn btn-primary', id: 'preview-edit', onclick: previewEdit }, 'Preview changes'),
        h('button', { type: 'button', class: 'btn btn-quiet', onclick: closeEditor }, 'Cancel')));
  }

  // What the editor edits, by what is reviewed: the request, or the
  // model's answer (the filter takes only its arguments, or only its texts).
  const EDITOR_LABELS = {
    prompt: ['Edit the request', 'JSON body sent to the model instead of the original'],
    tool_call: ['Edit the tool calls', 'the answer the caller gets: change only the calls\' arguments (a JSON object each); names and ids stay'],
    response: ['Edit the answer', 'the answer the caller gets: change only its texts; ids, roles, finish reasons and structure stay as they are'],
  };

  function editError(msg) {
    const el = $('#edit-error');
    if (el) {
      el.textContent = msg;
      el.hidden = false;
    }
  }

  function previewEdit() {
    const text = $('#edit-body').value;
    S.editing.text = text;
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      editError(`Not valid JSON: ${e.message}`);
      return;
    }
    if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
      editError('The body must be a JSON object.');
      return;
    }
    if (text.trim() === prettyJson(S.review.body).trim()) {
      editError('Nothing changed. Edit the body, or use Approve.');
      return;
    }
    S.editing.stage = 'preview';
    renderReview();
    const btn = $('#confirm-edit');
    if (btn) btn.focus();
  }

  function confirmEdit() {
    const reason = reasonValue();
    const body = { body: S.editing.text };
    if (reason) body.reason = reason;
    decide('edit', body, 'Approved with your edit.');
  }

  function appliedEditCard(r) {
    const lines = lineDiff(prettyJson(r.body).split('\n'), prettyJson(r.edited_body).split('\n'));
    const who = isAnswerReview(r) ? 'the caller received the edited answer' : 'the model received the edited body';
    return h('section', { class: 'card' },
      h('div', { class: 'card-title-row' },
        h('h2', { class: 'card-title' }, 'Edit applied'),
        h('span', { class: 'muted small' }, `${diffStats(lines)} · ${who}`)),
      diffView(lines));
  }

  // JSON text as a reader should see it: inside strings, `\uXXXX` escapes
  // (surrogate pairs too) and `\/` as the characters the model or the
  // agent will read (`"\u0063url"` is `"curl"`), except quotes,
  // backslashes, control characters and lone surrogates, which stay
  // escaped; then hidden characters marked (shownText). Display only: the
  // editor keeps the text as it is. Strings never span lines in
  // prettyJson's output, so a diff line reads the same way.
  function readableJson(text) {
    const s = String(text == null ? '' : text);
    let out = '';
    let inStr = false;
    const hex4 = (i) => (/^[0-9a-fA-F]{4}$/.test(s.slice(i, i + 4)) ? parseInt(s.slice(i, i + 4), 16) : -1);
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (!inStr) {
        if (c === '"') inStr = true;
        out += c;
        continue;
      }
      if (c === '"') { inStr = false; out += c; continue; }
      if (c !== '\\') { out += c; continue; }
      const next = s[i + 1];
      if (next === '/') { out += '/'; i += 1; continue; }
      if (next !== 'u') { out += c + (next === undefined ? '' : next); i += 1; continue; }
      let code = hex4(i + 2);
      let used = 6;
      if (code >= 0xD800 && code <= 0xDBFF && s[i + 6] === '\\' && s[i + 7] === 'u') {
        const low = hex4(i + 8);
        if (low >= 0xDC00 && low <= 0xDFFF) {
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          used = 12;
        }
      }
      const lone = code >= 0xD800 && code <= 0xDFFF;
      if (code < 0x20 || code === 0x22 || code === 0x5C || lone) {
        out += s.slice(i, i + 6);
        i += 5;
        continue;
      }
      out += String.fromCodePoint(code);
      i += used - 1;
    }
    return out;
  }

  function shownJson(text) {
    return shownText(readableJson(text));
  }

  // Pretty-prints JSON text without parsing values, so numbers such as 1.0
  // or 12345678901234567890 keep their exact spelling (JSON.parse would
  // change them). Invalid JSON is returned as it is.
  function prettyJson(text) {
    const src = String(text == null ? '' : text);
    try { JSON.parse(src); } catch (_) { return src; }
    let out = '';
    let depth = 0;
    let inStr = false;
    let esc = false;
    const nl = () => `\n${'  '.repeat(depth)}`;
    for (let i = 0; i < src.length; i++) {
      const c = src[i];
      if (inStr) {
        out += c;
        if (esc) esc = false;
        else if (c === '\\') esc = true;
        else if (c === '"') inStr = false;
        continue;
      }
      if (c === '"') { inStr = true; out += c; continue; }
      if (c === ' ' || c === '\t' || c === '\n' || c === '\r') continue;
      if (c === '{' || c === '[') {
        let j = i + 1;
        while (j < src.length && ' \t\n\r'.includes(src[j])) j++;
        if (src[j] === (c === '{' ? '}' : ']')) {
          out += c + src[j];
          i = j;
          continue;
        }
        depth++;
        out += c + nl();
        continue;
      }
      if (c === '}' || c === ']') { depth--; out += nl() + c; continue; }
      if (c === ',') { out += `,${nl()}`; continue; }
      if (c === ':') { out += ': '; continue; }
      out += c;
    }
    return out;
  }

  // Line diff by longest common subsequence (after trimming the common
  // head and tail). Returns [{op: ' ' | '-' | '+', text, a, b}] where a/b
  // are 1-based line numbers in the old/new text.
  function lineDiff(a, b) {
    let pre = 0;
    while (pre < a.length && pre < b.length && a[pre] === b[pre]) pre++;
    let suf = 0;
    while (suf < a.length - pre && suf < b.length - pre && a[a.length - 1 - suf] === b[b.length - 1 - suf]) suf++;
    const A = a.slice(pre, a.length - suf);
    const B = b.slice(pre, b.length - suf);
    const mid = [];
    const n = A.length;
    const m = B.length;
    if (n * m > 4000000) {
      for (const t of A) mid.push({ op: '-', text: t });
      for (const t of B) mid.push({ op: '+', text: t });
    } else {
      // L[i][j] = LCS length of A[i..] and B[j..].
      const w = m + 1;
      const L = new Uint16Array((n + 1) * w);
      for (let i = n - 1; i >= 0; i--) {
        for (let j = m - 1; j >= 0; j--) {
          L[i * w + j] = A[i] === B[j] ? L[(i + 1) * w + j + 1] + 1 : Math.max(L[(i + 1) * w + j], L[i * w + j + 1]);
        }
      }
      let i = 0;
      let j = 0;
      while (i < n && j < m) {
        if (A[i] === B[j]) { mid.push({ op: ' ', text: A[i] }); i++; j++; }
        else if (L[(i + 1) * w + j] >= L[i * w + j + 1]) { mid.push({ op: '-', text: A[i] }); i++; }
        else { mid.push({ op: '+', text: B[j] }); j++; }
      }
      while (i < n) mid.push({ op: '-', text: A[i++] });
      while (j < m) mid.push({ op: '+', text: B[j++] });
    }
    const out = [];
    for (let k = 0; k < pre; k++) out.push({ op: ' ', text: a[k] });
    out.push(...mid);
    for (let k = a.length - suf; k < a.length; k++) out.push({ op: ' ', text: a[k] });
    let ai = 0;
    let bi = 0;
    for (const l of out) {
      if (l.op !== '+') l.a = ++ai;
      if (l.op !== '-') l.b = ++bi;
    }
    return out;
  }

  function diffStats(lines) {
    let add = 0;
    let del = 0;
    for (const l of lines) {
      if (l.op === '+') add++;
      else if (l.op === '-') del++;
    }
    return `${del} line${del === 1 ? '' : 's'} removed, ${add} added`;
  }

  // Changed lines with 3 lines of context; long unchanged stretches fold.
  function diffView(lines) {
    const CONTEXT = 3;
    const keep = new Array(lines.length).fill(false);
    lines.forEach((l, i) => {
      if (l.op !== ' ') for (let k = Math.max(0, i - CONTEXT); k <= Math.min(lines.length - 1, i + CONTEXT); k++) keep[k] = true;
    });
    const view = h('div', { class: 'diff', id: 'diff', role: 'table', 'aria-label': 'Changes' });
    let skipped = 0;
    const flushSkip = () => {
      if (skipped) view.append(h('div', { class: 'diff-skip' }, `⋯ ${skipped} unchanged line${skipped === 1 ? '' : 's'}`));
      skipped = 0;
    };
    lines.forEach((l, i) => {
      if (!keep[i]) { skipped++; return; }
      flushSkip();
      const cls = l.op === '+' ? 'diff-add' : l.op === '-' ? 'diff-del' : 'diff-ctx';
      view.append(h('div', { class: `diff-line ${cls}`, role: 'row' },
        h('span', { class: 'diff-num' }, l.a ? String(l.a) : ''),
        h('span', { class: 'diff-num' }, l.b ? String(l.b) : ''),
        h('span', { class: 'diff-sign' }, l.op === ' ' ? '' : l.op === '-' ? '−' : '+'),
        h('span', { class: 'diff-text' }, shownJson(l.text))));
    });
    flushSkip();
    return view;
  }

  // -------------------------------------------------------------- history

  const HISTORY_FIELDS = ['q', 'caller', 'model', 'decision', 'what', 'reviewer', 'from', 'to'];

  function renderHistoryShell() {
    const params = new URLSearchParams(location.search);
    const v = (k) => params.get(k) || '';
    const decision = h('select', { name: 'decision', id: 'f-decision' },
      [['', 'All'], ['pending', 'Pending'], ['approved', 'Approved'], ['edited', 'Approved with edit'],
        ['rejected', 'Rejected'], ['expired', 'Expired'], ['cancelled', 'Cancelled'],
        ['abandoned', 'Abandoned']]
        .map(([val, label]) => h('option', { value: val, selected: v('decision') === val }, label)));
    // What is reviewed (`kind`), or the spot checks forwarded already (`mode`).
    const what = h('select', { name: 'what', id: 'f-what' },
      [['', 'All'], ['prompt', 'Requests'], ['tool_call', 'Tool calls'], ['response', 'Answers'], ['audit', 'Audits']]
        .map(([val, label]) => h('option', { value: val, selected: v('what') === val }, label)));
    const field = (name, label, input) => h('label', { class: `field field-${name}` }, h('span', null, label), input);
    const form = h('form', { class: 'card filters', id: 'filters', onsubmit: (e) => { e.preventDefault(); applyFilters(); } },
      field('q', 'Search', h('input', { type: 'search', name: 'q', id: 'f-q', value: v('q'), placeholder: 'Prompt text, id, reason…' })),
      field('caller', 'Caller', h('input', { name: 'caller', id: 'f-caller', value: v('caller') })),
      field('model', 'Model', h('input', { name: 'model', id: 'f-model', value: v('model') })),
      field('decision', 'Decision', decision),
      field('what', 'Reviewed', what),
      field('reviewer', 'Reviewer', h('input', { name: 'reviewer', id: 'f-reviewer', value: v('reviewer') })),
      field('from', 'From', h('input', { type: 'datetime-local', name: 'from', id: 'f-from', value: v('from') })),
      field('to', 'To', h('input', { type: 'datetime-local', name: 'to', id: 'f-to', value: v('to') })),
      h('div', { class: 'filter-actions' },
        h('button', { type: 'submit', class: 'btn btn-primary' }, 'Apply'),
        h('button', { type: 'button', class: 'btn btn-quiet', onclick: resetFilters }, 'Reset')));
    replace($('#main'),
      h('div', { class: 'page-head' }, h('div', null, h('h1', null, 'History'),
        h('p', { class: 'muted' }, 'Every review, newest first. Open one to see the full record.'))),
      form,
      h('div', { class: 'card history', id: 'history' }),
      h('div', { class: 'more-row' }, h('button', { type: 'button', class: 'btn', id: 'more', hidden: true, onclick: () => loadHistory(true) }, 'Load more')));
    for (const sel of ['#f-decision', '#f-what']) $(sel).addEventListener('change', applyFilters);
    loadHistory(false);
  }

  function filterValues() {
    const form = $('#filters');
    const out = {};
    for (const k of HISTORY_FIELDS) {
      const el = form.elements.namedItem(k);
      if (el && el.value.trim()) out[k] = el.value.trim();
    }
    return out;
  }

  function applyFilters() {
    const values = filterValues();
    const qs = new URLSearchParams(values).toString();
    history.replaceState(null, '', qs ? `/history?${qs}` : '/history');
    loadHistory(false);
  }

  function resetFilters() {
    const form = $('#filters');
    form.reset();
    for (const k of HISTORY_FIELDS) {
      const el = form.elements.namedItem(k);
      if (el) el.value = '';
    }
    applyFilters();
  }

  function historyQuery(before) {
    const f = filterValues();
    const p = new URLSearchParams();
    p.set('limit', '50');
    if (f.q) p.set('q', f.q);
    if (f.caller) p.set('caller', f.caller);
    if (f.model) p.set('model', f.model);
    if (f.reviewer) p.set('reviewer', f.reviewer);
    if (f.decision === 'edited') { p.set('status', 'approved'); p.set('edited', 'true'); }
    else if (f.decision) p.set('status', f.decision);
    if (f.what === 'audit') p.set('mode', 'audit');
    else if (f.what) p.set('kind', f.what);
    const from = f.from ? new Date(f.from).getTime() : NaN;
    const to = f.to ? new Date(f.to).getTime() : NaN;
    if (!Number.isNaN(from)) p.set('since_ms', String(from));
    if (!Number.isNaN(to)) p.set('until_ms', String(to + 60000));
    if (before) p.set('before_ms', String(before));
    return p.toString();
  }

  async function loadHistory(more) {
    const H = S.history;
    if (H.loading) return;
    H.loading = true;
    const before = more && H.items.length ? H.items[H.items.length - 1].created_at_ms : null;
    let data;
    try {
      data = await api(`/api/reviews?${historyQuery(before)}`);
    } catch (e) {
      H.loading = false;
      if (e.status !== 401) toast(`Could not load history: ${e.message}`, 'error');
      return;
    }
    H.loading = false;
    H.items = more ? H.items.concat(data.reviews) : data.reviews;
    H.paged = more;
    H.done = data.reviews.length < 50;
    renderHistoryRows();
  }

  function renderHistoryRows() {
    const box = $('#history');
    if (!box) return;
    const items = S.history.items;
    const more = $('#more');
    if (more) more.hidden = S.history.done || !items.length;
    if (!items.length) {
      replace(box, h('div', { class: 'empty' }, h('h2', null, 'Nothing found'), h('p', { class: 'muted' }, 'No review matches these filters.')));
      return;
    }
    const rows = items.map((r) => {
      const href = `/reviews/${encodeURIComponent(r.id)}`;
      return h('tr', { class: 'hrow', dataset: { href }, onclick: (e) => { if (!(e.target instanceof HTMLAnchorElement)) location.assign(href); } },
        h('td', { class: 'nowrap' }, h('a', { href, title: fmtFull(r.created_at_ms) }, fmtClock(r.created_at_ms))),
        h('td', null, badge(r.status, r.edited, r.mode)),
        h('td', { class: 'strong' }, r.model),
        h('td', null, r.caller || '—'),
        h('td', null, r.reviewer || '—'),
        h('td', { class: 'clip' }, r.reason || ''),
        h('td', { class: 'clip muted' }, maskedText(r.preview || '')));
    });
    replace(box, h('table', { class: 'table' },
      h('thead', null, h('tr', null, ['When', 'Decision', 'Model', 'Caller', 'Reviewer', 'Reason', 'Prompt'].map((t) => h('th', null, t)))),
      h('tbody', null, rows)));
  }

  // ------------------------------------------------------------- keyboard

  function isTyping(t) {
    return t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || t.isContentEditable);
  }

  function gotoPending(delta) {
    if (!S.pending.length) return;
    const i = S.pending.findIndex((r) => r.id === S.reviewId);
    let j;
    if (i < 0) j = delta > 0 ? 0 : S.pending.length - 1;
    else j = i + delta;
    if (j < 0 || j >= S.pending.length) {
      toast(delta > 0 ? 'That was the last pending review.' : 'That was the first pending review.', 'info');
      return;
    }
    location.assign(`/reviews/${encodeURIComponent(S.pending[j].id)}`);
  }

  function onKey(e) {
    if (e.defaultPrevented || e.altKey || e.metaKey) return;
    const help = $('#help');
    if (e.key === 'Escape') {
      if (help && help.open) return; // the dialog closes itself
      if (S.armed) { S.armed = null; renderReview(); return; }
      if (S.editing) { closeEditor(); return; }
      if (isTyping(e.target)) e.target.blur();
      return;
    }
    if (S.page === 'review' && e.target && e.target.id === 'reason' && e.key === 'Enter' && e.ctrlKey) {
      e.preventDefault();
      reject();
      return;
    }
    if (e.ctrlKey || isTyping(e.target)) return;
    if (help && help.open) return;
    if (e.key === '?') { e.preventDefault(); help.showModal(); return; }
    if (S.page === 'queue') {
      if (e.key === 'j') { e.preventDefault(); selectRow(1); }
      else if (e.key === 'k') { e.preventDefault(); selectRow(-1); }
      else if ((e.key === 'Enter' || e.key === 'o') && S.pending[S.selected] && !(e.target instanceof HTMLAnchorElement && e.key === 'Enter')) {
        e.preventDefault();
        location.assign(`/reviews/${encodeURIComponent(S.pending[S.selected].id)}`);
      } else if (e.key === '/') { e.preventDefault(); location.assign('/history'); }
    } else if (S.page === 'review' && S.review) {
      if (e.key === 'a') { e.preventDefault(); armApprove(); }
      else if (e.key === 'Enter' && S.armed === S.review.id && !(e.target instanceof HTMLButtonElement)) { e.preventDefault(); approve(); }
      else if (e.key === 'r' && S.review.status === 'pending') {
        e.preventDefault();
        const el = $('#reason');
        if (el) el.focus();
      } else if (e.key === 'e') { e.preventDefault(); openEditor(); }
      else if (e.key === 'j') { e.preventDefault(); gotoPending(1); }
      else if (e.key === 'k') { e.preventDefault(); gotoPending(-1); }
      else if (e.key === 'u') { e.preventDefault(); location.assign('/'); }
    } else if (S.page === 'history') {
      if (e.key === '/') { e.preventDefault(); $('#f-q').focus(); }
    }
  }

  // ----------------------------------------------------------------- init

  async function logout() {
    try {
      await api('/ui/logout', { method: 'POST' });
    } catch (e) {
      if (e.status === 401) return;
    }
    location.assign('/login');
  }

  async function initApp() {
    const path = location.pathname;
    const m = path.match(/^\/reviews\/([^/]+)$/);
    const pages = { '/': 'queue', '/history': 'history', '/load': 'load' };
    S.page = pages[path] || (m ? 'review' : /^\/standing(\/[^/]+)?$/.test(path) ? 'standing' : 'queue');
    if (m) S.reviewId = decodeURIComponent(m[1]);
    const navId = { queue: '#nav-queue', history: '#nav-history', load: '#nav-load', standing: '#nav-standing' }[S.page];
    if (navId) $(navId).classList.add('active');
    $('#logout').addEventListener('click', logout);
    $('#help-button').addEventListener('click', () => $('#help').showModal());
    try {
      S.me = await api('/api/me');
    } catch (_) {
      return;
    }
    S.csrf = S.me.csrf_token || '';
    $('#me').textContent = S.me.name;
    $('#me').title = asList(S.me.groups).length ? `Groups: ${S.me.groups.join(', ')}` : '';
    document.addEventListener('keydown', onKey);
    setInterval(tick, 1000);
    updateTitle();
    if (S.page === 'history') renderHistoryShell();
    else if (S.page === 'load') window.countersignLoadPage({ h, replace, api, toast, $ });
    else if (S.page === 'standing') window.countersignStanding.page({ h, replace, api, toast, $ });
    else if (S.page === 'review') {
      replace($('#main'), h('p', { class: 'muted loading' }, 'Loading…'));
      await loadReview(S.reviewId);
    } else {
      replace($('#main'), h('p', { class: 'muted loading' }, 'Loading…'));
    }
    await refreshPending();
    connectEvents();
  }

  // The server's rule (ui.rs `safe_next`): a local path of printable ASCII
  // only. A tab or newline would be dropped by the URL parser, turning
  // `/\t/evil.example` into `//evil.example`, another host.
  function safeNext(next) {
    return typeof next === 'string' && next.startsWith('/') && !next.startsWith('//')
      && !next.startsWith('/\\') && next.length <= 512 && /^[\x21-\x7e]+$/.test(next) ? next : '/';
  }

  async function initLogin() {
    const params = new URLSearchParams(location.search);
    const safe = safeNext(params.get('next') || '/');
    $('#next').value = safe;
    const sso = $('#oidc-sign-in');
    if (sso) sso.href = `/ui/oidc/login?next=${encodeURIComponent(safe)}`;
    const err = params.get('error');
    if (err) {
      const el = $('#login-error');
      el.textContent = {
        rate: 'Too many failed attempts. Wait a minute, then try again.',
        oidc: 'Sign-in with your company account did not work. Try again, or ask your administrator.',
        group: 'Your company account is not in the group allowed to review.',
        reviewer: 'Your company account is not a reviewer here. Ask your administrator to add you.',
        origin: 'The sign-in form was sent from another site and was refused.',
        cookies: 'Your browser holds more than one countersign session cookie (another site may have set one). Clear this site\'s cookies, then sign in again.',
      }[err] || 'That token was not accepted. Check it and try again.';
      el.hidden = false;
    }
    // Already signed in (e.g. arrived from a chat link, where the
    // SameSite=Strict cookie is not sent): go straight on.
    try {
      const res = await fetch('/api/me', { credentials: 'same-origin', cache: 'no-store' });
      if (res.ok) location.replace(safe);
    } catch (_) { /* stay on the form */ }
  }

  function start() {
    if (location.pathname === '/login') initLogin();
    else initApp();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
