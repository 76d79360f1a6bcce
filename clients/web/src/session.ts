// The signed-in session: the access token (memory only), the refresh token (this tab's
// sessionStorage, so a reload keeps the session and closing the tab ends it), renewal
// before expiry and once on UNAUTHENTICATED, single-flight and rotating.
//
// The rule the server enforces: a refresh token is good for one RefreshToken call, and
// presenting a spent one revokes the whole session (reuse detection). So the console
// presents each refresh token at most once:
// - every renewal in this tab shares one in-flight call (single flight);
// - the token is marked "presented" in storage before it leaves, so a reload during the
//   call does not send it again (the session ends instead; the server may have rotated it);
// - a call that got no answer (the connection failed) may have been redeemed: the token is
//   dropped, the access token is used until it expires, then the user signs in again;
// - a duplicated tab starts with a copy of sessionStorage: it asks the other tabs first
//   and, if one holds the session, does not use it (two tabs would rotate one chain).
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { AuthService, Session, TokenPair, User } from "./gen/switchboard/api/auth/v1/auth_pb";
import { type Problem, local, problem } from "./errors";

const STORAGE_KEY = "switchboard.console.session";
const CHANNEL = "switchboard.console.tabs";
/** How long a restoring tab waits for another tab to say it holds the session. */
const CLAIM_WAIT_MS = 150;
/** Renew this long before expiry at most (a quarter of the lifetime for short ones). */
const RENEW_MARGIN_MS = 60_000;
/** Below this much validity left, a call waits for the renewal rather than using the token. */
const MIN_VALIDITY_MS = 5_000;
const REFRESH_TIMEOUT_MS = 20_000;

export interface Identity {
  user: string;
  email: string;
  displayName: string;
  session: string;
}

interface Stored {
  v: 1;
  identity: Identity;
  /** "" once it can no longer be used (see `unrenewable`). */
  refreshToken: string;
  refreshExpireMs: number;
  /** Set while the token is out for redemption without an answer yet. */
  presented: boolean;
}

export type SessionChange =
  | { kind: "signed-in"; identity: Identity }
  | { kind: "renewed"; renewals: number }
  | { kind: "unrenewable"; until: number }
  | { kind: "signed-out"; why: string; problem?: Problem };

/** Thrown to a caller that needs a token when there is no session (anymore). */
export class SignedOut extends Error {
  constructor(readonly why: string) {
    super(why);
  }
}

type TabMessage = { type: "whose"; session: string; nonce: string } | { type: "mine"; session: string; nonce: string };

export class Tokens {
  private access = "";
  private renewAt = 0;
  private expireAt = 0;
  private stored: Stored | null = null;
  private inflight: Promise<string> | null = null;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly channel: BroadcastChannel | null;
  private readonly listeners: ((change: SessionChange) => void)[] = [];
  renewals = 0;

  constructor(
    private readonly auth: Client<typeof AuthService>,
    private readonly storage: Storage,
  ) {
    this.channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(CHANNEL) : null;
    this.channel?.addEventListener("message", (event: MessageEvent<TabMessage>) => {
      const message = event.data;
      if (message.type === "whose" && this.stored?.identity.session === message.session && this.access) {
        this.channel?.postMessage({ type: "mine", session: message.session, nonce: message.nonce });
      }
    });
    document.addEventListener("visibilitychange", () => {
      // Timers of hidden tabs are throttled: catch up when the tab is seen again.
      if (document.visibilityState === "visible" && this.access && Date.now() >= this.renewAt) {
        this.renewQuietly();
      }
    });
  }

  onChange(listener: (change: SessionChange) => void): void {
    this.listeners.push(listener);
  }

  get identity(): Identity | null {
    return this.stored?.identity ?? null;
  }

  get signedIn(): boolean {
    return this.stored !== null;
  }

  /** When the current access token stops working (local clock, ms), 0 without one. */
  get accessExpiresAt(): number {
    return this.expireAt;
  }

  /** Resume the session this tab had before a reload; its first call renews the token. */
  async restore(): Promise<Identity | null> {
    let stored: Stored | null = null;
    try {
      stored = parseStored(this.storage.getItem(STORAGE_KEY));
    } catch {
      stored = null;
    }
    if (stored === null) {
      this.storage.removeItem(STORAGE_KEY);
      return null;
    }
    if (stored.presented) {
      this.storage.removeItem(STORAGE_KEY);
      this.emit({
        kind: "signed-out",
        why: "the last renewal of this session got no answer (the server may have rotated the token); sign in again",
      });
      return null;
    }
    if (!stored.refreshToken || stored.refreshExpireMs <= Date.now()) {
      this.storage.removeItem(STORAGE_KEY);
      this.emit({ kind: "signed-out", why: "the session has expired; sign in again" });
      return null;
    }
    if (await this.heldElsewhere(stored.identity.session)) {
      // A duplicated tab: its copy of the session belongs to the original tab.
      this.storage.removeItem(STORAGE_KEY);
      this.emit({ kind: "signed-out", why: "this session is open in another tab; sign in here for a separate one" });
      return null;
    }
    this.stored = stored;
    this.emit({ kind: "signed-in", identity: stored.identity });
    return stored.identity;
  }

  /** Start the session Login or Register returned. */
  adopt(tokens: TokenPair, user: User, session: Session): Identity {
    const identity: Identity = {
      user: user.name,
      email: user.email,
      displayName: user.displayName,
      session: session.name,
    };
    this.stored = {
      v: 1,
      identity,
      refreshToken: tokens.refreshToken,
      refreshExpireMs: tokens.refreshTokenExpireTime ? timestampMs(tokens.refreshTokenExpireTime) : 0,
      presented: false,
    };
    this.renewals = 0;
    this.accept(tokens);
    this.emit({ kind: "signed-in", identity });
    return identity;
  }

  /** A usable access token, renewing it first when it is (nearly) expired. */
  async token(): Promise<string> {
    if (this.stored === null) throw new SignedOut("not signed in");
    const now = Date.now();
    if (this.access && now < this.expireAt - MIN_VALIDITY_MS) {
      if (now >= this.renewAt) this.renewQuietly();
      return this.access;
    }
    return this.renew();
  }

  /**
   * Renew the access token. `used` is the token a refused call carried: when the token
   * changed meanwhile (another call renewed it), that one is returned without a new
   * renewal. Concurrent callers share one RefreshToken call.
   */
  renew(used?: string): Promise<string> {
    if (used !== undefined && this.access && used !== this.access) return Promise.resolve(this.access);
    if (this.inflight === null) {
      this.inflight = this.redeem().finally(() => {
        this.inflight = null;
      });
    }
    return this.inflight;
  }

  /** End the session here (and on the server if it can be told). */
  async signOut(logout: () => Promise<unknown>): Promise<Problem | null> {
    let failed: Problem | null = null;
    if (this.stored !== null && (this.access || this.stored.refreshToken)) {
      try {
        await logout();
      } catch (error) {
        const p = problem(error);
        // Already over on the server: nothing to tell it.
        if (!(p.code === "UNAUTHENTICATED" || isSignedOut(error))) failed = p;
      }
    }
    this.end("signed out");
    return failed;
  }

  /** Forget the session (it ended on the server, or the user left). */
  end(why: string, cause?: Problem): void {
    if (this.stored === null && !this.access) return;
    this.access = "";
    this.stored = null;
    this.renewAt = this.expireAt = 0;
    clearTimeout(this.timer);
    this.storage.removeItem(STORAGE_KEY);
    this.emit({ kind: "signed-out", why, ...(cause ? { problem: cause } : {}) });
  }

  private async redeem(): Promise<string> {
    const stored = this.stored;
    if (stored === null) throw new SignedOut("not signed in");
    if (!stored.refreshToken) {
      this.end("the session could not be renewed; sign in again");
      throw new SignedOut("the session could not be renewed");
    }
    // Marked before it leaves: a reload from here on must not present it again.
    const marked: Stored = { ...stored, presented: true };
    this.persist(marked);
    let tokens: TokenPair | undefined;
    try {
      tokens = (await this.auth.refreshToken({ refreshToken: stored.refreshToken }, { timeoutMs: REFRESH_TIMEOUT_MS }))
        .tokens;
    } catch (error) {
      const p = problem(error);
      if (this.stored !== marked) throw error; // signed out (or in again) meanwhile
      if (p.wire && (p.code === "UNAVAILABLE" || p.code === "RESOURCE_EXHAUSTED")) {
        // Answered without redeeming it (Envoy had no server, or the server rolled back):
        // the token is still good for one call.
        this.persist(stored);
        throw error;
      }
      if (p.wire) {
        this.end("the session could not be renewed", p);
        throw new SignedOut("the session could not be renewed");
      }
      // No answer: it may have been redeemed. Never present it again.
      this.persist({ ...stored, refreshToken: "" });
      this.emit({ kind: "unrenewable", until: this.expireAt });
      throw error;
    }
    if (this.stored !== marked) throw new SignedOut("signed out while the session was renewed");
    if (tokens === undefined) {
      this.end("the server renewed the session without tokens", local("INTERNAL", "RefreshToken returned no tokens"));
      throw new SignedOut("no tokens");
    }
    this.stored = {
      ...stored,
      refreshToken: tokens.refreshToken,
      refreshExpireMs: tokens.refreshTokenExpireTime ? timestampMs(tokens.refreshTokenExpireTime) : stored.refreshExpireMs,
      presented: false,
    };
    this.accept(tokens);
    this.renewals += 1;
    this.emit({ kind: "renewed", renewals: this.renewals });
    return this.access;
  }

  private accept(tokens: TokenPair): void {
    const received = Date.now();
    this.access = tokens.accessToken;
    // The lifetime from the token's own claims, counted on this clock: a browser clock
    // that is off does not make the console renew too late or all the time.
    const lifetime =
      lifetimeMs(tokens.accessToken) ??
      (tokens.accessTokenExpireTime ? timestampMs(tokens.accessTokenExpireTime) - received : 60_000);
    this.expireAt = received + lifetime;
    this.renewAt = this.expireAt - Math.min(RENEW_MARGIN_MS, lifetime / 4);
    if (this.stored !== null) this.persist(this.stored);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.renewQuietly(), Math.max(0, this.renewAt - received));
  }

  /** A renewal nobody waits for (the timer's): a failure is retried while the token lasts. */
  private renewQuietly(attempt = 0): void {
    this.renew().catch((error: unknown) => {
      if (isSignedOut(error) || this.stored === null || !this.stored.refreshToken) return;
      const p = problem(error);
      if (p.wire && p.code !== "UNAVAILABLE" && p.code !== "RESOURCE_EXHAUSTED") return;
      const delay = Math.min(30_000, 1_000 * 2 ** attempt);
      if (Date.now() + delay < this.expireAt) {
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.renewQuietly(attempt + 1), delay);
      }
    });
  }

  private persist(stored: Stored): void {
    this.stored = stored;
    this.storage.setItem(STORAGE_KEY, JSON.stringify(stored));
  }

  private heldElsewhere(session: string): Promise<boolean> {
    const channel = this.channel;
    if (channel === null) return Promise.resolve(false);
    const nonce = crypto.randomUUID();
    return new Promise((resolve) => {
      const listen = (event: MessageEvent<TabMessage>): void => {
        if (event.data.type === "mine" && event.data.nonce === nonce) finish(true);
      };
      const timer = setTimeout(() => finish(false), CLAIM_WAIT_MS);
      function finish(held: boolean): void {
        clearTimeout(timer);
        channel?.removeEventListener("message", listen);
        resolve(held);
      }
      channel.addEventListener("message", listen);
      channel.postMessage({ type: "whose", session, nonce } satisfies TabMessage);
    });
  }

  private emit(change: SessionChange): void {
    for (const listener of this.listeners) listener(change);
  }
}

/** Whether `error` means there is no session: thrown here, or by a call's interceptor
 *  (the transport wraps what an interceptor throws). */
export function isSignedOut(error: unknown): boolean {
  return error instanceof SignedOut || (error instanceof ConnectError && error.cause instanceof SignedOut);
}

/** Whether a failed call should be retried after renewing the token (once). */
export function wantsRenewal(error: unknown): boolean {
  if (!(error instanceof ConnectError) || error.code !== Code.Unauthenticated) return false;
  // A revoked session cannot be renewed: its refresh token is refused too.
  return problem(error).reason !== "ERROR_REASON_SESSION_REVOKED";
}

function lifetimeMs(jwt: string): number | null {
  const payload = jwt.split(".")[1];
  if (payload === undefined) return null;
  try {
    const text = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const claims: unknown = JSON.parse(text);
    if (typeof claims !== "object" || claims === null) return null;
    const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
    if (typeof exp !== "number" || typeof iat !== "number" || exp <= iat) return null;
    return (exp - iat) * 1000;
  } catch {
    return null;
  }
}

function parseStored(text: string | null): Stored | null {
  if (text === null) return null;
  const value: unknown = JSON.parse(text);
  if (typeof value !== "object" || value === null) return null;
  const stored = value as Partial<Stored>;
  const identity = stored.identity;
  if (
    stored.v !== 1 ||
    typeof stored.refreshToken !== "string" ||
    typeof stored.refreshExpireMs !== "number" ||
    typeof identity !== "object" ||
    identity === null ||
    typeof identity.session !== "string" ||
    typeof identity.user !== "string"
  ) {
    return null;
  }
  return {
    v: 1,
    identity: {
      user: identity.user,
      email: String(identity.email ?? ""),
      displayName: String(identity.displayName ?? ""),
      session: identity.session,
    },
    refreshToken: stored.refreshToken,
    refreshExpireMs: stored.refreshExpireMs,
    presented: stored.presented === true,
  };
}
