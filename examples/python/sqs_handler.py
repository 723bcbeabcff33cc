"""An SQS-triggered batch handler: one Keyward credential per message, capped, labelled.

For each message the function derives a child credential from its own (which it got from the
gateway with its IAM role: keyward_credentials.py): only the rule this message needs, run label
`sqs/<messageId>` (in the gateway's access log beside every call it makes), a total cap
(KEYWARD_CALLS_PER_MESSAGE, default 1), a spend cap of exactly what the message says to charge
(`lim.spend`: on a gateway that prices Stripe payments, a bug that charges more is refused before
Stripe sees it), and five minutes to live. The Stripe call carries the
message id as its Idempotency-Key, so a redelivered message is not charged twice. A message whose
cap is used up, or that the gateway refuses, is reported as a partial batch failure (the event
source mapping needs ReportBatchItemFailures) and comes back later; the others are done.

Environment: KEYWARD_URL, KEYWARD_SERVER_ID (the gateway's issuer.aws_iam.server_id).
Message body: {"amount": 1200, "currency": "usd", "charges": 1}.
"""
import json
import os

import stripe

from keyward_credentials import KeywardCredential, KeywardError

_kw = None


def keyward():
    global _kw
    if _kw is None:
        _kw = KeywardCredential(os.environ["KEYWARD_URL"], os.environ["KEYWARD_SERVER_ID"])
    return _kw


def process(record, gateway, calls_per_message):
    message_id = record["messageId"]
    order = json.loads(record["body"])
    charges = int(order.get("charges", 1))
    child = keyward().child(allow=["stripe POST /v1/payment_intents"], ttl_s=300, run=f"sqs/{message_id}",
                            lim={"total": calls_per_message, "spend": int(order["amount"]) * charges})
    pay = stripe.StripeClient(child["token"], base_addresses={"api": f"{gateway}/stripe"}, max_network_retries=0)
    for i in range(charges):
        key = message_id if i == 0 else f"{message_id}/{i}"
        pay.v1.payment_intents.create(params={"amount": order["amount"], "currency": order.get("currency", "usd")},
                                      options={"idempotency_key": key})


def handler(event, context=None):
    gateway = os.environ["KEYWARD_URL"].rstrip("/")
    calls = int(os.environ.get("KEYWARD_CALLS_PER_MESSAGE", "1"))
    failures = []
    for record in event.get("Records", []):
        try:
            process(record, gateway, calls)
        except Exception as e:  # noqa: BLE001 - any failure of one message: retry that message
            # The cap is used up (429 quota_exhausted), or the gateway refused. Keyward's JSON
            # errors are not Stripe's shape: stripe-python raises AttributeError on them, not
            # StripeError, so every exception counts.
            status = getattr(e, "http_status", None) or getattr(e, "status", None)
            print(json.dumps({"messageId": record["messageId"], "failed": type(e).__name__, "status": status,
                              "keyward": isinstance(e, KeywardError)}))
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}
