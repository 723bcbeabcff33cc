#!/usr/bin/env python3
"""A demo vendor: answers every request with JSON describing what it received, and model calls
(OpenAI's chat/completions and responses, Anthropic's messages) as a model vendor would, with
usage (see model_vendor.py).

Stands in for Stripe, OpenAI, Anthropic, Twilio and Google Maps in `make run`, so you can see
exactly which credential Keyward injected (and that your own token never arrived).
Usage: demo_vendor.py [PORT]   (listens on 127.0.0.1 only)
"""
import json
import pathlib
import sys
from http.server import ThreadingHTTPServer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model_vendor import ModelHandler  # noqa: E402


class Echo(ModelHandler):
    echo_fields = True

    def echo(self, body: bytes):
        out = json.dumps({
            "vendor": "keyward-demo-vendor",
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_bytes": len(body),
        }, indent=2).encode() + b"\n"
        self.send_json(200, out)

    do_HEAD = ModelHandler.handle_any


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    ThreadingHTTPServer(("127.0.0.1", port), Echo).serve_forever()


if __name__ == "__main__":
    main()
