// Sign-in through a real OpenID Connect provider (the `oidc-provider`
// package, started on a free loopback port by these tests and stopped by
// PID), in headless Chromium, against the real stack: a reviewer signs in
// with the provider and approves a request held by Envoy; the provider's
// groups decide who may sign in and who may approve; a wrong audience, an
// expired ID token, a replayed state, a callback in another browser and
// one with a planted sign-in cookie are refused; a token and a company
// sign-in tied by `sign_in_names` are one approver; a rotated signing key
// is picked up.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort, heldCurl, launchChromium, Provider, removeTestDir, Stack, withLogs } from './stack.mjs';

const T = { timeout: 120000 };
const CLIENT_ID = 'countersign';
const CLIENT_SECRET = 'browser-test-client-secret-0123456789';
const USERS = {
  erin: ['reviewers', 'security'],
  dave: ['reviewers'],
  mallory: [],
  // Changed at the provider by the tests below.
  grace: ['reviewers', 'security'],
  frank: ['reviewers', 'security'],
  heidi: ['reviewers', 'security'],
  // Also a [[reviewers]] entry `ivan` (with a token) naming this sign-in.
  ivan: ['reviewers', 'security'],
};
const IVAN_TOKEN = 'ivan-reviewer-token-0123456789';
// How old a session's groups may get before the provider is asked again.
const RECHECK_S = 1;

let stack;
let provider;
let browser;
let dir;
const contexts = [];

before(async () => {
  const [approvalPort, providerPort] = await Promise.all([freePort(), freePort()]);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'countersign-oidc-'));
  provider = await new Provider({
    port: providerPort, clientId: CLIENT_ID, clientSecret: CLIENT_SECRET,
    redirectUri: `http://127.0.0.1:${approvalPort}/ui/oidc/callback`, users: USERS, dir,
  }).start();
  stack = await new Stack({
    approvalPort,
    extraToml: [
      '[oidc]',
      `issuer_url = "${provider.url}"`,
      `client_id = "${CLIENT_ID}"`,
      'client_secret_env = "COUNTERSIGN_TEST_OIDC_SECRET"',
      'scopes = ["openid", "email", "profile", "groups"]',
      'name_claim = "email"',
      'groups_claim = "groups"',
      'required_group = "reviewers"',
      'display_name = "Example SSO"',
      `recheck_seconds = ${RECHECK_S}`,
      '',
      '[[reviewers]]',
      'name = "ivan"',
      `token_sha256 = "${createHash('sha256').update(IVAN_TOKEN).digest('hex')}"`,
      'groups = ["security"]',
      'sign_in_names = ["ivan@example.com"]',
    ].join('\n'),
    env: { COUNTERSIGN_TEST_OIDC_SECRET: CLIENT_SECRET },
  }).start();
  browser = await launchChromium();
}, T);

after(async () => {
  if (browser) await browser.close();
  if (stack) await stack.stop();
  if (provider) await provider.stop();
  removeTestDir(dir);
});

const check = withLogs(() => [
  stack ? stack.logs() : 'stack not started',
  provider ? provider.logText().slice(-3000) : 'provider not started',
].join('\n'));

const url = (p) => stack.approvalUrl + p;

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, locale: 'en-GB', timezoneId: 'UTC' });
  context.setDefaultTimeout(15000);
  contexts.push(context);
  return { context, page: await context.newPage() };
}

const sessionCookie = async (context) => (await context.cookies()).find((c) => c.name === 'cs_session');

// From the service's sign-in page to the provider's login form, filled in
// as `login`; stops before the callback when `holdCallback` (returning its
// URL and the sign-in cookie the service set), otherwise lets it through.
async function signIn(page, login, { next = '/', holdCallback = false } = {}) {
  let browserCookie = null;
  page.on('response', async (res) => {
    if (res.url().includes('/ui/oidc/login')) {
      const set = await res.headerValue('set-cookie');
      const m = set && /cs_oidc=([0-9a-f]+)/.exec(set);
      if (m) [, browserCookie] = m;
    }
  });
  // The callback is the last of the provider's redirects, which a route
  // does not see: hold the login form's post instead, and follow the
  // provider's redirects here (with the context's cookies) up to it.
  let callbackUrl = null;
  const held = new Promise((resolve) => {
    if (!holdCallback) return;
    page.route(`${provider.url}/interaction/**`, async (route) => {
      if (route.request().method() !== 'POST') return route.continue();
      let res = await route.fetch({ maxRedirects: 0 });
      let location = res.headers().location;
      while (location && !location.startsWith(`${stack.approvalUrl}/ui/oidc/callback`)) {
        res = await page.context().request.get(new URL(location, provider.url).toString(), { maxRedirects: 0 });
        location = res.headers().location;
      }
      callbackUrl = location;
      await route.fulfill({ status: 200, contentType: 'text/plain', body: 'callback held' });
      resolve();
    });
  });
  await page.goto(url(next));
  await page.waitForURL(/\/login\?next=/);
  const sso = page.locator('#oidc-sign-in');
  assert.equal((await sso.textContent()).trim(), 'Sign in with Example SSO');
  await Promise.all([page.waitForURL(`${provider.url}/**`), sso.click()]);
  await page.fill('input[name="login"]', login);
  await page.fill('input[name="password"]', 'any password');
  if (holdCallback) {
    await Promise.all([held, page.click('button[type="submit"]')]);
    await page.unroute(`${provider.url}/interaction/**`);
  } else {
    await Promise.all([page.waitForURL(`${stack.approvalUrl}/**`), page.click('button[type="submit"]')]);
  }
  return { callbackUrl, browserCookie };
}

async function expectRefused(page, context, error) {
  await page.waitForURL(new RegExp(`/login\\?error=${error}`));
  await page.locator('#login-error').waitFor();
  assert.equal(await sessionCookie(context), undefined, 'no session');
  assert.equal(await page.evaluate(async () => (await fetch('/api/me')).status), 401);
}

test('a reviewer signs in through the provider and approves a request held by Envoy', T, check(async () => {
  const { context, page } = await newPage();
  await signIn(page, 'erin');
  await page.waitForURL(url('/'));
  await page.locator('#me', { hasText: 'erin@example.com' }).waitFor();
  const cookie = await sessionCookie(context);
  assert.ok(cookie, 'the same session cookie as token sign-in');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, 'Strict');
  const me = await page.evaluate(async () => (await fetch('/api/me')).json());
  assert.equal(me.name, 'erin@example.com');
  assert.deepEqual(me.groups, ['reviewers', 'security']);
  await page.locator('#live[data-state="live"]').waitFor();

  const held = heldCurl(stack.url, { model: 'demo-echo', messages: [{ role: 'user', content: 'Signed in with SSO' }] });
  const row = page.locator('.qrow', { hasText: 'Signed in with SSO' });
  await row.waitFor();
  await Promise.all([page.waitForURL(/\/reviews\//), row.click()]);
  await page.click('#approve');
  const res = await held.result;
  assert.equal(res.status, 200, `${res.body} ${res.stderr}`);
  assert.equal(JSON.parse(res.body).choices[0].message.content, 'echo: Signed in with SSO');
  const stored = (await stack.api('/api/reviews?status=approved')).json.reviews[0];
  assert.equal(stored.reviewer, 'erin@example.com');
}));

test('a person the provider puts in no approver group signs in but cannot approve', T, check(async () => {
  const id = await stack.fileReview({
    request_id: 'oidc-group-1', api: 'openai_chat', method: 'POST', path: '/v1/chat/completions', authority: 'llm',
    model: 'demo-echo', prompt: [{ role: 'user', text: 'needs security' }], approver_group: 'security',
    body: JSON.stringify({ model: 'demo-echo', messages: [{ role: 'user', content: 'needs security' }] }),
    hold_timeout_ms: 120000,
  });
  const { page } = await newPage();
  await signIn(page, 'dave', { next: `/reviews/${id}` });
  await page.waitForURL(url(`/reviews/${id}`));
  await page.locator('#me', { hasText: 'dave@example.com' }).waitFor();
  const status = await page.evaluate(async (rid) => {
    const me = await (await fetch('/api/me')).json();
    return (await fetch(`/api/reviews/${rid}/approve`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'x-csrf-token': me.csrf_token }, body: '{}',
    })).status;
  }, id);
  assert.equal(status, 403);
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.status, 'pending');

  // Someone in the group can.
  const erin = await newPage();
  await signIn(erin.page, 'erin', { next: `/reviews/${id}` });
  await erin.page.waitForURL(url(`/reviews/${id}`));
  await erin.page.click('#approve');
  await erin.page.locator('.decided .badge-approved').waitFor();
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.reviewer, 'erin@example.com');
}));

test('a person outside required_group is refused sign-in', T, check(async () => {
  const { context, page } = await newPage();
  await signIn(page, 'mallory');
  await expectRefused(page, context, 'group');
  assert.match(await page.locator('#login-error').textContent(), /not in the group/);
}));

// The provider re-signs its ID token with its own key with one claim
// wrong, so the service has only that to refuse it for.
for (const [mode, what, logged] of [
  ['wrong-audience', 'an ID token for another audience', /OpenID Connect sign-in failed.*another-application/],
  ['expired', 'an expired ID token', /OpenID Connect sign-in failed.*[Ee]xpire/],
]) {
  test(`${what} is refused`, T, check(async () => {
    await provider.setMode(mode);
    try {
      const { context, page } = await newPage();
      await signIn(page, 'erin');
      await expectRefused(page, context, 'oidc');
    } finally {
      await provider.setMode('normal');
    }
    assert.match(stack.approval.logText(), logged);
  }));
}

test('a callback works once, and only in the browser that started the sign-in', T, check(async () => {
  const first = await newPage();
  const { callbackUrl, browserCookie } = await signIn(first.page, 'erin', { holdCallback: true });
  assert.ok(callbackUrl && browserCookie, 'callback held');

  // Another browser (no sign-in cookie) with this callback: refused.
  const other = await newPage();
  await other.page.goto(callbackUrl);
  await expectRefused(other.page, other.context, 'oidc');
  assert.match(stack.approval.logText(), /did not start this sign-in/);

  // That attempt used the state up: the browser that started it is refused too.
  await first.page.goto(callbackUrl);
  await expectRefused(first.page, first.context, 'oidc');

  // A complete sign-in, then its callback replayed with its own cookie.
  const again = await newPage();
  const held = await signIn(again.page, 'erin', { holdCallback: true });
  await again.page.goto(held.callbackUrl);
  await again.page.waitForURL(url('/'));
  assert.ok(await sessionCookie(again.context));
  const replay = await newPage();
  await replay.context.addCookies([{
    name: 'cs_oidc', value: held.browserCookie, url: `${stack.approvalUrl}/ui/oidc/`,
  }]);
  await replay.page.goto(held.callbackUrl);
  await expectRefused(replay.page, replay.context, 'oidc');
  assert.match(stack.approval.logText(), /already used state/);
}));

// Login CSRF by cookie tossing: dave starts a sign-in in his own browser,
// keeps its callback, and plants his `cs_oidc` in erin's browser (any page
// of the host can: cookies are not kept apart by port), on a longer path so
// that it goes out before hers. Sent to dave's callback half-way through
// her own sign-in, erin must not end up signed in as dave.
test('a sign-in cookie planted beside the browser\'s own signs nobody in', T, check(async () => {
  const attacker = await newPage();
  const dave = await signIn(attacker.page, 'dave', { holdCallback: true });
  assert.ok(dave.callbackUrl && dave.browserCookie, 'callback held');
  const victim = await newPage();
  await signIn(victim.page, 'erin', { holdCallback: true });
  await victim.context.addCookies([{
    name: 'cs_oidc', value: dave.browserCookie, domain: '127.0.0.1', path: '/ui/oidc/callback',
  }]);
  const held = (await victim.context.cookies(dave.callbackUrl)).filter((c) => c.name === 'cs_oidc');
  assert.equal(held.length, 2, 'the browser sends its own sign-in cookie and the planted one');
  const refusedBefore = stack.approval.logText().split('did not start this sign-in').length;
  await victim.page.goto(dave.callbackUrl);
  await expectRefused(victim.page, victim.context, 'oidc');
  assert.equal(stack.approval.logText().split('did not start this sign-in').length, refusedBefore + 1);
}));

// ivan has a token (a [[reviewers]] entry `ivan`) and a company account
// (`ivan@example.com`), tied by the entry's `sign_in_names`: signed in
// either way he is one reviewer, so his two approvals are not a quorum.
test('a token and a company sign-in of one person are one approver', T, check(async () => {
  const id = await stack.fileReview({
    request_id: 'two-people', api: 'openai_chat', method: 'POST', path: '/v1/chat/completions', authority: 'llm',
    model: 'demo-echo', prompt: [{ role: 'user', text: 'two people' }], approver_group: 'security',
    required_approvals: 2, hold_timeout_ms: 120000,
    body: JSON.stringify({ model: 'demo-echo', messages: [{ role: 'user', content: 'two people' }] }),
  });
  const byToken = await fetch(url(`/api/reviews/${id}/approve`), {
    method: 'POST', headers: { authorization: `Bearer ${IVAN_TOKEN}`, 'content-type': 'application/json' }, body: '{}',
  });
  assert.equal(byToken.status, 200, await byToken.text());
  const { page } = await newPage();
  await signIn(page, 'ivan');
  await page.waitForURL(url('/'));
  await page.locator('#me', { hasText: 'ivan' }).waitFor();
  assert.equal((await page.evaluate(async () => (await fetch('/api/me')).json())).name, 'ivan');
  const second = await tryToApprove(page, id);
  assert.equal(second.approve, 409, JSON.stringify(second));
  assert.equal(second.code, 'already_approved');
  const review = (await stack.api(`/api/reviews/${id}`)).json;
  assert.equal(review.status, 'pending');
  assert.equal(review.approval_count, 1);
}));

// A held review for `security`, filed as the filter does.
async function securityReview(requestId) {
  return stack.fileReview({
    request_id: requestId, api: 'openai_chat', method: 'POST', path: '/v1/chat/completions', authority: 'llm',
    model: 'demo-echo', prompt: [{ role: 'user', text: requestId }], approver_group: 'security',
    body: JSON.stringify({ model: 'demo-echo', messages: [{ role: 'user', content: requestId }] }),
    hold_timeout_ms: 120000,
  });
}

// The signed-in page's own calls: /api/me, then a decision with its CSRF
// token; their statuses (and the decision's error code).
async function tryToApprove(page, id) {
  return page.evaluate(async (rid) => {
    const meRes = await fetch('/api/me');
    const me = meRes.ok ? await meRes.json() : {};
    const res = await fetch(`/api/reviews/${rid}/approve`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'x-csrf-token': me.csrf_token || '' }, body: '{}',
    });
    const body = await res.json().catch(() => ({}));
    return { me: meRes.status, groups: me.groups, approve: res.status, code: body.error && body.error.code };
  }, id);
}

const pastRecheck = () => new Promise((r) => { setTimeout(r, RECHECK_S * 1000 + 300); });

test('a person the provider takes out of the approver group cannot approve once the groups are re-checked', T, check(async () => {
  const id = await securityReview('oidc-recheck-group');
  const { page } = await newPage();
  await signIn(page, 'grace', { next: `/reviews/${id}` });
  await page.waitForURL(url(`/reviews/${id}`));
  await page.locator('#approve').waitFor();

  await provider.changeUser('grace', { groups: ['reviewers'] });
  await pastRecheck();
  const tried = await tryToApprove(page, id);
  // Still a reviewer (the session lives), no longer in `security`.
  assert.deepEqual(tried, { me: 200, groups: ['reviewers'], approve: 403, code: 'not_in_approver_group' });
  // The page's own button goes the same way.
  await page.click('#approve');
  await page.waitForTimeout(500);
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.status, 'pending');

  // Back in the group at the provider: she can again.
  await provider.changeUser('grace', { groups: ['reviewers', 'security'] });
  await pastRecheck();
  assert.equal((await tryToApprove(page, id)).approve, 200);
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.reviewer, 'grace@example.com');
}));

for (const [login, change, what] of [
  ['frank', { groups: ['security'] }, 'taken out of the required group'],
  ['heidi', { removed: true }, 'removed at the provider (the refresh is refused)'],
]) {
  test(`a person ${what} is signed out everywhere by the re-check of a live feed`, T, check(async () => {
    const id = await securityReview(`oidc-recheck-${login}`);
    // Two browsers, two sessions, the second watching the live feed.
    const first = await newPage();
    await signIn(first.page, login, { next: `/reviews/${id}` });
    await first.page.waitForURL(url(`/reviews/${id}`));
    const second = await newPage();
    await signIn(second.page, login);
    await second.page.waitForURL(url('/'));
    await second.page.locator('#live[data-state="live"]').waitFor();

    await provider.changeUser(login, change);
    await pastRecheck();
    // A new review reaches the feed, which re-checks before it sends
    // anything: the provider says no, every session of the person ends,
    // and the page is sent to the sign-in page.
    await securityReview(`oidc-recheck-${login}-2`);
    await second.page.waitForURL(/\/login\?next=/);
    // (Each page's feed may have asked; together they ended both sessions.)
    const ended = stack.approval.logText().split('\n')
      .filter((l) => l.includes('no longer vouches') && l.includes(`${login}@example.com`))
      .map((l) => Number(/"sessions":(\d+)/.exec(l)[1]));
    assert.equal(ended.reduce((a, b) => a + b, 0), 2, stack.approval.logText());
    // The first browser's session ended with it: it approves nothing.
    const me = await first.context.request.get(url('/api/me'));
    const approve = await first.context.request.post(url(`/api/reviews/${id}/approve`), {
      headers: { 'content-type': 'application/json', 'x-csrf-token': 'any' }, data: '{}',
    });
    assert.deepEqual([me.status(), approve.status()], [401, 401]);
    assert.equal((await stack.api(`/api/reviews/${id}`)).json.status, 'pending');
    if (!change.removed) {
      // Signing in again is refused: the provider no longer names the group.
      const again = await newPage();
      await signIn(again.page, login);
      await expectRefused(again.page, again.context, 'group');
    }
    assert.equal((await stack.api(`/api/reviews/${id}`)).json.status, 'pending');
  }));
}

test('a rotated provider signing key is fetched when a token names it', T, check(async () => {
  const before = (await (await fetch(`${provider.url}/jwks`)).json()).keys.map((k) => k.kid);
  await provider.rotate();
  const afterKeys = (await (await fetch(`${provider.url}/jwks`)).json()).keys.map((k) => k.kid);
  assert.notDeepEqual(afterKeys, before);
  const { context, page } = await newPage();
  await signIn(page, 'erin');
  await page.waitForURL(url('/'));
  await page.locator('#me', { hasText: 'erin@example.com' }).waitFor();
  assert.ok(await sessionCookie(context));
}));
