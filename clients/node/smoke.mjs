// Smoke test: node smoke.mjs <host:port>
//
// Checks health, reads the JWKS, registers a user, calls GetPrincipal with its
// bearer token and once without any, over an insecure channel, then prints
// one JSON object on stdout. An RPC error status is reported as data
// (exit 0); failing to connect or a passed deadline is fatal (exit 1).
import { createClients, decodeStatusDetails, grpc } from './lib.mjs';

const TIMEOUT_MS = 5000;
const AUTH_SERVICE = 'switchboard.api.auth.v1.AuthService';

class FatalError extends Error {}

const deadline = () => new Date(Date.now() + TIMEOUT_MS);

// Promisified unary call resolving to { ok: true, response } or
// { ok: false, error }; only a passed deadline rejects.
function unary(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (error, response) => {
      if (!error) return resolve({ ok: true, response });
      if (error.code === grpc.status.DEADLINE_EXCEEDED) {
        return reject(new FatalError(`${method}: deadline of ${TIMEOUT_MS} ms passed`));
      }
      resolve({ ok: false, error });
    });
  });
}

// grpc.status is a TypeScript enum, so it maps numbers back to names too.
function describeError(error) {
  const out = { ok: false, code: error.code, codeName: grpc.status[error.code], message: error.details };
  for (const { type, value } of decodeStatusDetails(error.metadata)?.details ?? []) {
    if (type === 'google.rpc.ErrorInfo') out.errorInfo = value;
    if (type === 'google.rpc.BadRequest') out.badRequest = value;
  }
  return out;
}

async function main(address) {
  const { auth, health, close } = createClients(address);
  try {
    // Without this, calls to an unreachable server fail fast with UNAVAILABLE,
    // which would be indistinguishable from a server returning UNAVAILABLE.
    await new Promise((resolve, reject) =>
      auth.waitForReady(deadline(), (err) =>
        err ? reject(new FatalError(`could not connect to ${address}: ${err.message}`)) : resolve(),
      ),
    );

    const result = { health: {} };
    for (const service of ['', AUTH_SERVICE]) {
      const r = await unary(health, 'check', { service });
      result.health[service] = r.ok ? r.response.status : describeError(r.error);
    }
    const jwks = await unary(auth, 'getJwks', {});
    result.getJwks = jwks.ok ? { ok: true, response: jwks.response } : describeError(jwks.error);

    const email = `node-${Date.now()}-${process.pid}@example.com`;
    const registered = await unary(auth, 'register', {
      email,
      password: 'node client password 123',
      displayName: 'Node',
    });
    result.register = registered.ok
      ? { ok: true, user: registered.response.user.name }
      : describeError(registered.error);
    if (registered.ok) {
      const bearer = new grpc.Metadata();
      bearer.set('authorization', `Bearer ${registered.response.tokens.accessToken}`);
      const me = await unary(auth, 'getPrincipal', {}, bearer);
      result.getPrincipal = me.ok
        ? { ok: true, user: me.response.principal.user, email: me.response.user.email }
        : describeError(me.error);
    }
    const anonymous = await unary(auth, 'getPrincipal', {});
    result.anonymous = anonymous.ok ? { ok: true } : describeError(anonymous.error);

    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    close();
  }
}

const address = process.argv[2];
if (!address) {
  process.stderr.write('usage: node smoke.mjs <host:port>\n');
  process.exit(2);
}
main(address).catch((err) => {
  process.stderr.write(`smoke: ${err instanceof FatalError ? err.message : err.stack}\n`);
  process.exitCode = 1;
});
