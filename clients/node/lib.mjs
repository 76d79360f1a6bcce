// Switchboard Node.js client helpers: loads the repo's .proto contracts at run
// time (no code generation), decodes google.rpc rich error details, keeps a
// signed-in session's tokens fresh (Session), follows events with resume from
// the last cursor (follow) and watches a run with resume from the last
// sequence (watchRun); both ask for merged deltas.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const here = path.dirname(fileURLToPath(import.meta.url));

// Include dirs, resolved from this file so the client works from any cwd.
// `protos/` holds the standard grpc.health.v1 proto, which the repo does not
// vendor. google/protobuf/* well-known types are bundled with protobufjs.
export const PROTO_DIRS = [
  path.resolve(here, '../../proto'),
  path.resolve(here, '../../third_party/proto'),
  path.resolve(here, 'protos'),
];

// Shared by proto-loader (requests/responses) and protobufjs toObject (error
// details) so both produce the same shape: camelCase fields, 64-bit integers
// and enums as strings, unset fields filled with defaults.
const CONVERSION = { longs: String, enums: String, defaults: true, oneofs: true };

const packageDefinition = protoLoader.loadSync(
  [
    'switchboard/api/auth/v1/auth.proto',
    'switchboard/api/context/v1/context.proto',
    'switchboard/api/dispatcher/v1/dispatcher.proto',
    'switchboard/api/events/v1/events.proto',
    'switchboard/api/integration/v1/integration.proto',
    'grpc/health/v1/health.proto',
  ],
  { keepCase: false, ...CONVERSION, includeDirs: PROTO_DIRS },
);
const loaded = grpc.loadPackageDefinition(packageDefinition);

/**
 * The routing header: the conversation a call is about. Envoy in front of several
 * Switchboard processes picks the process by a hash of it, so a conversation's
 * calls reach the process where its runs live. The servers never read it: a call
 * without it is served the same, with more work behind it.
 */
export const AFFINITY_HEADER = 'switchboard-affinity';
const NAMED_BY = new Set(['conversation', 'name', 'run', 'parent', 'session', 'message']);

/**
 * The conversation (`workspaces/{w}/conversations/{c}`) that `request` names:
 * `request` itself when it is a resource name (a run's gives its conversation's),
 * else the first of a request's conversation, name, run, parent or session fields
 * that names one, or those of a message it holds (a Converse action, a Talk
 * start or resume); '' if none.
 */
export function affinity(request, depth = 0) {
  if (typeof request === 'string') {
    const [workspaces, w, conversations, c] = request.split('/');
    const shaped = workspaces === 'workspaces' && w && conversations === 'conversations' && c;
    return shaped ? `workspaces/${w}/conversations/${c}` : '';
  }
  if (request === null || typeof request !== 'object' || depth > 1) return '';
  for (const [field, value] of Object.entries(request)) {
    if (NAMED_BY.has(field) && typeof value === 'string' && affinity(value)) return affinity(value);
  }
  for (const value of Object.values(request)) {
    if (value !== null && typeof value === 'object' && !Array.isArray(value) && !Buffer.isBuffer(value)) {
      const key = affinity(value, depth + 1);
      if (key) return key;
    }
  }
  return '';
}

/**
 * A grpc-js interceptor that adds AFFINITY_HEADER to every call whose request
 * names a conversation. The call's headers wait for its request (grpc-js sends
 * a unary or server-streaming call's request right after starting it); a call
 * that streams requests passes as it is: set the header yourself when you open
 * one (`metadata.set(AFFINITY_HEADER, affinity(conversation))`).
 */
export function affinityInterceptor(options, nextCall) {
  if (options.method_definition?.requestStream) return new grpc.InterceptingCall(nextCall(options));
  let started = null;
  const start = (message) => {
    if (started === null) return;
    const { metadata, listener, next } = started;
    started = null;
    const key = affinity(message);
    if (key && metadata.get(AFFINITY_HEADER).length === 0) metadata.set(AFFINITY_HEADER, key);
    next(metadata, listener);
  };
  return new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      started = { metadata, listener, next };
    },
    sendMessage(message, next) {
      start(message);
      next(message);
    },
    halfClose(next) {
      start(null);
      next();
    },
  });
}

/**
 * Creates AuthService, ContextService, DispatcherService, EventService,
 * IntegrationService and Health clients for `address` ("host:port") that share
 * one channel, each call carrying the routing header when its request names a
 * conversation (affinityInterceptor). Call close() when done.
 */
export function createClients(address, credentials = grpc.credentials.createInsecure()) {
  const api = loaded.switchboard.api;
  const auth = new api.auth.v1.AuthService(address, credentials, {
    interceptors: [affinityInterceptor],
  });
  const shared = { channelOverride: auth.getChannel(), interceptors: [affinityInterceptor] };
  const health = new loaded.grpc.health.v1.Health(address, credentials, shared);
  const events = new api.events.v1.EventService(address, credentials, shared);
  const context = new api.context.v1.ContextService(address, credentials, shared);
  const dispatcher = new api.dispatcher.v1.DispatcherService(address, credentials, shared);
  const integration = new api.integration.v1.IntegrationService(address, credentials, shared);
  return { auth, context, dispatcher, events, integration, health, close: () => auth.close() };
}

// proto-loader builds gRPC method definitions only, not standalone message
// codecs, so the google.rpc types are loaded separately with protobufjs.
const statusRoot = new protobuf.Root();
statusRoot.resolvePath = (origin, target) => {
  for (const dir of PROTO_DIRS) {
    const candidate = path.join(dir, target);
    try {
      fs.accessSync(candidate, fs.constants.R_OK);
      return candidate;
    } catch {
      // Not in this dir; try the next one.
    }
  }
  // Falls through for google/protobuf/*, which protobufjs serves from its
  // bundled copies.
  return target;
};
statusRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], {
  keepCase: false,
});
statusRoot.resolveAll();

const Status = statusRoot.lookupType('google.rpc.Status');
const DETAIL_TYPES = ['google.rpc.ErrorInfo', 'google.rpc.BadRequest'].map((name) =>
  statusRoot.lookupType(name),
);

/**
 * Decodes the `grpc-status-details-bin` trailer of a grpc-js ServiceError's
 * metadata as a google.rpc.Status.
 *
 * Returns null when the trailer is absent, otherwise
 * { code, message, details: [{ typeUrl, type, value }] } where `type` is the
 * full name of the detail message and `value` its fields as a plain object;
 * both are null for detail types this client does not know.
 */
export function decodeStatusDetails(metadata) {
  const [raw] = metadata?.get('grpc-status-details-bin') ?? [];
  if (!raw) return null;
  const status = Status.decode(raw);
  return {
    code: status.code,
    message: status.message,
    // protobufjs's bundled google.protobuf.Any keeps its snake_case field
    // name whatever keepCase says. type_url is "<prefix>/<full.message.Name>",
    // usually "type.googleapis.com/google.rpc.ErrorInfo".
    details: status.details.map(({ type_url: typeUrl, value }) => {
      const type = DETAIL_TYPES.find((t) => typeUrl.endsWith(`/${t.fullName.slice(1)}`));
      if (!type) return { typeUrl, type: null, value: null };
      return {
        typeUrl,
        type: type.fullName.slice(1),
        value: type.toObject(type.decode(value), CONVERSION),
      };
    }),
  };
}

/** Milliseconds a unary call may take unless the caller says otherwise. */
export const CALL_TIMEOUT_MS = 10000;

/**
 * Promisified unary call with a deadline. Rejects with grpc-js's ServiceError
 * (its `code`, `details` and `metadata`; decodeStatusDetails reads the rest).
 */
export function unary(client, method, request, metadata = new grpc.Metadata(), timeoutMs = CALL_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: new Date(Date.now() + timeoutMs) }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** The session ended: its refresh token was refused (revoked, expired or reused). */
export class SignedOutError extends Error {}

/**
 * A signed-in user's tokens. `metadata()` gives the `authorization` header for
 * the next call, refreshing the access token first when it expires within
 * `marginMs`. Refresh tokens rotate and the server treats a second use of one
 * as theft, so concurrent callers share one RefreshToken call and a spent
 * token is never presented again.
 */
export class Session {
  constructor(auth, { marginMs = 30000, onTokens = () => {} } = {}) {
    this.auth = auth;
    this.marginMs = marginMs;
    this.onTokens = onTokens;
    this.tokens = null;
    this.user = null;
    this.refreshing = null;
  }

  async register(request) {
    const answer = await unary(this.auth, 'register', request);
    this.adopt(answer.tokens);
    this.user = answer.user;
    return answer;
  }

  async login(email, password, clientInfo = { userAgent: 'switchboard-node' }) {
    const answer = await unary(this.auth, 'login', { password: { email, password }, clientInfo });
    this.adopt(answer.tokens);
    this.user = answer.user;
    return answer;
  }

  adopt(tokens) {
    this.tokens = tokens;
    this.onTokens(tokens);
  }

  expiresAt() {
    const at = this.tokens?.accessTokenExpireTime;
    return at ? Number(at.seconds) * 1000 + Math.floor((at.nanos ?? 0) / 1e6) : 0;
  }

  async metadata() {
    if (!this.tokens) throw new SignedOutError('not signed in');
    if (this.expiresAt() - Date.now() < this.marginMs) await this.refresh();
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${this.tokens.accessToken}`);
    return metadata;
  }

  /** Exchanges the refresh token once, however many callers ask at the same time. */
  refresh() {
    if (!this.refreshing) {
      const spent = this.tokens?.refreshToken;
      this.refreshing = (async () => {
        if (!spent) throw new SignedOutError('not signed in');
        try {
          const answer = await unary(this.auth, 'refreshToken', { refreshToken: spent });
          this.adopt(answer.tokens);
        } catch (error) {
          if (error.code === grpc.status.UNAUTHENTICATED || error.code === grpc.status.PERMISSION_DENIED) {
            this.tokens = null;
            throw new SignedOutError(`the session ended: ${error.details}`);
          }
          throw error;
        }
      })().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async logout() {
    if (!this.tokens) return;
    await unary(this.auth, 'logout', {}, await this.metadata());
    this.tokens = null;
  }
}

/** Stream statuses after which Subscribe is opened again from the last cursor. */
const RESUMABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN]);

/** Event ids (and runs' last delta sequences) a follower remembers, to drop repeats. */
const DEDUPE_WINDOW = 10000;

/**
 * The first sequence a run update covers: a merged delta's `firstSequence`,
 * else its own `sequence` (the last it covers), as a BigInt.
 */
export function firstSequence(update) {
  const first = BigInt(update.firstSequence ?? 0);
  return first > 0n ? first : BigInt(update.sequence);
}

/**
 * Follows events: yields { event } for each event and { state } when the
 * stream goes 'live' (its first frame) or 'reconnecting'. A broken stream is
 * opened again with `after_cursor` = the last cursor seen (a batch's or a
 * heartbeat's), after a capped, jittered backoff, so no event is skipped; an
 * id already delivered is dropped, so none arrives twice. It ends when
 * `signal` aborts; other errors (a refused scope, a signed-out session) are
 * thrown.
 *
 * It asks for merged deltas (`SubscribeRequest.merge_deltas`; pass
 * `mergeDeltas: false` in `request` for one event per delta): a run's
 * consecutive text deltas delivered together come as one RUN_UPDATED event,
 * the last one's, whose update covers `firstSequence(update)` .. `sequence`
 * and whose text is theirs joined. One id then stands for several deltas, so
 * a delta is also dropped when its run's deltas were delivered up to its
 * sequence already (a resume on another replica sends them again, one by one,
 * under ids this follower never saw).
 */
export async function* follow(events, session, request, { signal, maxBackoffMs = 5000 } = {}) {
  let cursor = request.afterCursor ?? '';
  const seen = new Set();
  const order = [];
  // Each run's last delta sequence delivered (a Map keeps insertion order: oldest first).
  const deltas = new Map();
  const fresh = (event) => {
    const update = event.runUpdated?.update;
    if (event.payload !== 'runUpdated' || update?.update !== 'delta') return true;
    const sequence = BigInt(update.sequence);
    if (sequence <= (deltas.get(update.run) ?? 0n)) return false;
    deltas.delete(update.run);
    deltas.set(update.run, sequence);
    if (deltas.size > DEDUPE_WINDOW) deltas.delete(deltas.keys().next().value);
    return true;
  };
  const open = (metadata) =>
    events.subscribe({ mergeDeltas: true, ...request, afterCursor: cursor }, metadata);
  async function* read(call, answered) {
    let live = false;
    for await (const frame of call) {
      if (!live) {
        live = true;
        answered();
        yield { state: 'live', cursor };
      }
      if (frame.frame === 'heartbeat') {
        cursor = frame.heartbeat.cursor || cursor;
        continue;
      }
      for (const event of frame.batch.events) {
        if (seen.has(event.id) || !fresh(event)) continue;
        seen.add(event.id);
        order.push(event.id);
        if (order.length > DEDUPE_WINDOW) seen.delete(order.shift());
        yield { event };
      }
      cursor = frame.batch.cursor || cursor;
    }
    return false;
  }
  yield* resumed(session, open, read, {
    signal,
    maxBackoffMs,
    resumable: (error) => RESUMABLE.has(error.code),
    reconnecting: () => ({ state: 'reconnecting', cursor }),
  });
}

/**
 * The resumed stream of `follow` and `watchRun`: opens a call (`open(metadata)`)
 * and yields what `read(call, answered)` yields from it, again and again. A broken
 * stream (an error `resumable(error)` says may pass, or the stream ending) is
 * opened again after a capped, jittered backoff, yielding `reconnecting()` first
 * if given; `read` calls `answered()` once the server has answered, which starts
 * the backoff over. An access token that expired while the stream was open is
 * renewed and the stream opened again; a fresh token refused as well means the
 * session is gone (SignedOutError). It returns when `read` returns true (done),
 * or when `signal` aborts or the call is cancelled; other errors are thrown.
 */
async function* resumed(session, open, read, { signal, maxBackoffMs, resumable, reconnecting }) {
  let failures = 0;
  let stale = false;
  while (!signal?.aborted) {
    const renewing = stale;
    let call = null;
    const stop = () => call?.cancel();
    signal?.addEventListener('abort', stop, { once: true });
    try {
      // Inside the try: while the server is down, a refresh fails UNAVAILABLE too.
      if (stale) await session.refresh();
      stale = false;
      call = open(await session.metadata());
      if (
        yield* read(call, () => {
          failures = 0;
        })
      ) {
        return;
      }
    } catch (error) {
      if (signal?.aborted || error.code === grpc.status.CANCELLED) return;
      if (error instanceof SignedOutError) throw error;
      // The access token expired while the stream was open: renew, then resume.
      // A fresh token refused as well means the session is gone, not just stale.
      if (error.code === grpc.status.UNAUTHENTICATED && renewing) {
        throw new SignedOutError(`the stream was refused: ${error.details}`);
      }
      if (error.code === grpc.status.UNAUTHENTICATED) stale = true;
      else if (!resumable(error)) throw error;
    } finally {
      signal?.removeEventListener('abort', stop);
    }
    if (signal?.aborted) return;
    if (reconnecting) yield reconnecting();
    failures += 1;
    await pause(failures, maxBackoffMs, signal);
  }
}

/** Waits a capped, jittered backoff before the `failures`-th retry (or until `signal` aborts). */
function pause(failures, maxBackoffMs, signal) {
  const ceiling = Math.min(maxBackoffMs, 100 * 2 ** Math.min(failures, 10));
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(done, ceiling / 2 + Math.random() * (ceiling / 2));
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** The states a run ends in. */
export const TERMINAL = new Set([
  'RUN_STATE_SUCCEEDED',
  'RUN_STATE_FAILED',
  'RUN_STATE_CANCELLED',
  'RUN_STATE_DEADLINE_EXCEEDED',
]);

/** Whether `error` is the server's CURSOR_EXPIRED: asked again, it starts from a snapshot. */
function cursorExpired(error) {
  const status = decodeStatusDetails(error.metadata);
  return Boolean(status?.details.some((d) => d.value?.reason === 'ERROR_REASON_CURSOR_EXPIRED'));
}

/**
 * Watches a run (`WatchRun`): yields each update after `afterSequence`, in
 * order and once, and returns after the terminal state change. A broken
 * stream (as for `follow`, and an expired access token, renewed once) is
 * opened again after the last sequence yielded, after the same backoff; other
 * errors are thrown. Abort `signal` to stop.
 *
 * It asks for merged deltas (`WatchRunRequest.merge_deltas`; `mergeDeltas:
 * false` for one update per delta): the text deltas ready together come as one
 * update covering `firstSequence(update)` .. `sequence`, its text theirs
 * joined. Nothing is missing while `firstSequence(update)` is the last
 * sequence seen plus one (a recovered run numbers on in a later block of 2^32).
 */
export async function* watchRun(
  dispatcher,
  session,
  name,
  { afterSequence = 0, mergeDeltas = true, signal, maxBackoffMs = 5000 } = {},
) {
  let last = BigInt(afterSequence);
  const open = (metadata) =>
    dispatcher.watchRun({ name, afterSequence: String(last), mergeDeltas }, metadata);
  async function* read(call, answered) {
    try {
      for await (const frame of call) {
        answered();
        if (frame.frame !== 'update') continue;
        const { update } = frame;
        // At or before the last one yielded: sent again after a resume.
        if (BigInt(update.sequence) <= last) continue;
        last = BigInt(update.sequence);
        yield update;
        if (update.update === 'stateChange' && TERMINAL.has(update.stateChange.run.state)) {
          return true;
        }
      }
      return false;
    } finally {
      // Left early (the caller stopped reading): end the call too.
      call.cancel();
    }
  }
  yield* resumed(session, open, read, {
    signal,
    maxBackoffMs,
    resumable: (error) => RESUMABLE.has(error.code) || cursorExpired(error),
  });
}

export { grpc };
