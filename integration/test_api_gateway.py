"""Keyward behind API Gateway (issue 15): the shipped envoy/api-gateway.yaml, run here behind a
front proxy that behaves as an HTTP API (stage "prod" in the path, IAM authorization, a 30 s
integration timeout, X-Forwarded-For and its own headers) followed by an internal ALB (appends the
VPC link's address). Real Envoy, real OpenBao; the front proxy is the one stand-in (API Gateway
cannot run here): it checks SigV4 signatures (service execute-api) with botocore's signer against
one known test identity, as IAM authorization would. Callers sign with the example helper
(examples/python/keyward_sigv4.py), through requests and through the Stripe SDK.

The shipped config is localised only where it must be: vendor and vault clusters point at local
servers without TLS, the vault store logs in with a token instead of AppRole, and the targets
held in AWS Secrets Manager are left out. Routes, stage prefix, XFF trust, header removal,
timeouts and credential sources are the shipped ones."""
import hmac
import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import yaml

import harness
from conftest import assert_no_leaks
from shipped import localise

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "examples" / "python"))
STAGE = "prod"
CLIENT_IP = "198.51.100.7"   # the caller's address as API Gateway sees it
ENI_IP = "10.0.1.5"          # the VPC link's address, which the ALB appends
REGION = "us-east-1"
# A caller's role credentials (temporary, as a Lambda's are). Test values, not AWS's.
TRACE_ID = "Root=1-6751e3c2-0123456789abcdef01234567"
CALLER = ("keyward-fake-caller-key-id", "keyward-test-secret-access-key-0123456789", "keyward-test-session-token")


def sigv4_valid(method, url, headers, body):
    """API Gateway's IAM check, for the one identity it knows: the signature over the signed headers."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    import re
    m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/execute-api/aws4_request, SignedHeaders=([^,]+), Signature=([0-9a-f]{64})",
                     headers.get("authorization") or "")
    if not m or m.group(1) != CALLER[0] or m.group(3) != REGION:
        return False
    signed = m.group(4).split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return False
    aws = AWSRequest(method=method, url=url, data=body, headers={h: headers.get(h, "") for h in signed if h != "host"})
    aws.context["timestamp"] = headers.get("x-amz-date", "")
    auth = SigV4Auth(Credentials(*CALLER), "execute-api", REGION)
    expected = auth.signature(auth.string_to_sign(aws, auth.canonical_request(aws)), aws)
    return hmac.compare_digest(expected, m.group(5))


class FrontProxy:
    """API Gateway (HTTP API, stage `prod`, IAM authorization) and an internal ALB, in one hop."""

    def __init__(self, upstream_port, timeout_s):
        self.port = harness.free_port()
        front = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                if not self.path.startswith(f"/{STAGE}/"):
                    return harness.send_json(self, 404, b'{"message":"Not Found"}')
                lower = {k.lower(): v for k, v in self.headers.items()}
                if not sigv4_valid(self.command, f"http://127.0.0.1:{front.port}{self.path}", lower, body):
                    return harness.send_json(self, 403, b'{"message":"Forbidden"}')
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length", "x-forwarded-for")}
                xff = [v.strip() for v in (self.headers.get("x-forwarded-for") or "").split(",") if v.strip()]
                headers["X-Forwarded-For"] = ", ".join(xff + [CLIENT_IP, ENI_IP])
                headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-Port": "443", "X-Amzn-Trace-Id": TRACE_ID})
                c = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=timeout_s)
                try:
                    c.request(self.command, self.path, body=body or None, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                except TimeoutError:
                    return harness.send_json(self, 503, b'{"message":"Service Unavailable"}')
                finally:
                    c.close()
                harness.send_json(self, r.status, data, [(k, v) for k, v in r.getheaders() if k.lower() not in ("content-length", "connection", "transfer-encoding", "content-type")])

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def fronted(gw, workdir):
    gw.bao.put("keyward/stripe", {"api_key": gw.s["stripe"]})
    gw.bao.put("keyward/twilio", {"account_sid": gw.s["twilio_sid"], "auth_token": gw.s["twilio_token"]})
    gw.bao.put("keyward/revoked", {"jti:seed": "x"})
    vendor = harness.Vendor()
    vendor.slow_s = 3.0
    ports = {"admin": harness.free_port(), "envoy": harness.free_port(), "log": workdir / "access-apigw.log"}
    clusters = {"vault": gw.bao.port, "stripe": vendor.port, "twilio": vendor.port}
    doc = localise(yaml.safe_load((ROOT / "envoy" / "api-gateway.yaml").read_text()), ports, clusters, ports["log"],
                   keep_routes={"keyward_health", "stripe", "twilio"})
    envoy = harness.Envoy(workdir, doc, gw.env, name="envoy-apigw")
    # API Gateway's integration timeout, scaled down from 30 s to 2 s: the front gives up first,
    # as API Gateway does for a vendor slower than 30 s.
    front = FrontProxy(ports["envoy"], timeout_s=2.0)
    envoy.front = f"http://127.0.0.1:{front.port}"
    envoy.vendor = vendor
    envoy.access = ports["log"]
    harness.wait_until(lambda: requests.get(f"http://127.0.0.1:{ports['envoy']}/keyward/health", timeout=5).status_code == 200,
                       timeout=15, what="the fronted gateway ready")
    envoy.direct = f"http://127.0.0.1:{ports['envoy']}"
    yield envoy
    assert_no_leaks(envoy.log_path.read_text(errors="replace") + envoy.access.read_text(errors="replace"), "the fronted gateway's logs")
    front.stop()
    envoy.stop()
    vendor.stop()


def token(gw, allow, **kw):
    """A credential for the shipped config, which names its issuer."""
    return gw.token(allow, iss="https://keyward.example.internal", **kw)


def signer(token, secret=None):
    from botocore.credentials import Credentials
    from keyward_sigv4 import KeywardSigV4
    key, real_secret, session = CALLER
    return KeywardSigV4(REGION, token, credentials=Credentials(key, secret or real_secret, session))


def call(fronted, path, token=None, method="GET", headers=None, sign=True, **kw):
    auth = signer(token or "") if sign else None
    r = requests.Request(method, fronted.front + path, headers=dict(headers or {}), auth=auth, **kw).prepare()
    if not token:
        r.headers.pop("X-Keyward-Token", None)
    with requests.Session() as s:
        return s.send(r, timeout=10)


def test_routing_rules_and_injection_through_the_stage(gw, fronted):
    t = token(gw, ["stripe GET /v1/**", "twilio POST /2010-04-01/Accounts/*/Messages.json"])
    r = call(fronted, f"/{STAGE}/stripe/v1/customers?limit=3", t, headers={"X-Forwarded-For": "6.6.6.6"})
    assert r.status_code == 200, r.text
    (req,) = fronted.vendor.take()
    assert req["path"] == "/v1/customers?limit=3", "the stage and the vendor prefix are gone"
    assert harness.header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"], "SigV4 replaced by the vendor key"
    sent = {k for k, _ in req["headers"]}
    for h in ("x-keyward-token", "x-amz-date", "x-amz-security-token", "x-forwarded-for", "x-forwarded-proto"):
        assert h not in sent, f"{h} reached the vendor"
    # The Stripe SDK, unchanged, through the example's signing session.
    import stripe
    sess = requests.Session()
    sess.auth = signer(t)
    client = stripe.StripeClient("unused-by-keyward", base_addresses={"api": f"{fronted.front}/{STAGE}/stripe"},
                                 http_client=stripe.RequestsClient(session=sess), max_network_retries=0)
    client.v1.customers.list()
    (req,) = fronted.vendor.take()
    assert req["path"].startswith("/v1/customers") and harness.header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"]
    # Twilio's basic auth out, the Keyward credential in X-Keyward-Token.
    r = call(fronted, f"/{STAGE}/twilio/2010-04-01/Accounts/AC1/Messages.json", t, method="POST", data=b"To=1")
    assert r.status_code == 200, r.text
    (req,) = fronted.vendor.take()
    assert harness.header_values(req, "authorization")[0].startswith("Basic ")
    # Rules hold: a method no rule allows, a missing credential, a credential in the wrong place.
    r = call(fronted, f"/{STAGE}/stripe/v1/customers/cus_1", t, method="DELETE")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = call(fronted, f"/{STAGE}/stripe/v1/customers")
    assert r.status_code == 401 and r.json()["error"] == "missing_credential"
    assert fronted.vendor.take() == []


def test_without_the_stage_or_a_valid_signature_nothing_reaches_keyward(gw, fronted):
    t = token(gw, ["stripe GET /v1/**"])
    assert call(fronted, "/stripe/v1/customers", t).status_code == 404
    assert call(fronted, f"/{STAGE}/stripe/v1/customers", t, sign=False).status_code == 403
    # Signed with the wrong secret key, or the Keyward credential swapped after signing.
    r = requests.get(fronted.front + f"/{STAGE}/stripe/v1/customers", auth=signer(t, secret="not-the-secret"), timeout=10)
    assert r.status_code == 403
    other = token(gw, ["stripe * /**"], sub="lambda/someone-else")
    p = requests.Request("GET", fronted.front + f"/{STAGE}/stripe/v1/customers", auth=signer(t)).prepare()
    p.headers["X-Keyward-Token"] = other
    with requests.Session() as s:
        assert s.send(p, timeout=10).status_code == 403, "X-Keyward-Token is covered by the signature"
    # Without the stage at Envoy itself (someone inside the VPC skipping API Gateway): no route,
    # so no target.
    r = requests.get(fronted.direct + "/stripe/v1/customers", headers={"X-Keyward-Token": t}, timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "unknown_target"
    assert fronted.vendor.take() == []


def test_the_access_log_names_the_client_api_gateway_saw(gw, fronted):
    t = token(gw, ["stripe GET /v1/**"], sub="lambda/apigw-log")
    marker = "apigw-" + harness.secrets.token_hex(4)
    r = call(fronted, f"/{STAGE}/stripe/v1/{marker}", t, headers={"X-Forwarded-For": "6.6.6.6, 7.7.7.7"})
    assert r.status_code == 200
    fronted.vendor.take()

    def line():
        for l in fronted.access.read_text(errors="replace").splitlines():
            if marker in l:
                return json.loads(l)
    harness.wait_until(line, timeout=15, what="the access log line (Envoy flushes file logs every ~10 s)")
    entry = line()
    assert entry["client"] == CLIENT_IP, entry
    assert entry["subject"] == "lambda/apigw-log" and entry["target"] == "stripe" and entry["decision"] == "allow"
    assert entry["path"] == f"/v1/{marker}", "the path the vendor got"
    assert entry["trace_id"] == TRACE_ID, "API Gateway's trace id (as the front set it) joins the two logs"


def test_a_vendor_slower_than_the_integration_timeout(gw, fronted):
    """API Gateway answers 503 at its integration timeout while the vendor is still working; the
    call was allowed and the key injected (the vendor may act on it): the README says to keep
    long LLM calls on the private path. The next requests are unaffected."""
    t = token(gw, ["stripe * /v1/**"])
    started = time.monotonic()
    r = call(fronted, f"/{STAGE}/stripe/v1/slow", t)
    assert r.status_code == 503 and 1.5 < time.monotonic() - started < 3.0
    harness.wait_until(lambda: len(fronted.vendor.requests) >= 1, timeout=5, what="the vendor got the slow call")
    fronted.vendor.take()
    r = call(fronted, f"/{STAGE}/stripe/v1/customers", t)
    assert r.status_code == 200
    fronted.vendor.take()
