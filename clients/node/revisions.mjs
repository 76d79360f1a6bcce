// An assistant's revisions, seen, tried and restored from Node:
//   node revisions.mjs <host:port> --email E --password P --assistant workspaces/w/assistants/a
//                      [--at N [--against M]] [--conversation C --send TEXT]
//                      [--rollback N [--etag E]]
// Signs in and lists the assistant's revisions, newest first (each change of
// its configuration is one, kept whole). With --at it reads revision N and
// shows which configuration fields differ between it and revision M (the
// current one by default); with --send it also asks TEXT in conversation C
// with revision N instead of the current one (how a change is tried, or
// undone for one conversation) and watches the run to its end. With
// --rollback it makes revision N's configuration current again, as a new
// revision, and lists again. It prints one JSON object on stdout:
// {"user", "revisions", "at", "diff", "run", "rolledBack", "after"}, revision
// numbers as numbers. Exits 0 when done, 1 on an error (the gRPC error on
// stderr, with its google.rpc details), 2 on bad usage.
//
// The functions it uses are exported: listRevisions, getAssistant,
// rollbackAssistant, assistantChanges, askWith.
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { createClients, decodeStatusDetails, Session, TERMINAL, unary, watchRun } from './lib.mjs';

/** The server's largest page: each revision holds a whole configuration. */
const PAGE_SIZE = 50;

/** Milliseconds askWith waits for its run to end unless told otherwise. */
export const RUN_TIMEOUT_MS = 60000;

/**
 * ListAssistantRevisions, every page: `assistant`'s revisions
 * (`workspaces/{w}/assistants/{a}`), newest first.
 */
export async function listRevisions(dispatcher, session, assistant) {
  const request = { parent: assistant, pageSize: PAGE_SIZE, pageToken: '' };
  const found = [];
  do {
    const page = await unary(dispatcher, 'listAssistantRevisions', request, await session.metadata());
    found.push(...page.revisions);
    request.pageToken = page.nextPageToken;
  } while (request.pageToken);
  return found;
}

/**
 * GetAssistant: the assistant as `revision` configured it (0, the default: the
 * current configuration). An earlier revision comes without an etag (it is not
 * updated; rollbackAssistant makes it current); one not kept is NOT_FOUND.
 */
export async function getAssistant(dispatcher, session, name, { revision = 0 } = {}) {
  const answer = await unary(
    dispatcher,
    'getAssistant',
    { name, revision: String(revision) },
    await session.metadata(),
  );
  return answer.assistant;
}

/**
 * RollbackAssistant (owners only): `revision`'s configuration becomes current,
 * a new revision whose origin is ROLLED_BACK. A stale `etag` is ABORTED
 * (ETAG_MISMATCH), so no change made meanwhile is undone unseen. The assistant
 * after it.
 */
export async function rollbackAssistant(dispatcher, session, name, revision, { etag = '' } = {}) {
  const answer = await unary(
    dispatcher,
    'rollbackAssistant',
    { name, revision: String(revision), etag },
    await session.metadata(),
  );
  return answer.assistant;
}

// The fields no revision changes: those the server sets, and workspaceDefault
// (the workspace's routing choice, not the assistant's configuration).
const NOT_CONFIGURATION = new Set(['name', 'etag', 'createTime', 'updateTime', 'revision', 'workspaceDefault']);

// A value with everything at its default left out (as the JSON mapping leaves
// it out), keys in order: the loader fills defaults in, and gives an unset
// message as null but a set, empty one as an object; both are no setting.
function settled(value) {
  if (Array.isArray(value)) return value.length ? value.map(settled) : undefined;
  if (value !== null && typeof value === 'object') {
    const kept = Object.keys(value)
      .sort()
      .map((key) => [key, settled(value[key])])
      .filter(([, v]) => v !== undefined);
    return kept.length ? Object.fromEntries(kept) : undefined;
  }
  const unset = value === null || value === '' || value === 0 || value === '0' || value === false;
  return unset || (typeof value === 'string' && value.endsWith('_UNSPECIFIED')) ? undefined : value;
}

/**
 * The configuration fields (camelCase) whose values differ between two
 * readings of an assistant, such as two of its revisions, in the order the
 * contract declares them: [{ field, from, to }]. A field unset on one side and
 * at its default on the other is no change.
 */
export function assistantChanges(from, to) {
  return Object.keys(from)
    .filter((field) => !NOT_CONFIGURATION.has(field))
    .filter((field) => JSON.stringify(settled(from[field])) !== JSON.stringify(settled(to[field])))
    .map((field) => ({ field, from: from[field], to: to[field] }));
}

/**
 * Asks `text` in `conversation` with `revision` of `assistant` (0: the
 * current one) and watches the run to its end, for `timeoutMs` at most:
 * { run, text }, the run as it ended (its assistantRevision the revision it
 * answered with) and its answer.
 */
export async function askWith(
  { dispatcher },
  session,
  conversation,
  assistant,
  revision,
  text,
  { timeoutMs = RUN_TIMEOUT_MS } = {},
) {
  const sent = await unary(
    dispatcher,
    'sendMessage',
    {
      conversation,
      assistant,
      assistantRevision: String(revision),
      message: { role: 'MESSAGE_ROLE_USER', parts: [{ text }] },
      // A retry of this call would then not start a second run.
      requestId: `node-${randomUUID()}`,
    },
    await session.metadata(),
  );
  let run = sent.run;
  let answer = '';
  const signal = AbortSignal.timeout(timeoutMs);
  for await (const update of watchRun(dispatcher, session, run.name, { signal })) {
    if (update.update === 'delta') answer += update.delta.text;
    if (update.update === 'result') answer = update.result.parts.map((part) => part.text).join('');
    if (update.update === 'stateChange') run = update.stateChange.run;
  }
  // watchRun returns quietly when the signal aborts it.
  if (!TERMINAL.has(run.state)) throw new Error(`${run.name} did not end within ${timeoutMs} ms`);
  return { run, text: answer };
}

// A revision in brief, as the output shows it.
function brief(revision) {
  return {
    name: revision.name,
    revision: Number(revision.revision),
    author: revision.author,
    origin: revision.origin,
    restoredRevision: Number(revision.restoredRevision),
    createTime: revision.createTime?.seconds ?? null,
    assistant: configuration(revision.assistant),
  };
}

// An assistant in brief: what people set most, and what says which it is.
function configuration(assistant) {
  return {
    name: assistant.name,
    revision: Number(assistant.revision),
    etag: assistant.etag,
    displayName: assistant.displayName,
    instructions: assistant.instructions,
    handler: assistant.handler,
  };
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      email: { type: 'string' },
      password: { type: 'string' },
      assistant: { type: 'string' },
      at: { type: 'string' },
      against: { type: 'string', default: '0' },
      conversation: { type: 'string' },
      send: { type: 'string' },
      rollback: { type: 'string' },
      etag: { type: 'string', default: '' },
    },
  });
  const [address] = positionals;
  const number = (value) => (value === undefined ? 0 : Number(value));
  const at = number(values.at);
  const rollback = number(values.rollback);
  const usable =
    address &&
    values.email &&
    values.password &&
    values.assistant &&
    [at, number(values.against), rollback].every((n) => Number.isInteger(n) && n >= 0) &&
    (values.send === undefined || (values.conversation && at > 0)) &&
    (values.at === undefined || at > 0) &&
    (values.rollback === undefined || rollback > 0);
  if (!usable) {
    process.stderr.write(
      'usage: node revisions.mjs <host:port> --email E --password P --assistant A ' +
        '[--at N [--against M]] [--conversation C --send TEXT] [--rollback N [--etag E]]\n',
    );
    process.exit(2);
  }
  const clients = createClients(address);
  try {
    const session = new Session(clients.auth);
    await session.login(values.email, values.password);
    const { dispatcher } = clients;
    const assistant = values.assistant;
    const result = {
      user: session.user.name,
      revisions: (await listRevisions(dispatcher, session, assistant)).map(brief),
      at: null,
      diff: null,
      run: null,
      rolledBack: null,
      after: null,
    };
    if (at) {
      const then = await getAssistant(dispatcher, session, assistant, { revision: at });
      const against = await getAssistant(dispatcher, session, assistant, { revision: number(values.against) });
      result.at = configuration(then);
      result.diff = {
        from: Number(then.revision),
        to: Number(against.revision),
        changes: assistantChanges(then, against),
      };
    }
    if (values.send !== undefined) {
      const { run, text } = await askWith(clients, session, values.conversation, assistant, at, values.send);
      result.run = {
        name: run.name,
        state: run.state,
        assistant: run.assistant,
        assistantRevision: Number(run.assistantRevision),
        text,
      };
    }
    if (rollback) {
      const rolled = await rollbackAssistant(dispatcher, session, assistant, rollback, { etag: values.etag });
      result.rolledBack = configuration(rolled);
      result.after = (await listRevisions(dispatcher, session, assistant)).map(brief);
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
      `revisions: ${error.code !== undefined ? `${error.code} ${error.details}` : error.stack}\n` +
        (details ? `${JSON.stringify(details)}\n` : ''),
    );
    process.exitCode = 1;
  });
}
