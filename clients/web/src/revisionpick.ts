// A choice of one of an assistant's kept revisions (docs/assistants.md, "Revisions"), for
// what pins one: a schedule, an API key. The select lists what ListAssistantRevisions
// keeps, newest first, the newest marked current; a pin already made stays offered even
// when it is not listed (no longer kept, or beyond the first page), so opening an editor
// never changes it silently.
import type { Api } from "./api";
import { h } from "./dom";

/** Revisions offered: ListAssistantRevisions' largest page. Older ones are rarely pinned
 *  and stay reachable by the API. */
export const PICK_PAGE = 50;

/** `revision` in words beside a name: "at revision 2". */
export function atRevision(revision: bigint): string {
  return `at revision ${revision}`;
}

/**
 * Fills `select` with `assistant`'s kept revisions after the `lead` options, `keep` chosen
 * (offered even when not listed). The select says what it holds in `data-assistant` and
 * `data-loaded` ("true" once listed), so a newer fill for another assistant wins over an
 * older one still under way. A failure to list is thrown, the lead options and `keep`
 * still offered.
 */
export async function fillRevisions(
  api: Api,
  select: HTMLSelectElement,
  assistant: string,
  lead: [string, string][],
  keep: string,
): Promise<void> {
  select.dataset.assistant = assistant;
  select.dataset.loaded = "false";
  const offer = (listed: [string, string][]): void => {
    const options = [...lead, ...listed];
    if (keep && !options.some(([value]) => value === keep)) options.push([keep, keep]);
    select.replaceChildren(...options.map(([value, text]) => h("option", { value }, text)));
    select.value = keep || (options[0]?.[0] ?? "");
  };
  offer([]);
  if (!assistant) return;
  const listed = await api.dispatcher.listAssistantRevisions({ parent: assistant, pageSize: PICK_PAGE });
  if (select.dataset.assistant !== assistant) return;
  // Newest first: the first listed is the current configuration.
  offer(listed.revisions.map((r, i): [string, string] => [String(r.revision), i === 0 ? `${r.revision} (current)` : String(r.revision)]));
  select.dataset.loaded = "true";
}
