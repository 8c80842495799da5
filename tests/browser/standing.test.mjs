// Standing approvals in the reviewer UI, in a real headless Chromium against
// the real stack (curl -> Envoy + countersign filter -> approval service ->
// demo model): a reviewer approves a held CI request "as standing approval"
// (the user message may vary, this caller only), the next templated run
// is released without a person, the reviewer revokes it on the Standing
// approvals page, and the run after that is held again.
//
// UPDATE_SCREENSHOTS=1 also writes docs/screenshots/standing-approvals.png
// and standing-approval-form.png.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { heldCurl, REVIEWERS, ROOT, stackWithPage } from './stack.mjs';

const SHOT_DIR = process.env.UPDATE_SCREENSHOTS ? path.join(ROOT, 'docs', 'screenshots') : null;
const T = { timeout: 120000 };
const KEY = 'ck-ci-nightly-browser-0123456789';
const SYSTEM = 'You summarise CI build logs in three bullet points.';

const env = stackWithPage({
  filterConfig: {
    identity: {
      source: 'api_key',
      api_keys: [{ sha256: createHash('sha256').update(KEY).digest('hex'), caller: 'ci-nightly', groups: ['ci'] }],
    },
    rules: [{ name: 'ci', group: 'ci', action: 'review', approver_group: 'security', hold_timeout_ms: 60000 }],
    default_action: 'deny',
  },
}, T);
const { check, url } = env;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// One nightly CI run: the same system prompt, a new build number.
const run = (build) => heldCurl(env.stack.url, {
  model: 'demo-echo',
  messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: `summarise build ${build}` }],
}, '/v1/chat/completions', [`authorization: Bearer ${KEY}`]);

async function pendingReview() {
  for (let i = 0; i < 200; i += 1) {
    const [r] = await env.stack.pending();
    if (r) return r;
    await sleep(50);
  }
  throw new Error('no pending review');
}

test('a standing approval is made in the UI, releases the next run, and is revoked in the UI', T, check(async () => {
  const { stack, page, pageErrors, cspViolations } = env;
  await page.goto(url('/'));
  await page.fill('#token', REVIEWERS.alice);
  await Promise.all([page.waitForURL(url('/')), page.click('#sign-in')]);

  // The first run waits for a person.
  const first = run(100);
  const review = await pendingReview();
  await page.goto(url(`/reviews/${review.id}`));
  const form = page.locator('#standing-form');
  await form.waitFor();
  await page.fill('#standing-days', '2');
  await page.fill('#standing-uses', '5');
  // The user message may vary (ticked by default), nothing else.
  assert.deepEqual(await page.$$eval('#standing-form input[name=vary]:checked', (els) => els.map((e) => e.value)), ['user']);
  assert.equal(await page.locator('#standing-scope').inputValue(), '', 'this caller only');
  assert.deepEqual(await page.$$eval('#standing-scope option', (els) => els.map((e) => e.textContent)),
    ['only caller ci-nightly', 'any caller in group ci']);
  await page.fill('#reason', 'nightly CI summary');
  if (SHOT_DIR) {
    fs.mkdirSync(SHOT_DIR, { recursive: true });
    await page.locator('#standing-card').screenshot({ path: path.join(SHOT_DIR, 'standing-approval-form.png') });
  }
  await page.click('#standing-approve');
  const firstResult = await first.result;
  assert.equal(firstResult.status, 200, firstResult.body);

  // The review page shows it live, agreed by alice alone (quorum 1).
  const state = page.locator('#standing-state');
  await state.locator('[data-state="live"]').waitFor();
  assert.match(await state.textContent(), /Agreed byalice/);
  assert.match(await state.textContent(), /2 days, 5 uses, caller ci-nightly/);
  assert.match(await state.textContent(), /System prompt, Tools, History fixed · User message may vary/);

  // The next run is released through it, without a person.
  const second = await run(101).result;
  assert.equal(second.status, 200, second.body);
  const { json: { standing_approvals: [sa] } } = await stack.api('/api/standing-approvals');
  assert.equal(sa.uses, 1);
  const { json: used } = await stack.api(`/api/reviews/${encodeURIComponent((await stack.api(`/api/standing-approvals/${sa.id}`)).json.used_by[0].review_id)}`);
  assert.equal(used.reviewer, `standing:${sa.id}`);

  // The list, from the nav.
  await page.locator('#nav-standing').click();
  await page.waitForURL(/\/standing$/);
  const row = page.locator(`#standing-list tr[data-id="${sa.id}"]`);
  await row.waitFor();
  const cells = await row.locator('td').allTextContents();
  assert.deepEqual([cells[0], cells[2], cells[3], cells[5], cells[6]], ['Live', 'alice', '4 of 5', 'caller ci-nightly', 'demo-echo']);
  assert.match(cells[4], /\d/, 'an expiry date');
  assert.equal(cells[7], 'System prompt, Tools, History fixed · User message may vary');
  if (SHOT_DIR) {
    fs.mkdirSync(SHOT_DIR, { recursive: true });
    await page.screenshot({ path: path.join(SHOT_DIR, 'standing-approvals.png'), fullPage: true });
  }

  // One standing approval, with its use; revoked after a confirmation.
  await row.click();
  await page.waitForURL(new RegExp(`/standing/${sa.id}$`));
  await page.locator('#standing-uses li').first().waitFor();
  assert.equal(await page.locator('#standing-uses li').count(), 1);
  await page.click('#revoke');
  const dialog = page.locator('#revoke-dialog');
  await dialog.waitFor();
  // Cancel revokes nothing.
  await page.click('#revoke-cancel');
  await dialog.waitFor({ state: 'hidden' });
  assert.equal((await stack.api(`/api/standing-approvals/${sa.id}`)).json.status, 'live');
  await page.click('#revoke');
  await page.fill('#revoke-reason', 'CI job retired');
  await page.click('#revoke-confirm');
  await page.locator('#standing-detail [data-state="revoked"]').first().waitFor();
  assert.match(await page.locator('#standing-detail').textContent(), /CI job retired/);
  assert.equal(await page.locator('#revoke').count(), 0, 'nothing left to revoke');

  // The next run waits for a person again.
  const third = run(102);
  const held = await pendingReview();
  assert.equal(held.status, 'pending');
  assert.equal(third.done, false);
  assert.equal((await stack.api(`/api/standing-approvals/${sa.id}`)).json.uses, 1);
  const r = await stack.api(`/api/reviews/${held.id}/reject`, { method: 'POST', body: { reason: 'revoked' } });
  assert.equal(r.status, 200);
  assert.equal((await third.result).status, 403);
  assert.deepEqual(pageErrors, []);
  assert.deepEqual(cspViolations, []);
}));

// On a prompt of user messages only, letting the user message vary would
// keep no text fixed (a standing approval of any prompt): the form does not
// tick it, and ticking it says so and disables the button.
test('the form offers no standing approval that keeps no text fixed', T, check(async () => {
  const { stack, page, pageErrors, cspViolations } = env;
  await page.goto(url('/'));
  if (await page.locator('#token').count()) {
    await page.fill('#token', REVIEWERS.alice);
    await Promise.all([page.waitForURL(url('/')), page.click('#sign-in')]);
  }
  const only = heldCurl(stack.url, { model: 'demo-echo', messages: [{ role: 'user', content: 'What is 2+2?' }] },
    '/v1/chat/completions', [`authorization: Bearer ${KEY}`]);
  const review = await pendingReview();
  await page.goto(url(`/reviews/${review.id}`));
  await page.locator('#standing-form').waitFor();
  assert.deepEqual(await page.$$eval('#standing-form input[name=vary]:checked', (els) => els.map((e) => e.value)), []);
  const note = page.locator('#standing-nothing-fixed');
  assert.equal(await note.isHidden(), true);
  assert.equal(await page.locator('#standing-approve').isDisabled(), false);
  await page.check('#standing-form input[name=vary][value=user]');
  await note.waitFor();
  assert.match(await note.textContent(), /no text of this request stays fixed/);
  assert.equal(await page.locator('#standing-approve').isDisabled(), true);
  // Another part with no message in this prompt changes nothing.
  await page.check('#standing-form input[name=vary][value=system]');
  assert.equal(await page.locator('#standing-approve').isDisabled(), true);
  await page.uncheck('#standing-form input[name=vary][value=user]');
  await note.waitFor({ state: 'hidden' });
  assert.equal(await page.locator('#standing-approve').isDisabled(), false);
  const r = await stack.api(`/api/reviews/${review.id}/reject`, { method: 'POST', body: { reason: 'done' } });
  assert.equal(r.status, 200);
  assert.equal((await only.result).status, 403);
  assert.deepEqual(pageErrors, []);
  assert.deepEqual(cspViolations, []);
}));
