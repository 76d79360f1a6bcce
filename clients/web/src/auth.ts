// The sign-in screen: sign in, or register, with an email and a password. A refusal is
// shown as the server gave it (code, reason, field). The App shows there too why a
// session ended: it is the screen the user is left on.
import type { Api } from "./api";
import { h } from "./dom";
import { type Problem, local, renderProblem } from "./errors";
import type { Page } from "./page";

export class AuthScreen {
  readonly element: HTMLElement;
  private readonly email = h("input", { type: "email", "data-testid": "email", autocomplete: "username", required: true });
  private readonly password = h("input", {
    type: "password",
    "data-testid": "password",
    autocomplete: "current-password",
    required: true,
  });
  private readonly displayName = h("input", { "data-testid": "display-name", autocomplete: "name" });
  private readonly error = h("div", { "data-testid": "auth-error" });

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    /** Signed in: the console takes over. */
    private readonly entered: () => Promise<void>,
  ) {
    const submit = (event: Event): void => {
      event.preventDefault();
      void this.authenticate("sign-in");
    };
    this.element = h(
      "section",
      { class: "auth", "data-testid": "auth" },
      h(
        "form",
        { onsubmit: submit },
        h("h2", {}, "Sign in"),
        h("label", {}, "Email", this.email),
        h("label", {}, "Password", this.password),
        h("label", {}, "Display name (to register)", this.displayName),
        h(
          "div",
          { class: "row" },
          h("button", { type: "submit", "data-testid": "sign-in" }, "Sign in"),
          h("button", { type: "button", "data-testid": "register", onclick: () => void this.authenticate("register") }, "Register"),
        ),
        this.error,
      ),
    );
  }

  /** Why the session ended, or why signing out did not reach the server; none clears it. */
  showProblem(p?: Problem): void {
    this.error.replaceChildren(...(p ? [renderProblem(p, "auth-problem")] : []));
  }

  private async authenticate(kind: "sign-in" | "register"): Promise<void> {
    const email = this.email.value.trim();
    const password = this.password.value;
    const displayName = this.displayName.value.trim();
    const clientInfo = { userAgent: "switchboard-console/0.1", deviceName: "browser console" };
    this.error.replaceChildren();
    this.page.notice("");
    await this.page.busy(kind, async () => {
      const answer =
        kind === "register"
          ? await this.api.auth.register({ email, password, displayName, clientInfo })
          : await this.api.auth.login({
              credential: { case: "password", value: { email, password } },
              clientInfo,
            });
      if (!answer.tokens || !answer.user || !answer.session) {
        throw local("INTERNAL", "the server's answer has no tokens");
      }
      this.password.value = "";
      this.api.tokens.adopt(answer.tokens, answer.user, answer.session);
      await this.entered();
    }, { area: "auth-error" });
  }
}
