// The reviewer UI's Load page (/load) in a real headless Chromium against
// the real stack (its own: the counts start from an empty database). A
// known set of reviews is made: held curl requests through Envoy approved
// by a person, reviews filed as the filter files them (for callers and
// rules the demo Envoy configuration cannot produce) that a person rejects,
// that expire, that the demo model's moderation endpoint approves as an
// assessor, and a spot-check audit that a person flags. The page must draw
// the charts with exactly those numbers.
//
// UPDATE_SCREENSHOTS=1 also writes docs/screenshots/reviewer-load.png,
// after a day of reviews is spread over the last 24 hours (see below).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { heldCurl, REVIEWERS, ROOT, stackWithPage } from './stack.mjs';

const SHOT_DIR = process.env.UPDATE_SCREENSHOTS ? path.join(ROOT, 'docs', 'screenshots') : null;
const T = { timeout: 180000 };

// The demo model answers `POST /v1/moderations` (flagging a fixed word
// list): the assessor of the reviews filed with an `auto_decision`.
const ASSESSOR = `
[[assessors]]
name = "moderation"
kind = "moderation"
url = "{{MODEL_URL}}/v1/moderations"
model = "omni-moderation-latest"
timeout_ms = 2000
`;

const env = stackWithPage({ extraToml: ASSESSOR }, T);
const { check, url } = env;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let seq = 0;
// A review as the filter files it.
function filed({ rule, caller, text = 'Summarise the release notes', hold = 600000, ...more }) {
  seq += 1;
  const body = JSON.stringify({ model: 'gpt-4o', messages: [{ role: 'user', content: text }] });
  return env.stack.fileReview({
    request_id: `load-${seq}`, api: 'openai_chat', method: 'POST', path: '/v1/chat/completions', authority: 'llm.internal',
    caller, model: 'gpt-4o', rule, stream: false, prompt: [{ role: 'user', text }], body, hold_timeout_ms: hold, ...more,
  });
}

async function decide(id, action, reviewer, reason) {
  const r = await env.stack.api(`/api/reviews/${id}/${action}`, { method: 'POST', body: reason ? { reason } : {}, reviewer });
  assert.equal(r.status, 200, JSON.stringify(r.json));
}

// Waits until review `id` has `status` (the sweeper expires, the assessor
// task approves, in the background).
async function until(id, status) {
  for (let i = 0; i < 200; i += 1) {
    const r = await env.stack.api(`/api/reviews/${id}`);
    if (r.json && r.json.status === status) return r.json;
    await sleep(100);
  }
  throw new Error(`review ${id} never became ${status}`);
}

// The sum of the `data-value`s of `selector`'s elements.
function sum(selector) {
  return env.page.$$eval(selector, (els) => els.reduce((t, e) => t + Number(e.getAttribute('data-value')), 0));
}

const AUTO = { auto_decision: { approve: { max_score: 0.9 } } };

test('the load page charts a known set of reviews', T, check(async () => {
  // Two held requests through Envoy, approved by alice.
  const held = [heldCurl(env.stack.url, { model: 'demo-echo', messages: [{ role: 'user', content: 'first held' }] }),
    heldCurl(env.stack.url, { model: 'demo-echo', messages: [{ role: 'user', content: 'second held' }] })];
  let pending = [];
  for (let i = 0; i < 200 && pending.length < 2; i += 1) {
    pending = (await env.stack.api('/api/reviews?status=pending')).json.reviews;
    await sleep(100);
  }
  assert.equal(pending.length, 2, 'both curl requests are held');
  for (const r of pending) await decide(r.id, 'approve', 'alice');
  for (const h of held) assert.equal((await h.result).status, 200);

  // support-bot: three reviews, one rejected by bob, two left pending.
  const support = [];
  for (let i = 0; i < 3; i += 1) support.push(await filed({ rule: 'support-drafts', caller: 'support-bot' }));
  await decide(support[0], 'reject', 'bob', 'promises a refund');
  // One that nobody decides in time.
  const late = await filed({ rule: 'code-agents', caller: 'ci-runner/nightly', hold: 1 });
  await until(late, 'expired');
  // Two the assessor approves (nothing flagged by the moderation endpoint).
  for (let i = 0; i < 2; i += 1) await until(await filed({ rule: 'faq', caller: 'docs-site', ...AUTO }), 'approved');
  // A spot check's audit, flagged by alice.
  const audit = await filed({ rule: 'chat-allow', caller: 'intern-tools', mode: 'audit' });
  await decide(audit, 'reject', 'alice', 'pasted a customer list');

  await env.page.goto(url('/'));
  await env.page.waitForURL(/\/login\?next=/);
  await env.page.fill('#token', REVIEWERS.alice);
  await Promise.all([env.page.waitForURL(url('/')), env.page.click('#sign-in')]);
  await env.page.locator('#nav-load').click();
  await env.page.waitForURL(/\/load$/);
  await env.page.locator('svg[data-chart="decisions"]').waitFor();
  const stat = (k) => env.page.locator(`[data-stat="${k}"]`).textContent();
  assert.equal(await stat('created'), '9');
  assert.equal(await stat('to_people'), '7');
  assert.equal(await stat('automatic_share'), '33%', '2 of 6 decisions');
  assert.equal(await stat('expired'), '1');
  assert.equal(await stat('pending'), '2');
  assert.notEqual(await stat('human_p50'), '—');

  // The charts: bars and points carry their values.
  assert.equal(await sum('svg[data-chart="decisions"] rect[data-series="human"]'), 4);
  assert.equal(await sum('svg[data-chart="decisions"] rect[data-series="automatic"]'), 2);
  assert.equal(await sum('svg[data-chart="expired"] rect[data-series="expired"]'), 1);
  assert.equal(await sum('svg[data-chart="queue"] circle[data-series="created"]'), 9);
  const queue = await env.page.$$eval('svg[data-chart="queue"] circle[data-series="pending_at_end"]', (els) => els.map((e) => Number(e.getAttribute('data-value'))));
  assert.equal(queue.length, 25, 'a day in hourly buckets, the current hour included');
  assert.equal(queue[queue.length - 1], 2);
  assert.ok(await env.page.locator('svg[data-chart="decision-time"] circle[data-series="p90"]').count() >= 1);
  assert.ok(await env.page.locator('svg[data-chart="decision-time"] path.line').count() >= 1);
  const ranking = (chart) => env.page.$$eval(`svg[data-chart="${chart}"] rect`, (els) => els.map((e) => [e.getAttribute('data-name'), Number(e.getAttribute('data-value'))]));
  const rules = await ranking('top-rules');
  assert.deepEqual(rules[0], ['support-drafts', 3]);
  assert.deepEqual(rules.find(([n]) => n === 'faq'), undefined, 'automatic decisions are not work for people');
  assert.equal(rules.reduce((t, [, n]) => t + n, 0), 7);
  const callers = await ranking('top-callers');
  assert.deepEqual(callers[0], ['support-bot', 3]);
  assert.ok(callers.some(([n, c]) => n === 'ci-runner/nightly' && c === 1), JSON.stringify(callers));

  // The flagged audit is a follow-up until resolved.
  const row = env.page.locator('#follow-ups tr', { hasText: 'intern-tools' });
  await row.waitFor();
  assert.ok((await row.textContent()).includes('pasted a customer list'));
  await env.page.locator('#follow-ups .chip', { hasText: 'intern-tools · chat-allow: 1' }).waitFor();
  await row.locator('button.resolve').click();
  await env.page.locator('#follow-ups', { hasText: 'No open follow-ups' }).waitFor();
  assert.equal((await env.stack.api('/api/follow-ups?status=all')).json.follow_ups[0].resolved_by, 'alice');

  // Another period: the same reviews, in 6-hour buckets.
  await env.page.click('button[data-period="7d"]');
  await env.page.waitForURL(/\/load\?period=7d$/);
  await env.page.waitForFunction(() => document.querySelectorAll('svg[data-chart="queue"] circle[data-series="pending_at_end"]').length === 29);
  assert.equal(await sum('svg[data-chart="decisions"] rect[data-series="human"]'), 4);
  assert.equal(await env.page.locator('button[data-period="7d"]').getAttribute('aria-pressed'), 'true');

  // The audit reads as flagged in the history.
  await env.page.goto(url('/history?what=audit'));
  await env.page.locator('.badge-rejected', { hasText: 'Flagged' }).waitFor();
  assert.deepEqual(env.pageErrors, []);
  assert.deepEqual(env.cspViolations, []);
}));

// For the screenshot only: a day of reviews. They are filed and decided
// through the API like the ones above, then moved back in time in the
// SQLite file (the service cannot be asked to create a review yesterday),
// spread over the last 24 hours with a reproducible pseudo-random draw.
test('screenshot of the load page over a day', T, check(async () => {
  const dir = SHOT_DIR || env.stack.dir;
  fs.mkdirSync(dir, { recursive: true });
  const rules = [['support-drafts', 'support-bot'], ['code-agents', 'ci-runner/nightly'], ['code-agents', 'ci-runner/pr'],
    ['finance', 'billing-svc'], ['support-drafts', 'helpdesk-ui'], ['research', 'notebook-7']];
  let x = 7;
  const rand = () => { x = (x * 48271) % 2147483647; return x / 2147483647; };
  for (let i = 0; i < 70; i += 1) {
    const [rule, caller] = rules[Math.floor(rand() * rand() * rules.length)];
    const r = rand();
    if (r < 0.35) await filed({ rule: 'faq', caller: 'docs-site', ...AUTO });
    else {
      const id = await filed({ rule, caller, hold: r < 0.42 ? 1 : 600000 });
      if (r >= 0.42 && r < 0.97) await decide(id, r < 0.9 ? 'approve' : 'reject', r < 0.7 ? 'alice' : 'bob', 'seen');
    }
  }
  // Spot checks: most audits are fine, two are flagged (open follow-ups).
  for (const [caller, reason] of [['notebook-7', 'customer e-mail addresses in a research prompt'], ['helpdesk-ui', 'a ticket with a card number']]) {
    await decide(await filed({ rule: 'chat-allow', caller, mode: 'audit' }), 'reject', 'bob', reason);
  }
  for (let i = 0; i < 3; i += 1) await decide(await filed({ rule: 'chat-allow', caller: 'docs-site', mode: 'audit' }), 'approve', 'alice');
  await sleep(1500); // the assessor and the sweeper finish
  const now = Date.now();
  const script = `
import random, sqlite3, sys
random.seed(13)
db = sqlite3.connect(sys.argv[1], timeout=10)
now = int(sys.argv[2])
rows = db.execute("SELECT id, status, automatic FROM reviews WHERE request_id LIKE 'load-%' AND created_at_ms > ? - 600000", (now,)).fetchall()
for rid, status, automatic in rows:
    created = now - int(random.triangular(0, 24, 6) * 3600000)
    if status == 'pending':
        decided = None
    elif automatic:
        decided = created + random.randint(40, 400)
    elif status == 'expired':
        decided = created + 1800000
    else:
        decided = created + int(random.lognormvariate(13.3, 0.9))
    decided = None if decided is None else min(decided, now - 1000)
    db.execute("UPDATE reviews SET created_at_ms = ?, decided_at_ms = ?, expires_at_ms = ? WHERE id = ?",
               (created, decided, created + 3600000, rid))
db.commit()
`;
  const py = spawnSync(path.join(ROOT, '.venv', 'bin', 'python'), ['-c', script, path.join(env.stack.dir, 'countersign.db'), String(now)], { encoding: 'utf8' });
  assert.equal(py.status, 0, py.stderr);
  await env.page.goto(url('/load'));
  await env.page.locator('svg[data-chart="decision-time"] path.line').first().waitFor();
  await env.page.locator('#follow-ups tr', { hasText: 'notebook-7' }).waitFor();
  await env.page.mouse.move(0, 0);
  await env.page.screenshot({ path: path.join(dir, 'reviewer-load.png'), fullPage: true });
  assert.ok(fs.statSync(path.join(dir, 'reviewer-load.png')).size > 10000, 'reviewer-load.png written');
  assert.deepEqual(env.pageErrors, []);
  assert.deepEqual(env.cspViolations, []);
}));
