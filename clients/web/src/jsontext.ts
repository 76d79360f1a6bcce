// A tool call's arguments as text. They travel as a google.protobuf.Struct, which is a
// map: the server's protobuf runtime iterates it in hash order (different in each
// process), so the order the model wrote the keys in is gone before the page sees them,
// and a JSON.stringify of what arrived showed `{"b":3,"a":2}` for `{"a":2,"b":3}`, and in
// another order after a restart. The server reads a call back to the model with its keys
// sorted (shared/parttext.py, compact_json); the page shows the same text, so what a person
// approves reads as what the model is told it asked, in the same order every time.
import type { JsonValue } from "@bufbuild/protobuf";

/** Keys in code-unit order, as Python's `sort_keys` orders the server's text (they differ
 *  only for keys with characters beyond the Basic Multilingual Plane). */
function sortedKeys(value: { [key: string]: JsonValue }): string[] {
  return Object.keys(value).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/** `value` as JSON with every object's keys sorted: compact (`{"a":2,"b":3}`), or
 *  indented by `indent` spaces a level. Written out here rather than with
 *  JSON.stringify, which puts integer-like keys ("10", "2") first whatever the order. */
export function jsonText(value: JsonValue | undefined, indent = 0): string {
  return write(value ?? {}, indent, "");
}

function write(value: JsonValue, indent: number, at: string): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  const inner = at + " ".repeat(indent);
  const open = indent ? `\n${inner}` : "";
  const close = indent ? `\n${at}` : "";
  const comma = indent ? `,\n${inner}` : ",";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[${open}${value.map((item) => write(item, indent, inner)).join(comma)}${close}]`;
  }
  const keys = sortedKeys(value);
  if (!keys.length) return "{}";
  const colon = indent ? ": " : ":";
  return `{${open}${keys.map((key) => `${JSON.stringify(key)}${colon}${write(value[key] as JsonValue, indent, inner)}`).join(comma)}${close}}`;
}
