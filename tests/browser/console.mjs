// Drives Debian's Chromium through the browser console (clients/web) for
// tests/e2e/test_console.py, one step at a time, so the test can act on the servers (cut
// the network, restart a server, write through the Python stubs) between the page's steps:
//   node console.mjs '<json config>'     config: {chromium, spki, waitMs}
// Then one JSON command per line on stdin, {"id": n, "op": ..., ...}, each answered by one
// JSON line on stdout, {"id": n, "ok": true, "value": ...} or {"id": n, "ok": false,
// "error": ...}. Predicates and page functions arrive as JavaScript source (a function
// expression) and run in the page through DevTools, the way puppeteer runs any function.
// One Chromium serves every test of the module; each page opens in a browser context of
// its own (an incognito profile: its own storage, cache and connections).
import { createInterface } from "node:readline";
import { launch } from "./chromium.mjs";

const config = JSON.parse(process.argv[2]);
const browser = await launch(config);

const pages = [];
const network = [];
const messages = [];
// Files the pages downloaded, by DevTools' download guid: {context, filename, state, path}.
const downloads = new Map();
const downloadWaiters = new Set();
const browserSession = await browser.target().createCDPSession();
browserSession.on("Browser.downloadWillBegin", ({ guid, suggestedFilename }) => {
  downloads.set(guid, { ...(downloads.get(guid) ?? {}), filename: suggestedFilename, state: "inProgress" });
});
browserSession.on("Browser.downloadProgress", ({ guid, state }) => {
  downloads.set(guid, { ...(downloads.get(guid) ?? {}), state });
  for (const check of downloadWaiters) check();
});

// A context that saves downloads into `directory`, each under its guid (DevTools' own
// naming, so two downloads of one name cannot collide).
async function open(url, directory) {
  const context = await browser.createBrowserContext();
  if (directory) {
    await browserSession.send("Browser.setDownloadBehavior", {
      behavior: "allowAndName",
      browserContextId: context.id,
      downloadPath: directory,
      eventsEnabled: true,
    });
  }
  const page = await context.newPage();
  const index = await attach(page);
  await page.goto(url, { waitUntil: "load" });
  return index;
}

// A tab the page opens itself (window.open): same context, and a copy of the opener's
// sessionStorage, as when a person duplicates a tab.
async function duplicate(opener) {
  const [tab] = await Promise.all([
    new Promise((resolve) => opener.once("popup", resolve)),
    opener.evaluate(() => {
      window.open(location.href);
    }),
  ]);
  const index = await attach(tab);
  await tab.waitForFunction(() => document.readyState === "complete", { polling: 50 });
  return index;
}

async function attach(page) {
  page.setDefaultTimeout(config.waitMs);
  await page.setViewport({ width: 1400, height: 900 });
  const index = pages.length;
  pages.push(page);
  page.on("console", (m) => messages.length < 500 && messages.push({ page: index, type: m.type(), text: m.text() }));
  page.on("pageerror", (e) => messages.length < 500 && messages.push({ page: index, type: "pageerror", text: String(e) }));
  // DevTools' view of every response: its protocol and connection (h2 or not), status
  // and, for the document, the headers Envoy sent.
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  cdp.on("Network.responseReceived", ({ type, response }) => {
    if (network.length >= 2000) return;
    const entry = {
      page: index,
      type,
      url: response.url,
      status: response.status,
      protocol: response.protocol,
      connection: response.connectionId,
    };
    if (type === "Document") entry.headers = response.headers;
    // A call refused before it ran answers with its status in the headers (trailers-only).
    if (response.headers["grpc-status"] !== undefined) entry.grpcStatus = Number(response.headers["grpc-status"]);
    network.push(entry);
  });
  return index;
}

function page(command) {
  const found = pages[command.page ?? 0];
  if (!found) throw new Error(`no page ${command.page ?? 0}`);
  return found;
}

function fn(source) {
  // Node compiles it (the page's CSP forbids eval); puppeteer sends its source to DevTools.
  return new Function(`return (${source});`)();
}

const ops = {
  open: (c) => open(c.url, c.downloads),
  // Sets files on an <input type=file> as a person choosing them would (change event).
  upload: async (c) => {
    const input = await page(c).waitForSelector(c.selector);
    await input.uploadFile(...c.paths);
    await input.dispose();
  },
  // From now on, the nth request whose URL ends with `suffix` fails as a reset connection
  // would (the browser never sends it); every other request goes on unchanged.
  failRequest: async (c) => {
    const p = page(c);
    let seen = 0;
    await p.setRequestInterception(true);
    p.on("request", (request) => {
      if (request.isInterceptResolutionHandled()) return;
      if (request.url().endsWith(c.suffix) && ++seen === c.nth) {
        void request.abort("connectionreset");
        return;
      }
      void request.continue();
    });
  },
  // Waits until a download named `filename` completes; its guid (the file's name on disk).
  downloaded: (c) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        downloadWaiters.delete(check);
        reject(new Error(`no completed download of ${c.filename} within ${config.waitMs} ms`));
      }, c.timeoutMs ?? config.waitMs);
      function check() {
        for (const [guid, d] of downloads) {
          if (d.filename === c.filename && d.state === "completed" && !d.taken) {
            d.taken = true;
            clearTimeout(timer);
            downloadWaiters.delete(check);
            resolve(guid);
            return;
          }
        }
      }
      downloadWaiters.add(check);
      check();
    }),
  reload: async (c) => {
    await page(c).reload({ waitUntil: "load" });
  },
  // Sets the value as a paste would, with the input event a page listens to (typing it key
  // by key costs a DevTools round trip per character).
  fill: async (c) => {
    const field = await page(c).waitForSelector(c.selector, { visible: true });
    await field.evaluate((e, v) => {
      e.focus();
      e.value = v;
      e.dispatchEvent(new Event("input", { bubbles: true }));
    }, c.value);
    await field.dispose();
  },
  duplicate: (c) => duplicate(page(c)),
  // Closes the page's whole browser context (its duplicates too).
  close: async (c) => {
    const p = page(c);
    for (const [i, other] of pages.entries()) {
      if (other?.browserContext() === p.browserContext()) pages[i] = null;
    }
    await p.browserContext().close();
  },
  closeTab: async (c) => {
    const p = page(c);
    pages[c.page] = null;
    await p.close();
  },
  // A key pressed (`down`) or let go (`up`) on the element `selector` finds, focused first:
  // a person holding Space on a button.
  key: async (c) => {
    const p = page(c);
    if (c.selector) await p.focus(c.selector);
    await (c.action === "up" ? p.keyboard.up(c.key) : p.keyboard.down(c.key));
  },
  click: async (c) => {
    await page(c).locator(c.selector).click();
  },
  select: async (c) => {
    const p = page(c);
    await p.waitForFunction(
      (s, v) => [...(document.querySelector(s)?.options ?? [])].some((o) => o.value === v),
      { polling: 50 },
      c.selector,
      c.value,
    );
    await p.select(c.selector, c.value);
  },
  // Waits until the function returns something truthy; answers what it returned.
  wait: async (c) => {
    const handle = await page(c).waitForFunction(fn(c.fn), { polling: 50, timeout: c.timeoutMs ?? config.waitMs }, c.arg ?? null);
    return handle.jsonValue();
  },
  eval: (c) => page(c).evaluate(fn(c.fn), c.arg ?? null),
  // The time zone the page's clock reads in (Intl and Date), as a person abroad has it.
  timezone: async (c) => {
    await page(c).emulateTimezone(c.timeZone);
  },
  // The window's size, as a phone's or a desktop's (the page lays itself out again).
  viewport: async (c) => {
    await page(c).setViewport({ width: c.width, height: c.height });
  },
  screenshot: async (c) => {
    await page(c).screenshot({ path: c.path, fullPage: true });
  },
  network: (c) => network.filter((n) => n.page === c.page),
  console: (c) => messages.filter((m) => m.page === c.page),
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.op === "quit") break;
  let answer;
  try {
    const op = ops[command.op];
    if (!op) throw new Error(`unknown op ${command.op}`);
    const value = await op(command);
    answer = { id: command.id, ok: true, value: value ?? null };
  } catch (error) {
    answer = { id: command.id, ok: false, error: String(error) };
    // What the page showed when it went wrong, for the test's failure message.
    const p = pages[command.page ?? 0];
    if (p) {
      answer.page = await p
        .evaluate(() => ({
          connection: document.querySelector('[data-testid="connection"]')?.dataset.history,
          problems: [...document.querySelectorAll('[data-testid="error"], [data-testid="auth-problem"]')].map((e) => e.textContent),
          notice: document.querySelector('[data-testid="notice"]')?.textContent,
          runs: [...document.querySelectorAll('[data-testid="run"]')].map((e) => ({ ...e.dataset, text: e.textContent })),
          // What the page was doing: calls in flight, where it is, what the composer holds.
          busy: document.body.dataset.busy,
          hash: location.hash,
          composer: document.querySelector('[data-testid="message-input"]')?.value,
          earlier: [...document.querySelectorAll('[data-testid="inspect-run"]')].map((e) => e.dataset.run),
        }))
        .catch(String);
      // The page's last calls and how they were answered.
      answer.network = network
        .filter((e) => e.page === (command.page ?? 0) && e.type !== "Document")
        .slice(-8)
        .map((e) => `${new URL(e.url).pathname} ${e.status} ${e.grpcStatus ?? ""}`);
    }
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
