// The clients of the five services over one grpc-web transport to the page's own origin
// (Envoy serves the page and the API), with the bearer token added to every call that
// needs one.
import { type Client, Code, ConnectError, type Interceptor, createClient } from "@connectrpc/connect";
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
    interceptors: [bearer],
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
