// Following a server stream that should outlive its connection (a run's updates, the
// integrations' status): reopened with backoff after a drop, the token renewed once when
// it is refused, given up on an answer that reopening would not change.
import type { Api } from "./api";
import { backoff, pause } from "./dom";
import { type Problem, problem } from "./errors";
import { retryable } from "./feed";
import { isSignedOut, wantsRenewal } from "./session";

export interface Follow<T> {
  /** Open the stream (again); `headers` carry the token. */
  open(headers: Record<string, string>, signal: AbortSignal): AsyncIterable<T>;
  /** One frame; "done" ends following (the run ended). */
  frame(value: T): "more" | "done";
  /** Connected (first frame of an opening) or not; the problem that broke it, if any. */
  status(live: boolean, detail?: Problem): void;
  /** Following ended for good with this problem. */
  failed(detail: Problem): void;
}

export async function follow<T>(api: Api, how: Follow<T>, signal: AbortSignal): Promise<void> {
  let attempt = 0;
  let renewed = false;
  while (!signal.aborted) {
    let used = "";
    try {
      used = await api.tokens.token();
      let first = true;
      for await (const value of how.open({ authorization: `Bearer ${used}` }, signal)) {
        if (first) {
          first = false;
          attempt = 0;
          renewed = false;
          how.status(true);
        }
        if (how.frame(value) === "done") return;
      }
    } catch (error) {
      if (signal.aborted || isSignedOut(error)) return;
      const p = problem(error);
      if (wantsRenewal(error) && !renewed) {
        renewed = true;
        try {
          await api.tokens.renew(used);
          continue;
        } catch (failure) {
          if (isSignedOut(failure)) return;
          renewed = false;
        }
      } else if (p.code === "UNAUTHENTICATED") {
        api.tokens.end("the server ended the session", p);
        return;
      } else if (p.wire && !retryable(p)) {
        return how.failed(p);
      }
      how.status(false, p);
    }
    await pause(backoff(attempt++), signal);
  }
}
