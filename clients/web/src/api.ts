// The clients of the five services over one grpc-web transport to the page's own origin
// (Envoy serves the page and the API), with the bearer token added to every call that
// needs one and the routing header to every call that names a conversation.
import { type Client, Code, ConnectError, type Interceptor, createClient } from "@connectrpc/connect";
import { createAsyncIterable } from "@connectrpc/connect/protocol";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "./gen/switchboard/api/auth/v1/auth_pb";
import { ContextService } from "./gen/switchboard/api/context/v1/context_pb";
import { DispatcherService } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { EventService } from "./gen/switchboard/api/events/v1/events_pb";
import { IntegrationService } from "./gen/switchboard/api/integration/v1/integration_pb";
import { problem } from "./errors";
import { Tokens, wantsRenewal } from "./session";

/** Methods that take no bearer token (the contract's public ones). */
const PUBLIC = new Set([
  "/switchboard.api.auth.v1.AuthService/Register",
  "/switchboard.api.auth.v1.AuthService/Login",
  "/switchboard.api.auth.v1.AuthService/RefreshToken",
  "/switchboard.api.auth.v1.AuthService/GetJwks",
]);

/**
 * The routing header: the conversation a call is about. Envoy in front of several
 * Switchboard processes picks the process by a hash of it, so a conversation's calls
 * reach the process where its runs live. The servers never read it: a call without it
 * is served the same, with more work behind it.
 */
export const AFFINITY_HEADER = "switchboard-affinity";
const NAMED_BY = ["conversation", "name", "run", "parent", "session", "message"];

/**
 * The conversation (`workspaces/{w}/conversations/{c}`) that `request` names: itself
 * when it is a resource name (a run's gives its conversation's), else the first of a
 * request's conversation, name, run, parent, session or message (a regenerated answer)
 * fields that names one, or those of the message its oneof holds; "" if none.
 */
export function affinity(request: unknown): string {
  if (typeof request === "string") {
    const [workspaces, w, conversations, c] = request.split("/");
    const shaped = workspaces === "workspaces" && w && conversations === "conversations" && c;
    return shaped ? `workspaces/${w}/conversations/${c}` : "";
  }
  if (typeof request !== "object" || request === null) return "";
  const fields = request as Record<string, unknown>;
  for (const field of NAMED_BY) {
    const key = typeof fields[field] === "string" ? affinity(fields[field]) : "";
    if (key) return key;
  }
  for (const value of Object.values(fields)) {
    // A oneof holds its message as { case, value }.
    const held = typeof value === "object" && value !== null && "case" in value ? value : null;
    if (held !== null && "value" in held && typeof held.value === "object") {
      const key = affinity(held.value);
      if (key) return key;
    }
  }
  return "";
}

/** Adds the routing header to every call whose request names a conversation. */
const affine: Interceptor = (next) => async (request) => {
  if (!request.stream) {
    const key = affinity(request.message);
    if (key && !request.header.has(AFFINITY_HEADER)) request.header.set(AFFINITY_HEADER, key);
    return next(request);
  }
  // grpc-web streams only from the server: the one request is read, and sent on as it was.
  if (request.method.methodKind !== "server_streaming") return next(request);
  const messages = [];
  for await (const message of request.message) messages.push(message);
  const key = affinity(messages[0]);
  if (key && !request.header.has(AFFINITY_HEADER)) request.header.set(AFFINITY_HEADER, key);
  return next({ ...request, message: createAsyncIterable(messages) });
};

/** Items asked for per page of a list call. */
export const PAGE_SIZE = 100;

export interface Api {
  tokens: Tokens;
  auth: Client<typeof AuthService>;
  context: Client<typeof ContextService>;
  dispatcher: Client<typeof DispatcherService>;
  events: Client<typeof EventService>;
  integration: Client<typeof IntegrationService>;
}

export function connect(baseUrl: string, storage: Storage): Api {
  let tokens: Tokens | null = null;
  const bearer: Interceptor = (next) => async (request) => {
    const path = new URL(request.url).pathname;
    if (PUBLIC.has(path) || tokens === null) return next(request);
    // A stream's owner sets the header itself (it renews and reopens the stream).
    if (request.stream) {
      if (!request.header.has("authorization")) {
        request.header.set("authorization", `Bearer ${await tokens.token()}`);
      }
      return next(request);
    }
    const session = tokens;
    const used = await session.token();
    request.header.set("authorization", `Bearer ${used}`);
    try {
      return await next(request);
    } catch (error) {
      if (!refused(error)) throw error;
      if (!wantsRenewal(error)) {
        session.end("the server ended the session", problem(error));
        throw error;
      }
      // Refused before anything ran (authentication comes first), so sending it again
      // is safe: once, with a renewed token.
      request.header.set("authorization", `Bearer ${await session.renew(used)}`);
      try {
        return await next(request);
      } catch (again) {
        if (refused(again)) session.end("the server refused the renewed session", problem(again));
        throw again;
      }
    }
  };
  const transport = createGrpcWebTransport({
    baseUrl,
    useBinaryFormat: true,
    interceptors: [bearer, affine],
    // A unary call without its own deadline still ends (Envoy's route timeout is 60 s).
    defaultTimeoutMs: 30_000,
  });
  const auth = createClient(AuthService, transport);
  tokens = new Tokens(auth, storage);
  return {
    tokens,
    auth,
    context: createClient(ContextService, transport),
    dispatcher: createClient(DispatcherService, transport),
    events: createClient(EventService, transport),
    integration: createClient(IntegrationService, transport),
  };
}

/** An idempotency key: letters, digits and `-` (the contracts allow 1-64 of those). */
export function requestId(): string {
  return crypto.randomUUID();
}

function refused(error: unknown): boolean {
  return error instanceof ConnectError && error.code === Code.Unauthenticated;
}
