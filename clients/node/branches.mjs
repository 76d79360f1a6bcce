// A conversation's branches, made, read and pruned from Node, and forks of it:
//   node branches.mjs <host:port> --email E --password P --conversation C
//                     [--send TEXT] [--edit TEXT [--message M]] [--regenerate [--answer A]]
//                     [--switch M | --branch N] [--delete M [--with-later]] [--fork TITLE [--at M]]
// Signs in, then, in this order and each only if asked: sends TEXT in
// conversation C and waits for its answer; edits message M (by default the
// one just sent) to TEXT, a new version beside it on a new branch that
// becomes the active one, and waits for the run that answers it there;
// regenerates answer A (by default the latest answer of this run), a new
// answer beside it on a new branch, active too; makes active the branch
// through message M that changed last (what picking M in a "< 1 / 2 >"
// switcher does) or branch N; deletes message M, with the messages after it on
// the active branch if --with-later. Last it reads the active branch, each
// message with where it stands among its versions ("2 / 2"; "" when it has
// no other), and, if asked, forks C at message M (by default the last one it
// read): a new conversation titled TITLE that shares the history up to M and
// goes on alone. It prints one JSON object on stdout: {"user", "sent",
// "edited", "regenerated", "switched", "deleted", "branch", "forked"} (null
// for a step not asked). Exits 0 when done, 1 on an error (the gRPC error on
// stderr, with its google.rpc details), 2 on bad usage.
//
// The functions it uses are exported: editMessage, regenerate, switchBranch,
// deleteMessage, branchMessages, forkConversation, awaitAnswer,
// siblingPosition.
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import {
  AFFINITY_HEADER,
  affinity,
  createClients,
  decodeStatusDetails,
  Session,
  TERMINAL,
  unary,
  watchRun,
} from './lib.mjs';

/** How many messages branchMessages asks for a page: each carries its parts whole. */
const PAGE_SIZE = 100;

/** Milliseconds awaitAnswer waits for a run to end unless told otherwise. */
export const RUN_TIMEOUT_MS = 60000;

// A user message of one text part.
function userText(text) {
  return { role: 'MESSAGE_ROLE_USER', parts: [{ text }] };
}

/**
 * SendMessage with `replaces`: `text` becomes a new version of the user
 * message `message` (`workspaces/{w}/conversations/{c}/messages/{m}`), its
 * sibling on a new branch that starts just before it; that branch becomes the
 * active one and the run answers there. Only the message's author may edit it
 * (PERMISSION_DENIED). `request` sets more of the SendMessageRequest (an
 * assistant, a handler, a timeout). { run, message }: the run and the new
 * version.
 */
export async function editMessage(dispatcher, session, message, text, request = {}) {
  const conversation = affinity(message);
  if (!conversation || conversation === message) {
    throw new TypeError(`${JSON.stringify(message)} names no message of a conversation`);
  }
  return unary(
    dispatcher,
    'sendMessage',
    {
      requestId: `node-${randomUUID()}`,
      ...request,
      conversation,
      message: userText(text),
      replaces: message,
    },
    await session.metadata(),
  );
}

/**
 * RegenerateMessage: a new run answers again the user message that `answer`
 * (a message a run wrote) answers, on a new branch beside it, which becomes
 * the active one. { run, message }: the run (its outputMessage, once it ends,
 * is the new answer, a sibling of the old one) and the user message.
 */
export async function regenerate(dispatcher, session, answer) {
  const metadata = await session.metadata();
  // The request names its conversation only in a field routing does not read.
  if (affinity(answer)) metadata.set(AFFINITY_HEADER, affinity(answer));
  return unary(dispatcher, 'regenerateMessage', { message: answer, requestId: `node-${randomUUID()}` }, metadata);
}

/**
 * SwitchBranch: makes `branch` (from 1), or the branch through `message` that
 * changed last, the conversation's active one. A stale `etag` is ABORTED.
 * The conversation, with its activeBranch and branchCount.
 */
export async function switchBranch(context, session, conversation, { message = '', branch = 0, etag = '' } = {}) {
  const answer = await unary(
    context,
    'switchBranch',
    { conversation, message, branch, etag },
    await session.metadata(),
  );
  return answer.conversation;
}

/**
 * DeleteMessage: deletes `name` and, with `withLater`, the messages after it
 * on the active branch (the answers below it). { deleted, conversation }:
 * the names deleted, in order, and the conversation after it. Editors may
 * delete answers and their own messages; someone else's takes the owner.
 */
export async function deleteMessage(context, session, name, { withLater = false } = {}) {
  return unary(context, 'deleteMessage', { name, withLater }, await session.metadata());
}

/**
 * ListMessages, every page, of `branch` of `conversation` (0: the active
 * one): { branch, messages }, the branch read and its messages in order, each
 * with its siblings and siblingPosition. The pages after the first read the
 * branch the first one did (their page token holds it), so a switch made
 * meanwhile splices no branches.
 */
export async function branchMessages(context, session, conversation, { branch = 0 } = {}) {
  // Every page asks what the first did, branch 0 included: a page token is
  // only good for the request it came from.
  const request = { parent: conversation, pageSize: PAGE_SIZE, pageToken: '', branch };
  const messages = [];
  let read = branch;
  do {
    const page = await unary(context, 'listMessages', request, await session.metadata());
    messages.push(...page.messages);
    read ||= page.branch;
    request.pageToken = page.nextPageToken;
  } while (request.pageToken);
  return { branch: read, messages };
}

/**
 * ForkConversation: a new conversation titled `title`, in the same workspace,
 * that shares the history of `message` (`workspaces/{w}/conversations/{c}/messages/{m}`)
 * up to it, included, on the branch it was appended on, and goes on alone.
 * Nothing is copied: the fork's reads show the shared messages under their
 * own names, the source's, then its own. Editors and owners may fork, viewers
 * not (PERMISSION_DENIED). The new conversation, its forkedFrom `message`.
 */
export async function forkConversation(context, session, message, title = '') {
  const conversation = affinity(message);
  if (!conversation || conversation === message) {
    throw new TypeError(`${JSON.stringify(message)} names no message of a conversation`);
  }
  const answer = await unary(
    context,
    'forkConversation',
    { message, conversation: { title }, requestId: `node-${randomUUID()}` },
    await session.metadata(),
  );
  return answer.conversation;
}

/** Where `message` stands among its versions, as a switcher shows it: "2 / 3"; '' when alone. */
export function siblingPosition(message) {
  const siblings = message.siblings ?? [];
  return siblings.length > 1 ? `${message.siblingPosition} / ${siblings.length}` : '';
}

/**
 * Watches `run` to its end, for `timeoutMs` at most: { run, text }, the run
 * as it ended (its outputMessage the answer) and the answer's text.
 */
export async function awaitAnswer(dispatcher, session, run, { timeoutMs = RUN_TIMEOUT_MS } = {}) {
  let ended = run;
  let text = '';
  const signal = AbortSignal.timeout(timeoutMs);
  for await (const update of watchRun(dispatcher, session, run.name, { signal })) {
    if (update.update === 'delta') text += update.delta.text;
    if (update.update === 'result') text = update.result.parts.map((part) => part.text).join('');
    if (update.update === 'stateChange') ended = update.stateChange.run;
  }
  // watchRun returns quietly when the signal aborts it.
  if (!TERMINAL.has(ended.state)) throw new Error(`${run.name} did not end within ${timeoutMs} ms`);
  return { run: ended, text };
}

// A message in brief, as the output shows it.
function brief(message) {
  return {
    name: message.name,
    role: message.role,
    text: message.parts.map((part) => part.text).join(''),
    branch: message.branch,
    position: siblingPosition(message),
    siblings: message.siblings,
  };
}

// A write's outcome in brief: the message it stored, and its run as it ended.
function answered(message, { run, text }) {
  return {
    message: brief(message),
    run: run.name,
    state: run.state,
    branch: run.branch,
    answer: run.outputMessage,
    text,
  };
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      email: { type: 'string' },
      password: { type: 'string' },
      conversation: { type: 'string' },
      send: { type: 'string' },
      edit: { type: 'string' },
      message: { type: 'string' },
      regenerate: { type: 'boolean', default: false },
      answer: { type: 'string' },
      switch: { type: 'string' },
      branch: { type: 'string' },
      delete: { type: 'string' },
      'with-later': { type: 'boolean', default: false },
      fork: { type: 'string' },
      at: { type: 'string' },
    },
  });
  const [address] = positionals;
  const branch = values.branch === undefined ? 0 : Number(values.branch);
  const usable =
    address &&
    values.email &&
    values.password &&
    values.conversation &&
    Number.isInteger(branch) &&
    (values.branch === undefined || branch > 0) &&
    !(values.switch !== undefined && values.branch !== undefined) &&
    (values.edit === undefined || values.message !== undefined || values.send !== undefined) &&
    (!values.regenerate || values.answer !== undefined || values.send !== undefined || values.edit !== undefined) &&
    (values.at === undefined || values.fork !== undefined);
  if (!usable) {
    process.stderr.write(
      'usage: node branches.mjs <host:port> --email E --password P --conversation C ' +
        '[--send TEXT] [--edit TEXT [--message M]] [--regenerate [--answer A]] ' +
        '[--switch M | --branch N] [--delete M [--with-later]] [--fork TITLE [--at M]]\n',
    );
    process.exit(2);
  }
  const clients = createClients(address);
  try {
    const session = new Session(clients.auth);
    await session.login(values.email, values.password);
    const { context, dispatcher } = clients;
    const { conversation } = values;
    const result = {
      user: session.user.name,
      sent: null,
      edited: null,
      regenerated: null,
      switched: null,
      deleted: null,
      branch: null,
      forked: null,
    };
    let message = values.message;
    let answer = values.answer;
    if (values.send !== undefined) {
      const sent = await unary(
        dispatcher,
        'sendMessage',
        { conversation, message: userText(values.send), requestId: `node-${randomUUID()}` },
        await session.metadata(),
      );
      const done = await awaitAnswer(dispatcher, session, sent.run);
      result.sent = answered(sent.message, done);
      message ??= sent.message.name;
      answer ??= done.run.outputMessage;
    }
    if (values.edit !== undefined) {
      const edited = await editMessage(dispatcher, session, message, values.edit);
      const done = await awaitAnswer(dispatcher, session, edited.run);
      result.edited = { replaces: message, ...answered(edited.message, done) };
      if (values.answer === undefined) answer = done.run.outputMessage;
    }
    if (values.regenerate) {
      const again = await regenerate(dispatcher, session, answer);
      const done = await awaitAnswer(dispatcher, session, again.run);
      result.regenerated = { replaces: answer, ...answered(again.message, done) };
    }
    if (values.switch !== undefined || values.branch !== undefined) {
      const switched = await switchBranch(context, session, conversation, { message: values.switch, branch });
      result.switched = { activeBranch: switched.activeBranch, branchCount: switched.branchCount };
    }
    if (values.delete !== undefined) {
      const deleted = await deleteMessage(context, session, values.delete, { withLater: values['with-later'] });
      result.deleted = { deleted: deleted.deleted, activeBranch: deleted.conversation.activeBranch };
    }
    const read = await branchMessages(context, session, conversation);
    result.branch = { branch: read.branch, messages: read.messages.map(brief) };
    if (values.fork !== undefined) {
      const at = values.at ?? read.messages.at(-1)?.name;
      if (at === undefined) throw new Error(`${conversation} has no message to fork at`);
      const forked = await forkConversation(context, session, at, values.fork);
      result.forked = {
        name: forked.name,
        title: forked.title,
        forkedFrom: forked.forkedFrom,
        messageCount: forked.messageCount,
      };
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
      `branches: ${error.code !== undefined ? `${error.code} ${error.details}` : error.stack}\n` +
        (details ? `${JSON.stringify(details)}\n` : ''),
    );
    process.exitCode = 1;
  });
}
