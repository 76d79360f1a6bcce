"""A webhook receiver to try Switchboard's webhooks with: an HTTP server on loopback that
verifies each delivery's Standard Webhooks signature, as a real receiver must, and prints one
line per delivery.

    .venv/bin/python examples/webhook_receiver.py --port 8090 --secret-file .local/hook.secret

It answers 204 to a delivery whose signature verifies (and 400 to one that does not, which
Switchboard then retries and reports), so the webhook integration turns healthy after its
first delivery. With ``--secret-file``, a file that does not exist yet gets a new secret
(``whsec_`` and 32 random bytes, owner-only) for the integration's ``credential``.
examples/local-servers.sh starts it. Its first line on stdout is its URL.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

#: Deliveries are small JSON events; anything larger is refused unread.
MAX_BODY_BYTES = 1 << 20


def read_or_make_secret(path: Path) -> str:
    """The secret in ``path``; a new one written there (owner-only) when it is missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
    return path.read_text().strip()


def handler(hook: Webhook) -> type[BaseHTTPRequestHandler]:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY_BYTES:
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                payload = hook.verify(body, headers)
            except WebhookVerificationError as exc:
                print(f"refused {headers.get('webhook-id', '?')}: {exc}", flush=True)
                self.send_response(400)
                self.end_headers()
                return
            event = payload.get("type", "?") if isinstance(payload, dict) else "?"
            print(
                f"delivery {headers.get('webhook-id')} {event} verified: "
                f"{json.dumps(payload, separators=(',', ':'))[:200]}",
                flush=True,
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Each delivery has its own line above; no access log besides."""

    return Receiver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8090, help="port; 0 picks a free one")
    parser.add_argument(
        "--secret-file",
        type=Path,
        required=True,
        help="the webhook's signing secret (whsec_...); made when missing",
    )
    args = parser.parse_args()
    hook = Webhook(read_or_make_secret(args.secret_file))
    server = ThreadingHTTPServer((args.host, args.port), handler(hook))
    host, port = server.server_address[:2]
    print(f"http://{host!s}:{port}/hook", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
