// A delete asked for beside the thing it deletes: what it will do, then Delete or Keep it.
// One place for both lists (assistants, integrations), so they ask and fail the same way.
import { h } from "./dom";
import { problem, renderProblem } from "./errors";

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

/** The confirmation box; the caller places it. It removes itself when kept or deleted. */
export function deleteConfirmation(question: DeleteQuestion): HTMLElement {
  const where = h("div", {});
  const box: HTMLElement = h(
    "div",
    { class: "confirm", role: "alertdialog", "data-testid": "delete-confirmation" },
    h("p", {}, `Delete ${question.title}? `, question.consequence),
    where,
    h(
      "div",
      { class: "row" },
      h(
        "button",
        {
          type: "button",
          class: "danger",
          "data-testid": "confirm-delete",
          onclick: async (e: globalThis.Event) => {
            const button = e.currentTarget as HTMLButtonElement;
            button.disabled = true;
            try {
              await question.remove();
              box.remove();
            } catch (error) {
              const shown = renderProblem(problem(error));
              shown.dataset.action = question.action;
              where.replaceChildren(shown);
            } finally {
              button.disabled = false;
            }
          },
        },
        "Delete",
      ),
      h("button", { type: "button", "data-testid": "cancel-delete", onclick: () => box.remove() }, "Keep it"),
    ),
  );
  return box;
}
