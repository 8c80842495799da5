// Reviews of the model's answer in the reviewer UI, in a real headless
// Chromium against the real stack: a `review` response rule on a phrase
// holds the demo model's plain answer (it echoes the prompt) in Envoy; the
// review page shows the answer's texts, masked, next to the prompt, and the
// reviewer edits the answer's text (an edit that changes more is refused,
// shown by the editor, and fixed); curl gets the edited answer.
//
//   cd tests/browser && npm ci && node --test answers.test.mjs
//
// UPDATE_SCREENSHOTS=1 also writes docs/screenshots/answer-review.png.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { heldCurl, launchChromium, REVIEWERS, ROOT, Stack, withLogs } from './stack.mjs';

const SHOT_DIR = process.env.UPDATE_SCREENSHOTS ? path.join(ROOT, 'docs', 'screenshots') : null;
const T = { timeout: 120000 };

// Requests to `demo-allow*` models are allowed (envoy/filter-config.json);
// their answers go through this rule.
const FILTER = {
  masking: { profiles: { default: { detectors: { email: 'redact' } } } },
  content_policy: {
    response_rules: [{ name: 'internal-answers', action: 'review', phrases: ['internal only'], streams: 'block' }],
  },
};
const ASK = 'internal only: write to bob@example.com about the Q3 plan';

let stack;
let browser;
let page;
const pageErrors = [];

before(async () => {
  stack = await new Stack({ filterConfig: FILTER }).start();
  browser = await launchChromium();
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 }, locale: 'en-GB', timezoneId: 'UTC' });
  context.setDefaultTimeout(15000);
  page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await page.goto(`${stack.approvalUrl}/login`);
  await page.fill('#token', REVIEWERS.alice);
  await Promise.all([page.waitForURL(`${stack.approvalUrl}/`), page.click('#sign-in')]);
}, T);

after(async () => {
  if (browser) await browser.close();
  if (stack) await stack.stop();
});

const check = withLogs(() => (stack ? stack.logs() : 'stack not started'));

async function pendingId() {
  for (let i = 0; i < 150; i += 1) {
    const [r] = await stack.pending();
    if (r) return r.id;
    await new Promise((res) => setTimeout(res, 100));
  }
  throw new Error('no review was created');
}

test('a held answer shows as an Answer card, is edited as an answer, and curl gets the edit', T, check(async () => {
  const held = heldCurl(stack.url, { model: 'demo-allow-1', messages: [{ role: 'user', content: ASK }] });
  const id = await pendingId();
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.kind, 'response');
  await page.goto(`${stack.approvalUrl}/reviews/${id}`);

  // The answer's text, masked as stored, next to the prompt it answers.
  const answer = page.locator('#answer');
  await answer.locator('h2', { hasText: 'Answer' }).waitFor();
  const echoed = 'echo: internal only: write to [EMAIL] about the Q3 plan';
  assert.equal(await answer.locator('.msg-assistant .msg-text').textContent(), echoed);
  assert.deepEqual(await answer.locator('.masked').allTextContents(), ['[EMAIL]']);
  assert.equal(await page.locator('.msg-user .msg-text').textContent(), 'internal only: write to [EMAIL] about the Q3 plan');
  await page.locator('.card-title-row', { hasText: 'the prompt the model answered' }).waitFor();
  assert.equal(await page.locator('h2', { hasText: 'Parameters' }).count(), 0, 'an answer has no request parameters');
  assert.equal(held.done, false, 'curl waits while the answer is reviewed');
  if (SHOT_DIR) {
    await page.mouse.move(0, 0);
    await page.screenshot({ path: path.join(SHOT_DIR, 'answer-review.png'), fullPage: true });
  }

  // The editor is the answer's: change its text only.
  await page.click('#edit');
  await page.locator('#editor h2', { hasText: 'Edit the answer' }).waitFor();
  const editor = page.locator('#edit-body');
  const text = await editor.inputValue();
  assert.ok(text.includes(`"content": "${echoed}"`), text);
  // An edit the gateway would refuse (a finish reason changed) is refused
  // when it is confirmed: the error shows by the edit, and nothing is
  // decided, so the reviewer goes back and fixes it.
  assert.ok(text.includes('"finish_reason": "stop"'), text);
  await editor.fill(text.replace(echoed, 'Please ask the planning team.').replace('"finish_reason": "stop"', '"finish_reason": "length"'));
  await page.click('#preview-edit');
  await page.click('#confirm-edit');
  const editError = page.locator('#editor #edit-error');
  await editError.filter({ hasText: "only the answer's text may change" }).waitFor();
  assert.match(await editError.textContent(), /the review is still pending/);
  assert.equal((await stack.api(`/api/reviews/${id}`)).json.status, 'pending');
  assert.equal(held.done, false, 'a refused edit decides nothing');
  await page.click('#back-to-edit');
  await editor.fill(text.replace(echoed, 'Please ask the planning team.'));
  await page.click('#preview-edit');
  await page.locator('.diff-add', { hasText: '"content": "Please ask the planning team."' }).waitFor();
  assert.equal(held.done, false, 'nothing is decided before confirming');
  await page.click('#confirm-edit');

  const res = await held.result;
  assert.equal(res.status, 200, `${res.body} ${res.stderr}`);
  assert.equal(JSON.parse(res.body).choices[0].message.content, 'Please ask the planning team.');
  await page.locator('.decided .badge-approved', { hasText: 'edited' }).waitFor();
  await page.locator('.card-title-row', { hasText: 'the caller received the edited answer' }).waitFor();
  const stored = (await stack.api(`/api/reviews/${id}`)).json;
  assert.equal(stored.reviewer, 'alice');
  assert.equal(stored.edited, true);
  assert.deepEqual(pageErrors, [], 'no script errors on the page');
}));

test('an answer review that is rejected ends in an error with the reason', T, check(async () => {
  const held = heldCurl(stack.url, { model: 'demo-allow-1', messages: [{ role: 'user', content: 'internal only: the roadmap' }] });
  const id = await pendingId();
  await page.goto(`${stack.approvalUrl}/reviews/${id}`);
  await page.locator('#answer .msg-assistant', { hasText: 'echo: internal only: the roadmap' }).waitFor();
  await page.fill('#reason', 'not for this caller');
  await page.click('#reject');
  const res = await held.result;
  assert.equal(res.status, 403, res.body);
  assert.match(res.body, /not for this caller/);
  assert.doesNotMatch(res.body, /the roadmap/);
  await page.locator('.decided .badge-rejected').waitFor();
}));

test('a tool-call review shows each call\'s name and arguments and edits them in the answer', T, check(async () => {
  // Filed as the filter files it (the demo Envoy configuration has no
  // tool-call rule; tests/e2e/test_tool_calls.py holds real ones).
  const answer = {
    id: 'chatcmpl-1', object: 'chat.completion', created: 1, model: 'gpt-4o',
    choices: [{ index: 0, finish_reason: 'tool_calls', message: { role: 'assistant', content: null,
      tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'delete_file', arguments: '{"path":"/srv/data"}' } }] } }],
  };
  const id = await stack.fileReview({
    request_id: 'tool-1', api: 'openai_chat', method: 'POST', path: '/v1/chat/completions', authority: 'llm.internal',
    model: 'gpt-4o', rule: 'dangerous-tools', stream: false, kind: 'tool_call',
    prompt: [{ role: 'user', text: 'clean up the data volume' }], body: JSON.stringify(answer),
    tool_calls: [{ name: 'delete_file', arguments: '{"path":"/srv/data"}' }], hold_timeout_ms: 600000,
    async_review: true, // no hold to keep alive: this test's decision comes whenever it comes
  });
  await page.goto(`${stack.approvalUrl}/reviews/${id}`);
  const call = page.locator('#tool-calls .msg-tool');
  await call.waitFor();
  assert.equal(await call.locator('.msg-role').textContent(), 'tool call · delete_file');
  assert.match(await call.locator('pre').textContent(), /"path": "\/srv\/data"/);
  assert.equal(await page.locator('#answer').count(), 0);
  await page.click('#edit');
  await page.locator('#editor h2', { hasText: 'Edit the tool calls' }).waitFor();
  const editor = page.locator('#edit-body');
  await editor.fill((await editor.inputValue()).replace('/srv/data', '/tmp/scratch'));
  await page.click('#preview-edit');
  await page.click('#confirm-edit');
  await page.locator('.decided .badge-approved', { hasText: 'edited' }).waitFor();
  const stored = (await stack.api(`/api/reviews/${id}`)).json;
  assert.match(stored.edited_body, /\/tmp\/scratch/);
}));
