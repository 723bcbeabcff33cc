"""No decision, no key, whatever the framing: real Envoy (two workers) with Keyward, Envoy's buffer
filter on the routes it reads bodies on, as shipped, and real OpenBao. Every way a client can end
a request body is tried on a priced target (a spend cap, an unreadable amount), on a credential
with a request quota, and on the issuing endpoint: HTTP/1.1 with a length, chunked, chunked with
trailers; HTTP/2 with DATA frames, with trailers; headers that end the request; a body over the
target's bound; a client that leaves mid-body. The vendor receives exactly the requests the filter
allowed, each with a matching access-log line naming its subject, jti and decision."""
import json

import pytest
import requests

import envoy_config
import framing
import harness
from conftest import assert_no_leaks
from framing import RESETS, WITH_BODY

FORM = {"content-type": "application/x-www-form-urlencoded"}
COLD = ["length", "chunked", "trailers", "h2-data", "h2-trailers"]
BUFFER = "envoy.filters.http.buffer"
ISS = "https://issuer.test"


def framing_bootstrap(ports, log):
    cfg = envoy_config.filter_config()
    secret = {"store": "bao", "path": "it/stripe", "field": "api_key"}
    cfg["targets"]["pay"] = {"credential": "bearer", "secret": secret, "inject": {"type": "bearer"},
                             "cost": {"form_field": "amount", "currency_field": "currency", "currencies": ["usd"],
                                      "max_body_bytes": 4096, "free": ["GET /**", "POST /v1/customers/**"]}}
    # Priced targets whose secret nobody fetched yet: their first request parks while it is.
    for fr in COLD:
        cfg["targets"][f"cold-{fr}"] = dict(cfg["targets"]["pay"], secret={"store": "bao", "path": f"it/cold-{fr}", "field": "api_key"})
    cfg.pop("issuer")
    # Children are signed with the store-held k2; parents here with k1 from the environment.
    cfg["issuer"] = {"iss": ISS, "kid": "k2", "max_ttl_s": 900, "attenuate": True}
    b = envoy_config.bootstrap(ports, log, cfg)
    for lst in b["static_resources"]["listeners"]:
        h = lst["filter_chains"][0]["filters"][0]["typed_config"]
        fmt = h["access_log"][0]["typed_config"]["log_format"]["json_format"]
        fmt["case"] = "%REQ(X-CASE)%"
        # HTTP/1.1 trailers reach the filters only when the codec is told to keep them.
        h["http_protocol_options"] = {"enable_trailers": True}
        filters = h["http_filters"]
        filters.insert(len(filters) - 1, {"name": BUFFER, "disabled": True, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 65536}})
        per_route = {BUFFER: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
            "buffer": {"max_request_bytes": 65536}}}}
        routes = h["route_config"]["virtual_hosts"][0]["routes"]
        for r in routes:
            if r["name"] == "pay" or r["name"].startswith("cold-"):
                r["typed_per_filter_config"] = per_route
        routes.insert(0, {"name": "keyward_issue", "match": {"path": "/keyward/v1/credentials"},
                          "direct_response": {"status": 503, "body": {"inline_string": '{"error":"secret_unavailable","message":"the keyward filter is not running"}'}},
                          "typed_per_filter_config": per_route,
                          "metadata": {"filter_metadata": {"keyward": {"endpoint": "issue"}}}})
    return b


class FramingGateway:
    def __init__(self, gw, workdir):
        self.gw = gw
        self.cold_keys = {}
        for fr in COLD:
            self.cold_keys[fr] = harness.fake_secret(f"sk_cold_{fr.replace('-', '_')}")
            gw.bao.put(f"it/cold-{fr}", {"api_key": self.cold_keys[fr]})
        self.vendor = harness.Vendor()
        self.ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port(), vendor=self.vendor.port)
        self.access_log = workdir / "access-framing.log"
        self.envoy = harness.Envoy(workdir, framing_bootstrap(self.ports, self.access_log), gw.env, name="envoy-framing", concurrency=2)
        self.port = self.ports["hardened"]
        self.url = f"http://127.0.0.1:{self.port}"
        harness.wait_until(lambda: requests.get(self.url + "/keyward/health", timeout=5).status_code == 200, timeout=15, what="ready")

    def token(self, allow=("pay * /**",), **lim):
        c = harness.claims(list(allow), sub="lambda/framing", run="sqs/m-7", ttl=600, **({"lim": lim} if lim else {}))
        return harness.mint(self.gw.k1, c), c["jti"]

    def send(self, fr, tok, body, case, path="/pay/v1/payment_intents", method="POST", headers=None, burst=False):
        h = {"authorization": f"Bearer {tok}", **({"x-case": case} if case else {}), **FORM, **(headers or {})}
        return framing.send(self.port, fr, method, path, h, body.encode() if isinstance(body, str) else body, burst=burst)

    def entries(self):
        out = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def entry(self, case):
        harness.wait_until(lambda: any(e.get("case") == case for e in self.entries()), timeout=10, what=f"access-log entry {case}")
        return [e for e in self.entries() if e.get("case") == case]

    def received(self, case):
        return [r for r in self.vendor.history if harness.header_values(r, "x-case") == [case]]

    def healthy_on_every_worker(self):
        """Fresh connections (spread over both workers) are served at once."""
        t, _ = self.token(allow=("pay GET /**",))
        for _ in range(8):
            r = requests.get(self.url + "/pay/v1/ok", headers={"Authorization": f"Bearer {t}", "Connection": "close"}, timeout=5)
            assert r.status_code == 200 and r.elapsed.total_seconds() < 1.0, (r.status_code, r.elapsed)

    def stop(self):
        self.envoy.stop()
        self.vendor.stop()


@pytest.fixture(scope="module")
def fg(gw, workdir):
    g = FramingGateway(gw, workdir)
    yield g
    logs = g.envoy.log_path.read_text(errors="replace") + (g.access_log.read_text() if g.access_log.exists() else "")
    assert_no_leaks(logs, "the framing gateway's logs")
    g.stop()


@pytest.mark.parametrize("fr", WITH_BODY)
def test_a_payment_over_the_cap_is_refused_in_every_framing(fg, fr):
    t, jti = fg.token(spend=1000)
    r = fg.send(fr, t, "amount=5000&currency=usd", f"over-{fr}")
    assert r.status_code == 429 and r.json()["error"] == "spend_exhausted", (fr, r.status_code, r.body)
    assert fg.received(f"over-{fr}") == [], "the vendor never sees it"
    [e] = fg.entry(f"over-{fr}")
    assert (e["subject"], e["jti"], e["decision"], e["cost"]) == ("lambda/framing", jti, "spend_exhausted", "5000")
    # What fits goes through, with the vendor's key, once, priced.
    r = fg.send(fr, t, "amount=600&currency=usd", f"fits-{fr}")
    assert r.status_code == 200, (fr, r.status_code, r.body)
    [got] = fg.received(f"fits-{fr}")
    assert got["body"] == b"amount=600&currency=usd"
    assert harness.header_values(got, "authorization") == [f"Bearer {fg.gw.s['stripe']}"]
    [e] = fg.entry(f"fits-{fr}")
    assert (e["decision"], e["cost"], e["spend"]) == ("allow", "600", "reserved")
    r = fg.send(fr, t, "amount=401&currency=usd", f"rest-{fr}")
    assert r.status_code == 429, "600 of 1000 spent: 401 more does not fit"


@pytest.mark.parametrize("fr", COLD)
def test_a_request_that_parks_for_its_secret_is_forwarded_whole_in_every_framing(fg, fr):
    """A priced request whose secret is not cached yet parks (Envoy holds its body and trailers)
    and is decided when the secret arrives. Its body reaches the vendor as one request, with its
    own length: bytes that look like another request inside it never become one."""
    t, _ = fg.token(allow=(f"cold-{fr} * /**", "pay GET /**"), spend=1000)
    smuggled = b"DELETE /v1/customers/cus_victim HTTP/1.1\r\nHost: vendor.test\r\nX-Swallow: "
    body = smuggled + b"&amount=1&currency=usd&z="
    # Every byte at once: Envoy holds the body and its end while the request waits.
    r = fg.send(fr, t, body, f"cold-{fr}", path=f"/cold-{fr}/v1/payment_intents", burst=True)
    assert r.status_code == 200, (fr, r.status_code, r.body)
    # The upstream connection is used again by the next requests.
    for i in range(4):
        assert fg.send("length", t, b"", f"after-cold-{fr}-{i}", path="/pay/v1/ok", method="GET").status_code == 200
    [got] = fg.received(f"cold-{fr}")
    assert (got["method"], got["path"], got["body"]) == ("POST", "/v1/payment_intents", body)
    assert harness.header_values(got, "authorization") == [f"Bearer {fg.cold_keys[fr]}"]
    assert not [x for x in fg.vendor.history if x["method"] == "DELETE" or "cus_victim" in x["path"]], "no request was smuggled"


@pytest.mark.parametrize("fr", WITH_BODY)
def test_an_unreadable_amount_is_refused_in_every_framing(fg, fr):
    t, _ = fg.token(allow=("pay POST /**",), spend=1000)
    for body in ["amount=abc&currency=usd", "amount=1&%20amount=900&currency=usd", "amount=1&currency=usd&_method=DELETE"]:
        case = f"bad-{fr}-{len(body)}"
        r = fg.send(fr, t, body, case)
        want = (403, "forbidden") if "_method" in body else (400, "bad_request")
        assert (r.status_code, r.json()["error"]) == want, (fr, body, r.body)
        assert fg.received(case) == []


@pytest.mark.parametrize("fr", WITH_BODY)
def test_a_request_quota_holds_in_every_framing(fg, fr):
    t, jti = fg.token(total=1, rpm=1)
    assert fg.send(fr, t, "amount=1&currency=usd", f"q1-{fr}").status_code == 200
    for i in range(3):
        r = fg.send(fr, t, "amount=1&currency=usd", f"q{i + 2}-{fr}")
        assert r.status_code == 429 and r.json()["error"] in ("quota_exhausted", "rate_limited"), (fr, r.body)
    assert len(fg.received(f"q1-{fr}")) == 1
    assert all(fg.received(f"q{i + 2}-{fr}") == [] for i in range(3))


@pytest.mark.parametrize("ct,body,want", [
    (None, "_method=DELETE", (403, "forbidden")),
    ("application/x-www-form-urlencoded", "_method=DELETE", (403, "forbidden")),
    ("application/vnd.api+json", '{"_method":"DELETE"}', (403, "forbidden")),
    ("text/json", '{"_method":"DELETE"}', (403, "forbidden")),
    ("multipart/form-data; boundary=x", "--x\r\n", (400, "bad_request")),
    ("application/x-www-form-urlencoded; charset=utf-16le", "a=1", (400, "bad_request")),
    ("application/x-www-form-urlencoded", "q=1", (200, None)),
    ("text/plain", "_method=DELETE", (200, None)),
])
def test_a_free_request_with_a_body_is_read_for_method_overrides(fg, ct, body, want):
    """The target's free requests (here `GET /**`, and a free POST path) run only methods the
    rules allow, whatever their body says in a form a framework would parse."""
    t, _ = fg.token(allow=("pay GET /**", "pay POST /**"), spend=1000)
    case = "free-" + "".join(c for c in f"{ct}-{body}" if c.isalnum())
    h = {"authorization": f"Bearer {t}", "x-case": case}
    if ct:
        h["content-type"] = ct
    r = framing.send(fg.port, "length", "POST", "/pay/v1/customers/free", h, body.encode())
    if want[0] == 200:
        assert r.status_code == 200, (ct, body, r.body)
    else:
        assert (r.status_code, r.json()["error"]) == want, (ct, body, r.body)
        assert fg.received(case) == []


@pytest.mark.parametrize("fr", ["h1-empty", "h2-empty"])
def test_headers_that_end_the_request_are_priced_too(fg, fr):
    t, _ = fg.token(spend=1000)
    r = fg.send(fr, t, b"", f"empty-{fr}")
    assert r.status_code == 400 and r.json()["error"] == "bad_request", (fr, r.body)
    assert fg.received(f"empty-{fr}") == []


@pytest.mark.parametrize("fr", ["length", "chunked", "trailers", "h2-data", "h2-trailers"])
def test_a_body_over_the_bound_is_refused_in_every_framing(fg, fr):
    t, _ = fg.token(spend=10 ** 9)
    body = "amount=1&currency=usd&description=" + "x" * 5000
    r = fg.send(fr, t, body, f"big-{fr}")
    assert r.status_code == 413, (fr, r.status_code, r.body)
    assert fg.received(f"big-{fr}") == []


@pytest.mark.parametrize("fr", RESETS)
def test_a_client_that_leaves_mid_body_holds_nothing(fg, fr):
    t, jti = fg.token(spend=1000, total=2)
    assert fg.send(fr, t, "amount=1000&currency=usd&description=" + "y" * 300, f"left-{fr}") is None
    fg.healthy_on_every_worker()
    assert fg.received(f"left-{fr}") == []
    # Nothing was reserved or counted: the whole cap is there for the next request.
    r = fg.send("length", t, "amount=1000&currency=usd", f"after-{fr}")
    assert r.status_code == 200, r.body
    entries = [e for e in fg.entries() if e.get("case") == f"left-{fr}"]
    assert all(e["decision"] in ("-", None) for e in entries), "never decided, never allowed"


@pytest.mark.parametrize("fr", WITH_BODY + ["h1-empty", "h2-empty"])
def test_the_issuing_endpoint_answers_in_every_framing(fg, fr):
    parent, _ = fg.token(allow=("pay * /**",), spend=500)
    body = b"" if fr.endswith("empty") else json.dumps({"grant": "attenuate", "allow": ["pay POST /v1/payment_intents"], "ttl_s": 60}).encode()
    h = {"authorization": f"Bearer {parent}", "content-type": "application/json", "x-case": f"issue-{fr}"}
    r = framing.send(fg.port, fr, "POST", "/keyward/v1/credentials", h, body)
    if fr.endswith("empty"):
        assert r.status_code == 400 and r.json()["error"] == "bad_request", r.body
        return
    assert r.status_code == 200, (fr, r.status_code, r.body)
    child = r.json()["token"]
    harness.TOKENS.add(child)
    [e] = fg.entry(f"issue-{fr}")
    assert e["decision"] == "issued" and e["issued"] == r.json()["jti"]


def child_of(fg, parent, allow=("pay * /**",), **lim):
    grant = {"grant": "attenuate", "allow": list(allow), "ttl_s": 300}
    if lim:
        grant["lim"] = lim
    r = requests.post(fg.url + "/keyward/v1/credentials", json=grant, headers={"Authorization": f"Bearer {parent}"}, timeout=10)
    assert r.status_code == 200, r.text
    harness.TOKENS.add(r.json()["token"])
    return r.json()["token"]


def test_a_parent_and_its_children_share_one_budget_whatever_key_signed_the_parent(fg):
    """The parent is signed with k1, its children with the issuing key k2: one budget all the same,
    in either order, for spend and for counts."""
    parent, _ = fg.token(spend=5000)
    assert fg.send("length", parent, "amount=5000&currency=usd", "pb-parent").status_code == 200
    child = child_of(fg, parent)
    r = fg.send("h2-trailers", child, "amount=1&currency=usd", "pb-child")
    assert r.status_code == 429 and r.json()["error"] == "spend_exhausted", r.body
    # The other order: the children spend it, the parent has nothing left.
    parent, _ = fg.token(spend=5000)
    first, second = child_of(fg, parent), child_of(fg, parent)
    assert fg.send("chunked", first, "amount=3000&currency=usd", "pb2-first").status_code == 200
    assert fg.send("h2-data", second, "amount=2001&currency=usd", "pb2-second").status_code == 429
    assert fg.send("h2-data", second, "amount=2000&currency=usd", "pb2-second-fits").status_code == 200
    assert fg.send("length", parent, "amount=1&currency=usd", "pb2-parent").status_code == 429
    # Counts too: three requests in all.
    parent, _ = fg.token(total=3)
    child = child_of(fg, parent)
    codes = [fg.send("length", tok, "amount=1&currency=usd", f"pt-{i}").status_code for i, tok in enumerate([parent, child, child, parent, child])]
    assert codes == [200, 200, 200, 429, 429], codes


def test_a_retry_is_the_same_request(fg):
    """Same Idempotency-Key, same everything: not charged again. Same key and amount but another
    field, another query or another account: charged as a new request. (These requests carry no
    case tag: a header of their own would make each another request.)"""
    def spends(jti, n):
        harness.wait_until(lambda: len([e for e in fg.entries() if e.get("jti") == jti]) >= n, timeout=10, what=f"{n} lines")
        return [e["spend"] for e in fg.entries() if e.get("jti") == jti]

    t, jti = fg.token(spend=10000)
    key = {"idempotency-key": "order-1"}
    body = "amount=3000&currency=usd&customer=cus_a"
    assert fg.send("length", t, body, None, headers=key).status_code == 200
    assert fg.send("h2-trailers", t, body, None, headers=key).status_code == 200
    assert fg.send("chunked", t, "amount=3000&currency=usd&customer=cus_b", None, headers=key).status_code == 200
    assert fg.send("length", t, body, None, headers=key, path="/pay/v1/payment_intents?expand=x").status_code == 200
    assert spends(jti, 4) == ["reserved", "retry", "reserved", "reserved"]
    # 9000 of 10000 spent: another 3000 does not fit, even as a retry of nothing.
    assert fg.send("length", t, "amount=3000&currency=usd&customer=cus_c", None, headers=key).status_code == 429
    assert fg.send("length", t, body, None, headers=key).status_code == 200, "a true retry still is one"
    # The same key, body and path for another account (Stripe scopes keys per account) is a new
    # charge; a retry with its tracing and SDK retry-count headers changed is still a retry.
    t, jti = fg.token(spend=10000)
    acct = {"idempotency-key": "order-2", "stripe-account": "acct_1"}
    assert fg.send("length", t, body, None, headers={**acct, "traceparent": "00-aa-bb-01"}).status_code == 200
    assert fg.send("length", t, body, None, headers={**acct, "traceparent": "00-cc-dd-01", "x-stainless-retry-count": "1"}).status_code == 200
    assert fg.send("length", t, body, None, headers={**acct, "stripe-account": "acct_2"}).status_code == 200
    assert spends(jti, 3) == ["reserved", "retry", "reserved"]


def test_every_request_the_vendor_received_was_decided_and_logged(fg):
    """Run last: every request of this module the vendor received has its access-log line, with
    the subject, the jti and the decision that allowed it."""
    assert fg.vendor.history, "the vendor received requests"
    harness.wait_until(lambda: all(any(e.get("case") == harness.header_values(r, "x-case")[0] for e in fg.entries())
                                   for r in fg.vendor.history if harness.header_values(r, "x-case")), timeout=10, what="every access-log line")
    decided = {e["case"]: e for e in fg.entries() if e.get("case") not in (None, "-")}
    for r in fg.vendor.history:
        case = (harness.header_values(r, "x-case") or [None])[0]
        if case is None:
            continue
        e = decided.get(case)
        assert e is not None, f"the vendor received {case} with no access-log line"
        assert e["decision"] == "allow" and e["subject"] == "lambda/framing" and e["jti"] not in (None, "", "-"), e
