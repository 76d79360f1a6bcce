// A Switchboard assistant called as an A2A v1.0 agent with the official JavaScript SDK
// (@a2a-js/sdk) over its gRPC transport (lf.a2a.v1.A2AService), through Envoy or directly.
//
//   node a2a.mjs --address 127.0.0.1:8080 --token "$TOKEN" --tenant acme.helper \
//       [--stranger-token "$OTHER"] [--text "hello"] [--slow-text "a b c d"]
//
// It fetches the authenticated card (GetExtendedAgentCard), sends a message (blocking),
// streams one and collects its text chunks, reads and lists the task (in its context and
// in all of them), cancels a slow task and a finished one, asks for a task that does not
// exist, sends text to a finished task, and (with --stranger-token) has a caller from
// outside the workspace read the task. It prints one JSON object with what each step got; a step that failed
// holds {error: {name, code, message}} instead, and the program still exits 0 (the caller
// judges the results). Anything unexpected ends it with exit status 1.
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';

import { Role, TaskState } from '@a2a-js/sdk';
import { ClientFactory, ClientFactoryOptions } from '@a2a-js/sdk/client';
import { GrpcTransportFactory } from '@a2a-js/sdk/client/grpc';

// Deadline of each unary call, and of the whole stream.
const CALL_TIMEOUT_MS = 30_000;

const { values: args } = parseArgs({
  options: {
    address: { type: 'string' },
    token: { type: 'string' },
    tenant: { type: 'string' },
    'stranger-token': { type: 'string', default: '' },
    text: { type: 'string', default: 'hello from the JavaScript SDK' },
    'slow-text': { type: 'string', default: 'one slow answer that is cancelled midway' },
  },
});
for (const required of ['address', 'token', 'tenant']) {
  if (!args[required]) {
    console.error(`usage: node a2a.mjs --address HOST:PORT --token TOKEN --tenant W.A (missing --${required})`);
    process.exit(2);
  }
}

/**
 * Puts the caller's token in the card's bearer scheme on every call: gRPC metadata
 * `authorization: Bearer ...` (the SDK's gRPC transport sends service parameters as
 * metadata).
 */
class BearerToken {
  constructor(token) {
    this.token = token;
  }

  async before({ options }) {
    options.serviceParameters = { ...options.serviceParameters, authorization: `Bearer ${this.token}` };
  }

  async after() {}
}

/**
 * A client for the agent at `address` as `token`. The SDK builds clients from a card;
 * Switchboard's card comes from GetExtendedAgentCard (authenticated), so this starts from
 * the little a public card would say (the gRPC interface, the tenant, "there is an
 * extended card"), and `client.getAgentCard()` then fetches the real one through the
 * same transport.
 */
async function connect(address, token, tenant) {
  const factory = new ClientFactory(
    ClientFactoryOptions.createFrom(ClientFactoryOptions.default, {
      transports: [new GrpcTransportFactory()],
      preferredTransports: ['GRPC'],
      clientConfig: { interceptors: [new BearerToken(token)] },
    }),
  );
  return factory.createFromAgentCard({
    name: tenant,
    description: '',
    version: '',
    supportedInterfaces: [{ url: address, protocolBinding: 'GRPC', tenant, protocolVersion: '1.0' }],
    capabilities: { streaming: true, extendedAgentCard: true, pushNotifications: false, extensions: [] },
    securitySchemes: {},
    securityRequirements: [],
    defaultInputModes: ['text/plain'],
    defaultOutputModes: ['text/plain'],
    skills: [],
    signatures: [],
  });
}

/** RequestOptions with a deadline (the SDK cancels the call when the signal aborts). */
function deadline() {
  return { signal: AbortSignal.timeout(CALL_TIMEOUT_MS) };
}

function userMessage(text) {
  return {
    messageId: randomUUID(),
    contextId: '',
    taskId: '',
    role: Role.ROLE_USER,
    parts: [{ content: { $case: 'text', value: text }, metadata: undefined, filename: '', mediaType: 'text/plain' }],
    metadata: undefined,
    extensions: [],
    referenceTaskIds: [],
  };
}

function sendRequest(text, { metadata, returnImmediately = false } = {}) {
  return {
    tenant: '',
    message: userMessage(text),
    configuration: {
      acceptedOutputModes: ['text/plain'],
      taskPushNotificationConfig: undefined,
      returnImmediately,
    },
    metadata,
  };
}

const stateName = (state) => TaskState[state] ?? String(state);

const textOf = (parts) =>
  parts.filter((part) => part.content?.$case === 'text').map((part) => part.content.value).join('');

/** The parts of a task the caller checks, as plain JSON. */
function taskSummary(task) {
  return {
    id: task.id,
    contextId: task.contextId,
    state: stateName(task.status?.state),
    statusText: task.status?.message ? textOf(task.status.message.parts) : '',
    history: task.history.map((message) => ({ role: Role[message.role], text: textOf(message.parts) })),
    answer: task.artifacts.map((artifact) => textOf(artifact.parts)).join(''),
    artifacts: task.artifacts.map((artifact) => artifact.name),
    metadata: task.metadata ?? {},
  };
}

/** What a failed call says: the SDK's error class, the gRPC status code, the message. */
function failure(error) {
  if (error?.status === undefined) throw error;
  return { error: { name: error.constructor.name, code: error.status, message: error.message } };
}

async function attempt(step) {
  try {
    return await step();
  } catch (error) {
    return failure(error);
  }
}

async function main() {
  const result = {};
  const client = await connect(args.address, args.token, args.tenant);

  const card = await client.getAgentCard(deadline());
  result.card = {
    name: card.name,
    protocolVersion: client.protocolVersion,
    transport: client.transport.protocolName,
    interfaces: card.supportedInterfaces.map(({ url, protocolBinding, tenant, protocolVersion }) => ({
      url,
      protocolBinding,
      tenant,
      protocolVersion,
    })),
    streaming: card.capabilities?.streaming ?? false,
    securitySchemes: Object.keys(card.securitySchemes),
    extensions: (card.capabilities?.extensions ?? []).map((extension) => extension.uri),
  };

  // A blocking send: the task once the run has ended.
  const sent = await client.sendMessage(sendRequest(args.text), deadline());
  if (!('id' in sent)) throw new Error(`SendMessage answered a message, not a task: ${JSON.stringify(sent)}`);
  result.blocking = taskSummary(sent);

  // A streamed send: the task, then the answer's chunks, then the final status.
  const streamed = { kinds: [], states: [], chunks: [], appends: [], lastChunks: [], sequences: [] };
  let streamedTask = {};
  for await (const event of client.sendMessageStream(sendRequest(args.text), deadline())) {
    const { $case: kind, value } = event.payload ?? {};
    streamed.kinds.push(kind);
    if (kind === 'task') {
      streamedTask = { id: value.id, contextId: value.contextId };
      streamed.states.push(stateName(value.status?.state));
    } else if (kind === 'statusUpdate') {
      streamed.states.push(stateName(value.status?.state));
      streamed.sequences.push(value.metadata?.['switchboard.sequence'] ?? null);
    } else if (kind === 'artifactUpdate') {
      streamed.chunks.push(textOf(value.artifact?.parts ?? []));
      streamed.appends.push(value.append);
      streamed.lastChunks.push(value.lastChunk);
      streamed.sequences.push(value.metadata?.['switchboard.sequence'] ?? null);
    }
  }
  result.streamed = { ...streamed, ...streamedTask, text: streamed.chunks.join('') };

  // The streamed task read back, and listed in its context.
  result.got = taskSummary(await client.getTask({ tenant: '', id: streamedTask.id }, deadline()));
  const listed = await client.listTasks(
    {
      tenant: '',
      contextId: streamedTask.contextId,
      status: TaskState.TASK_STATE_UNSPECIFIED,
      pageToken: '',
      statusTimestampAfter: undefined,
      includeArtifacts: true,
    },
    deadline(),
  );
  result.listed = {
    tasks: listed.tasks.map(taskSummary),
    nextPageToken: listed.nextPageToken,
    totalSize: listed.totalSize,
  };
  // Every context's: no contextId (A2A makes the filter optional).
  const everywhere = await client.listTasks(
    {
      tenant: '',
      contextId: '',
      status: TaskState.TASK_STATE_UNSPECIFIED,
      pageToken: '',
      statusTimestampAfter: undefined,
    },
    deadline(),
  );
  result.listedAll = { ids: everywhere.tasks.map((task) => task.id), totalSize: everywhere.totalSize };
  // A task id that names no task (not even of this agent's form): A2A's TaskNotFoundError.
  result.missingTask = await attempt(async () =>
    taskSummary(await client.getTask({ tenant: '', id: 'nonexistent-task-id' }, deadline())),
  );

  // A slow task (the echo handler waits between words), cancelled while it runs.
  const slow = await client.sendMessage(
    sendRequest(args['slow-text'], { metadata: { delay_ms: 60_000 }, returnImmediately: true }),
    deadline(),
  );
  result.slow = taskSummary(slow);
  result.cancelled = await attempt(async () => taskSummary(await client.cancelTask({ tenant: '', id: slow.id }, deadline())));
  // A task that has already ended, cancelled again.
  result.cancelFinished = await attempt(async () =>
    taskSummary(await client.cancelTask({ tenant: '', id: sent.id }, deadline())),
  );

  // Text on a task that has ended: A2A's UnsupportedOperationError.
  const more = sendRequest('and one more thing');
  more.message.taskId = sent.id;
  more.message.contextId = sent.contextId;
  result.continueFinished = await attempt(async () => taskSummary(await client.sendMessage(more, deadline())));

  // Someone who is not a member of the workspace: the same agent, the same task.
  if (args['stranger-token']) {
    const stranger = await connect(args.address, args['stranger-token'], args.tenant);
    result.stranger = {
      getTask: await attempt(async () => taskSummary(await stranger.getTask({ tenant: '', id: sent.id }, deadline()))),
      card: await attempt(async () => (await stranger.getAgentCard(deadline())).name),
    };
  }
  return result;
}

main().then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  },
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
