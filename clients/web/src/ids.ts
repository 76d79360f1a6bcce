// The ids a person chooses here (a workspace's, an assistant's, an integration's), by the
// server's own rules: idrules.json holds each kind's bounds and the rule in the words the
// server's refusals use (services/switchboard/platform/values/names.py; tests/platform/values/test_id_rules.py
// fails when they differ). The input's pattern and its hint both come from it, so the page
// says and checks exactly what the server enforces.
import rules from "./idrules.json";

export type IdField = keyof typeof rules;

export interface IdRule {
  shortest: number;
  longest: number;
  /** "3 to 63 characters: lowercase letters, digits and hyphens, starting with a letter". */
  words: string;
}

export function idRule(field: IdField): IdRule {
  return rules[field];
}

/** The rule as an input's `pattern`: the server's `[a-z][a-z0-9-]{2,62}`, its `-` escaped
 *  (browsers compile patterns with the `v` flag, where a bare `-` in a class is an error
 *  and the whole pattern would be ignored). */
export function idPattern(rule: IdRule): string {
  return `[a-z][a-z0-9\\-]{${rule.shortest - 1},${rule.longest - 1}}`;
}

/** The attributes of an input for an id of `field`: its pattern, and the rule as its title
 *  (what the browser says when the pattern refuses a value). */
export function idAttributes(field: IdField): { pattern: string; title: string; maxlength: number } {
  const rule = idRule(field);
  return { pattern: idPattern(rule), title: `The id: ${rule.words}.`, maxlength: rule.longest };
}
