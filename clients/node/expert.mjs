// A Switchboard domain expert in Node.js: a server of
// switchboard.api.handler.v1.HandlerService (and grpc.health.v1.Health).
//
//   node expert.mjs [--port 0] [--host 127.0.0.1] [--id translator] [--token SECRET] [--no-health]
//
// Register it in a workspace as an integration of kind
// INTEGRATION_KIND_GRPC_HANDLER with endpoint "host:port"; the dispatcher
// routes messages to it by the integration's id (SendMessage `handler`, or a
// `/id` command prefix). It answers deterministically ("<id> heard: <text>"),
// streaming a progress frame, one delta per word and then the result, so
// tests can check what it saw. Parameters: `shout` (bool) upper-cases the answer; `fail` (string)
// ends the call with FAILED_PRECONDITION and that message.
//
// With --token, every call must carry `authorization: Bearer <token>` (the
// integration's credential); others are refused UNAUTHENTICATED. With
// --no-health it serves no grpc.health.v1 (Switchboard then probes it with
// GetCapabilities).
//
// The first stdout line is `LISTENING <port>` once it serves. SIGTERM or
// SIGINT marks it NOT_SERVING and stops it (calls in flight are cancelled).
import process from 'node:process';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

import { PROTO_DIRS } from './lib.mjs';

const SERVICE = 'switchboard.api.handler.v1.HandlerService';
const HANDLER_ID = /^[a-z][a-z0-9-]{1,62}$/;
const MAX_INPUT_CHARS = 100_000;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    id: { type: 'string', default: 'translator' },
    token: { type: 'string', default: '' },
    'no-health': { type: 'boolean', default: false },
  },
});
if (!HANDLER_ID.test(args.id)) {
  console.error(`--id must match ${HANDLER_ID}`);
  process.exit(2);
}

// keepCase: the handlers read and write the proto's own field names.
const definition = protoLoader.loadSync(
  ['switchboard/api/handler/v1/handler.proto', 'grpc/health/v1/health.proto'],
  { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: PROTO_DIRS },
);
const loaded = grpc.loadPackageDefinition(definition);
const handlerService = loaded.switchboard.api.handler.v1.HandlerService.service;
const healthService = loaded.grpc.health.v1.Health.service;

const capabilities = {
  id: args.id,
  display_name: `Node expert ${args.id}`,
  description: 'Answers with what it heard, word by word (a Node.js HandlerService example).',
  topics: ['example', 'node'],
  streaming: true,
  max_context_tokens: 2000,
  // It asks for no tool calls: the dispatcher calls Handle, not HandleInteractive
  // (which this example does not implement; grpc-js answers it UNIMPLEMENTED).
  interactive: false,
  // google.protobuf.Struct in proto-loader's object form (protobufjs bundles
  // the well-known types with camelCase field names, whatever keepCase says).
  parameters_schema: {
    fields: {
      type: { stringValue: 'object' },
      properties: {
        structValue: {
          fields: { shout: { structValue: { fields: { type: { stringValue: 'boolean' } } } } },
        },
      },
    },
  },
};

// Health: "" and the HandlerService entry; SERVING until it stops.
const health = new Map([
  ['', 'SERVING'],
  [SERVICE, 'SERVING'],
]);

function authorized(call) {
  if (!args.token) return true;
  const [value] = call.metadata.get('authorization');
  return value === `Bearer ${args.token}`;
}

function refuse(code, details) {
  const error = new Error(details);
  error.code = code;
  error.details = details;
  return error;
}

function textOf(message) {
  const parts = (message && message.parts) || [];
  return parts
    .filter((part) => part.part === 'text')
    .map((part) => part.text)
    .join('\n\n');
}

function parameter(request, name) {
  const fields = (request.parameters && request.parameters.fields) || {};
  const value = fields[name];
  if (!value) return undefined;
  return value[value.kind];
}

const server = new grpc.Server();
server.addService(handlerService, {
  GetCapabilities(call, callback) {
    if (!authorized(call)) {
      callback(refuse(grpc.status.UNAUTHENTICATED, 'a valid bearer token is required'));
      return;
    }
    callback(null, { capabilities });
  },
  Handle(call) {
    if (!authorized(call)) {
      call.emit('error', refuse(grpc.status.UNAUTHENTICATED, 'a valid bearer token is required'));
      return;
    }
    const heard = textOf(call.request.message).slice(0, MAX_INPUT_CHARS);
    const fail = parameter(call.request, 'fail');
    if (fail) {
      call.emit('error', refuse(grpc.status.FAILED_PRECONDITION, String(fail).slice(0, 200)));
      return;
    }
    let answer = `${args.id} heard: ${heard}`;
    if (parameter(call.request, 'shout') === true) answer = answer.toUpperCase();
    // Progress, one delta per word, then the result: a streaming expert in miniature.
    call.write({ progress: { stage: 'answering', fraction: 0.5 } });
    const words = answer.split(/(?<=\s)/);
    for (const word of words) {
      if (call.cancelled) return;
      call.write({ delta: { text: word } });
    }
    call.write({
      result: {
        parts: [{ text: answer }],
        usage: { input_tokens: heard.split(/\s+/).filter(Boolean).length, output_tokens: words.length, estimated: true },
        finish_reason: 'stop',
      },
    });
    call.end();
  },
});
if (!args['no-health']) server.addService(healthService, {
  Check(call, callback) {
    const status = health.get(call.request.service);
    if (status === undefined) {
      callback(refuse(grpc.status.NOT_FOUND, 'unknown service'));
      return;
    }
    callback(null, { status });
  },
  Watch(call) {
    // Not needed by Switchboard (it calls Check); answer once, as the spec allows for a snapshot.
    const status = health.get(call.request.service) ?? 'SERVICE_UNKNOWN';
    call.write({ status });
  },
});

server.bindAsync(`${args.host}:${args.port}`, grpc.ServerCredentials.createInsecure(), (error, port) => {
  if (error) {
    console.error(`cannot listen: ${error.message}`);
    process.exit(1);
  }
  process.stdout.write(`LISTENING ${port}\n`);
});

function stop() {
  for (const name of health.keys()) health.set(name, 'NOT_SERVING');
  server.forceShutdown();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
