// Resource names as a person reads them: a workspace or conversation by its title, a user
// by email, a run or an assistant by its workspace's titles and its own id. What the
// console has listed teaches it the titles; a name it has not seen stays as it is.
export class Names {
  private readonly titles = new Map<string, string>();

  learn(name: string, title: string): void {
    if (name && title) this.titles.set(name, title);
  }

  /** Whether the console has learned `name`'s title. */
  knows(name: string): boolean {
    return this.titles.has(name);
  }

  forget(): void {
    this.titles.clear();
  }

  /** `workspaces/acme/conversations/702d...` -> "Acme › Launch". */
  title(name: string): string {
    if (!name) return "";
    const own = this.titles.get(name);
    if (own) return own;
    const parts = name.split("/");
    // The nearest known ancestor, then the rest by collection and id.
    for (let end = parts.length - 2; end >= 2; end -= 2) {
      const parent = parts.slice(0, end).join("/");
      const known = this.titles.get(parent);
      if (known) {
        const rest: string[] = [];
        for (let i = end; i + 1 < parts.length; i += 2) {
          const sub = parts.slice(0, i + 2).join("/");
          rest.push(this.titles.get(sub) ?? `${singular(parts[i] ?? "")} ${short(parts[i + 1] ?? "")}`);
        }
        return [this.parentTitle(parts.slice(0, end)), ...rest].join(" › ");
      }
    }
    return name;
  }

  private parentTitle(parts: string[]): string {
    const chain: string[] = [];
    for (let i = 2; i <= parts.length; i += 2) {
      const sub = parts.slice(0, i).join("/");
      chain.push(this.titles.get(sub) ?? short(parts[i - 1] ?? ""));
    }
    return chain.join(" › ");
  }
}

function singular(collection: string): string {
  return collection.endsWith("s") ? collection.slice(0, -1) : collection;
}

/** A long generated id shortened for reading (the full name stays in data-* and links). */
function short(id: string): string {
  return id.length > 12 ? `${id.slice(0, 8)}…` : id;
}
