// Your data, taken out of Switchboard and then deleted, from Node (docs/privacy.md):
//   node yourdata.mjs <host:port> --email E --password P [--out PATH]
//                     [--hand-over workspaces/w=users/u ...] [--no-export] [--no-delete]
// Signs in, then, unless told not to: asks for an export of everything the
// deployment holds about you (ExportMyData), waits for the archive
// (GetDataExport), downloads it to PATH (DownloadFile of the export's name; a new
// file in the temporary directory by default), checks it against the export's
// size and SHA-256 and lists the ZIP's entries; then deletes the account
// (DeleteMyAccount), naming each workspace it owns with no other owner: handed
// over to the member --hand-over says, else deleted with everything in it. The
// tokens it had are refused from then on, which it shows by presenting them
// again. It prints one JSON object on stdout: {"user", "export", "downloaded",
// "ownedAlone", "deleted", "refused"} (null for a step not taken). Exits 0 when
// done, 1 on an error (the gRPC error on stderr, with its google.rpc details), 2
// on bad usage.
//
// The functions it uses are exported: exportMyData, getDataExport,
// waitForExport, downloadExport, zipEntries, ownedAlone, deleteMyAccount.
import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { createClients, decodeStatusDetails, grpc, Session, unary } from './lib.mjs';

/** Milliseconds waitForExport waits for the archive unless told otherwise. */
export const EXPORT_TIMEOUT_MS = 600000;
/** Milliseconds a download may take unless told otherwise. */
export const DOWNLOAD_TIMEOUT_MS = 600000;
// Polls start quick (a small account's archive is ready at once) and slow down
// to one every few seconds for a large one.
const FIRST_POLL_MS = 100;
const MAX_POLL_MS = 3000;
const PAGE_SIZE = 100;
// A download broken by these is opened again from the bytes written.
const RESUMABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN]);
const MAX_RESUMES = 5;

/**
 * ExportMyData: starts writing one archive of your data; the export, RUNNING
 * (while one runs, asking again returns it; at most 5 a day, then
 * RESOURCE_EXHAUSTED). Keyed by `requestId`, so a retry returns the same export.
 */
export async function exportMyData(context, session, { requestId = `node-${randomUUID()}` } = {}) {
  const answer = await unary(context, 'exportMyData', { requestId }, await session.metadata());
  return answer.export;
}

/** GetDataExport: an export of yours (`users/{u}/exports/{e}`) as it stands now. */
export async function getDataExport(context, session, name) {
  const answer = await unary(context, 'getDataExport', { name }, await session.metadata());
  return answer.export;
}

/** An Error carrying the google.rpc.Status a FAILED export says why with. */
export class ExportFailedError extends Error {
  constructor(name, status) {
    super(`${name} failed: ${status?.message || 'no reason given'}`);
    this.code = status?.code ?? grpc.status.UNKNOWN;
    this.status = status;
  }
}

/**
 * Polls GetDataExport until the export SUCCEEDED (returned, with its size,
 * SHA-256 and expireTime) or FAILED (ExportFailedError); `timeoutMs` at most.
 */
export async function waitForExport(context, session, name, { timeoutMs = EXPORT_TIMEOUT_MS } = {}) {
  const deadline = Date.now() + timeoutMs;
  let delay = FIRST_POLL_MS;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    const answer = await unary(context, 'getDataExport', { name }, await session.metadata(), left);
    const current = answer.export;
    if (current.state === 'DATA_EXPORT_STATE_SUCCEEDED') return current;
    if (current.state === 'DATA_EXPORT_STATE_FAILED') throw new ExportFailedError(name, current.error);
    await sleep(Math.min(delay, Math.max(0, deadline - Date.now())));
    delay = Math.min(2 * delay, MAX_POLL_MS);
  }
  throw new Error(`${name} was not written within ${timeoutMs} ms`);
}

// One DownloadFile stream from `state.written`, each chunk appended to `handle`.
async function downloadOnce(context, session, name, handle, state, deadline) {
  const call = context.downloadFile(
    { name, readOffset: String(state.written) },
    await session.metadata(),
    { deadline: new Date(deadline) },
  );
  try {
    for await (const frame of call) {
      if (frame.file && !state.file) state.file = frame.file;
      if (!frame.data?.length) continue;
      if (BigInt(frame.offset) !== BigInt(state.written)) {
        throw new Error(`${name}: a chunk at offset ${frame.offset}, expected ${state.written}`);
      }
      await handle.write(frame.data);
      state.digest.update(frame.data);
      state.written += frame.data.length;
    }
  } finally {
    call.cancel();
  }
}

/**
 * DownloadFile of a finished export into the file `out`, opened again at the
 * bytes written after a break; throws unless what arrived has the export's
 * size and SHA-256. { path, sizeBytes, sha256 }.
 */
export async function downloadExport(context, session, exported, out, { timeoutMs = DOWNLOAD_TIMEOUT_MS } = {}) {
  const deadline = Date.now() + timeoutMs;
  const state = { file: null, written: 0, digest: createHash('sha256') };
  const handle = await fs.open(out, 'w');
  try {
    for (let failures = 0; ; ) {
      const before = state.written;
      try {
        await downloadOnce(context, session, exported.name, handle, state, deadline);
        break;
      } catch (error) {
        if (state.written > before) failures = 0;
        if (!RESUMABLE.has(error.code) || failures >= MAX_RESUMES) throw error;
        await sleep(Math.min(MAX_POLL_MS, FIRST_POLL_MS * 2 ** failures));
        failures += 1;
      }
    }
  } finally {
    await handle.close();
  }
  const sha256 = state.digest.digest('hex');
  const expected = [String(exported.sizeBytes), exported.sha256];
  const streamed = [String(state.file?.sizeBytes), state.file?.sha256];
  if (String(state.written) !== expected[0] || sha256 !== expected[1] || streamed.join() !== expected.join()) {
    throw new Error(
      `${exported.name}: ${state.written} bytes with SHA-256 ${sha256}, the export says ${expected[0]} and ${expected[1]}`,
    );
  }
  return { path: out, sizeBytes: state.written, sha256 };
}

/**
 * The entries of the ZIP at `file`, read from its central directory (only the
 * file's tail and the directory are read): [{ name, sizeBytes }]. Archives
 * that need ZIP64 (over 4 GiB or 65535 entries) are refused.
 */
export async function zipEntries(file) {
  const handle = await fs.open(file, 'r');
  try {
    const { size } = await handle.stat();
    // The end record (22 bytes) is followed by a comment of at most 65535.
    const tailSize = Math.min(size, 22 + 65535);
    const tail = Buffer.alloc(tailSize);
    await handle.read(tail, 0, tailSize, size - tailSize);
    let end = -1;
    for (let i = tailSize - 22; i >= 0; i -= 1) {
      if (tail.readUInt32LE(i) === 0x06054b50) {
        end = i;
        break;
      }
    }
    if (end < 0) throw new Error(`${file} is not a ZIP archive`);
    const count = tail.readUInt16LE(end + 10);
    const directorySize = tail.readUInt32LE(end + 12);
    const directoryOffset = tail.readUInt32LE(end + 16);
    if (count === 0xffff || directorySize === 0xffffffff || directoryOffset === 0xffffffff) {
      throw new Error(`${file} is a ZIP64 archive, which this reader does not list`);
    }
    const directory = Buffer.alloc(directorySize);
    await handle.read(directory, 0, directorySize, directoryOffset);
    const entries = [];
    for (let at = 0, n = 0; n < count; n += 1) {
      if (directory.readUInt32LE(at) !== 0x02014b50) throw new Error(`${file}: a broken central directory`);
      const nameLength = directory.readUInt16LE(at + 28);
      const extraLength = directory.readUInt16LE(at + 30);
      const commentLength = directory.readUInt16LE(at + 32);
      entries.push({
        name: directory.toString('utf8', at + 46, at + 46 + nameLength),
        sizeBytes: directory.readUInt32LE(at + 24),
      });
      at += 46 + nameLength + extraLength + commentLength;
    }
    return entries;
  } finally {
    await handle.close();
  }
}

// Every page of a List call: the items under `field`.
async function everyPage(client, method, request, session, field) {
  const found = [];
  let pageToken = '';
  do {
    const page = await unary(client, method, { ...request, pageSize: PAGE_SIZE, pageToken }, await session.metadata());
    found.push(...page[field]);
    pageToken = page.nextPageToken;
  } while (pageToken);
  return found;
}

/**
 * The workspaces `user` (`users/{u}`) is the only owner of: each must be named
 * when the account is deleted. In ListWorkspaces' order.
 */
export async function ownedAlone(context, session, user) {
  const alone = [];
  for (const workspace of await everyPage(context, 'listWorkspaces', {}, session, 'workspaces')) {
    const members = await everyPage(context, 'listWorkspaceMembers', { parent: workspace.name }, session, 'members');
    const owners = members.filter((m) => m.role === 'WORKSPACE_ROLE_OWNER').map((m) => m.user);
    if (owners.length === 1 && owners[0] === user) alone.push(workspace.name);
  }
  return alone;
}

/**
 * DeleteMyAccount: `email` confirms it (compared case-insensitively); each of
 * `remove` is deleted at once with everything in it, each of `handOver`
 * ({ workspace: 'users/{u}' }) goes to that member, who becomes its owner.
 * Every workspace owned alone must be named (else FAILED_PRECONDITION naming
 * it). Needs a signed-in session, not an API key. Afterwards every credential
 * of the account is refused, so the session forgets its tokens. The Erasure
 * under way.
 */
export async function deleteMyAccount(auth, session, email, { remove = [], handOver = {} } = {}) {
  const workspaces = [
    ...remove.map((workspace) => ({ workspace, action: 'OWNED_WORKSPACE_ACTION_DELETE' })),
    ...Object.entries(handOver).map(([workspace, newOwner]) => ({
      workspace,
      action: 'OWNED_WORKSPACE_ACTION_HAND_OVER',
      newOwner,
    })),
  ];
  const answer = await unary(auth, 'deleteMyAccount', { confirmEmail: email, workspaces }, await session.metadata());
  session.tokens = null;
  return answer.erasure;
}

// The gRPC code name a call ended with ('OK' if it was accepted).
async function codeOf(call) {
  try {
    await call();
    return 'OK';
  } catch (error) {
    if (error.code === undefined) throw error;
    return Object.keys(grpc.status).find((name) => grpc.status[name] === error.code);
  }
}

function parseHandOver(values) {
  const handOver = {};
  for (const value of values) {
    const [workspace, user, ...rest] = value.split('=');
    if (rest.length || !workspace?.startsWith('workspaces/') || !user?.startsWith('users/')) return null;
    handOver[workspace] = user;
  }
  return handOver;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      email: { type: 'string' },
      password: { type: 'string' },
      out: { type: 'string' },
      'hand-over': { type: 'string', multiple: true, default: [] },
      'no-export': { type: 'boolean', default: false },
      'no-delete': { type: 'boolean', default: false },
    },
  });
  const [address] = positionals;
  const handOver = parseHandOver(values['hand-over']);
  if (!address || !values.email || !values.password || handOver === null) {
    process.stderr.write(
      'usage: node yourdata.mjs <host:port> --email E --password P [--out PATH] ' +
        '[--hand-over workspaces/w=users/u ...] [--no-export] [--no-delete]\n',
    );
    process.exit(2);
  }
  const clients = createClients(address);
  try {
    const { auth, context } = clients;
    const session = new Session(auth);
    await session.login(values.email, values.password);
    const result = {
      user: session.user.name,
      export: null,
      downloaded: null,
      ownedAlone: null,
      deleted: null,
      refused: null,
    };
    if (!values['no-export']) {
      const started = await exportMyData(context, session);
      const ready = await waitForExport(context, session, started.name);
      result.export = {
        name: ready.name,
        state: ready.state,
        sizeBytes: ready.sizeBytes,
        sha256: ready.sha256,
        mediaType: ready.mediaType,
        expireTime: new Date(Number(ready.expireTime.seconds) * 1000).toISOString(),
      };
      const out = values.out ?? path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'switchboard-export-')), 'export.zip');
      const downloaded = await downloadExport(context, session, ready, path.resolve(out));
      result.downloaded = { ...downloaded, entries: await zipEntries(downloaded.path) };
    }
    if (!values['no-delete']) {
      const alone = await ownedAlone(context, session, session.user.name);
      result.ownedAlone = alone;
      const remove = alone.filter((workspace) => !(workspace in handOver));
      const kept = session.tokens;
      const erasure = await deleteMyAccount(auth, session, values.email, { remove, handOver });
      result.deleted = {
        erasure: erasure.name,
        user: erasure.user,
        state: erasure.state,
        pendingParts: erasure.pendingParts,
        workspaces: [...remove, ...Object.keys(handOver)],
      };
      // The tokens the session had, presented by hand: both refused.
      const bearer = new grpc.Metadata();
      bearer.set('authorization', `Bearer ${kept.accessToken}`);
      result.refused = {
        accessToken: await codeOf(() => unary(auth, 'getPrincipal', {}, bearer)),
        refreshToken: await codeOf(() => unary(auth, 'refreshToken', { refreshToken: kept.refreshToken })),
      };
      if (Object.values(result.refused).includes('OK')) {
        throw new Error(`a token of the deleted account was still accepted: ${JSON.stringify(result.refused)}`);
      }
    }
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    clients.close();
  }
}

if (path.resolve(process.argv[1] ?? '') === fileURLToPath(import.meta.url)) {
  main().catch((error) => {
    const details = decodeStatusDetails(error.metadata);
    process.stderr.write(
      `yourdata: ${error.code !== undefined ? `${error.code} ${error.details ?? error.message}` : error.stack}\n` +
        (details ? `${JSON.stringify(details)}\n` : ''),
    );
    process.exitCode = 1;
  });
}
