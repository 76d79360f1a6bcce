// Event stream example and test: node events.mjs <host:port>
//
// Registers a user, subscribes to its own user scope, and waits for the first
// frame (a heartbeat: the subscription is live). It then creates an API key,
// which publishes a security event, and reads that event from the stream.
// Finally it resumes after the heartbeat's cursor in a new Subscribe and
// checks that the same event is replayed. It prints one JSON object on stdout.
// Every step has a deadline; any failure exits 1.
import { createClients, grpc, unary } from './lib.mjs';

const TIMEOUT_MS = 10000;



// Buffers every frame of a server stream from the start, so a frame that
// arrives before anyone waits for it is not missed.
class Frames {
  constructor(call) {
    this.call = call;
    this.frames = [];
    this.error = null;
    this.waiters = [];
    call.on('data', (frame) => {
      this.frames.push(frame);
      this.wake();
    });
    call.on('error', (error) => {
      if (error.code !== grpc.status.CANCELLED) this.error = error;
      this.wake();
    });
  }

  wake() {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  // Resolves with the first value `accept` returns for a buffered or later frame.
  async until(accept) {
    const stop = Date.now() + TIMEOUT_MS;
    for (let seen = 0; ; ) {
      for (; seen < this.frames.length; seen++) {
        const value = accept(this.frames[seen]);
        if (value !== undefined) return value;
      }
      if (this.error) throw this.error;
      const left = stop - Date.now();
      if (left <= 0) {
        throw new Error(`no matching frame within ${TIMEOUT_MS} ms: ${JSON.stringify(this.frames)}`);
      }
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
}

async function main(address) {
  const { auth, events, close } = createClients(address);
  try {
    const registered = await unary(
      auth,
      'register',
      { email: `node-events-${Date.now()}-${process.pid}@example.com`, password: 'node client password 123' },
      new grpc.Metadata(),
    );
    const bearer = new grpc.Metadata();
    bearer.set('authorization', `Bearer ${registered.tokens.accessToken}`);
    const scopes = [{ user: registered.user.name }];

    const live = new Frames(events.subscribe({ scopes }, bearer));
    const liveFrom = await live.until((f) => (f.frame === 'heartbeat' ? f.heartbeat.cursor : undefined));
    const key = await unary(auth, 'createApiKey', { displayName: 'from node' }, bearer);
    const event = await live.until((f) =>
      f.frame === 'batch' ? f.batch.events.find((e) => e.security?.apiKey === key.apiKey.name) : undefined,
    );
    live.call.cancel();

    const resumed = new Frames(events.subscribe({ scopes, afterCursor: liveFrom }, bearer));
    const replayed = await resumed.until((f) =>
      f.frame === 'batch' ? f.batch.events.find((e) => e.id === event.id) : undefined,
    );
    resumed.call.cancel();

    process.stdout.write(
      `${JSON.stringify({
        liveFrom,
        event: {
          id: event.id,
          cursor: event.cursor,
          type: event.type,
          kind: event.security.kind,
          apiKey: event.security.apiKey,
        },
        apiKey: key.apiKey.name,
        replayedId: replayed.id,
        replayedFirstFrame: resumed.frames[0].frame,
      })}\n`,
    );
  } finally {
    close();
  }
}

const address = process.argv[2];
if (!address) {
  process.stderr.write('usage: node events.mjs <host:port>\n');
  process.exit(2);
}
main(address).catch((err) => {
  process.stderr.write(`events: ${err.stack}\n`);
  process.exitCode = 1;
});
