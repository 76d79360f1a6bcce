// What every part of the console shares: the page's fixed elements (the header, the
// notice, the problem box), looked up once by their `data-testid`, and actions run with
// their button disabled and their failure shown, so no part reports errors its own way.
import { h } from "./dom";
import { type Problem, problem, renderProblem } from "./errors";
import { isSignedOut } from "./session";

export class Page {
  private readonly parts: Record<string, HTMLElement> = {};

  constructor(
    private readonly root: HTMLElement,
    private readonly signedIn: () => boolean,
  ) {}

  /** Run an action with its button disabled; its failure is shown, never thrown. */
  async busy(action: string, work: () => Promise<void>, area = ""): Promise<void> {
    const button = this.root.querySelector<HTMLButtonElement>(`button[data-testid="${action}"]`);
    if (button) button.disabled = true;
    document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "0") + 1);
    try {
      await work();
      if (!area) this.clearProblem(action);
    } catch (error) {
      // The session ended under it: the sign-in screen says why.
      if (isSignedOut(error) || (!this.signedIn() && action !== "sign-in" && action !== "register")) return;
      const p = isProblem(error) ? error : problem(error);
      if (area) this.part(area).replaceChildren(renderProblem(p, area === "auth-error" ? "auth-problem" : "error"));
      else this.showProblem(p, action);
    } finally {
      if (button) button.disabled = false;
      document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "1") - 1);
    }
  }

  showProblem(p: Problem, action: string): void {
    const box = renderProblem(p);
    box.dataset.action = action;
    box.append(h("button", { type: "button", class: "dismiss", onclick: () => box.remove() }, "×"));
    this.part("problems").replaceChildren(box);
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

  private clearProblem(action: string): void {
    const shown = this.part("problems").querySelector<HTMLElement>('[data-testid="error"]');
    if (shown?.dataset.action === action) shown.remove();
  }
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}
