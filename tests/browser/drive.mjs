// Drives Debian's Chromium through tests/browser/edge.html for tests/e2e/test_browser.py:
//   node drive.mjs '<json config>'   (the config comes from drive() there)
// Prints one JSON object on stdout: what the page saw, or `error` plus the page's state, so
// the Python test asserts on everything and a failure shows where it stopped.
import { launch } from "./chromium.mjs";

const config = JSON.parse(process.argv[2]);
const result = { console: [] };

const browser = await launch(config);
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(config.waitMs);
  page.on("console", (m) => result.console.length < 50 && result.console.push(m.text()));
  page.on("pageerror", (e) => result.console.length < 50 && result.console.push(String(e)));
  // DevTools' view of each response: protocol and connection id, which the page cannot
  // read cross-origin. A stream's entry arrives with its headers, while it is still open.
  const network = [];
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  cdp.on("Network.responseReceived", ({ type, response }) => {
    if (type === "Fetch" && network.length < 200) {
      network.push({ url: response.url, protocol: response.protocol, connection: response.connectionId });
    }
  });
  const traffic = async (listener, base) => {
    const seen = network.filter((n) => n.url.startsWith(base))
      .map((n) => ({ path: n.url.slice(base.length), protocol: n.protocol, connection: n.connection }));
    const protocols = [...new Set(seen.map((n) => n.protocol))].join(", ");
    const connections = new Set(seen.map((n) => n.connection)).size;
    await page.evaluate((...a) => edge.note(...a), listener, "protocol (DevTools)",
      `${protocols}: ${seen.length} responses on ${connections} connection(s)`);
    return seen;
  };
  await page.goto(config.page, { waitUntil: "load" });
  try {
    result.tls = await manyStreams(page, config.tls);
    result.tls.network = await traffic("TLS", config.tls.base);
    result.plain = await sixStreams(page, config.plain);
    result.plain.network = await traffic("plain", config.plain.base);
  } catch (e) {
    result.error = String(e);
    result.state = await page.evaluate(() => edge.streamReport()).catch(String);
  }
  // The screenshot shows whatever happened, failures too.
  await page.screenshot({ path: config.screenshot, fullPage: true });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));

// Waits (polling the page) until every open stream has a frame of `kind` ("heartbeat",
// "batch"), or has ended, which the test then reports instead of a bare timeout.
async function everyStream(page, listener, kind) {
  await page.waitForFunction(
    (k) => edge.streams.every((s) => s.first[k] || s.ended),
    { polling: 50 }, kind);
  await page.evaluate((l, k) => edge.note(l, `${edge.streams.length} streams`,
    `${edge.streams.filter((s) => s.first[k]).length} with a ${k} frame`), listener, kind);
}

// The TLS listener: HTTP/2, so all streams and the unary call share one connection.
async function manyStreams(page, run) {
  const out = {};
  out.register = await page.evaluate((r) => edge.register("TLS", r.base, r.email, r.password), run);
  await page.evaluate((r) => edge.subscribe("TLS", r.base, r.streams), run);
  await everyStream(page, "TLS", "heartbeat");
  out.created = await page.evaluate(
    (r) => edge.createApiKey("TLS", r.base, "browser-h2", r.deadlineMs), run);
  await everyStream(page, "TLS", "batch");
  out.streams = await page.evaluate(() => edge.streamReport());
  out.protocols = await page.evaluate((r) => edge.protocols("TLS", r.base), run);
  await page.evaluate(() => edge.closeStreams("TLS"));
  await page.waitForFunction(() => edge.streams.every((s) => s.ended), { polling: 50 });
  return out;
}

// The plain listener: HTTP/1.1, one connection per open stream, six per origin at most.
async function sixStreams(page, run) {
  const out = {};
  out.register = await page.evaluate((r) => edge.register("plain", r.base, r.email, r.password), run);
  await page.evaluate((r) => edge.subscribe("plain", r.base, r.streams), run);
  await everyStream(page, "plain", "heartbeat");
  out.streams = await page.evaluate(() => edge.streamReport());
  out.blocked = await page.evaluate(
    (r) => edge.createApiKey("plain", r.base, "browser-http1-blocked", r.deadlineMs), run);
  // Freed connections let the same call through: it was waiting for one, nothing else.
  await page.evaluate(() => edge.closeStreams("plain"));
  await page.waitForFunction(() => edge.streams.every((s) => s.ended), { polling: 50 });
  out.after = await page.evaluate(
    (r) => edge.createApiKey("plain", r.base, "browser-http1-after", r.deadlineMs), run);
  out.protocols = await page.evaluate((r) => edge.protocols("plain", r.base), run);
  return out;
}
