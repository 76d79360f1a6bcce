// Runs over the bidirectional Converse stream: node runs.mjs <host:port>
//
// Registers a user, creates a workspace and a conversation, then on one
// Converse stream sends a message and reads the run's updates to its end,
// sends a slow one, cancels it with a cancel frame once its first delta has
// arrived, and reads it to CANCELLED. Then it watches the first run again
// from its start with watchRun, which asks for merged deltas: its deltas,
// all ready at once, come as one update. It prints one JSON object on stdout.
// Every step has a deadline; any failure exits 1.
import { createClients, firstSequence, Session, TERMINAL, unary, watchRun } from './lib.mjs';

const TIMEOUT_MS = 10000;

const deadline = () => new Date(Date.now() + TIMEOUT_MS);


// Frames of a bidirectional stream, buffered from the start, awaited in order.
class Stream {
  constructor(call) {
    this.call = call;
    this.frames = [];
    this.error = null;
    this.ended = false;
    this.waiters = [];
    call.on('data', (frame) => {
      this.frames.push(frame);
      this.wake();
    });
    call.on('error', (error) => {
      this.error = error;
      this.wake();
    });
    call.on('end', () => {
      this.ended = true;
      this.wake();
    });
  }

  wake() {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  async next() {
    const stop = Date.now() + TIMEOUT_MS;
    for (;;) {
      const frame = this.frames.shift();
      if (frame !== undefined) return frame;
      if (this.error) throw this.error;
      if (this.ended) return null;
      const left = stop - Date.now();
      if (left <= 0) throw new Error(`no frame within ${TIMEOUT_MS} ms`);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  // Frames (heartbeats skipped) until `stop(frame)` is true; returns them all.
  async until(stop) {
    const seen = [];
    for (;;) {
      const frame = await this.next();
      if (frame === null) throw new Error(`the stream ended: ${JSON.stringify(seen)}`);
      if (frame.frame === 'heartbeat') continue;
      seen.push(frame);
      if (stop(frame)) return seen;
    }
  }
}

const isEnd = (run) => (frame) =>
  frame.frame === 'update' &&
  frame.update.run === run &&
  frame.update.update === 'stateChange' &&
  TERMINAL.has(frame.update.stateChange.run.state);

async function main(address) {
  const { auth, context, dispatcher, close } = createClients(address);
  try {
    const session = new Session(auth);
    await session.register({
      email: `node-runs-${Date.now()}-${process.pid}@example.com`,
      password: 'node client password 123',
    });
    const bearer = await session.metadata();
    const workspace = await unary(
      context,
      'createWorkspace',
      { workspace: { displayName: 'Node' } },
      bearer,
    );
    const created = await unary(
      context,
      'createConversation',
      { parent: workspace.workspace.name, conversation: { title: 'From Node' } },
      bearer,
    );
    const conversation = created.conversation.name;
    const stream = new Stream(dispatcher.converse(bearer, { deadline: deadline() }));
    const send = (id, text, parameters) =>
      stream.call.write({
        clientRequestId: id,
        sendMessage: {
          conversation,
          message: { parts: [{ text }] },
          parameters: parameters ? { fields: parameters } : undefined,
        },
      });

    // A pause between words: each word is a delta of its own, not merged at the source.
    send('first', 'hello from node', { delay_ms: { numberValue: 20 } });
    const [ack] = await stream.until((frame) => frame.frame === 'messageSent');
    const first = ack.messageSent.run.name;
    const frames = await stream.until(isEnd(first));
    const updates = frames.filter((f) => f.frame === 'update' && f.update.run === first);
    const answer = updates
      .filter((f) => f.update.update === 'delta')
      .map((f) => f.update.delta.text)
      .join('');

    send('slow', 'slow words here', { delay_ms: { numberValue: 60000 } });
    const [slowAck] = await stream.until((frame) => frame.frame === 'messageSent');
    const slow = slowAck.messageSent.run.name;
    await stream.until((f) => f.frame === 'update' && f.update.run === slow && f.update.update === 'delta');
    stream.call.write({ clientRequestId: 'stop', cancelRun: { name: slow, reason: 'from node' } });
    // The run's last update and the answer to the cancel frame come in either order.
    const rest = await stream.until(isEnd(slow));
    let cancelled = rest.find((f) => f.frame === 'runCancelled');
    if (!cancelled) [cancelled] = await stream.until((f) => f.frame === 'runCancelled');
    const ended = rest.filter((f) => f.frame === 'update');
    stream.call.end();
    const last = ended[ended.length - 1].update.stateChange.run;

    const watching = new AbortController();
    const giveUp = setTimeout(() => watching.abort(), TIMEOUT_MS);
    const replay = [];
    try {
      for await (const update of watchRun(dispatcher, session, first, { signal: watching.signal })) {
        replay.push(update);
      }
    } finally {
      clearTimeout(giveUp);
    }
    if (watching.signal.aborted) throw new Error(`watchRun did not end within ${TIMEOUT_MS} ms`);

    console.log(
      JSON.stringify({
        first: {
          run: first,
          sequences: updates.map((f) => Number(f.update.sequence)),
          answer,
          state: updates[updates.length - 1].update.stateChange.run.state,
        },
        replay: {
          updates: replay.map((u) => ({
            kind: u.update,
            sequence: Number(u.sequence),
            firstSequence: Number(firstSequence(u)),
          })),
          answer: replay
            .filter((u) => u.update === 'delta')
            .map((u) => u.delta.text)
            .join(''),
        },
        cancelled: {
          run: slow,
          ack: cancelled ? cancelled.clientRequestId : null,
          ackState: cancelled ? cancelled.runCancelled.run.state : null,
          state: last.state,
          error: last.error ? last.error.message : '',
        },
      }),
    );
  } finally {
    close();
  }
}

main(process.argv[2]).catch((error) => {
  console.error(error.stack || String(error));
  process.exit(1);
});
