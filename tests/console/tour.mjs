// The console act of `cargo xtask demo`: an approver signs in through the OpenID provider,
// finds the request a gated workload filed, approves it, then looks at sessions, one
// session's replay and the audit page, taking a screenshot of each page (the same pictures
// `docs/screenshots/` shows; regenerate them by running the demo).
//
// Usage: node tour.mjs CONSOLE_URL LOGIN OUT_DIR REQUEST_ID REPLAY_SESSION_ID
// Prints one line per step ("step NAME FILE") and exits non-zero on any failure.
import { chromium } from 'playwright-core';
import path from 'node:path';

const [consoleUrl, login, outDir, requestId, replayId] = process.argv.slice(2);
if (!replayId) {
  console.error('usage: node tour.mjs CONSOLE_URL LOGIN OUT_DIR REQUEST_ID REPLAY_SESSION_ID');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox'],
});
// The demo's console has a certificate from the host's own CA, which this browser does not
// know; a real deployment uses `tls_cert` or trusts the host CA.
const context = await browser.newContext({
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 800 },
});
const page = await context.newPage();
page.setDefaultTimeout(15000);

async function shot(name, target = page, fullPage = true) {
  const file = path.join(outDir, `${name}.png`);
  await target.screenshot({ path: file, fullPage });
  console.log(`step ${name} ${file}`);
}

async function clickAndWait(selector) {
  await Promise.all([page.waitForNavigation(), page.click(selector)]);
}

try {
  // Not signed in: the console sends the browser to the provider.
  await page.goto(`${consoleUrl}/`);
  if (!page.url().includes('/interaction/')) {
    throw new Error(`expected the provider's sign-in page, got ${page.url()}`);
  }
  await page.fill('input[name=login]', login);
  await page.fill('input[name=password]', 'demo');
  await clickAndWait('button[type=submit]');
  // The provider's consent page, then back to the console.
  await clickAndWait('button[type=submit]');
  if (!page.url().startsWith(consoleUrl)) {
    throw new Error(`sign-in did not come back to the console: ${page.url()}`);
  }

  const card = `[data-request="${requestId}"]`;
  for (let i = 0; !(await page.locator(card).count()); i++) {
    if (i > 50) throw new Error(`request ${requestId} never appeared in the console`);
    await page.waitForTimeout(200);
    await page.reload();
  }
  await shot('requests');

  // The same page as a phone shows it.
  const phone = await context.newPage();
  await phone.setViewportSize({ width: 390, height: 844 });
  await phone.goto(`${consoleUrl}/`);
  await shot('requests-phone', phone);
  await phone.close();

  await clickAndWait(`${card} button.approve`);
  if (!(await page.innerText('body')).includes(`Request ${requestId} approved`)) {
    throw new Error(`the console did not confirm the approval: ${await page.innerText('body')}`);
  }
  await shot('approved');

  // Each page must be shown to Ann, not refused (she approves what these sessions used).
  async function visit(url) {
    const r = await page.goto(url);
    if (!r || r.status() !== 200) {
      throw new Error(`${url}: ${r ? r.status() : 'no answer'}: ${await page.innerText('body')}`);
    }
  }
  await visit(`${consoleUrl}/sessions`);
  await shot('sessions', page, false);
  await visit(`${consoleUrl}/sessions/${replayId}`);
  await shot('replay');
  await visit(`${consoleUrl}/audit`);
  await shot('audit', page, false);
} catch (e) {
  console.error(`console tour failed: ${e && e.message || e}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
