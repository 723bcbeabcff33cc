"""A Lambda function behind API Gateway (REST or HTTP API) that calls Stripe and Anthropic through
Keyward with the vendors' own SDKs, one narrower credential per invocation.

Each invocation derives a child of the function's credential, good for five minutes and for what
this request needs, labelled with the API Gateway request id (`run`), and sends the trace id on
every vendor call: Keyward's access log (`run`, `trace_id`) then joins API Gateway's access log
and X-Ray. No vendor key anywhere in the function.

Environment, as for handler.py: KEYWARD_URL (the gateway), and KEYWARD_TOKEN or
KEYWARD_TOKEN_PARAMETER (the function's credential, minted at deploy time; examples/README.md).
examples/sam/template.yaml deploys it behind an HTTP API.
"""
import json
import os
import uuid

import anthropic
import stripe

from handler import credential
from keyward_credentials import _post, run_label, trace_headers

ALLOW = ["stripe POST /v1/payment_intents", "anthropic POST /v1/messages"]


def child_credential(event, context):
    """A credential for this invocation only: derived from the function's, within it."""
    gateway = os.environ["KEYWARD_URL"].rstrip("/")
    grant = {"grant": "attenuate", "allow": ALLOW, "ttl_s": 300}
    run = run_label(event, context)
    if run:
        grant["run"] = run
    return _post(gateway + "/keyward/v1/credentials", grant, token=credential())["token"]


def handler(event, context=None):
    gateway = os.environ["KEYWARD_URL"].rstrip("/")
    token = child_credential(event, context)
    headers = trace_headers(event)
    pay = stripe.StripeClient(token, base_addresses={"api": f"{gateway}/stripe"}, max_network_retries=0,
                              http_client=stripe.RequestsClient(session=_session(headers)))
    llm = anthropic.Anthropic(api_key=token, base_url=f"{gateway}/anthropic", max_retries=0, default_headers=headers)
    body = json.loads(event.get("body") or "{}") if isinstance(event.get("body"), str) else {}
    order = body.get("order_id") or str(uuid.uuid4())
    intent = pay.v1.payment_intents.create(params={"amount": int(body.get("amount", 1000)), "currency": "usd"},
                                           options={"idempotency_key": f"order-{order}"})
    message = llm.messages.create(model=body.get("model", "claude-sonnet-5"), max_tokens=64,
                                  messages=[{"role": "user", "content": f"Write a one-line receipt for order {order}."}])
    out = {"order": order, "payment_intent": intent.to_dict(), "message": message.to_dict()}
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(out, default=str)}


def _session(headers):
    import requests
    s = requests.Session()
    s.headers.update(headers)
    return s
