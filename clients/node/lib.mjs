// Switchboard Node.js client helpers: loads the repo's .proto contracts at run
// time (no code generation) and decodes google.rpc rich error details.
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
    'grpc/health/v1/health.proto',
  ],
  { keepCase: false, ...CONVERSION, includeDirs: PROTO_DIRS },
);
const loaded = grpc.loadPackageDefinition(packageDefinition);

/**
 * Creates AuthService, ContextService, DispatcherService, EventService and
 * Health clients for `address` ("host:port") that share one channel. Call
 * close() when done.
 */
export function createClients(address, credentials = grpc.credentials.createInsecure()) {
  const api = loaded.switchboard.api;
  const auth = new api.auth.v1.AuthService(address, credentials);
  const shared = { channelOverride: auth.getChannel() };
  const health = new loaded.grpc.health.v1.Health(address, credentials, shared);
  const events = new api.events.v1.EventService(address, credentials, shared);
  const context = new api.context.v1.ContextService(address, credentials, shared);
  const dispatcher = new api.dispatcher.v1.DispatcherService(address, credentials, shared);
  return { auth, context, dispatcher, events, health, close: () => auth.close() };
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

export { grpc };
