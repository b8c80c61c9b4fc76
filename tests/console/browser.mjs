// Drives Debian's chromium (headless) with playwright-core for the console tests: one JSON
// command per stdin line, one JSON answer per stdout line, one browser for the whole test.
//   {"op":"context"}                      a fresh context (no cookies: another person)
//   {"op":"goto","url":U}                 -> {status,url,text}
//   {"op":"fill","selector":S,"value":V}
//   {"op":"click","selector":S}           clicks and waits for the next page -> {url,text}
//   {"op":"value","selector":S}           -> {value}
//   {"op":"post","url":U,"form":{},"headers":{}}  with this context's cookies -> {status,text}
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox'],
});
let context = null;
let page = null;
async function fresh() {
  if (context) await context.close();
  context = await browser.newContext({ ignoreHTTPSErrors: true });
  page = await context.newPage();
  page.setDefaultTimeout(15000);
}
await fresh();

async function answer(cmd) {
  switch (cmd.op) {
    case 'context': await fresh(); return {};
    case 'goto': {
      const r = await page.goto(cmd.url);
      return { status: r ? r.status() : 0, url: page.url(), text: await page.innerText('body') };
    }
    case 'fill': await page.fill(cmd.selector, cmd.value); return {};
    case 'click': {
      await Promise.all([page.waitForNavigation(), page.click(cmd.selector)]);
      return { url: page.url(), text: await page.innerText('body') };
    }
    case 'value': return { value: await page.inputValue(cmd.selector) };
    case 'post': {
      const r = await context.request.post(cmd.url, {
        form: cmd.form, headers: cmd.headers || {}, maxRedirects: 0, ignoreHTTPSErrors: true,
      });
      return { status: r.status(), text: await r.text(), location: r.headers()['location'] || null };
    }
    case 'close': await browser.close(); return {};
    default: throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
console.log(JSON.stringify({ ready: true }));
for await (const line of lines) {
  let out;
  try { out = { ok: true, ...(await answer(JSON.parse(line))) }; }
  catch (e) { out = { ok: false, error: String(e && e.message || e) }; }
  console.log(JSON.stringify(out));
  if (JSON.parse(line).op === 'close') break;
}
process.exit(0);
