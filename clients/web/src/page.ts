// What every part of the console shares: the page's fixed elements (the header, the
// notice, the problem shelf), looked up once by their `data-testid`, and actions run with
// their button disabled and their failure shown, so no part reports errors its own way.
//
// A failure is shown where it happened: beside the control that was used (in its form,
// list item or card), else on the shelf atop the columns. Either way it takes its own
// room in the page and covers nothing. It goes when its cause does: dismissed (×), when
// the same action next succeeds, and by itself after a while when the cause may pass on
// its own (a lost connection, a deadline, a rate limit).
import { h } from "./dom";
import { type Problem, isTransient, problem, renderProblem } from "./errors";
import { isSignedOut } from "./session";

/** How long a problem whose cause may pass by itself stays on the page. */
export const TRANSIENT_MS = 8_000;
/** Problems on the shelf at once (the newest first; one per action). */
const SHELF_MAX = 3;

export interface BusyOptions {
  /** Show a failure in this part (by `data-testid`) instead, replacing what is there. */
  area?: string;
  /** The control that started it (when several share the action's `data-testid`). */
  button?: HTMLButtonElement | null;
}

export class Page {
  private readonly parts: Record<string, HTMLElement> = {};

  constructor(
    private readonly root: HTMLElement,
    private readonly signedIn: () => boolean,
  ) {}

  /** Run an action with its button disabled; its failure is shown, never thrown. */
  async busy(action: string, work: () => Promise<void>, options: BusyOptions = {}): Promise<void> {
    const button = options.button ?? this.root.querySelector<HTMLButtonElement>(`button[data-testid="${action}"]`);
    if (button) button.disabled = true;
    document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "0") + 1);
    try {
      await work();
      if (!options.area) this.clearProblem(action);
    } catch (error) {
      // The session ended under it: the sign-in screen says why.
      if (isSignedOut(error) || (!this.signedIn() && action !== "sign-in" && action !== "register")) return;
      const p = isProblem(error) ? error : problem(error);
      if (options.area) this.part(options.area).replaceChildren(renderProblem(p, options.area === "auth-error" ? "auth-problem" : "error"));
      else this.showProblem(p, action, button);
    } finally {
      if (button) button.disabled = false;
      document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "1") - 1);
    }
  }

  /** Shows `p` as the failure of `action`, beside `near` when that is on the page. */
  showProblem(p: Problem, action: string, near?: HTMLElement | null): void {
    this.clearProblem(action);
    const box = renderProblem(p);
    box.dataset.action = action;
    const transient = isTransient(p);
    box.dataset.transient = String(transient);
    box.append(
      h("button", { type: "button", class: "dismiss", "data-testid": "dismiss-problem", "aria-label": "dismiss", onclick: () => box.remove() }, "×"),
    );
    const place = near?.isConnected && near.checkVisibility() ? near.closest<HTMLElement>("form, li, article, section, .editor") : null;
    if (place && this.root.contains(place)) {
      place.append(box);
    } else {
      const shelf = this.part("problems");
      shelf.prepend(box);
      while (shelf.children.length > SHELF_MAX) shelf.lastElementChild?.remove();
    }
    if (transient) setTimeout(() => box.remove(), TRANSIENT_MS);
  }

  /** The failure shown for `action` is over (it succeeded since, or its cause went). */
  clearProblem(action: string): void {
    for (const shown of this.root.querySelectorAll<HTMLElement>('[data-testid="error"]')) {
      if (shown.dataset.action === action) shown.remove();
    }
  }

  notice(text: string): void {
    const notice = this.part("notice");
    notice.textContent = text;
    notice.hidden = !text;
  }

  part(id: string): HTMLElement {
    const cached = this.parts[id];
    if (cached) return cached;
    const found = document.querySelector<HTMLElement>(`[data-testid="${id}"]`);
    if (found === null) throw new Error(`the page has no ${id}`);
    this.parts[id] = found;
    return found;
  }
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}
