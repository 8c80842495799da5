// Starts the real countersign stack (demo model + approval service + Envoy
// with the wasm filter) on free loopback ports, and stops every process it
// started by PID (each runs in its own process group).
//
// Needs the binaries from `./dev build`: target/release/countersign-approval,
// target/release/demo-backend (or those in $COUNTERSIGN_BINARIES, as
// `./dev test` sets it), target/wasm32-wasip1/wasm/countersign_filter.wasm
// and .venv/bin/envoy.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BINARIES = process.env.COUNTERSIGN_BINARIES || path.join(ROOT, 'target', 'release');
const WASM = path.join(ROOT, 'target', 'wasm32-wasip1', 'wasm', 'countersign_filter.wasm');
const ENVOY = path.join(ROOT, '.venv', 'bin', 'envoy');
const TEMPLATE = path.join(ROOT, 'envoy', 'countersign.yaml');
const FILTER_CONFIG = path.join(ROOT, 'envoy', 'filter-config.json');
const BUFFER_LIMIT = 16 * 1024 * 1024;
// The stack runs as the README recommends: only the filter, holding this
// token, may use the service's filter API.
const FILTER_TOKEN = 'browser-filter-token-0123456789abcdef';

export const REVIEWERS = {
  alice: 'alice-browser-token-0123456789',
  bob: 'bob-browser-token-0123456789',
};

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Debian's Chromium, headless, without anything that phones home.
export function launchChromium() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

// A page of a new browser context (UTC, en-GB, `viewport`) that collects
// uncaught script errors into `pageErrors` and CSP violations into
// `cspViolations`.
export async function watchedPage(browser, viewport = { width: 1360, height: 900 }) {
  const context = await browser.newContext({ viewport, locale: 'en-GB', timezoneId: 'UTC' });
  context.setDefaultTimeout(15000);
  const page = await context.newPage();
  const pageErrors = [];
  const cspViolations = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) cspViolations.push(m.text()); });
  return { page, pageErrors, cspViolations };
}

// Registers the hooks of a test file that runs one stack (`new
// Stack(options)`) and one watched page in Chromium, started before its
// tests and stopped after them. The returned object holds `stack`, `page`,
// `pageErrors`, `cspViolations` once started, `url(path)` on the approval
// service and `check`, the wrapper printing the processes' logs on failure.
export function stackWithPage(options, hookOptions) {
  const it = { stack: null, browser: null, page: null, pageErrors: null, cspViolations: null };
  before(async () => {
    it.stack = await new Stack(options).start();
    it.browser = await launchChromium();
    Object.assign(it, await watchedPage(it.browser));
  }, hookOptions);
  after(async () => {
    if (it.browser) await it.browser.close();
    if (it.stack) await it.stack.stop();
  });
  it.check = withLogs(() => (it.stack ? it.stack.logs() : 'stack not started'));
  it.url = (p) => it.stack.approvalUrl + p;
  return it;
}

// Wraps a test body: on failure, prints what `logs()` returns (the
// processes' logs) to help diagnose.
export function withLogs(logs) {
  return (fn) => async (t) => {
    try {
      await fn(t);
    } catch (e) {
      console.error(logs());
      throw e;
    }
  };
}

const children = new Set();

// Last resort: never leave a process behind, even if the runner dies.
process.on('exit', () => {
  for (const child of children) {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch (_) {
      try { child.kill('SIGKILL'); } catch (__) { /* gone */ }
    }
  }
});

// Ports the tests choose for their listeners: below the kernel's ephemeral
// range (as tests/e2e/stack.py does). A port from listen(0) comes from that
// range, which every outgoing connection (Envoy's to the model and the
// service, the browser's) also draws from, so one of them could take it
// between the choice and the listener's bind.
function ephemeralLow() {
  try {
    const [low] = fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (Number.isInteger(low)) return low;
  } catch { /* not Linux: the default below */ }
  return 32768;
}
const LISTEN_LOW = 10000;
const LISTEN_HIGH = ephemeralLow();
// Ports this process handed out: two choices made at once (Promise.all)
// never get the same one.
const handedOut = new Set();

function tryListen(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', () => resolve(null));
    srv.listen(port, '127.0.0.1', () => {
      const chosen = srv.address().port;
      srv.close(() => resolve(chosen));
    });
  });
}

/** A loopback port nothing is bound to now, outside the ephemeral range
 * (listen(0) when that range leaves no room below it). */
export async function freePort() {
  const tries = LISTEN_HIGH - LISTEN_LOW >= 1000 ? 200 : 0;
  for (let i = 0; i < tries; i += 1) {
    const port = LISTEN_LOW + Math.floor(Math.random() * (LISTEN_HIGH - LISTEN_LOW));
    if (handedOut.has(port)) continue;
    handedOut.add(port);
    const got = await tryListen(port);
    if (got !== null) return got;
  }
  const got = await tryListen(0);
  if (got === null) throw new Error('no free loopback port');
  return got;
}

const sha256 = (text) => createHash('sha256').update(text).digest('hex');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitHttp(url, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last = null;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
      if (res.ok) return;
      last = `HTTP ${res.status}`;
    } catch (e) {
      last = e.message;
    }
    await sleep(100);
  }
  throw new Error(`${what} did not come up at ${url} (${last})`);
}

class Proc {
  constructor(name, cmd, args, log, env = undefined) {
    Object.assign(this, { name, cmd, args, log, env, child: null, exited: null });
  }

  start() {
    for (const file of [this.cmd]) {
      if (!fs.existsSync(file)) throw new Error(`${file} is missing: run ./dev build first`);
    }
    const out = fs.openSync(this.log, 'a');
    this.child = spawn(this.cmd, this.args, {
      stdio: ['ignore', out, out], detached: true, env: this.env ? { ...process.env, ...this.env } : process.env,
    });
    fs.closeSync(out);
    children.add(this.child);
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => {
      children.delete(this.child);
      resolve({ code, signal });
    }));
    return this;
  }

  get alive() { return this.child && this.child.exitCode === null && this.child.signalCode === null; }

  async stop() {
    if (!this.alive) return;
    const { pid } = this.child;
    try { process.kill(-pid, 'SIGTERM'); } catch (_) { return; }
    const done = await Promise.race([this.exited, sleep(5000).then(() => null)]);
    if (!done) {
      try { process.kill(-pid, 'SIGKILL'); } catch (_) { /* gone */ }
      await this.exited;
    }
  }

  logText() {
    try { return fs.readFileSync(this.log, 'utf8'); } catch (_) { return ''; }
  }
}

export function removeTestDir(dir) {
  if (dir && !process.env.COUNTERSIGN_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
}

function renderTemplate(template, values) {
  return template.replace(/\{\{([A-Z_]+)\}\}/g, (_, key) => {
    if (!(key in values)) throw new Error(`no value for {{${key}}}`);
    return String(values[key]);
  });
}

export class Stack {
  // `approvalPort` may be chosen beforehand (an OpenID provider must know
  // the redirect URI before the service starts); `settings` are top-level
  // lines of the service's configuration (before its tables), `extraToml`
  // is appended to it (`{{MODEL_URL}}` in it becomes the demo model's
  // address), `env` added to its environment; `filterConfig` replaces
  // fields of envoy/filter-config.json.
  constructor({ approvalPort = null, settings = '', extraToml = '', env = undefined, filterConfig = {} } = {}) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'countersign-browser-'));
    this.procs = [];
    Object.assign(this, { fixedApprovalPort: approvalPort, settings, extraToml, env, filterFields: filterConfig });
  }

  async start() {
    const [modelPort, freeApprovalPort, listenPort, adminPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
    const approvalPort = this.fixedApprovalPort || freeApprovalPort;
    this.approvalUrl = `http://127.0.0.1:${approvalPort}`;
    this.url = `http://127.0.0.1:${listenPort}`;
    this.modelUrl = `http://127.0.0.1:${modelPort}`;

    const toml = [
      `listen = "127.0.0.1:${approvalPort}"`,
      `database = "${path.join(this.dir, 'countersign.db')}"`,
      `public_url = "${this.approvalUrl}"`,
      `filter_token_sha256 = "${sha256(FILTER_TOKEN)}"`,
      this.settings,
      ...Object.entries(REVIEWERS).flatMap(([name, token]) => [
        '', '[[reviewers]]', `name = "${name}"`, `token_sha256 = "${sha256(token)}"`, 'groups = ["security"]',
      ]),
      '',
      // `{{MODEL_URL}}`: the demo model's address (it also plays assessors).
      this.extraToml.replaceAll('{{MODEL_URL}}', this.modelUrl),
    ].join('\n');
    fs.writeFileSync(path.join(this.dir, 'approval.toml'), `${toml}\n`);

    const filterConfig = JSON.stringify({
      ...JSON.parse(fs.readFileSync(FILTER_CONFIG, 'utf8')), ...this.filterFields, approval_token: FILTER_TOKEN,
    })
      .replace(/'/g, "''");
    fs.writeFileSync(path.join(this.dir, 'envoy.yaml'), renderTemplate(fs.readFileSync(TEMPLATE, 'utf8'), {
      ADMIN_PORT: adminPort, LISTEN_PORT: listenPort, MODEL_PORT: modelPort, APPROVAL_PORT: approvalPort,
      BUFFER_LIMIT, WASM_PATH: WASM, FILTER_CONFIG: filterConfig,
    }));
    if (!fs.existsSync(WASM)) throw new Error(`${WASM} is missing: run ./dev build first`);

    const log = (name) => path.join(this.dir, `${name}.log`);
    this.backend = new Proc('demo-backend', path.join(BINARIES, 'demo-backend'),
      ['--listen', `127.0.0.1:${modelPort}`], log('demo-backend'));
    this.approval = new Proc('countersign-approval', path.join(BINARIES, 'countersign-approval'),
      ['serve', '--config', path.join(this.dir, 'approval.toml')], log('approval'), this.env);
    this.envoy = new Proc('envoy', ENVOY,
      ['-c', path.join(this.dir, 'envoy.yaml'), '--log-level', 'warn', '--component-log-level', 'wasm:info',
        '--concurrency', '2', '--base-id', String(adminPort)], log('envoy'));
    this.procs = [this.envoy, this.approval, this.backend];

    this.backend.start();
    this.approval.start();
    await waitHttp(`${this.modelUrl}/_demo/stats`, 'demo backend');
    await waitHttp(`${this.approvalUrl}/healthz`, 'approval service');
    this.envoy.start();
    await waitHttp(`http://127.0.0.1:${adminPort}/ready`, 'envoy', 30000);
    return this;
  }

  // Stops the processes, then removes the stack's directory (database,
  // configuration, logs): a failing test has printed the logs by then
  // (`withLogs`). COUNTERSIGN_KEEP_TEST_DIRS=1 keeps it to look at.
  async stop() {
    for (const p of this.procs) await p.stop();
    removeTestDir(this.dir);
  }

  logs() {
    return this.procs.map((p) => `----- ${p.name} (${p.log})\n${p.logText().slice(-4000)}`).join('\n');
  }

  // The reviewer API with a bearer token, as curl would use it.
  async api(pathname, { method = 'GET', body, reviewer = 'alice' } = {}) {
    const res = await fetch(this.approvalUrl + pathname, {
      method,
      headers: { authorization: `Bearer ${REVIEWERS[reviewer]}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, json: await res.json().catch(() => null) };
  }

  async pending() {
    const r = await this.api('/api/reviews?status=pending');
    return r.json.reviews;
  }

  // Files a review directly through the filter API, as the filter does
  // (with its token). Only for the screenshots' seed reviews, whose
  // callers, routes and rules the demo Envoy configuration cannot produce;
  // every other review in these tests comes from a request held by Envoy.
  async fileReview(review) {
    const res = await fetch(`${this.approvalUrl}/v1/reviews`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-countersign-filter-token': FILTER_TOKEN },
      body: JSON.stringify(review),
    });
    if (res.status !== 201) throw new Error(`create failed: ${res.status} ${await res.text()}`);
    return (await res.json()).id;
  }
}

// The OpenID Connect provider (oidc-provider.mjs) on 127.0.0.1:`port`, in
// a process of its own; `rotate()` restarts it with a new signing key.
export class Provider {
  constructor({ port, clientId, clientSecret, redirectUri, users, dir }) {
    Object.assign(this, { port, clientId, clientSecret, redirectUri, users, dir, generation: 0 });
    this.url = `http://127.0.0.1:${port}`;
  }

  async start() {
    this.generation += 1;
    this.keyId = `key-${this.generation}`;
    this.proc = new Proc(`oidc-provider-${this.generation}`, process.execPath,
      [path.join(ROOT, 'tests', 'browser', 'oidc-provider.mjs')], path.join(this.dir, `oidc-provider-${this.generation}.log`), {
        PORT: String(this.port), CLIENT_ID: this.clientId, CLIENT_SECRET: this.clientSecret,
        REDIRECT_URI: this.redirectUri, KEY_ID: this.keyId, USERS: JSON.stringify(this.users),
      }).start();
    await waitHttp(`${this.url}/.well-known/openid-configuration`, 'oidc-provider');
    return this;
  }

  async stop() {
    if (this.proc) await this.proc.stop();
  }

  async rotate() {
    await this.stop();
    return this.start();
  }

  async setMode(mode) {
    const res = await fetch(`${this.url}/_test/mode?mode=${encodeURIComponent(mode)}`, { method: 'POST' });
    if (!res.ok) throw new Error(`mode ${mode}: ${res.status}`);
  }

  // Changes `login` at the provider: `{ groups }` or `{ removed: true }`.
  async changeUser(login, change) {
    const res = await fetch(`${this.url}/_test/user?login=${encodeURIComponent(login)}`, {
      method: 'POST', body: JSON.stringify(change),
    });
    if (!res.ok) throw new Error(`user ${login}: ${res.status}`);
  }

  logText() {
    return this.proc ? this.proc.logText() : '';
  }
}

// A held request: `curl` against the Envoy listener, running until a
// reviewer decides. Resolves with { code, status, body, stderr }.
// `headers`: more request headers ("name: value").
export function heldCurl(url, body, apiPath = '/v1/chat/completions', headers = []) {
  const child = spawn('curl', ['-sS', '-m', '120', '-o', '-', '-w', '\n%{http_code}',
    '-H', 'content-type: application/json', ...headers.flatMap((x) => ['-H', x]),
    '--data-binary', '@-', url + apiPath], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  child.stdin.end(JSON.stringify(body));
  const result = new Promise((resolve) => child.once('close', (code) => {
    children.delete(child);
    const cut = out.lastIndexOf('\n');
    resolve({ code, status: Number(out.slice(cut + 1)), body: out.slice(0, cut), stderr: err });
  }));
  return {
    result,
    get done() { return child.exitCode !== null || child.signalCode !== null; },
    kill() { try { child.kill('SIGKILL'); } catch (_) { /* gone */ } },
  };
}
