// A real OpenID Connect provider for the browser tests: the `oidc-provider`
// package (a certified implementation) with its development login page,
// on 127.0.0.1:$PORT, started and stopped by oidc.test.mjs (see
// stack.mjs `Provider`).
//
// Environment: PORT, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, KEY_ID (the
// signing key's id; a new process gets a new key, so restarting with
// another KEY_ID rotates the keys), USERS (JSON: login -> groups).
//
// `POST /_test/mode?mode=...` makes the provider misbehave on purpose for
// the next token responses, re-signing the ID token with its own key so
// that exactly one thing is wrong: `wrong-audience` (aud is another
// client), `expired` (exp in the past); `normal` undoes it.
//
// `POST /_test/user?login=...` with a JSON body changes a person at the
// provider from now on: `{"groups": [...]}` sets their groups, `{"removed":
// true}` removes the account (their refresh tokens then fail with
// `invalid_grant`, as when an administrator deletes or disables someone).
//
// Refresh tokens are issued at every sign-in (the service asks the
// provider again for a person's groups with them).
import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';
import { decodeJwt, importJWK, SignJWT } from 'jose';
import Provider from 'oidc-provider';

const { PORT, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, KEY_ID } = process.env;
const USERS = JSON.parse(process.env.USERS || '{}');
const issuer = `http://127.0.0.1:${PORT}`;

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: KEY_ID, alg: 'RS256', use: 'sig' };
const signingKey = await importJWK(jwk, 'RS256');

const provider = new Provider(issuer, {
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    redirect_uris: [REDIRECT_URI],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: ['countersign-browser-test-cookie-key'] },
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
  },
  // The claims go into the ID token itself (the service reads them there).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  // Without asking for `offline_access`: what the tests check is the use
  // of a refresh token, not how a provider is talked into issuing one.
  async issueRefreshToken(_ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  // A first-party app: the reviewer is not asked to consent.
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid email profile groups');
    await grant.save();
    return grant;
  },
  async findAccount(_ctx, id) {
    if (!(id in USERS)) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.com`,
          email_verified: true,
          preferred_username: id,
          name: id,
          groups: USERS[id] || [],
        };
      },
    };
  },
});

let mode = 'normal';

provider.use(async (ctx, next) => {
  if (ctx.path === '/_test/user' && ctx.method === 'POST') {
    let body = '';
    for await (const chunk of ctx.req) body += chunk;
    const change = JSON.parse(body);
    if (change.removed) delete USERS[ctx.query.login];
    else USERS[ctx.query.login] = change.groups;
    ctx.body = { users: USERS };
    return;
  }
  if (ctx.path === '/_test/mode' && ctx.method === 'POST') {
    mode = ctx.query.mode;
    ctx.body = { mode };
    return;
  }
  await next();
  if (ctx.path === '/token' && mode !== 'normal' && ctx.body && ctx.body.id_token) {
    const claims = decodeJwt(ctx.body.id_token);
    const now = Math.floor(Date.now() / 1000);
    if (mode === 'wrong-audience') claims.aud = 'another-application';
    if (mode === 'expired') Object.assign(claims, { iat: now - 1200, exp: now - 600 });
    ctx.body = {
      ...ctx.body,
      id_token: await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: KEY_ID }).sign(signingKey),
    };
  }
});

http.createServer(provider.callback()).listen(Number(PORT), '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
