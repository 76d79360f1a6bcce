// Follows a conversation's events, resuming across dropped connections and
// server restarts:
//   node follow.mjs <host:port> --email E --password P --conversation NAME
//                   [--after CURSOR] [--count N] [--refresh-margin-ms MS]
// Signs in, subscribes to the conversation's scope and prints one JSON object
// per line: {"signedIn": ...}, {"state": "live"|"reconnecting", "cursor": ...},
// {"refreshed": <access token expiry>} when the session renews its tokens,
// and {"event": {...}} for each event, exactly once each (a run's update with
// the sequences it covers: the deltas delivered together come merged). It exits 0 after
// --count events (default: follow until interrupted), 1 on an error that is
// not a dropped connection (a refused sign-in, a scope it may not read).
import { parseArgs } from 'node:util';

import { createClients, firstSequence, follow, grpc, Session } from './lib.mjs';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    email: { type: 'string' },
    password: { type: 'string' },
    conversation: { type: 'string' },
    after: { type: 'string', default: '' },
    count: { type: 'string', default: '0' },
    // Renew the access token when it expires within this many milliseconds.
    'refresh-margin-ms': { type: 'string', default: '30000' },
  },
});
const [address] = positionals;
if (!address || !values.email || !values.password || !values.conversation) {
  process.stderr.write('usage: node follow.mjs <host:port> --email E --password P --conversation NAME\n');
  process.exit(2);
}
const count = Number.parseInt(values.count, 10);

const print = (object) => process.stdout.write(`${JSON.stringify(object)}\n`);

// A run update in brief: its kind, the sequences it covers (a merged delta's
// from its firstSequence), and its text or the run's state.
function runUpdate(update) {
  return {
    run: update.run,
    kind: update.update,
    sequence: Number(update.sequence),
    firstSequence: Number(firstSequence(update)),
    ...(update.update === 'delta' ? { delta: update.delta.text } : {}),
    ...(update.update === 'stateChange' ? { state: update.stateChange.run.state } : {}),
  };
}

// The event's payload, in brief: enough to tell events apart.
function summary(event) {
  const text = event.messageCreated?.message?.parts?.map((part) => part.text ?? '').join('') ?? '';
  return {
    id: event.id,
    cursor: event.cursor,
    type: event.type,
    conversation: event.conversation,
    payload: event.payload,
    ...(text ? { text } : {}),
    ...(event.payload === 'runUpdated' ? { update: runUpdate(event.runUpdated.update) } : {}),
  };
}

async function main() {
  const { auth, events, close } = createClients(address);
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort());
  process.once('SIGTERM', () => stop.abort());
  try {
    let signedIn = false;
    const session = new Session(auth, {
      marginMs: Number.parseInt(values['refresh-margin-ms'], 10),
      // Where an application would save the pair; here, a line saying it changed.
      onTokens: (tokens) => signedIn && print({ refreshed: tokens.accessTokenExpireTime }),
    });
    const login = await session.login(values.email, values.password);
    signedIn = true;
    print({ signedIn: login.user.name });
    const request = { scopes: [{ conversation: values.conversation }], afterCursor: values.after };
    let received = 0;
    for await (const item of follow(events, session, request, { signal: stop.signal })) {
      if (item.state) {
        print({ state: item.state, cursor: item.cursor });
        continue;
      }
      print({ event: summary(item.event) });
      received += 1;
      if (count > 0 && received >= count) stop.abort();
    }
  } finally {
    close();
  }
}

main().catch((error) => {
  const code = error.code === undefined ? '' : `${grpc.status[error.code]}: `;
  process.stderr.write(`follow: ${code}${error.details ?? error.message}\n`);
  process.exitCode = 1;
});
