// countersign reviewer UI: the Load page (`/load`), charts of the reviewer
// load over a period from `GET /api/stats/load`. No dependencies: the
// charts are inline SVG drawn here, styled by app.css classes (the CSP
// allows no inline style). app.js calls `window.countersignLoadPage` with
// its DOM and API helpers when the address is `/load`.
//
// Security rule, as in app.js: rule and caller names come from the API and
// reach the page only as text nodes (SVG <text> content, textContent).
'use strict';

(() => {
  const SVG = 'http://www.w3.org/2000/svg';
  const HOUR = 3600000;
  // Period → bucket: hourly for a day, 6-hourly for a week, daily for 30 days.
  const PERIODS = {
    '24h': { label: '24 h', ms: 24 * HOUR, bucket: HOUR, per: 'per hour' },
    '7d': { label: '7 d', ms: 7 * 24 * HOUR, bucket: 6 * HOUR, per: 'per 6 hours' },
    '30d': { label: '30 d', ms: 30 * 24 * HOUR, bucket: 24 * HOUR, per: 'per day' },
  };
  // Chart geometry, in viewBox units: about the size the page shows them
  // at (a full-width card; half of one for the rankings), so text keeps
  // the page's size.
  const W = 1160;
  const HT = 220;
  const RANK_W = 540;
  const M = { top: 12, right: 12, bottom: 26, left: 56 };

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
    for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
    return el;
  }

  // A round step for about `n` ticks up to `max`.
  function niceStep(max, n) {
    const raw = Math.max(max, 1) / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((f) => f * mag).find((v) => v >= raw);
    return Math.max(step, 1);
  }

  // A step of whole seconds, minutes, hours or days for durations.
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
    .map((sec) => sec * 1000);
  function niceTimeStep(max, n) {
    const raw = Math.max(max, 1) / n;
    if (raw < 1000) return niceStep(max, n);
    return TIME_STEPS.find((v) => v >= raw) || Math.ceil(raw / 86400000) * 86400000;
  }

  function fmtMs(ms) {
    // One decimal below 10, none for whole numbers.
    const num = (v) => (Number.isInteger(v) || v >= 10 ? String(Math.round(v)) : v.toFixed(1));
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const sec = ms / 1000;
    if (sec < 60) return `${num(sec)} s`;
    const min = sec / 60;
    if (min < 60) return `${Math.round(min)} min`;
    const hr = min / 60;
    return hr < 48 ? `${num(hr)} h` : `${Math.round(hr / 24)} d`;
  }

  function fmtBucket(ms, bucketMs) {
    const d = new Date(ms);
    if (bucketMs >= 24 * HOUR) return d.toLocaleDateString([], { month: 'short', day: 'numeric' });
    if (bucketMs >= 6 * HOUR) return d.toLocaleString([], { weekday: 'short', hour: '2-digit' });
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // The frame of a time chart: y grid and labels, x labels every few
  // buckets. Returns the svg and the scales.
  function frame(name, buckets, bucketMs, maxY, fmtY) {
    const n = Math.max(buckets.length, 1);
    const iw = W - M.left - M.right;
    const ih = HT - M.top - M.bottom;
    const step = fmtY ? niceTimeStep(maxY, 4) : niceStep(maxY, 4);
    const top = Math.max(step, Math.ceil(maxY / step) * step);
    const x = (i) => M.left + (i * iw) / n;
    const y = (v) => M.top + ih - (v / top) * ih;
    const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${HT}`, role: 'img', 'data-chart': name });
    for (let v = 0; v <= top + 1e-9; v += step) {
      svg.append(s('line', { class: 'grid', x1: M.left, x2: W - M.right, y1: y(v), y2: y(v) }));
      svg.append(s('text', { class: 'tick', x: M.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, v && fmtY ? fmtY(v) : String(v)));
    }
    const every = Math.max(1, Math.ceil(n / 6));
    buckets.forEach((b, i) => {
      if (i % every) return;
      svg.append(s('text', { class: 'tick', x: x(i) + iw / n / 2, y: HT - 8, 'text-anchor': 'middle' }, fmtBucket(b.start_ms, bucketMs)));
    });
    svg.append(s('line', { class: 'axis', x1: M.left, x2: W - M.right, y1: y(0), y2: y(0) }));
    return { svg, x, y, bw: iw / n };
  }

  // Stacked bars: `series` = [{ key, label, cls }], values b[key].
  function stackedBars(name, buckets, bucketMs, series) {
    const maxY = Math.max(1, ...buckets.map((b) => series.reduce((t, sr) => t + (b[sr.key] || 0), 0)));
    const f = frame(name, buckets, bucketMs, maxY);
    const pad = Math.min(2, f.bw * 0.15);
    buckets.forEach((b, i) => {
      let base = 0;
      for (const sr of series) {
        const v = b[sr.key] || 0;
        if (v > 0) {
          f.svg.append(s('rect', {
            class: `bar ${sr.cls}`, x: f.x(i) + pad, width: Math.max(f.bw - 2 * pad, 1), y: f.y(base + v), height: f.y(base) - f.y(base + v),
            'data-series': sr.key, 'data-start': b.start_ms, 'data-value': v,
          }, s('title', null, `${fmtBucket(b.start_ms, bucketMs)}: ${v} ${sr.label}`)));
        }
        base += v;
      }
    });
    return f.svg;
  }

  // Lines through the buckets that have a value: `series` = [{ label, cls, get(b) }].
  function lines(name, buckets, bucketMs, series, fmtY) {
    const values = buckets.flatMap((b) => series.map((sr) => sr.get(b))).filter((v) => v !== null && v !== undefined);
    const f = frame(name, buckets, bucketMs, Math.max(1, ...values), fmtY);
    for (const sr of series) {
      let d = '';
      let pen = 'M';
      buckets.forEach((b, i) => {
        const v = sr.get(b);
        if (v === null || v === undefined) { pen = 'M'; return; }
        const cx = f.x(i) + f.bw / 2;
        d += `${pen}${cx.toFixed(1)},${f.y(v).toFixed(1)} `;
        pen = 'L';
        f.svg.append(s('circle', { class: `dot ${sr.cls}`, cx, cy: f.y(v), r: 2.5, 'data-series': sr.key, 'data-start': b.start_ms, 'data-value': v },
          s('title', null, `${fmtBucket(b.start_ms, bucketMs)}: ${sr.label} ${fmtY ? fmtY(v) : v}`)));
      });
      if (d) f.svg.insertBefore(s('path', { class: `line ${sr.cls}`, d: d.trim() }), f.svg.querySelector('circle'));
    }
    return f.svg;
  }

  // Horizontal bars of a ranking: [{ name, count }].
  function ranking(name, items, empty) {
    if (!items.length) {
      const p = document.createElement('p');
      p.className = 'muted';
      p.textContent = empty;
      return p;
    }
    const rowH = 24;
    const labelW = 170;
    const height = items.length * rowH + 4;
    const max = Math.max(...items.map((r) => r.count));
    const svg = s('svg', { class: 'chart chart-rank', viewBox: `0 0 ${RANK_W} ${height}`, role: 'img', 'data-chart': name });
    items.forEach((r, i) => {
      const label = r.name === null || r.name === undefined ? '(none)' : r.name;
      const w = ((RANK_W - labelW - 40) * r.count) / max;
      const y = i * rowH + 2;
      svg.append(
        s('text', { class: 'rank-label', x: labelW - 8, y: y + 15, 'text-anchor': 'end' }, label.length > 24 ? `${label.slice(0, 23)}…` : label),
        s('rect', { class: 'bar s-human', x: labelW, y: y + 3, width: Math.max(w, 1), height: rowH - 8, 'data-name': label, 'data-value': r.count },
          s('title', null, `${label}: ${r.count}`)),
        s('text', { class: 'rank-count', x: labelW + w + 6, y: y + 15 }, String(r.count)));
    });
    return svg;
  }

  function legend(h, series) {
    return h('div', { class: 'legend' }, series.map((sr) => h('span', { class: 'legend-item' }, h('span', { class: `swatch ${sr.cls}` }), sr.label)));
  }

  window.countersignLoadPage = function loadPage(ui) {
    const { h, replace, api, toast, $ } = ui;
    const params = new URLSearchParams(location.search);
    let period = PERIODS[params.get('period')] ? params.get('period') : '24h';

    function tile(key, label, value, title) {
      return h('div', { class: 'tile', title }, h('div', { class: 'tile-value', dataset: { stat: key } }, value), h('div', { class: 'tile-label' }, label));
    }

    function chartCard(title, sub, ...body) {
      return h('section', { class: 'card chart-card' }, h('div', { class: 'card-title-row' }, h('h2', { class: 'card-title' }, title), h('span', { class: 'muted' }, sub)), body);
    }

    function render(data) {
      const p = PERIODS[period];
      const t = data.totals;
      const decided = t.human + t.automatic;
      const share = decided ? `${Math.round((100 * t.automatic) / decided)}%` : '—';
      const hp = data.decision_ms.human;
      const b = data.buckets;
      const decisionSeries = [
        { key: 'human', label: 'decided by people', cls: 's-human' },
        { key: 'automatic', label: 'decided automatically', cls: 's-auto' },
      ];
      const ttd = [
        { key: 'p50', label: 'p50', cls: 's-p50', get: (x) => (x.human_decision_ms ? x.human_decision_ms.p50_ms : null) },
        { key: 'p90', label: 'p90', cls: 's-p90', get: (x) => (x.human_decision_ms ? x.human_decision_ms.p90_ms : null) },
        { key: 'p99', label: 'p99', cls: 's-p99', get: (x) => (x.human_decision_ms ? x.human_decision_ms.p99_ms : null) },
      ];
      const flow = [
        { key: 'created', label: 'created', cls: 's-created', get: (x) => x.created },
        { key: 'pending_at_end', label: 'pending', cls: 's-pending', get: (x) => x.pending_at_end },
      ];
      replace($('#load'),
        h('div', { class: 'tiles' },
          tile('created', 'Reviews created', t.created),
          tile('to_people', 'Sent to people', t.to_people, 'Created in the period and not decided by an assessor or a standing approval'),
          tile('automatic_share', 'Decided automatically', share, `${t.automatic} of ${decided} decisions`),
          tile('human_p50', 'Time to decision, p50 (people)', hp ? fmtMs(hp.p50_ms) : '—'),
          tile('human_p90', 'p90 (people)', hp ? fmtMs(hp.p90_ms) : '—'),
          tile('expired', 'Expired', t.expired, 'Nobody decided before the hold timeout'),
          tile('pending', 'Pending now', data.pending_at_end)),
        chartCard('Decisions', p.per, legend(h, decisionSeries), stackedBars('decisions', b, data.bucket_ms, decisionSeries)),
        chartCard('Time to decision by people', p.per, legend(h, ttd), lines('decision-time', b, data.bucket_ms, ttd, fmtMs)),
        chartCard('Queue', `pending at the end of each bucket; created ${p.per}`, legend(h, flow), lines('queue', b, data.bucket_ms, flow)),
        chartCard('Expiries', p.per, stackedBars('expired', b, data.bucket_ms, [{ key: 'expired', label: 'expired', cls: 's-expired' }])),
        h('div', { class: 'chart-pair' },
          chartCard('Rules sending work to people', 'reviews', ranking('top-rules', data.top_rules, 'No reviews went to people.')),
          chartCard('Callers sending work to people', 'reviews', ranking('top-callers', data.top_callers, 'No reviews went to people.'))));
    }

    // Flagged audits: the callers and rules marked for follow-up, and each
    // flag with a button that resolves it.
    function renderFollowUps(data) {
      const box = $('#follow-ups');
      if (!box) return;
      const items = data.follow_ups;
      if (!items.length) {
        replace(box, h('p', { class: 'muted' }, 'No open follow-ups. An audit a reviewer flags appears here.'));
        return;
      }
      const name = (v) => (v === null || v === undefined ? '—' : v);
      const rows = items.map((f) => h('tr', { dataset: { review: f.review_id } },
        h('td', { class: 'nowrap' }, new Date(f.flagged_at_ms).toLocaleString()),
        h('td', null, h('a', { href: `/reviews/${encodeURIComponent(f.review_id)}` }, name(f.caller))),
        h('td', null, name(f.rule)),
        h('td', null, f.flagged_by),
        h('td', { class: 'clip' }, f.reason || ''),
        h('td', null, h('button', {
          type: 'button', class: 'btn btn-quiet resolve',
          onclick: async () => {
            try {
              await api(`/api/follow-ups/${encodeURIComponent(f.review_id)}/resolve`, { method: 'POST', body: {} });
            } catch (e) {
              if (e.status !== 401) toast(`Could not resolve: ${e.message}`, 'error');
            }
            loadFollowUps();
          },
        }, 'Resolve'))));
      replace(box,
        h('p', { class: 'follow-up-targets' }, data.targets.map((t) => h('span', { class: 'chip chip-hit', dataset: { open: String(t.open) } },
          `${name(t.caller)} · ${name(t.rule)}: ${t.open}`))),
        h('table', { class: 'table' },
          h('thead', null, h('tr', null, ['Flagged', 'Caller', 'Rule', 'By', 'Reason', ''].map((x) => h('th', null, x)))),
          h('tbody', null, rows)));
    }

    async function loadFollowUps() {
      try {
        renderFollowUps(await api('/api/follow-ups?status=open'));
      } catch (e) {
        if (e.status !== 401) toast(`Could not load the follow-ups: ${e.message}`, 'error');
      }
    }

    async function load() {
      const p = PERIODS[period];
      const until = Date.now();
      const q = new URLSearchParams({ since_ms: String(until - p.ms), until_ms: String(until), bucket_ms: String(p.bucket) });
      let data;
      try {
        data = await api(`/api/stats/load?${q}`);
      } catch (e) {
        if (e.status !== 401) toast(`Could not load the statistics: ${e.message}`, 'error');
        return;
      }
      render(data);
    }

    const buttons = Object.entries(PERIODS).map(([key, p]) => h('button', {
      type: 'button', class: `btn seg${key === period ? ' active' : ''}`, 'aria-pressed': key === period ? 'true' : 'false', dataset: { period: key },
      onclick: () => {
        period = key;
        history.replaceState(null, '', `/load?period=${key}`);
        for (const el of document.querySelectorAll('.seg')) {
          const on = el.dataset.period === key;
          el.classList.toggle('active', on);
          el.setAttribute('aria-pressed', on ? 'true' : 'false');
        }
        load();
      },
    }, p.label));
    replace($('#main'),
      h('div', { class: 'page-head' },
        h('div', null, h('h1', null, 'Reviewer load'),
          h('p', { class: 'muted' }, 'What reached people, how fast they decided, and where the work comes from.')),
        h('div', { class: 'segmented', role: 'group', 'aria-label': 'Period' }, buttons)),
      h('div', { id: 'load', class: 'load' }, h('p', { class: 'muted loading' }, 'Loading…')),
      h('section', { class: 'card follow-ups-card' },
        h('div', { class: 'card-title-row' }, h('h2', { class: 'card-title' }, 'Follow-ups'),
          h('span', { class: 'muted' }, 'audits flagged by reviewers: their caller and rule need a look')),
        h('div', { id: 'follow-ups' }, h('p', { class: 'muted' }, 'Loading…'))));
    load();
    loadFollowUps();
    return { refresh: () => { load(); loadFollowUps(); } };
  };
})();
