// Debian's Chromium as every browser test starts it (drive.mjs, console.mjs).
import puppeteer from "puppeteer-core";

// config: {chromium: its path, spki: the dev certificate's key hash, waitMs, args: more
// flags (optional: the fake microphone of the push-to-talk test)}
export function launch(config) {
  return puppeteer.launch({
    executablePath: config.chromium,
    headless: true,
    // Over a pipe, not a port: if the driver dies, Chromium sees the pipe close and exits.
    pipe: true,
    // puppeteer passes the first and the fourth itself; named here so that stays true.
    args: [
      "--headless=new",
      // Root in a container: Chromium's sandbox needs namespaces it may not get.
      "--no-sandbox",
      "--disable-gpu",
      // No connections of Chromium's own (updates, field trials) beside the page's.
      "--disable-background-networking",
      // Trust exactly the dev certificate's key, not every certificate.
      `--ignore-certificate-errors-spki-list=${config.spki}`,
      ...(config.args ?? []),
    ],
    timeout: config.waitMs,
  });
}
