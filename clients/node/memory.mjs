// What an assistant remembers about you, seen and kept from Node:
//   node memory.mjs <host:port> --email E --password P --workspace workspaces/w
//                   [--validity current|retired|all] [--forget NAME]
// Signs in, lists the user's memory in the workspace (what was formed there,
// and what people wrote, which follows the user everywhere; the current items
// unless --validity says otherwise), shows each item's history (its versions
// and those of the items it replaced), then with --forget deletes that item
// for good and lists again. It prints one JSON object on stdout:
// {"user", "items", "histories": {name: [versions]}, "forgotten", "after"}.
// Exits 0 when done, 1 on an error (the gRPC error on stderr, with its
// google.rpc details), 2 on bad usage.
//
// The functions it uses are exported: listMemory, getMemory, correctMemory,
// retireMemory, forgetMemory, setMemoryPolicy.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { createClients, decodeStatusDetails, Session, unary } from './lib.mjs';

/** A protobuf Timestamp of a Date. */
export function timestamp(date) {
  const ms = date.getTime();
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

/**
 * ListMemoryItems, every page up to `limit`: `parent`'s items (`users/{u}`,
 * `workspaces/{w}` or a conversation of it), newest first. `validity`:
 * 'current' (the default), 'retired' or 'all'; `validAt` (a Date): the items
 * true then instead; `workspace`, in a user's scope: only what was formed in
 * that workspace, and what people wrote.
 */
export async function listMemory(
  context,
  session,
  parent,
  { validity = 'current', validAt = null, workspace = '', kinds = [], limit = 1000 } = {},
) {
  const request = {
    parent,
    validity: `MEMORY_VALIDITY_${validity.toUpperCase()}`,
    workspace,
    kinds,
    pageToken: '',
  };
  if (validAt) request.validAt = timestamp(validAt);
  const found = [];
  while (found.length < limit) {
    request.pageSize = Math.min(100, limit - found.length);
    const page = await unary(context, 'listMemoryItems', request, await session.metadata());
    found.push(...page.memoryItems);
    request.pageToken = page.nextPageToken;
    if (!request.pageToken) break;
  }
  return found.slice(0, limit);
}

/** GetMemoryItem: { memoryItem, history } (history oldest first, with `history`). */
export async function getMemory(context, session, name, { history = false } = {}) {
  return unary(context, 'getMemoryItem', { name, includeHistory: history }, await session.metadata());
}

async function updateMemory(context, session, memoryItem, paths) {
  const answer = await unary(
    context,
    'updateMemoryItem',
    { memoryItem, updateMask: { paths } },
    await session.metadata(),
  );
  return answer.memoryItem;
}

/** A new content: a version in its history. A stale `etag` is ABORTED (ETAG_MISMATCH). */
export function correctMemory(context, session, name, content, { etag = '' } = {}) {
  return updateMemory(context, session, { name, etag, content }, ['content']);
}

/** No longer true since `at` (now by default), with `reason`; kept in its history. */
export function retireMemory(context, session, name, { reason = '', at = new Date(), etag = '' } = {}) {
  return updateMemory(context, session, { name, etag, invalidTime: timestamp(at), invalidReason: reason }, [
    'invalid_time',
    'invalid_reason',
  ]);
}

/** DeleteMemoryItem: gone for good, with its history (the items it superseded, every version). */
export async function forgetMemory(context, session, name) {
  await unary(context, 'deleteMemoryItem', { name }, await session.metadata());
}

/**
 * Sets the memory policy of an assistant (`workspaces/{w}/assistants/{a}`,
 * through `dispatcher`) or of a workspace (`workspaces/{w}`, through
 * `context`); null takes the workspace's (an assistant's) or turns forming off
 * (a workspace's). The updated assistant or workspace.
 */
export async function setMemoryPolicy({ context, dispatcher }, session, target, policy) {
  const memoryPolicy = policy ?? undefined;
  if (target.includes('/assistants/')) {
    const answer = await unary(
      dispatcher,
      'updateAssistant',
      { assistant: { name: target, memoryPolicy }, updateMask: { paths: ['memory_policy'] } },
      await session.metadata(),
    );
    return answer.assistant;
  }
  const answer = await unary(
    context,
    'updateWorkspace',
    { workspace: { name: target, memoryPolicy }, updateMask: { paths: ['memory_policy'] } },
    await session.metadata(),
  );
  return answer.workspace;
}

// An item in brief, as the output shows it.
function brief(item) {
  return {
    name: item.name,
    kind: item.kind,
    content: item.content,
    version: item.version,
    validTime: item.validTime?.seconds ?? null,
    invalidTime: item.invalidTime?.seconds ?? null,
    invalidReason: item.invalidReason,
    supersedes: item.supersedes,
    supersededBy: item.supersededBy,
    workspace: item.workspace,
  };
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      email: { type: 'string' },
      password: { type: 'string' },
      workspace: { type: 'string' },
      validity: { type: 'string', default: 'current' },
      forget: { type: 'string' },
    },
  });
  const [address] = positionals;
  if (!address || !values.email || !values.password || !values.workspace) {
    process.stderr.write(
      'usage: node memory.mjs <host:port> --email E --password P --workspace W [--validity V] [--forget NAME]\n',
    );
    process.exit(2);
  }
  const clients = createClients(address);
  try {
    const session = new Session(clients.auth);
    await session.login(values.email, values.password);
    const user = session.user.name;
    const options = { validity: values.validity, workspace: values.workspace };
    const items = await listMemory(clients.context, session, user, options);
    const histories = {};
    for (const item of items) {
      const { history } = await getMemory(clients.context, session, item.name, { history: true });
      histories[item.name] = history.map((v) => ({
        memoryItem: v.memoryItem,
        version: v.version,
        change: v.change,
        content: v.content,
        editor: v.editor,
        invalidReason: v.invalidReason,
      }));
    }
    const result = { user, items: items.map(brief), histories, forgotten: null, after: null };
    if (values.forget) {
      await forgetMemory(clients.context, session, values.forget);
      result.forgotten = values.forget;
      result.after = (await listMemory(clients.context, session, user, { ...options, validity: 'all' })).map(
        brief,
      );
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
      `memory: ${error.code !== undefined ? `${error.code} ${error.details}` : error.stack}\n` +
        (details ? `${JSON.stringify(details)}\n` : ''),
    );
    process.exitCode = 1;
  });
}
