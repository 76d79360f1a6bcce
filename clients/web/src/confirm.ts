// An act asked for beside the thing it acts on: what it will do, then the act or Keep it.
// One place for every such question (deleting an assistant or an integration, rolling an
// assistant back), so they ask and fail the same way.
import { h } from "./dom";
import { type Problem, problem, renderProblem } from "./errors";

export interface Question {
  /** What the box says the act will do. */
  text: string;
  /** The button that does it ("Delete", "Roll back"). */
  label: string;
  /** The `data-testid`s are `${name}-confirmation`, `confirm-${name}` and `cancel-${name}`. */
  name: string;
  /** The problem's `data-action`, for the tests and the stylesheet. */
  action: string;
  /** Does it; a refusal is shown in the box, which stays open. */
  act: () => Promise<void>;
  /** Adds to a refusal's display (an etag conflict offers the current version). */
  refused?: (shown: HTMLElement, found: Problem) => void;
}

/** The confirmation box; the caller places it. It removes itself when kept or done. */
export function confirmation(question: Question): HTMLElement {
  const where = h("div", {});
  const box: HTMLElement = h(
    "div",
    { class: "confirm", role: "alertdialog", "data-testid": `${question.name}-confirmation` },
    h("p", {}, question.text),
    where,
    h(
      "div",
      { class: "row" },
      h(
        "button",
        {
          type: "button",
          class: "danger",
          "data-testid": `confirm-${question.name}`,
          onclick: async (e: globalThis.Event) => {
            const button = e.currentTarget as HTMLButtonElement;
            button.disabled = true;
            try {
              await question.act();
              box.remove();
            } catch (error) {
              const found = problem(error);
              const shown = renderProblem(found);
              shown.dataset.action = question.action;
              question.refused?.(shown, found);
              where.replaceChildren(shown);
            } finally {
              button.disabled = false;
            }
          },
        },
        question.label,
      ),
      h("button", { type: "button", "data-testid": `cancel-${question.name}`, onclick: () => box.remove() }, "Keep it"),
    ),
  );
  return box;
}

export interface DeleteQuestion {
  /** What is deleted, as the page names it. */
  title: string;
  /** What deleting it does to the rest of the workspace. */
  consequence: string;
  /** The problem's `data-action`, for the tests and the stylesheet. */
  action: string;
  /** Deletes it; a refusal is shown in the box, which stays open. */
  remove: () => Promise<void>;
}

/** A delete's confirmation box. */
export function deleteConfirmation(question: DeleteQuestion): HTMLElement {
  return confirmation({
    text: `Delete ${question.title}? ${question.consequence}`,
    label: "Delete",
    name: "delete",
    action: question.action,
    act: question.remove,
  });
}
