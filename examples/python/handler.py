"""A Lambda handler that calls Stripe and Anthropic through Keyward, with the vendors' own SDKs.

The function never holds a Stripe or Anthropic key. It holds a Keyward credential (a short-lived,
scoped JWT minted at deploy time, see examples/README.md) and gives it to each SDK where the SDK
expects its API key; the SDK's base URL points at the Keyward gateway. The gateway checks the
credential and puts the real key on the request.

Environment:
  KEYWARD_URL              the gateway, e.g. http://keyward-gateway.internal:10000
  KEYWARD_TOKEN            the credential, or
  KEYWARD_TOKEN_PARAMETER  the name of an SSM SecureString parameter holding it (re-minted on a
                           schedule; read at cold start and again when the gateway says it expired)
"""
import json
import os
import uuid

import anthropic
import stripe

_token = None


def credential(refresh=False):
    """The Keyward credential: from the environment, or from SSM Parameter Store (cached)."""
    global _token
    if os.environ.get("KEYWARD_TOKEN"):
        return os.environ["KEYWARD_TOKEN"]
    if _token is None or refresh:
        import boto3  # present in the Lambda runtime
        p = boto3.client("ssm").get_parameter(Name=os.environ["KEYWARD_TOKEN_PARAMETER"], WithDecryption=True)
        _token = p["Parameter"]["Value"]
    return _token


def clients():
    gateway = os.environ["KEYWARD_URL"].rstrip("/")
    token = credential()
    # Stripe sends the API key as "Authorization: Bearer ..."; the gateway's stripe target reads it there.
    pay = stripe.StripeClient(token, base_addresses={"api": f"{gateway}/stripe"}, max_network_retries=0)
    # Anthropic sends it as "x-api-key"; the gateway's anthropic target reads that header.
    llm = anthropic.Anthropic(api_key=token, base_url=f"{gateway}/anthropic", max_retries=0)
    return pay, llm


def handler(event, context=None):
    pay, llm = clients()
    order = event.get("order_id") or str(uuid.uuid4())
    # POSTs to Stripe carry an Idempotency-Key (the gateway's stripe target requires one).
    intent = pay.v1.payment_intents.create(
        params={"amount": int(event.get("amount", 1000)), "currency": "usd"},
        options={"idempotency_key": f"order-{order}"},
    )
    message = llm.messages.create(
        model=event.get("model", "claude-sonnet-5"),
        max_tokens=64,
        messages=[{"role": "user", "content": f"Write a one-line receipt for order {order}."}],
    )
    return {"order": order, "payment_intent": intent.to_dict(), "message": message.to_dict()}


if __name__ == "__main__":
    print(json.dumps(handler(json.loads(os.environ.get("EVENT", "{}"))), indent=2, default=str))
