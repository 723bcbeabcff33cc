"""Calling Keyward behind API Gateway (IAM authorization) with a vendor SDK, unchanged.

API Gateway's IAM authorization wants every request signed with SigV4 (service `execute-api`), and
the signature takes the Authorization header. So the Keyward credential moves to X-Keyward-Token
(which the signature covers), and the request is signed with the function's own role. This is a
`requests` auth: give it to any SDK that takes a requests session (Stripe's RequestsClient does).

    import requests, stripe
    from keyward_sigv4 import KeywardSigV4
    s = requests.Session()
    s.auth = KeywardSigV4(region="us-east-1", token=keyward_credential)
    pay = stripe.StripeClient("unused", base_addresses={"api": f"{KEYWARD_URL}/stripe"},
                              http_client=stripe.RequestsClient(session=s))

KEYWARD_URL is the stack's KeywardUrl output (https://<api>.execute-api.<region>.amazonaws.com/prod).
"""
import botocore.session
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest


class KeywardSigV4(requests.auth.AuthBase):
    def __init__(self, region, token, credentials=None):
        self.region = region
        self.token = token
        # The Lambda role's credentials (from the environment the runtime sets), or given.
        self.credentials = credentials or botocore.session.get_session().get_credentials()

    def __call__(self, r):
        # Whatever credential the SDK put on the request (its "API key") is not sent.
        for h in ("Authorization", "X-Api-Key"):
            r.headers.pop(h, None)
        r.headers["X-Keyward-Token"] = self.token
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode()
        signed = {"X-Keyward-Token": self.token}
        if "Content-Type" in r.headers:
            signed["Content-Type"] = r.headers["Content-Type"]
        aws = AWSRequest(method=r.method, url=r.url, data=body, headers=signed)
        SigV4Auth(self.credentials.get_frozen_credentials(), "execute-api", self.region).add_auth(aws)
        for h in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            if h in aws.headers:
                r.headers[h] = aws.headers[h]
        return r
