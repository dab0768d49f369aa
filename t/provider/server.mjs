// OIDC provider for nginx-authentik's end-to-end tests and `make demo`.
//
// A real `oidc-provider` (authorization code + PKCE, discovery, JWKS, userinfo,
// RP-initiated logout) with a tiny non-interactive-friendly login page and a few
// control endpoints for tests.  It imitates what matters of an authentik
// OAuth2/proxy provider: the claims and scopes (`profile`, `email`,
// `entitlements`, `ak_proxy`), HS256 id tokens keyed by the client secret.
//
// Usage:
//   node server.mjs [--port N] [--host 127.0.0.1] [--issuer URL] [--clients FILE]
//                   [--ttl SECONDS]
// Environment (used when the option is absent):
//   PROVIDER_PORT, PROVIDER_HOST, PROVIDER_ISSUER, PROVIDER_CLIENTS (JSON text: a
//   client object or an array of them), PROVIDER_CLIENTS_FILE, PROVIDER_TTL.
// Port 0 picks a free port.  The issuer defaults to http://127.0.0.1:<port>; an
// issuer with a path (e.g. http://127.0.0.1:9000/application/o/app) mounts every
// endpoint under that path.
// Prints exactly one line `ready <issuer>` on stdout once listening.
//
// Clients: objects with oidc-provider client metadata (client_id, client_secret,
// redirect_uris, post_logout_redirect_uris, token_endpoint_auth_method,
// id_token_signed_response_alg), plus the optional extra `token_ttl` (seconds)
// that overrides the access/id token lifetime for that client.
//
// Control endpoints (tests only; never under the issuer path):
//   POST /__control/stall_token?ms=N[&count=K]  the next K (default: all, until
//        reset) token endpoint requests are held N ms before being answered
//   POST /__control/reset                       clear stalls and the request log
//   POST /__control/clients                     upsert clients (JSON body: object or array)
//   GET  /__control/log                         recent requests (JSON array)
//   GET  /__control/users                       users (JSON; sub, username, password)

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

// --- options ------------------------------------------------------------------------------
const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string' },
    issuer: { type: 'string' },
    clients: { type: 'string' },
    ttl: { type: 'string' },
  },
  strict: true,
});

const HOST = args.host ?? process.env.PROVIDER_HOST ?? '127.0.0.1';
const PORT = Number(args.port ?? process.env.PROVIDER_PORT ?? 9000);
const DEFAULT_TTL = Number(args.ttl ?? process.env.PROVIDER_TTL ?? 3600);

function loadInitialClients() {
  let list = [];
  const file = args.clients ?? process.env.PROVIDER_CLIENTS_FILE;
  if (file) list = JSON.parse(fs.readFileSync(file, 'utf8'));
  else if (process.env.PROVIDER_CLIENTS) list = JSON.parse(process.env.PROVIDER_CLIENTS);
  return Array.isArray(list) ? list : [list];
}

// --- users ------------------------------------------------------------------------------
function subFor(username) {
  // stable per user, hex like authentik's hashed user ids
  return crypto.createHash('sha256').update(`nginx-authentik-test:${username}`).digest('hex');
}

const USERS = {
  alice: {
    password: 'alice-password',
    claims: {
      name: 'Alice Liddell',
      preferred_username: 'alice',
      groups: ['admins', 'users'],
      email: 'alice@example.test',
      email_verified: true,
      entitlements: ['app-read', 'app-write'],
      ak_proxy: { user_attributes: { additionalHeaders: { 'X-Custom-Team': 'blue' } } },
    },
  },
  bob: {
    password: 'bob-password',
    claims: {
      name: 'Bob Builder',
      preferred_username: 'bob',
      groups: ['users'],
      email: 'bob@example.test',
      email_verified: false,
      entitlements: ['app-read'],
      ak_proxy: { user_attributes: { additionalHeaders: { 'X-Custom-Team': 'red' } } },
    },
  },
  // a user with nothing but a username: every optional claim is missing
  carol: {
    password: 'carol-password',
    claims: { preferred_username: 'carol' },
  },
  // a user with thousands of groups: a session record far over the module's max_record
  dave: {
    password: 'dave-password',
    claims: {
      preferred_username: 'dave',
      groups: Array.from({ length: 3000 }, (_, i) => `very-long-group-name-number-${i}`),
    },
  },
};
const USERS_BY_SUB = new Map(Object.entries(USERS).map(([u, v]) => [subFor(u), { username: u, ...v }]));

// --- storage (in memory; clients are mutable through /__control/clients) ----------------------
const clients = new Map();
for (const c of loadInitialClients()) clients.set(c.client_id, c);

const store = new Map(); // key -> { payload, expiresAt }
const grantIndex = new Map(); // grantId -> Set(keys)
const uidIndex = new Map(); // session uid -> id
const userCodeIndex = new Map();
const GRANTABLE = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode']);

function live(key) {
  const e = store.get(key);
  if (!e) return undefined;
  if (e.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return e.payload;
}

setInterval(() => {
  const now = Date.now();
  for (const [k, e] of store) if (e.expiresAt <= now) store.delete(k);
}, 30_000).unref();

class Adapter {
  constructor(name) { this.name = name; }

  key(id) { return `${this.name}:${id}`; }

  async upsert(id, payload, expiresIn) {
    if (this.name === 'Client') {
      clients.set(id, payload);
      return;
    }
    const key = this.key(id);
    store.set(key, { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
    if (GRANTABLE.has(this.name) && payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
    if (payload.uid) uidIndex.set(payload.uid, id);
    if (payload.userCode) userCodeIndex.set(payload.userCode, id);
  }

  async find(id) {
    if (this.name === 'Client') return clients.get(id);
    return live(this.key(id));
  }

  async findByUid(uid) {
    const id = uidIndex.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = userCodeIndex.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const p = live(this.key(id));
    if (p) p.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    if (this.name === 'Client') {
      clients.delete(id);
      return;
    }
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) ?? []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

// --- test controls ---------------------------------------------------------------------------
let stall = { ms: 0, count: Infinity };
const requestLog = [];
function logRequest(entry) {
  requestLog.push({ at: Date.now() / 1000, ...entry });
  if (requestLog.length > 500) requestLog.splice(0, requestLog.length - 500);
}

// --- helpers ---------------------------------------------------------------------------------
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function readBody(req, limit = 1 << 20) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new Error('body too large'));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, type = 'text/html; charset=utf-8', headers = {}) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', ...headers });
  res.end(body);
}

const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

function page(title, inner) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font-family:sans-serif;max-width:24em;margin:3em auto}input{display:block;width:100%;margin:.3em 0 .8em}</style>
</head><body><h1>${esc(title)}</h1>${inner}</body></html>`;
}

// --- provider --------------------------------------------------------------------------------
function buildProvider(issuer, pathPrefix) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };

  const ttlFor = (client) => {
    const own = client?.metadata?.().token_ttl;
    return typeof own === 'number' && own > 0 ? own : DEFAULT_TTL;
  };

  const configuration = {
    adapter: Adapter,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    clients: [],
    findAccount(ctx, sub) {
      const user = USERS_BY_SUB.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() { return { sub, ...structuredClone(user.claims) }; },
      };
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username', 'groups'],
      email: ['email', 'email_verified'],
      entitlements: ['entitlements'],
      ak_proxy: ['ak_proxy'],
    },
    // profile/email/... go to userinfo, not to the code flow's id_token (the default)
    conformIdTokenClaims: true,
    responseTypes: ['code'],
    pkce: { required: () => true },
    enabledJWA: {
      idTokenSigningAlgValues: ['RS256', 'HS256'],
    },
    extraClientMetadata: {
      properties: ['token_ttl'],
      validator(ctx, key, value) {
        if (key === 'token_ttl' && value !== undefined && !(Number.isInteger(value) && value > 0)) {
          throw new errors.InvalidClientMetadata('token_ttl must be a positive integer');
        }
      },
    },
    ttl: {
      AccessToken: (ctx, token, client) => ttlFor(client),
      IdToken: (ctx, token, client) => ttlFor(client),
      AuthorizationCode: 60,
      ClientCredentials: 600,
      DeviceCode: 600,
      BackchannelAuthenticationRequest: 600,
      RefreshToken: 14 * 24 * 3600,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    clientBasedCORS: () => true,
    interactions: {
      url: (ctx, interaction) => `${pathPrefix}/interaction/${interaction.uid}`,
    },
    features: {
      devInteractions: { enabled: false },
      // RFC 7662: the module's Bearer header authentication introspects access tokens
      introspection: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource(ctx, form) {
          // auto-submitting "yes, sign me out" form; a test client can POST it as well
          const withYes = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
          ctx.body = page('Sign out', `${withYes}
<p>Signing you out&hellip;</p><noscript><button type="submit" form="op.logoutForm">Sign out</button></noscript>
<script>document.forms[0].submit()</script>`);
        },
        postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<p>You are signed out.</p>');
        },
      },
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Provider error', `<pre id="error">${esc(out.error)}: ${esc(out.error_description ?? '')}</pre>`);
    },
  };

  const provider = new Provider(issuer, configuration);
  provider.proxy = false;
  return provider;
}

// --- login interaction --------------------------------------------------------------------------
async function autoGrant(provider, details, accountId) {
  const { params, prompt } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: params.client_id });
  if (params.scope) grant.addOIDCScope(params.scope);
  const missing = prompt.details ?? {};
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  return grant.save();
}

async function handleInteraction(provider, req, res, rest) {
  const [uid, action] = rest.split('/');
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    return send(res, 400, page('Login expired', `<p id="error">${esc(err.message)}</p>`));
  }
  if (details.uid !== uid) return send(res, 400, page('Login expired', '<p id="error">interaction mismatch</p>'));

  if (req.method === 'GET' && !action) {
    if (details.prompt.name === 'consent') {
      // consent is always granted here
      const grantId = await autoGrant(provider, details, details.session.accountId);
      const to = await provider.interactionResult(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
      return send(res, 303, '', 'text/plain', { location: to });
    }
    const client = await provider.Client.find(details.params.client_id);
    return send(res, 200, page('Sign in', `
<p>Sign in to continue to <b>${esc(client?.clientId ?? '')}</b>.</p>
<form id="login" method="post" action="${esc(`${req.originalPath}/login`)}" autocomplete="off">
  <label>Username <input name="username" autofocus></label>
  <label>Password <input name="password" type="password"></label>
  <button type="submit">Sign in</button>
</form>`));
  }

  if (req.method === 'POST' && action === 'login') {
    const form = new URLSearchParams(await readBody(req));
    const username = form.get('username') ?? '';
    const user = USERS[username];
    if (!user || form.get('password') !== user.password) {
      logRequest({ method: req.method, path: 'interaction/login', result: 'bad-password', username });
      return send(res, 401, page('Sign in', `<p id="error">Invalid username or password.</p>
<form id="login" method="post" action="${esc(req.originalPath)}">
  <label>Username <input name="username" value="${esc(username)}"></label>
  <label>Password <input name="password" type="password"></label>
  <button type="submit">Sign in</button>
</form>`));
    }
    const accountId = subFor(username);
    // login and consent at once: the browser goes straight back to the client
    const grantId = await autoGrant(provider, { ...details, prompt: { details: {} }, grantId: undefined }, accountId);
    const result = { login: { accountId }, consent: { grantId } };
    const to = await provider.interactionResult(req, res, result, { mergeWithLastSubmission: false });
    logRequest({ method: req.method, path: 'interaction/login', result: 'ok', username });
    return send(res, 303, '', 'text/plain', { location: to });
  }
  return send(res, 405, 'method not allowed', 'text/plain');
}

// --- control endpoints ---------------------------------------------------------------------------
async function handleControl(req, res, url) {
  const what = url.pathname.slice('/__control/'.length);
  const json = (status, obj) => send(res, status, JSON.stringify(obj), 'application/json');
  if (req.method === 'POST' && what === 'stall_token') {
    const ms = Number(url.searchParams.get('ms') ?? 0);
    const count = url.searchParams.has('count') ? Number(url.searchParams.get('count')) : Infinity;
    stall = { ms, count };
    return json(200, { ms, count: Number.isFinite(count) ? count : null });
  }
  if (req.method === 'POST' && what === 'reset') {
    stall = { ms: 0, count: Infinity };
    requestLog.length = 0;
    return json(200, { ok: true });
  }
  if (req.method === 'POST' && what === 'clients') {
    let list = JSON.parse(await readBody(req));
    if (!Array.isArray(list)) list = [list];
    for (const c of list) {
      if (!c.client_id) return json(400, { error: 'client_id required' });
      clients.set(c.client_id, c);
    }
    return json(200, { clients: [...clients.keys()] });
  }
  if (req.method === 'GET' && what === 'log') return json(200, requestLog);
  if (req.method === 'GET' && what === 'users') {
    return json(200, Object.fromEntries(Object.entries(USERS).map(([u, v]) => [u, { sub: subFor(u), password: v.password, claims: v.claims }])));
  }
  return json(404, { error: 'unknown control endpoint' });
}

// --- server ----------------------------------------------------------------------------------------
let provider;
let providerCallback;
let pathPrefix = '';

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://localhost');
    if (url.pathname.startsWith('/__control/')) return await handleControl(req, res, url);

    if (pathPrefix) {
      if (url.pathname !== pathPrefix && !url.pathname.startsWith(`${pathPrefix}/`)) {
        return send(res, 404, 'not found', 'text/plain');
      }
    }
    const inner = url.pathname.slice(pathPrefix.length) || '/';
    req.originalPath = url.pathname;

    if (inner.startsWith('/interaction/')) {
      return await handleInteraction(provider, req, res, inner.slice('/interaction/'.length));
    }

    if (inner === '/token' || inner === '/auth' || inner === '/me' || inner.startsWith('/session/end')) {
      const auth = req.headers.authorization ?? '';
      logRequest({
        method: req.method,
        path: inner,
        query: Object.fromEntries(url.searchParams),
        client_auth: auth.startsWith('Basic ') ? 'basic' : (auth.startsWith('Bearer ') ? 'bearer' : 'none'),
      });
    }
    if (inner === '/token' && stall.ms > 0 && stall.count > 0) {
      stall.count -= 1;
      await sleep(stall.ms);
    }

    if (pathPrefix) {
      req.originalUrl = req.url;
      req.url = req.url.slice(pathPrefix.length) || '/';
      if (req.url.startsWith('?')) req.url = `/${req.url}`;
    }
    return providerCallback(req, res);
  } catch (err) {
    console.error(`provider: ${req.method} ${req.url}: ${err.stack ?? err}`);
    if (!res.headersSent) send(res, 500, 'internal error', 'text/plain');
    else res.destroy();
  }
});

server.listen(PORT, HOST, () => {
  const { port } = server.address();
  // kept as given: authentik's issuers end with a slash (http://host/application/o/<slug>/)
  const issuer = args.issuer ?? process.env.PROVIDER_ISSUER ?? `http://${HOST}:${port}`;
  pathPrefix = new URL(issuer).pathname.replace(/\/+$/, '');
  provider = buildProvider(issuer, pathPrefix);
  provider.on('server_error', (ctx, err) => console.error(`provider: server_error: ${err.stack ?? err}`));
  providerCallback = provider.callback();
  process.stdout.write(`ready ${issuer}\n`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
