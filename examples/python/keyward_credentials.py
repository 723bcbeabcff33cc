"""A Keyward credential from the gateway, with nothing but the function's own AWS identity.

The function signs an sts:GetCallerIdentity request (SigV4, with its role's credentials, over the
gateway's server id) and hands it to the gateway, which asks STS who signed it and issues a
short-lived credential for that role. No static secret anywhere in the function.

    from keyward_credentials import KeywardCredential
    kw = KeywardCredential(os.environ["KEYWARD_URL"], server_id=os.environ["KEYWARD_SERVER_ID"])
    token = kw.token()                      # cached, renewed a minute before it expires
    child = kw.child(["stripe POST /v1/payment_intents"], ttl_s=300, run=f"sqs/{message_id}",
                     lim={"total": 1})      # a narrower credential for one unit of work

Behind API Gateway, one child per invocation labelled with the API request that caused it, and
its trace id on every vendor call, join Keyward's access log with API Gateway's and X-Ray:

    child = kw.child(allow, ttl_s=300, run=run_label(event, context))
    headers = trace_headers(event)          # give them to the SDK as default headers
"""
import os
import json
import threading
import time
import urllib.error
import urllib.request

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

STS_BODY = "Action=GetCallerIdentity&Version=2011-06-15"
RENEW_BEFORE_S = 60
MAX_RUN_LEN = 128
MAX_TRACE_LEN = 256


def run_label(event, context=None):
    """This invocation's run label: `apigw/<request id>` for a function behind API Gateway (REST
    APIs, and HTTP APIs with payload 1.0 or 2.0, all carry requestContext.requestId), else
    `lambda/<Lambda's request id>`, else None. The access log's `run` then names the API request."""
    rc = event.get("requestContext") if isinstance(event, dict) else None
    rid = rc.get("requestId") if isinstance(rc, dict) else None
    if isinstance(rid, str) and rid:
        label = f"apigw/{rid}"
    else:
        lid = getattr(context, "aws_request_id", None)
        label = f"lambda/{lid}" if isinstance(lid, str) and lid else None
    if label is None:
        return None
    label = "".join(c for c in label if c.isprintable())
    # The gateway takes at most 128 bytes: cut on a character boundary.
    return label.encode()[:MAX_RUN_LEN].decode("utf-8", "ignore")


def trace_headers(event=None):
    """The trace header to send on this invocation's vendor calls: Lambda's own (`_X_AMZN_TRACE_ID`,
    set when tracing is on), else the one API Gateway passed in the event, else none. Keyward logs
    it as `trace_id`."""
    trace = os.environ.get("_X_AMZN_TRACE_ID")
    if not trace and isinstance(event, dict):
        headers = event.get("headers") or {}
        trace = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == "x-amzn-trace-id"), None)
    # An X-Ray trace header is short ASCII (Root=1-…;Parent=…;Sampled=…): anything else is left out.
    ok = isinstance(trace, str) and 0 < len(trace) <= MAX_TRACE_LEN and trace.isascii() and trace.isprintable()
    return {"X-Amzn-Trace-Id": trace} if ok else {}


def iam_proof(server_id, credentials=None, region="us-east-1", sts_host="sts.amazonaws.com"):
    """A signed GetCallerIdentity request, not sent: the gateway forwards it to STS unchanged."""
    creds = credentials or botocore.session.get_session().get_credentials()
    url = f"https://{sts_host}/"
    req = AWSRequest(method="POST", url=url, data=STS_BODY,
                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "X-Keyward-Server-Id": server_id})
    SigV4Auth(creds.get_frozen_credentials(), "sts", region).add_auth(req)
    return {"method": "POST", "url": url, "headers": dict(req.headers.items()), "body": STS_BODY}


class KeywardError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body.get('error')}: {body.get('message')}")
        self.status, self.code = status, body.get("error")


def _post(url, grant, token=None, timeout=10):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(grant).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:
            body = {}
        raise KeywardError(e.code, body) from None


class KeywardCredential:
    def __init__(self, gateway, server_id, allow=None, ttl_s=None, run=None, credentials=None,
                 region="us-east-1", sts_host="sts.amazonaws.com", path="/keyward/v1/credentials"):
        self.url = gateway.rstrip("/") + path
        self.server_id, self.allow, self.ttl_s, self.run = server_id, allow, ttl_s, run
        self.credentials, self.region, self.sts_host = credentials, region, sts_host
        self._lock = threading.Lock()
        self._issued = None

    def token(self):
        """The current credential, obtained or renewed when less than a minute is left."""
        with self._lock:
            if self._issued is None or time.time() > self._issued["expires_at"] - RENEW_BEFORE_S:
                grant = {"grant": "aws_iam", "iam_request": iam_proof(self.server_id, self.credentials, self.region, self.sts_host)}
                for k in ("allow", "ttl_s", "run"):
                    if getattr(self, k) is not None:
                        grant[k] = getattr(self, k)
                self._issued = _post(self.url, grant)
            return self._issued["token"]

    def child(self, allow=None, ttl_s=None, run=None, lim=None):
        """A credential derived from this one, within it in every dimension (its jti is the
        child's `par`: revoking this one revokes the child)."""
        grant = {"grant": "attenuate"}
        for k, v in (("allow", allow), ("ttl_s", ttl_s), ("run", run), ("lim", lim)):
            if v is not None:
                grant[k] = v
        return _post(self.url, grant, token=self.token())
