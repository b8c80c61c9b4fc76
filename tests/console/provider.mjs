// A real OpenID Provider (panva's oidc-provider) on loopback for the console tests.
// Usage: node provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI
// People: any login name listed in ACCOUNTS signs in with any password (the provider's
// development login and consent pages). The password says how they authenticated: `otp` a
// second factor (acr urn:jitgate:mfa), anything else a password only (acr urn:jitgate:pwd),
// so step-up policies (approval_acr) can be tested. Prints "ready" once it listens.
import Provider from 'oidc-provider';

const [port, clientId, clientSecret, redirectUri] = process.argv.slice(2);
const ACCOUNTS = {
  ann: { email: 'ann@example.com', groups: ['dba'] },
  eve: { email: 'eve@example.com', groups: ['devs'] },
  wendy: { email: 'wendy@example.com', groups: [] },
};

const PWD = 'urn:jitgate:pwd';
const MFA = 'urn:jitgate:mfa';

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: {
    acr: null, auth_time: null, sid: null,
    openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'],
  },
  acrValues: [PWD, MFA],
  scopes: ['openid', 'email', 'groups'],
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['console-e2e-cookie-key'] },
  // The claims asked for by scope go into the ID token itself (the console reads no userinfo).
  conformIdTokenClaims: false,
  async findAccount(ctx, id) {
    const who = ACCOUNTS[id];
    if (!who) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: who.email, email_verified: true, groups: who.groups };
      },
    };
  },
});
// The development login page's form, answered here so the sign-in carries an acr: a POST to
// /interaction/UID while the login prompt is up.
provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || !/^\/interaction\/[^/]+$/.test(ctx.path)) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.prompt.name !== 'login') return next();
  let raw = '';
  for await (const chunk of ctx.req) raw += chunk;
  const form = new URLSearchParams(raw);
  const accountId = form.get('login');
  const mfa = form.get('password') === 'otp';
  await provider.interactionFinished(ctx.req, ctx.res, {
    login: { accountId, acr: mfa ? MFA : PWD, amr: mfa ? ['pwd', 'otp'] : ['pwd'] },
  }, { mergeWithLastSubmission: false });
  ctx.respond = false;
});
provider.listen(Number(port), '127.0.0.1', () => console.log('ready'));
