// Builds the console into dist/ (or --outdir DIR): index.html, app.js, app.css, favicon.svg,
// and capture.js (push-to-talk's AudioWorklet, which a browser loads from a URL of its own).
//   node build.mjs [--outdir DIR] [--sourcemap]
// What it writes is exactly what Envoy serves (`switchboard envoy --console DIR`): every
// file of the directory becomes one route, so nothing else may land there.
import { build } from "esbuild";
import { copyFile, mkdir, readdir, rm, stat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    outdir: { type: "string", default: join(here, "dist") },
    sourcemap: { type: "boolean", default: false },
  },
});
const outdir = resolve(values.outdir);

// A clean directory: a stale file from an older build would be served too.
await rm(outdir, { recursive: true, force: true });
await mkdir(outdir, { recursive: true });
await build({
  entryPoints: { app: join(here, "src", "main.ts"), capture: join(here, "src", "capture.ts") },
  outdir,
  bundle: true,
  minify: true,
  // One classic script with `defer`: no module loading, nothing inline (the CSP allows
  // scripts from 'self' only).
  format: "iife",
  target: ["chrome120", "firefox120", "safari17"],
  sourcemap: values.sourcemap ? "linked" : false,
  legalComments: "none",
  logLevel: "warning",
});
for (const name of ["index.html", "app.css", "favicon.svg"]) {
  await copyFile(join(here, "static", name), join(outdir, name));
}
const files = await readdir(outdir);
let total = 0;
for (const name of files.sort()) {
  const { size } = await stat(join(outdir, name));
  total += size;
  console.log(`${name.padEnd(14)} ${String(size).padStart(8)} bytes`);
}
console.log(`${"total".padEnd(14)} ${String(total).padStart(8)} bytes in ${outdir}`);
