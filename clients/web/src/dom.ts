// DOM helpers. Text always goes in as text (textContent, attributes), never as markup:
// the page runs under a Trusted Types CSP, so an innerHTML assignment would throw, and
// nothing a server or another user wrote can become markup here.

export type Child = Node | string | null | undefined | false;

export interface Attrs {
  [name: string]: string | number | boolean | undefined | null | ((event: Event) => void);
}

/** An element with attributes (`on*` functions become listeners) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (typeof value === "function") {
      element.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else if (name === "value" && "value" in element) {
      (element as HTMLInputElement).value = String(value);
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

export function append(parent: Node, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
}

/** The element with `data-testid` equal to `id` (the page's stable handles). */
export function byTestId<T extends HTMLElement = HTMLElement>(id: string, root: ParentNode = document): T {
  const found = root.querySelector<T>(`[data-testid="${id}"]`);
  if (found === null) throw new Error(`no element ${id}`);
  return found;
}

/** Sleeps `ms`, or less if `signal` aborts (then it resolves, never rejects). */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** Exponential backoff, jittered between half and all of `base * 2^attempt`, capped at `max`. */
export function backoff(attempt: number, base = 250, max = 5_000): number {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 16));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

export function formatTime(date: Date | undefined): string {
  if (date === undefined) return "";
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** Replaces the element's children (null, undefined and false skipped). */
export function fill(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, children);
}
