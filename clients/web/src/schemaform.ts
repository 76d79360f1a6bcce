// A form generated from a tool's input schema (JSON Schema, as ListTools gives it): one
// field per top-level property, typed by the property's `type` (string, number, integer,
// boolean, enum) or, for anything else (objects, arrays, unions), a JSON text field.
// Reading the form checks what the schema says before anything is sent, and reports
// what is wrong the way the server would (INVALID_ARGUMENT with one violation a field).
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { h } from "./dom";
import { type Problem, type Violation, local } from "./errors";

interface Field {
  name: string;
  kind: "string" | "number" | "integer" | "boolean" | "enum" | "json";
  required: boolean;
  input: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement;
}

export interface SchemaForm {
  element: HTMLElement;
  /** The arguments, or the problem with them. */
  read(): { args: JsonObject } | { problem: Problem };
}

function object(value: JsonValue | undefined): JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value) ? value : {};
}

export function schemaForm(schema: JsonObject | undefined, testid = "tool-arg"): SchemaForm {
  const properties = object(schema?.properties);
  const required = new Set(Array.isArray(schema?.required) ? schema.required.map(String) : []);
  const fields: Field[] = [];
  // A Struct's keys may arrive in any order: required ones first, in the schema's order.
  const order = [...required];
  const names = Object.keys(properties).sort((a, b) => {
    const [i, j] = [order.indexOf(a), order.indexOf(b)];
    return (i < 0 ? order.length : i) - (j < 0 ? order.length : j) || a.localeCompare(b);
  });
  for (const name of names) {
    const raw = properties[name];
    const spec = object(raw);
    const type = typeof spec.type === "string" ? spec.type : "";
    const title = typeof spec.description === "string" ? spec.description : "";
    const common = { "data-testid": testid, "data-field": name, title, "aria-label": name };
    let field: Field;
    if (Array.isArray(spec.enum)) {
      field = {
        name,
        kind: "enum",
        required: required.has(name),
        input: h("select", common, ...spec.enum.map((v) => h("option", { value: JSON.stringify(v) }, String(v)))),
      };
    } else if (type === "boolean") {
      field = { name, kind: "boolean", required: false, input: h("input", { ...common, type: "checkbox" }) };
    } else if (type === "number" || type === "integer") {
      field = {
        name,
        kind: type,
        required: required.has(name),
        input: h("input", { ...common, type: "number", step: type === "integer" ? 1 : "any" }),
      };
    } else if (type === "string") {
      field = { name, kind: "string", required: required.has(name), input: h("input", { ...common, type: "text" }) };
    } else {
      field = {
        name,
        kind: "json",
        required: required.has(name),
        input: h("textarea", { ...common, rows: 2, spellcheck: false, placeholder: "JSON" }),
      };
    }
    if ("default" in spec && field.input instanceof HTMLInputElement) {
      if (field.kind === "boolean") field.input.checked = spec.default === true;
      else field.input.value = String(spec.default);
    }
    fields.push(field);
  }
  const element = h(
    "div",
    { class: "schema-form", "data-testid": "schema-form" },
    ...fields.map((f) =>
      h("label", {}, h("code", {}, f.name), f.required ? h("span", { class: "muted" }, " (required)") : null, f.input),
    ),
    fields.length === 0 ? h("span", { class: "muted" }, "No arguments.") : null,
  );
  return {
    element,
    read(): { args: JsonObject } | { problem: Problem } {
      const args: JsonObject = {};
      const violations: Violation[] = [];
      for (const f of fields) {
        const input = f.input;
        if (f.kind === "boolean") {
          args[f.name] = (input as HTMLInputElement).checked;
          continue;
        }
        const text = input.value.trim();
        if (text === "") {
          if (f.required) violations.push({ field: `arguments.${f.name}`, description: "is required" });
          continue;
        }
        switch (f.kind) {
          case "string":
            args[f.name] = input.value;
            break;
          case "number":
          case "integer": {
            const n = Number(text);
            if (!Number.isFinite(n) || (f.kind === "integer" && !Number.isInteger(n))) {
              violations.push({ field: `arguments.${f.name}`, description: `must be ${f.kind === "integer" ? "an integer" : "a number"}` });
            } else args[f.name] = n;
            break;
          }
          case "enum":
            args[f.name] = JSON.parse(text) as JsonValue;
            break;
          case "json":
            try {
              args[f.name] = JSON.parse(text) as JsonValue;
            } catch {
              violations.push({ field: `arguments.${f.name}`, description: "must be JSON" });
            }
            break;
        }
      }
      if (violations.length) {
        return { problem: local("INVALID_ARGUMENT", "the arguments do not match the tool's input schema", violations) };
      }
      return { args };
    },
  };
}
