// The open workspace's Search page (`#workspaces/w/search`): SearchContext over its memory,
// its conversations' messages and its documents' text, with the mode switch (the server's
// default, full-text, semantic, hybrid) and an optional filter. Each result says where it
// came from (a memory item with its kind and scope; a message with its role and a link to
// its conversation; a document with its file name and character range), its score and its
// rank in each list; a search that fell back to full-text says why. A bad filter or query
// is the server's INVALID_ARGUMENT, shown beside the field it names. A search by meaning
// answers its page size whatever the query (the nearest vectors, however far): results found
// by meaning alone and much less similar than the best are folded away below the others.
import { type Api } from "./api";
import { h } from "./dom";
import { type Problem, problem, renderProblem } from "./errors";
import {
  MessageRole,
  SearchFallbackReason,
  SearchMode,
  type SearchContextResponse,
  type SearchResult,
} from "./gen/switchboard/api/context/v1/context_pb";
import { memoryKindLabel } from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";

/** Results asked for at once (SearchContext's ceiling is 50). */
const PAGE = 20;
const MODES: [SearchMode, string][] = [
  [SearchMode.UNSPECIFIED, "Default"],
  [SearchMode.FULL_TEXT, "Full-text"],
  [SearchMode.SEMANTIC, "Semantic"],
  [SearchMode.HYBRID, "Hybrid"],
];
const MODE_WORDS: Record<SearchMode, string> = {
  [SearchMode.UNSPECIFIED]: "default",
  [SearchMode.FULL_TEXT]: "full-text",
  [SearchMode.SEMANTIC]: "semantic",
  [SearchMode.HYBRID]: "hybrid",
};
const FALLBACKS: Record<SearchFallbackReason, string> = {
  [SearchFallbackReason.UNSPECIFIED]: "",
  [SearchFallbackReason.NOT_CONFIGURED]: "no embeddings endpoint or model is configured for this workspace",
  [SearchFallbackReason.NO_VECTOR_ENGINE]: "the database has no vector engine",
  [SearchFallbackReason.EMBEDDINGS_UNAVAILABLE]: "the embeddings endpoint could not embed the query",
  [SearchFallbackReason.BUDGET_EXHAUSTED]: "a budget had no room for the query's embedding",
};
const ROLES: Record<MessageRole, string> = {
  [MessageRole.UNSPECIFIED]: "message",
  [MessageRole.USER]: "user",
  [MessageRole.ASSISTANT]: "assistant",
  [MessageRole.SYSTEM]: "system",
  [MessageRole.TOOL]: "tool",
};

/** A result found by meaning alone (no full-text rank) is a weaker match when its similarity
 *  is under this share of the best result's: with no words in common, the semantic list
 *  still fills its page with the nearest vectors, and those tail off into the unrelated. */
export const WEAK_SHARE = 0.5;

/** The results worth showing first, and the weaker ones (found by meaning alone, under
 *  WEAK_SHARE of the best similarity), each list in the server's order; `cutoff` the
 *  similarity under which a result is weaker (undefined when no result has one). */
export function splitWeak(results: SearchResult[]): { strong: [SearchResult, number][]; weak: [SearchResult, number][]; cutoff: number | undefined } {
  const similarities = results.map((r) => r.scores?.similarity).filter((x): x is number => x !== undefined);
  const best = similarities.length ? Math.max(...similarities) : undefined;
  const cutoff = best !== undefined && best > 0 ? best * WEAK_SHARE : undefined;
  const strong: [SearchResult, number][] = [];
  const weak: [SearchResult, number][] = [];
  results.forEach((r, i) => {
    const scores = r.scores;
    const byMeaningOnly = scores?.fullTextRank === undefined && scores?.semanticRank !== undefined;
    const similarity = scores?.similarity ?? Number.NEGATIVE_INFINITY;
    (cutoff !== undefined && byMeaningOnly && similarity < cutoff ? weak : strong).push([r, i + 1]);
  });
  return { strong, weak, cutoff };
}

/** `workspaces/w/conversations/c` of a message's or memory item's name, or "". */
function conversationOf(name: string): string {
  return /^(workspaces\/[^/]+\/conversations\/[^/]+)\//.exec(name)?.[1] ?? "";
}

export class SearchPage {
  /** The page, in the centre column while it is open. */
  readonly element: HTMLElement;
  private readonly query = h("input", {
    type: "search",
    "data-testid": "search-query",
    "aria-label": "search query",
    placeholder: "what are you looking for?",
    maxlength: 2000,
    required: true,
  });
  private readonly filter = h("input", {
    "data-testid": "search-filter",
    "aria-label": "filter",
    placeholder: "filter, e.g. source = memory AND kind = fact",
    maxlength: 1000,
  });
  private readonly modes = h("div", { class: "row modes", role: "radiogroup", "aria-label": "mode", "data-testid": "search-modes" });
  private readonly status = h("p", { class: "muted", "data-testid": "search-status", "aria-live": "polite" });
  private readonly problemBox = h("div", { "data-testid": "search-problem" });
  private readonly results = h("ol", { class: "list results", "data-testid": "search-results" });
  private mode: SearchMode = SearchMode.UNSPECIFIED;
  private workspace = "";

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    for (const [mode, label] of MODES) {
      const id = `search-mode-${MODE_WORDS[mode]}`;
      this.modes.append(
        h(
          "label",
          { class: "choice" },
          h("input", {
            type: "radio",
            name: "search-mode",
            value: String(mode),
            "data-testid": id,
            checked: mode === this.mode,
            onchange: () => {
              this.mode = mode;
            },
          }),
          ` ${label}`,
        ),
      );
    }
    this.element = h(
      "div",
      { class: "page search", "data-testid": "search-page", hidden: true },
      h(
        "form",
        {
          class: "inline editor",
          "data-testid": "search-form",
          onsubmit: (event: globalThis.Event) => {
            event.preventDefault();
            void this.search();
          },
        },
        h("label", {}, "Search", this.query),
        this.modes,
        h("label", {}, "Filter (optional)", this.filter),
        h("button", { type: "submit", "data-testid": "run-search" }, "Search"),
      ),
      this.problemBox,
      this.status,
      this.results,
    );
  }

  open(workspace: string): void {
    if (workspace === this.workspace) return;
    this.workspace = workspace;
    this.results.replaceChildren();
    this.status.textContent = "";
    this.problemBox.replaceChildren();
  }

  show(visible: boolean): void {
    this.element.hidden = !visible;
    if (visible) this.query.focus();
  }

  clear(): void {
    this.workspace = "";
    this.results.replaceChildren();
    this.status.textContent = "";
    this.problemBox.replaceChildren();
  }

  private async search(): Promise<void> {
    const parent = this.workspace;
    const query = this.query.value;
    if (!parent || !query.trim()) return;
    this.problemBox.replaceChildren();
    await this.page.busy("run-search", async () => {
      let response: SearchContextResponse;
      try {
        response = await this.api.context.searchContext({ parent, query, mode: this.mode, filter: this.filter.value, pageSize: PAGE });
      } catch (error) {
        this.showProblem(problem(error));
        return;
      }
      if (parent !== this.workspace) return;
      this.render(response);
    });
  }

  private showProblem(p: Problem): void {
    this.results.replaceChildren();
    this.status.textContent = "";
    const box = renderProblem(p, "error");
    this.problemBox.replaceChildren(box);
    const fields = new Set(p.violations.map((v) => v.field));
    this.filter.setAttribute("aria-invalid", String(fields.has("filter")));
    this.query.setAttribute("aria-invalid", String(fields.has("query")));
  }

  private render(response: SearchContextResponse): void {
    this.filter.setAttribute("aria-invalid", "false");
    this.query.setAttribute("aria-invalid", "false");
    const { strong, weak, cutoff } = splitWeak(response.results);
    const count = strong.length;
    const said = `${count} result${count === 1 ? "" : "s"}, ranked ${MODE_WORDS[response.mode]}${weak.length ? ` · ${weak.length} weaker below` : ""}`;
    const fallback = FALLBACKS[response.fallbackReason];
    this.status.replaceChildren(said);
    if (fallback) {
      this.status.append(
        h(
          "span",
          { class: "fallback", "data-testid": "search-fallback", "data-reason": SearchFallbackReason[response.fallbackReason] },
          ` · fell back to full-text: ${fallback}`,
        ),
      );
    }
    if (response.pendingIndexCount > 0n) {
      // Written moments ago and not embedded yet: a search by meaning misses those.
      this.status.append(
        h(
          "span",
          { class: "fallback", "data-testid": "search-lag", "data-pending": String(response.pendingIndexCount) },
          ` · ${response.indexLagDetail}: a search by meaning finds them once indexed`,
        ),
      );
    }
    this.results.replaceChildren(...strong.map(([result, rank]) => this.item(result, rank)));
    this.results.dataset.weak = String(weak.length);
    if (weak.length && cutoff !== undefined) {
      this.results.append(
        h(
          "li",
          { class: "weaker" },
          h(
            "details",
            { "data-testid": "search-weaker", "data-count": String(weak.length), "data-cutoff": cutoff.toFixed(3) },
            h(
              "summary",
              { class: "muted" },
              `${weak.length} weaker ${weak.length === 1 ? "match" : "matches"}: found by meaning alone, less than half as similar as the best (similarity under ${cutoff.toFixed(3)})`,
            ),
            h("ol", { class: "list results" }, ...weak.map(([result, rank]) => this.item(result, rank))),
          ),
        ),
      );
    }
  }

  private item(result: SearchResult, rank: number): HTMLElement {
    const source = result.source;
    let where: (Node | string)[] = [];
    let text = "";
    let kind = "";
    if (source.case === "memoryItem") {
      const item = source.value;
      const conversation = conversationOf(item.name);
      kind = "memory";
      text = item.content;
      where = [
        `memory · ${memoryKindLabel(item.kind)} · `,
        conversation
          ? h("a", { href: `#${conversation}`, "data-testid": "result-conversation" }, this.names.title(conversation))
          : h("span", { "data-testid": "result-scope" }, item.name.startsWith("users/") ? "your memory" : "workspace memory"),
      ];
    } else if (source.case === "message") {
      const message = source.value;
      const conversation = conversationOf(message.name);
      kind = "message";
      text = message.parts.map((p) => (p.part.case === "text" ? p.part.value : "")).join(" ");
      where = [
        `message · ${ROLES[message.role]} · `,
        h("a", { href: `#${conversation}`, "data-testid": "result-conversation" }, this.names.title(conversation)),
      ];
    } else if (source.case === "documentChunk") {
      const chunk = source.value;
      kind = "document";
      text = chunk.text;
      where = [
        "document · ",
        h("span", { "data-testid": "result-file" }, chunk.displayName || chunk.file),
        ` · characters ${chunk.startOffset}–${chunk.endOffset}`,
      ];
    }
    const scores = result.scores;
    const ranks = [
      scores?.fullTextRank !== undefined ? `full-text #${scores.fullTextRank}` : "",
      scores?.semanticRank !== undefined ? `semantic #${scores.semanticRank}` : "",
      scores?.similarity !== undefined ? `similarity ${scores.similarity.toFixed(3)}` : "",
    ].filter(Boolean);
    return h(
      "li",
      { class: "item result", "data-testid": "search-result", "data-kind": kind },
      h("div", { class: "row" }, h("strong", {}, `${rank}.`), " ", h("span", { class: "muted", "data-testid": "result-source" }, ...where)),
      h("p", { "data-testid": "result-text" }, text.length > 600 ? `${text.slice(0, 600)}…` : text),
      h("small", { class: "muted", "data-testid": "result-score" }, `score ${result.score.toPrecision(3)}`, ranks.length ? ` · ${ranks.join(" · ")}` : ""),
    );
  }
}
