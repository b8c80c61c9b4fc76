// A real OpenID Provider (panva's oidc-provider) on loopback for the console tests.
// Usage: node provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI
// People: any login name listed in ACCOUNTS signs in with any password (the provider's
// development login and consent pages). Prints "ready" once it listens.
import Provider from 'oidc-provider';

const [port, clientId, clientSecret, redirectUri] = process.argv.slice(2);
const ACCOUNTS = {
  ann: { email: 'ann@example.com', groups: ['dba'] },
  eve: { email: 'eve@example.com', groups: ['devs'] },
  wendy: { email: 'wendy@example.com', groups: [] },
};

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
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
provider.listen(Number(port), '127.0.0.1', () => console.log('ready'));
