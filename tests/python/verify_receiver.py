"""A webhook receiver that checks webhookd's signatures with code webhookd's
authors did not write: the official Standard Webhooks library (PyPI
`standardwebhooks`) for `webhook-signature`, and Python's own `hmac` for the
legacy `x-hmac-signature`.

Usage: verify_receiver.py EXPECTATIONS_JSON

EXPECTATIONS_JSON maps a request path to what must hold for it:
  {"/during": {"must_verify": ["whsec_new", "whsec_old"],
               "must_not_verify": ["whsec_other"],
               "signatures": 2,
               "legacy": "whsec_new"}}          # or null: header must be absent

Prints "listening <port>" once, then one JSON line per request:
  {"path": ..., "webhook_id": ..., "ok": true|false, "problems": [...]}
and answers 204 when everything held, 400 otherwise.
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def check(expect: dict, body: bytes, headers: dict) -> list:
    problems = []
    for secret in expect["must_verify"]:
        try:
            Webhook(secret).verify(body, headers)
        except WebhookVerificationError as e:
            problems.append(f"a secret that must verify did not ({secret[:10]}…): {e}")
    for secret in expect["must_not_verify"]:
        try:
            Webhook(secret).verify(body, headers)
            problems.append(f"a secret that must not verify did ({secret[:10]}…)")
        except WebhookVerificationError:
            pass
    # The library must also reject a tampered body: proof that it checked something.
    try:
        Webhook(expect["must_verify"][0]).verify(body + b" ", headers)
        problems.append("a tampered body verified")
    except WebhookVerificationError:
        pass
    count = len(headers.get("webhook-signature", "").split(" "))
    if count != expect["signatures"]:
        problems.append(f"expected {expect['signatures']} signatures, found {count}")
    legacy = headers.get("x-hmac-signature")
    if expect["legacy"] is None:
        if legacy is not None:
            problems.append("unexpected x-hmac-signature")
    else:
        want = hmac.new(key_of(expect["legacy"]), body, hashlib.sha256).hexdigest()
        if legacy is None or not hmac.compare_digest(want, legacy):
            problems.append("x-hmac-signature does not match hmac-sha256 of the body")
    return problems


def main() -> None:
    with open(sys.argv[1]) as f:
        expectations = json.load(f)
    out = threading.Lock()  # one verdict per line, whatever the thread

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            expect = expectations.get(self.path)
            problems = ["unknown path"] if expect is None else check(expect, body, headers)
            line = {
                "path": self.path,
                "webhook_id": headers.get("webhook-id"),
                "ok": not problems,
                "problems": problems,
            }
            with out:
                print(json.dumps(line), flush=True)
            self.send_response(204 if not problems else 400)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
