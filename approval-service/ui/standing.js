// countersign reviewer UI: standing approvals. On a review page, the
// "Approve as standing approval" card (terms posted with the approval to
// `POST /api/reviews/{id}/approve`, and the quorum state of the terms
// proposed so far); the "Standing approvals" pages (`/standing`, list;
// `/standing/{id}`, one with its uses and a revoke button behind a
// confirmation). No dependencies. app.js calls
// `window.countersignStanding.page(ctx)` on those addresses and
// `window.countersignStanding.reviewCard(ctx, review, after)` on a review
// page, with its DOM and API helpers.
//
// Security rule, as in app.js: callers, groups, models, rules and reasons
// come from the API and reach the page only as text nodes.
'use strict';

(() => {
  // The parts the API lets vary (`crate::standing::Part`), in its order.
  const PARTS = [
    ['system', 'System prompt', 'system and developer messages'],
    ['tools', 'Tools', 'tool definitions and answer schemas'],
    ['user', 'User message', 'what the caller asks'],
    ['history', 'History', 'earlier answers and tool results'],
  ];
  const PART_LABEL = Object.fromEntries(PARTS.map(([k, label]) => [k, label]));

  // The part a message of `role` belongs to (`Part::of_role`).
  function partOf(role) {
    if (role === 'system' || role === 'developer') return 'system';
    if (role === 'tools' || role === 'schema') return 'tools';
    if (role === 'user' || role === 'input' || role === 'suffix') return 'user';
    return 'history';
  }

  // Whether some message with text stays fixed with `vary` open
  // (`standing::keeps_text_fixed`): the service refuses terms that keep
  // only the roles, which would approve any prompt with those roles.
  function keepsTextFixed(prompt, vary) {
    return list(prompt).some((m) => m && !vary.includes(partOf(String(m.role)))
      && typeof m.text === 'string' && m.text.trim() !== '');
  }
  const STATE_LABEL = {
    proposed: 'Proposed', live: 'Live', declined: 'Declined', revoked: 'Revoked', expired: 'Expired', used_up: 'Used up',
    suspended: 'Suspended',
  };
  const STATE_BADGE = {
    proposed: 'pending', live: 'approved', revoked: 'rejected', declined: 'expired', expired: 'expired', used_up: 'expired',
    suspended: 'expired',
  };

  const list = (v) => (Array.isArray(v) ? v : []);
  const when = (ms) => (typeof ms === 'number' ? new Date(ms).toLocaleString() : '—');

  function stateBadge(h, sa) {
    const title = sa.status === 'suspended'
      ? 'A creator is no longer a reviewer of its approver group: it approves nothing' : null;
    return h('span', { class: `badge badge-${STATE_BADGE[sa.status] || 'expired'}`, dataset: { state: String(sa.status) }, title },
      STATE_LABEL[sa.status] || String(sa.status));
  }

  function scopeText(sa) {
    return sa.group ? `any caller in group ${sa.group}` : `caller ${sa.caller || '?'}`;
  }

  // "System prompt, Tools fixed · User message may vary".
  function partsText(vary) {
    const v = list(vary);
    const fixed = PARTS.filter(([k]) => !v.includes(k)).map(([, label]) => label);
    const open = v.map((k) => PART_LABEL[k] || String(k));
    return [fixed.length ? `${fixed.join(', ')} fixed` : 'nothing fixed but the roles',
      open.length ? `${open.join(', ')} may vary` : 'nothing may vary'].join(' · ');
  }

  function usesLeft(sa) {
    return `${Math.max(0, sa.max_uses - sa.uses)} of ${sa.max_uses}`;
  }

  function detailRow(h, label, value) {
    if (value === null || value === undefined || value === '') return null;
    return h('div', { class: 'detail' }, h('dt', null, label), h('dd', null, value));
  }

  // ------------------------------------------------------ the review page

  // Where the terms proposed on review `r` stand against its quorum.
  function quorumText(r, sa) {
    const need = Math.max(1, r.required_approvals || 1);
    const agreed = list(sa.created_by);
    const counted = list(r.approvals).filter((a) => a && !a.superseded_at_ms).map((a) => String(a.reviewer));
    const without = counted.filter((n) => !agreed.includes(n));
    if (sa.status !== 'proposed') return null;
    if (without.length) {
      return `${without.join(', ')} approved without these terms: the standing approval will not go live.`;
    }
    return `${agreed.length} of ${need} approval${need === 1 ? '' : 's'} agreed on these terms; it goes live once the review's quorum has approved with the same terms.`;
  }

  function reviewCard(ctx, r, after) {
    const { h, api, toast, $ } = ctx;
    if (r.kind !== 'prompt' || r.mode === 'audit') return null;
    const card = h('section', { class: 'card standing-card', id: 'standing-card' },
      h('h2', { class: 'card-title' }, 'Standing approval'),
      h('p', { class: 'muted small' }, 'Loading…'));
    load();
    return card;

    async function load() {
      let data;
      try {
        data = await api(`/api/standing-approvals?review_id=${encodeURIComponent(r.id)}`);
      } catch (e) {
        card.lastChild.textContent = `Could not load: ${e.message}`;
        return;
      }
      const sa = list(data && data.standing_approvals)[0] || null;
      render(sa);
    }

    function render(sa) {
      const parts = [h('h2', { class: 'card-title' }, 'Standing approval')];
      if (sa) {
        const quorum = quorumText(r, sa);
        parts.push(h('dl', { class: 'details', id: 'standing-state' },
          detailRow(h, 'State', stateBadge(h, sa)),
          detailRow(h, 'Agreed by', list(sa.created_by).join(', ') || '—'),
          detailRow(h, 'Terms', `${sa.valid_days} day${sa.valid_days === 1 ? '' : 's'}, ${sa.max_uses} use${sa.max_uses === 1 ? '' : 's'}, ${scopeText(sa)}`),
          detailRow(h, 'Parts', partsText(sa.vary))),
        quorum ? h('p', { class: 'small quorum', id: 'standing-quorum' }, quorum) : null,
        h('a', { href: `/standing/${encodeURIComponent(sa.id)}`, class: 'small' }, 'Open the standing approval'));
      }
      if (r.status === 'pending' && (!sa || sa.status === 'proposed')) parts.push(form(sa));
      else if (!sa) parts.push(h('p', { class: 'muted small' }, 'None was made on this review.'));
      ctx.replace(card, parts);
    }

    // The terms form; prefilled with a proposal's terms (a second approver
    // must agree to the same ones).
    function form(sa) {
      const num = (id, label, value, max, hint) => h('label', { class: 'field' }, h('span', null, label),
        h('input', { type: 'number', id, min: '1', max: String(max), step: '1', required: true, value: String(value) }),
        h('span', { class: 'muted small' }, hint));
      // The user message may vary by default, unless nothing with text
      // would then stay fixed (a prompt of user messages only): then
      // everything stays fixed, a standing approval of this exact prompt.
      const vary = sa ? list(sa.vary) : (keepsTextFixed(r.prompt, ['user']) ? ['user'] : []);
      const groups = list(r.caller_groups);
      const scope = h('select', { id: 'standing-scope' },
        r.caller ? h('option', { value: '' }, `only caller ${r.caller}`) : null,
        groups.map((g) => h('option', { value: g, selected: sa && sa.group === g }, `any caller in group ${g}`)));
      const f = h('form', { class: 'standing-form', id: 'standing-form', onsubmit: (e) => { e.preventDefault(); submit(); } },
        num('standing-days', 'Days', sa ? sa.valid_days : 7, 90, 'valid once live, at most 90'),
        num('standing-uses', 'Max uses', sa ? sa.max_uses : 30, 100000, 'requests it may approve'),
        h('fieldset', { class: 'standing-parts', onchange: checkFixed },
          h('legend', null, 'May vary'),
          PARTS.map(([k, label, hint]) => h('label', { class: 'check', title: hint },
            h('input', { type: 'checkbox', name: 'vary', value: k, checked: vary.includes(k) }), ` ${label}`)),
          h('span', { class: 'muted small' }, 'Every part not ticked must stay exactly as in this request; model, API, path and rule never vary.'),
          h('p', { class: 'form-error', id: 'standing-nothing-fixed', role: 'status', hidden: true },
            'With these parts ticked no text of this request stays fixed: any request with the same roles would be approved. Untick a part.')),
        h('label', { class: 'field' }, h('span', null, 'For'), scope),
        h('button', { type: 'submit', class: 'btn btn-block', id: 'standing-approve' },
          sa ? 'Approve with the same terms' : 'Approve as standing approval'),
        h('p', { class: 'form-error', id: 'standing-error', role: 'alert', hidden: true }));
      checkFixed(null, f);
      return f;
    }

    // Says so, and disables the button, when the ticked parts would leave
    // no text fixed (the service would refuse the terms).
    function checkFixed(_e, form) {
      const el = form || $('#standing-form');
      const ticked = [...el.querySelectorAll('input[name=vary]:checked')].map((i) => i.value);
      const ok = keepsTextFixed(r.prompt, ticked);
      el.querySelector('#standing-nothing-fixed').hidden = ok;
      el.querySelector('#standing-approve').disabled = !ok;
    }

    async function submit() {
      const err = $('#standing-error');
      const terms = {
        valid_days: Number($('#standing-days').value),
        max_uses: Number($('#standing-uses').value),
        vary: [...document.querySelectorAll('#standing-form input[name=vary]:checked')].map((el) => el.value),
      };
      const group = $('#standing-scope').value;
      if (group) terms.group = group;
      const reasonEl = $('#reason');
      const reason = reasonEl ? reasonEl.value.trim() : '';
      const body = reason ? { reason, standing: terms } : { standing: terms };
      // The edits this page showed: an edit made since is not approved unseen.
      body.edits_seen = (r.approvals || []).filter((a) => a.edited).length;
      try {
        await api(`/api/reviews/${encodeURIComponent(r.id)}/approve`, { method: 'POST', body });
      } catch (e) {
        if (e.status === 401) return;
        err.textContent = e.message;
        err.hidden = false;
        return;
      }
      toast('Approved with standing terms.', 'ok');
      after();
    }
  }

  // ------------------------------------------------------------ the pages

  function page(ctx) {
    const m = location.pathname.match(/^\/standing\/([^/]+)$/);
    if (m) return showOne(ctx, decodeURIComponent(m[1]));
    return showList(ctx);
  }

  async function showList(ctx) {
    const { h, replace, api, toast, $ } = ctx;
    const box = h('div', { class: 'card history', id: 'standing-list' }, h('p', { class: 'muted loading' }, 'Loading…'));
    replace($('#main'),
      h('div', { class: 'page-head' }, h('div', null, h('h1', null, 'Standing approvals'),
        h('p', { class: 'muted' }, 'Made by approving a review with terms: the same request shape from a caller or group, for some days, a number of uses. Open one to see its uses or revoke it.'))),
      box);
    let data;
    try {
      data = await api('/api/standing-approvals?limit=500');
    } catch (e) {
      if (e.status !== 401) toast(`Could not load standing approvals: ${e.message}`, 'error');
      return;
    }
    const items = list(data && data.standing_approvals);
    if (!items.length) {
      replace(box, h('div', { class: 'empty' }, h('h2', null, 'None yet'),
        h('p', { class: 'muted' }, 'Approve a review with "Approve as standing approval" to make one.')));
      return;
    }
    const rows = items.map((sa) => {
      const href = `/standing/${encodeURIComponent(sa.id)}`;
      return h('tr', { class: 'hrow', dataset: { id: sa.id }, onclick: (e) => { if (!(e.target instanceof HTMLAnchorElement)) location.assign(href); } },
        h('td', null, stateBadge(h, sa)),
        h('td', { class: 'nowrap' }, h('a', { href }, sa.id.slice(0, 11))),
        h('td', null, list(sa.created_by).join(', ') || '—'),
        h('td', { class: 'nowrap' }, usesLeft(sa)),
        h('td', { class: 'nowrap' }, sa.expires_at_ms ? when(sa.expires_at_ms) : `${sa.valid_days} d once live`),
        h('td', null, scopeText(sa)),
        h('td', { class: 'strong' }, sa.model),
        h('td', null, partsText(sa.vary)));
    });
    replace(box, h('table', { class: 'table' },
      h('thead', null, h('tr', null, ['State', 'Id', 'Created by', 'Uses left', 'Expires', 'Scope', 'Model', 'Parts'].map((t) => h('th', null, t)))),
      h('tbody', null, rows)));
  }

  async function showOne(ctx, id) {
    const { h, replace, api, toast, $ } = ctx;
    let sa;
    try {
      sa = await api(`/api/standing-approvals/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 401) return;
      replace($('#main'), h('div', { class: 'empty' }, h('h2', null, 'Not found'), h('p', { class: 'muted' }, e.message),
        h('a', { href: '/standing' }, '← Standing approvals')));
      return;
    }
    // A suspended one (a creator is no longer a reviewer of its group) is
    // live again if they are again: it can be revoked.
    const active = ['live', 'proposed', 'suspended'].includes(sa.status);
    const uses = list(sa.used_by).map((u) => h('li', null, `#${u.use_no} `,
      h('a', { href: `/reviews/${encodeURIComponent(u.review_id)}` }, h('code', null, u.review_id)),
      h('span', { class: 'muted' }, ` · ${when(u.used_at_ms)}`)));
    const dialog = h('dialog', { class: 'dialog', id: 'revoke-dialog', 'aria-labelledby': 'revoke-title' },
      h('h2', { id: 'revoke-title' }, 'Revoke this standing approval?'),
      h('p', null, `From now on no request is approved by it; ${scopeText(sa)} waits for a person again.`),
      h('label', { class: 'field' }, h('span', null, 'Reason (optional)'),
        h('textarea', { id: 'revoke-reason', rows: '2', maxlength: '2000' })),
      h('p', { class: 'form-error', id: 'revoke-error', role: 'alert', hidden: true }),
      h('div', { class: 'dialog-actions' },
        h('button', { type: 'button', class: 'btn btn-quiet', id: 'revoke-cancel', onclick: () => dialog.close() }, 'Cancel'),
        h('button', { type: 'button', class: 'btn btn-danger', id: 'revoke-confirm', onclick: () => revoke() }, 'Revoke')));
    replace($('#main'),
      h('div', { class: 'review-head' },
        h('div', { class: 'crumbs' }, h('a', { href: '/standing', class: 'back' }, '← Standing approvals')),
        h('div', { class: 'title-row' }, h('h1', null, sa.model), stateBadge(h, sa)),
        h('div', { class: 'subtitle muted' }, h('span', null, scopeText(sa)), h('span', { class: 'dot' }, '·'),
          h('span', null, `${usesLeft(sa)} uses left`))),
      h('section', { class: 'card', id: 'standing-detail' },
        h('dl', { class: 'details' },
          detailRow(h, 'Id', h('code', null, sa.id)),
          detailRow(h, 'State', stateBadge(h, sa)),
          detailRow(h, 'Created by', list(sa.created_by).join(', ') || '—'),
          detailRow(h, 'Made on review', h('a', { href: `/reviews/${encodeURIComponent(sa.review_id)}` }, h('code', null, sa.review_id))),
          detailRow(h, 'Scope', scopeText(sa)),
          detailRow(h, 'Model', sa.model),
          detailRow(h, 'Rule', sa.rule || '—'),
          detailRow(h, 'Approvers', sa.approver_group ? `group ${sa.approver_group}` : 'any reviewer'),
          detailRow(h, 'Parts', partsText(sa.vary)),
          detailRow(h, 'Uses', `${sa.uses} of ${sa.max_uses} (${usesLeft(sa)} left)`),
          detailRow(h, 'Proposed', when(sa.created_at_ms)),
          detailRow(h, 'Live since', sa.live_at_ms ? when(sa.live_at_ms) : null),
          detailRow(h, 'Expires', sa.expires_at_ms ? when(sa.expires_at_ms) : `${sa.valid_days} days after it goes live`),
          detailRow(h, 'Revoked', sa.revoked_at_ms ? `${when(sa.revoked_at_ms)} by ${sa.revoked_by || '?'}` : null),
          detailRow(h, 'Why', sa.revoke_reason || null),
          detailRow(h, 'Shape', h('code', null, `${String(sa.shape_sha256).slice(0, 16)}…`))),
        active ? h('button', { type: 'button', class: 'btn btn-danger', id: 'revoke', onclick: () => dialog.showModal() }, 'Revoke…') : null),
      h('section', { class: 'card' }, h('h2', { class: 'card-title' }, `Uses (${uses.length})`),
        uses.length ? h('ul', { class: 'approvals', id: 'standing-uses' }, uses) : h('p', { class: 'muted' }, 'Not used yet.')),
      dialog);

    async function revoke() {
      const reason = $('#revoke-reason').value.trim();
      try {
        await api(`/api/standing-approvals/${encodeURIComponent(id)}/revoke`, { method: 'POST', body: reason ? { reason } : {} });
      } catch (e) {
        if (e.status === 401) return;
        const err = $('#revoke-error');
        err.textContent = e.message;
        err.hidden = false;
        return;
      }
      dialog.close();
      toast('Revoked: matching requests wait for a person again.', 'warn');
      showOne(ctx, id);
    }
  }

  window.countersignStanding = { page, reviewCard };
})();
