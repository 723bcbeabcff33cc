"""The adversarial suite: forged and malformed tokens, header smuggling, path tricks,
vault-reaching requests and secret-reflecting vendors, against real Envoy with the production
connection-manager settings (the `hardened` listener: path normalisation, merge_slashes, escaped
slashes and underscore headers rejected) and the raw listener where the filter must defend alone.

Every case asserts that the vendor was not called, or got exactly one correct credential. After
every test the leak check (conftest) asserts that no secret or token reached Envoy's log, the access
log or the vendor."""
import base64
import json
import socket
import subprocess
import time

import pytest

import harness

DENIED = (400, 401, 403, 404, 431)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def forge(gw, header, payload, key=None):
    """A token with exactly this header and payload (dicts or raw JSON text), signed with k1."""
    import hashlib
    import hmac
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    signing = f"{b64u(h.encode())}.{b64u(p.encode())}"
    sig = hmac.new(key or gw.k1, signing.encode(), hashlib.sha256).digest()
    t = f"{signing}.{b64u(sig)}"
    harness.TOKENS.add(t)
    return t


def claims():
    return harness.claims(["stripe * /**", "anthropic * /**", "maps * /**", "twilio * /**", "charges * /**"])


def expect_refused(gw, r, statuses=DENIED):
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    if r.status_code in (401, 403) and r.headers.get("content-type") == "application/json":
        assert set(r.json()) == {"error", "message"}
    assert gw.vendor.take() == [], "a refused request reached the vendor"


def flip(s, i):
    c = s[i]
    return s[:i] + ("A" if c != "A" else "B") + s[i + 1:]


HS = {"alg": "HS256", "typ": "JWT", "kid": "k1"}


def token_cases(gw):
    now = int(time.time())
    c = claims()
    good = forge(gw, HS, c)
    h, p, s = good.split(".")
    cases = {}
    # alg none and its variants, unsigned or signed anyway.
    for alg in ["none", "None", "NONE", "nOnE", ""]:
        cases[f"alg-{alg or 'empty'}-unsigned"] = f"{b64u(json.dumps({**HS, 'alg': alg}).encode())}.{p}."
        cases[f"alg-{alg or 'empty'}-signed"] = forge(gw, {**HS, "alg": alg}, c)
    # alg relabelled: same key, other names.
    for alg in ["HS384", "HS512", "RS256", "ES256", "PS256", "hs256", "HS256 ", "EdDSA"]:
        cases[f"alg-relabel-{alg.strip()}{'-space' if ' ' in alg else ''}"] = forge(gw, {**HS, "alg": alg}, c)
    cases["alg-missing"] = forge(gw, {"typ": "JWT", "kid": "k1"}, c)
    cases["alg-array"] = forge(gw, {**HS, "alg": ["HS256"]}, c)
    # Bit flips and truncation in each part.
    for name, i in [("header", 3), ("payload", len(h) + 5), ("signature", len(h) + len(p) + 4), ("last", len(good) - 1)]:
        cases[f"flip-{name}"] = flip(good, i)
    cases["truncated-1"] = good[:-1]
    cases["truncated-sig"] = f"{h}.{p}."
    cases["truncated-half"] = good[: len(good) // 2]
    cases["sig-twice"] = f"{h}.{p}.{s}{s}"
    # Bad base64url, JSON and structure.
    cases["b64-padding"] = f"{h}=.{p}.{s}"
    cases["b64-std-alphabet"] = f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}" if ("-" in s or "_" in s) else f"{h}.{p}+.{s}"
    cases["b64-junk"] = f"{h}.{p}*.{s}"
    cases["header-not-json"] = forge(gw, "{alg:HS256}", c)
    cases["payload-array"] = forge(gw, HS, "[1,2]")
    cases["payload-string"] = forge(gw, HS, '"sub"')
    cases["payload-trailing"] = forge(gw, HS, json.dumps(c) + "x")
    cases["two-parts"] = f"{h}.{p}"
    cases["four-parts"] = f"{good}.{s}"
    cases["empty-parts"] = ".."
    cases["leading-dot"] = "." + good
    cases["inner-space"] = f"{h}. {p}.{s}"
    # Wrong claim types.
    for k, v in [("exp", str(now + 60)), ("exp", now + 60.5), ("exp", None), ("sub", 7), ("aud", 1), ("aud", [1]),
                 ("allow", "stripe * /**"), ("allow", [1]), ("nbf", True), ("iat", "now"), ("jti", 5), ("lim", "x")]:
        cases[f"type-{k}-{type(v).__name__}"] = forge(gw, HS, {**c, k: v})
    # Duplicate keys, crit, embedded keys.
    cases["dup-alg"] = forge(gw, '{"alg":"none","alg":"HS256","kid":"k1"}', c)
    cases["dup-exp"] = forge(gw, HS, json.dumps(c)[:-1] + f',"exp":{now + 99999}}}')
    cases["dup-allow"] = forge(gw, HS, json.dumps(c)[:-1] + ',"allow":["stripe * /**"]}')
    cases["crit"] = forge(gw, {**HS, "crit": ["exp"]}, c)
    cases["crit-empty"] = forge(gw, {**HS, "crit": []}, c)
    # An embedded key is never used (contract): a token signed with the key it carries fails.
    cases["jwk"] = forge(gw, {**HS, "jwk": {"kty": "oct", "k": b64u(b"x" * 32)}}, c, key=b"x" * 32)
    cases["jwk-no-kid"] = forge(gw, {"alg": "HS256", "jwk": {"kty": "oct", "k": b64u(b"x" * 32)}}, c, key=b"x" * 32)
    cases["jku-other-key"] = forge(gw, {**HS, "jku": "https://evil.test/jwks"}, c, key=b"y" * 32)
    cases["x5c-other-key"] = forge(gw, {**HS, "x5c": ["MIIB"]}, c, key=b"z" * 32)
    # Odd kids.
    for name, kid in [("traversal", "../k1"), ("nul", "k1\u0000"), ("empty", ""), ("case", "K1"), ("space", "k1 "),
                      ("long", "k" * 2000), ("number", 1), ("null", None), ("array", ["k1"])]:
        cases[f"kid-{name}"] = forge(gw, {**HS, "kid": kid}, c)
    cases["kid-missing"] = forge(gw, {"alg": "HS256", "typ": "JWT"}, c)
    # Time bounds.
    cases["expired-past-skew"] = forge(gw, HS, {**c, "exp": now - 31})
    cases["nbf-future"] = forge(gw, HS, {**c, "nbf": now + 120})
    cases["iat-future"] = forge(gw, HS, {**c, "iat": now + 600})
    cases["lifetime-too-long"] = forge(gw, HS, {**c, "exp": now + 10 * 86400})
    cases["exp-huge"] = forge(gw, HS, {**c, "exp": 10**20})
    cases["exp-negative"] = forge(gw, HS, {**c, "exp": -1})
    # Oversized.
    cases["oversized-claims"] = forge(gw, HS, {**c, "pad": "x" * 12000})
    cases["oversized-allow"] = forge(gw, HS, {**c, "allow": ["stripe * /**"] * 3000})
    return cases


@pytest.fixture(scope="module")
def tokens(gw):
    return token_cases(gw)




def pytest_generate_tests(metafunc):
    if "token_case" in metafunc.fixturenames:
        class Fake:
            k1 = b"\0" * 32
        names = sorted(token_cases(Fake()))
        metafunc.parametrize("token_case", names)


def test_forged_or_malformed_tokens_are_refused(gw, tokens, token_case):
    gw.vendor.take()
    r = gw.get("/stripe/v1/customers", headers={"Authorization": f"Bearer {tokens[token_case]}"})
    expect_refused(gw, r)


@pytest.mark.parametrize("param,value", [("jku", "https://evil.test/jwks"), ("x5u", "https://evil.test/c"),
                                         ("x5c", ["MIIB"]), ("jwk", {"kty": "oct", "k": "eHh4"})])
def test_key_pointers_in_the_header_are_never_followed(gw, param, value):
    """Signed with the configured k1, a token that also names a key elsewhere verifies with k1
    only (the contract: embedded keys are never used); nothing is fetched, and the vendor gets
    exactly the configured credential."""
    gw.vendor.take()
    r = gw.get("/stripe/v1/customers", headers={"Authorization": f"Bearer {forge(gw, {**HS, param: value}, claims())}"})
    assert r.status_code == 200
    (req,) = gw.vendor.take()
    assert harness.header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"]


def test_the_control_token_is_accepted(gw):
    """The forging helper makes valid tokens: the refusals above are the checks, not the helper."""
    gw.vendor.take()
    r = gw.get("/stripe/v1/customers", headers={"Authorization": f"Bearer {forge(gw, HS, claims())}"})
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    assert harness.header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"]


# ------------------------------------------------------------------ headers

def raw(port, lines, body=b""):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def one_credential(gw, req, header, value):
    """The vendor got exactly one credential: `header` with `value`, and no other auth header."""
    assert harness.header_values(req, header) == [value]
    for h in ("authorization", "proxy-authorization", "x-api-key", "cookie"):
        if h != header:
            assert harness.header_values(req, h) == [], f"{h} reached the vendor"


def test_proxy_authorization_never_carries_the_credential_nor_reaches_the_vendor(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    expect_refused(gw, gw.get("/stripe/v1/x", headers={"Proxy-Authorization": f"Bearer {t}"}))
    r = gw.get("/stripe/v1/x", headers={"Authorization": f"Bearer {t}", "Proxy-Authorization": "Basic ZXZpbDpldmls"})
    assert r.status_code == 200
    (req,) = gw.vendor.take()
    one_credential(gw, req, "authorization", f"Bearer {gw.s['stripe']}")


@pytest.mark.parametrize("where", ["query", "cookie", "query-access_token", "x-api-key-on-bearer-target"])
def test_tokens_outside_the_configured_source_are_not_accepted(gw, where):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    if where == "query":
        r = gw.get(f"/stripe/v1/x?token={t}")
    elif where == "query-access_token":
        r = gw.get(f"/stripe/v1/x?access_token={t}")
    elif where == "cookie":
        r = gw.get("/stripe/v1/x", headers={"Cookie": f"token={t}"})
    else:
        r = gw.get("/stripe/v1/x", headers={"x-api-key": t})
    expect_refused(gw, r)
    assert r.json()["error"] == "missing_credential"


def test_header_target_with_an_extra_authorization_gets_one_credential(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    r = gw.get("/anthropic/v1/messages", method="POST",
               headers={"x-api-key": t, "Authorization": "Bearer sk-attacker-chosen"})
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    one_credential(gw, req, "x-api-key", gw.s["anthropic"])


def test_underscore_headers_are_rejected_on_the_hardened_listener(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    resp = raw(gw.ports["hardened"], ["GET /anthropic/v1/messages HTTP/1.1", "Host: x", f"x_api_key: {t}",
                                      f"Authorization: Bearer {t}", "Connection: close"])
    assert resp.startswith("HTTP/1.1 400"), resp[:200]
    assert gw.vendor.take() == []


@pytest.mark.parametrize("line", ["Authorization: Bearer {t}\rX-Injected: 1", "Authorization: Bearer {t}\nX-Injected: 1",
                                  "Authorization: Bearer {t}\x00", "Authorization : Bearer {t}",
                                  "Authorization: Bearer {t}\r\n X-Folded: 1"])
def test_cr_lf_nul_in_headers_smuggle_nothing(gw, line):
    """A bare CR, NUL, a space before the colon or an obsolete line fold is refused (by the codec,
    or as a malformed credential). A bare LF ends the header line (two headers): the request is
    then an ordinary one, and the vendor gets exactly one credential, the configured one."""
    gw.vendor.take()
    t = forge(gw, HS, claims())
    resp = raw(gw.ports["hardened"], ["GET /stripe/v1/x HTTP/1.1", "Host: x", line.format(t=t), "Connection: close"])
    status = int(resp.split(" ", 2)[1])
    got = gw.vendor.take()
    if "\n" in line and "\r" not in line:
        assert status == 200, resp[:200]
        (req,) = got
        one_credential(gw, req, "authorization", f"Bearer {gw.s['stripe']}")
    else:
        assert status in (400, 401), resp[:200]
        assert got == []


def test_duplicate_x_api_key_over_http2_is_refused(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-X", "POST", gw.url + "/anthropic/v1/messages",
                          "-H", f"x-api-key: {t}", "-H", "x-api-key: sk-attacker"], capture_output=True, text=True, timeout=10).stdout
    assert json.loads(out)["error"] == "bad_request", out
    assert gw.vendor.take() == []


# ------------------------------------------------------------------ paths

@pytest.mark.parametrize("path,statuses", [
    ("/stripe/v1/customers/../../admin", (403, 404)),         # resolved to /admin or /stripe/admin: not allowed
    ("/stripe/v1/customers/%2e%2e/%2e%2e/admin", (403, 404)),
    ("/stripe/v1/customers%2F..%2Fadmin", (400,)),
    ("/stripe/v1/customers/%252e%252e/admin", (403,)),         # double encoding stays literal: no rule matches it
    ("/STRIPE/v1/customers", (403, 404)),                      # route prefixes are case-sensitive
    ("/stripe/V1/customers", (403,)),                          # so are rules
    ("/stripe/v1/customers?x=/../../admin", (200,)),           # the query is not the path
    ("/stripe//v1///customers", (200,)),                       # merge_slashes: this is /v1/customers
    ("/stripe/v1/customers#frag", (400,)),
    ("/stripe/v1/x/..;/customers", (200,)),                    # Envoy resolves `..;` as `..`: the rules see /v1/customers
    ("/stripe/v1/customers/..;x/..;y/admin", (403, 404)),      # ...and here /stripe/admin
])
def test_path_tricks_on_the_hardened_listener(gw, path, statuses):
    gw.vendor.take()
    t = harness.mint(gw.k1, harness.claims(["stripe GET /v1/customers"]))
    resp = raw(gw.ports["hardened"], [f"GET {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {t}", "Connection: close"])
    status = int(resp.split(" ", 2)[1])
    assert status in statuses, resp[:300]
    got = gw.vendor.take()
    if status == 200:
        (req,) = got
        assert req["path"].split("?")[0] == "/v1/customers"
        one_credential(gw, req, "authorization", f"Bearer {gw.s['stripe']}")
    else:
        assert got == []


@pytest.mark.parametrize("path", ["/stripe/v1/x/..;/customers", "/stripe/v1/customers/..;x/admin", "/stripe/v1/.;/customers"])
def test_dot_segments_with_matrix_parameters_are_refused_without_normalisation(gw, path):
    """On a listener without Envoy's path normalisation, the filter itself refuses `..;x`: a vendor
    that strips matrix parameters would resolve it to a path the rules never saw (issue 13)."""
    gw.vendor.take()
    t = harness.mint(gw.k1, harness.claims(["stripe GET /v1/**"]))
    resp = raw(gw.ports["raw"], [f"GET {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {t}", "Connection: close"])
    assert resp.split(" ", 2)[1] == "400", resp[:300]
    assert gw.vendor.take() == []


# ------------------------------------------------------------------ method overrides (issue 13)

@pytest.mark.parametrize("how", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "_method"])
def test_a_method_override_cannot_run_a_method_no_rule_allows(gw, how):
    """A credential allowed only POST /v1/payment_intents asks the vendor to run DELETE: refused
    before the key is attached, on both listeners. Overriding to an allowed method passes."""
    t = harness.mint(gw.k1, harness.claims(["stripe POST /v1/payment_intents"]))
    def send(method_value, raw_listener=False):
        path = "/stripe/v1/payment_intents"
        headers = {}
        if how == "_method":
            path += f"?_method={method_value}"
        else:
            headers[how] = method_value
        return gw.get(path, t, method="POST", headers=headers, raw=raw_listener)
    for raw_listener in (False, True):
        r = send("DELETE", raw_listener)
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "forbidden"
        assert gw.vendor.take() == []
    r = send("post")
    assert r.status_code == 200, r.text
    assert len(gw.vendor.take()) == 1


# ------------------------------------------------------------------ hosts and the vault

@pytest.mark.parametrize("lines", [
    ["GET http://vault.test/v1/secret/data/it/stripe HTTP/1.1", "Host: vendor.test"],
    ["GET /v1/secret/data/it/stripe HTTP/1.1", "Host: vault.test"],
    ["GET /stripe/../v1/secret/data/it/stripe HTTP/1.1", "Host: vault.test"],
    ["GET http://vault.test/stripe/v1/x HTTP/1.1", "Host: vault.test"],
    ["GET /v1/sys/health HTTP/1.1", "Host: 127.0.0.1"],
])
def test_no_request_reaches_the_vault(gw, lines):
    """Absolute-form URIs, a Host naming the vault, vault paths: either refused, or (the last but
    one) routed like any request by path, to the vendor with the vendor's credential only."""
    gw.vendor.take()
    t = forge(gw, HS, claims())
    before = gw.rev_relay.count("")
    resp = raw(gw.ports["hardened"], lines + [f"Authorization: Bearer {t}", "Connection: close"])
    for v in gw.s.values():
        assert v not in resp, "a secret came back"
    assert '"data"' not in resp and "lease_duration" not in resp, "a vault answer came back"
    got = gw.vendor.take()
    assert all(not r["path"].startswith("/v1/secret") for r in got)
    for r in got:
        one_credential(gw, r, "authorization", f"Bearer {gw.s['stripe']}")
    # The revocation relay saw only the filter's own refreshes (GETs of it/revoked).
    with gw.rev_relay.lock:
        assert all(p.endswith("/it/revoked") for p in gw.rev_relay.paths[before:])


def test_authority_differing_from_host_over_http2(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
                          gw.url + "/stripe/v1/x", "-H", "Host: vault.test", "-H", f"Authorization: Bearer {t}"],
                         capture_output=True, text=True, timeout=10).stdout
    assert out == "200"
    (req,) = gw.vendor.take()
    assert harness.header_values(req, "host") == ["vendor.test"], "the route's host_rewrite wins"
    one_credential(gw, req, "authorization", f"Bearer {gw.s['stripe']}")


# ------------------------------------------------------------------ copies of the credential

COPIES = ["x-api-key", "x-goog-api-key", "api-key", "x-auth-token", "cookie", "query", "encoded query", "twice encoded query", "path",
          "x-envoy-original-path", "base64 header", "base64url cookie", "signature cut short"]


@pytest.mark.parametrize("where", COPIES)
def test_a_copy_of_the_credential_anywhere_else_is_refused(gw, where):
    """The vendor never receives the workload's credential: the filter removes the header it reads
    it from, and a request with another copy (a second header, a cookie, the path or the query, as
    sent or percent-encoded) is refused before anything is fetched or forwarded."""
    gw.vendor.take()
    t = forge(gw, HS, claims())
    path, h = "/stripe/v1/charges", {"Authorization": f"Bearer {t}"}
    if where == "cookie":
        h["Cookie"] = f"theme=dark; session={t}"
    elif where == "query":
        path += f"?token={t}"
    elif where == "encoded query":
        path += "?t=" + "".join(f"%{b:02X}" for b in t.encode())
    elif where == "twice encoded query":
        path += "?t=" + "".join(f"%25{b:02X}" for b in t.encode())
    elif where == "base64 header":
        h["x-token"] = base64.b64encode(t.encode()).decode()
    elif where == "base64url cookie":
        h["Cookie"] = "s=" + base64.urlsafe_b64encode(f"user:{t}".encode()).decode().rstrip("=")
    elif where == "signature cut short":
        h["x-api-key"] = t[:-1]
    elif where == "path":
        path = f"/stripe/v1/customers/{t}"
    elif where == "x-auth-token":
        h[where] = f"Token {t}"
    else:
        h[where] = t
    r = gw.get(path, headers=h)
    assert r.status_code == 400 and r.json()["error"] == "bad_request", (where, r.status_code, r.text)
    assert t not in r.text
    assert gw.vendor.take() == []
    if where in ("query", "path"):
        # A workload that puts its credential in its path has it printed by every access-log
        # format that prints paths: its own doing, which the filter refuses but cannot unlog.
        harness.TOKENS.discard(t)


def test_a_copy_of_a_basic_pair_is_refused(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    pair = base64.b64encode(f"ACany:{t}".encode()).decode()
    for copy in [pair, pair.rstrip("="), base64.b64encode(f"ACother:{t}".encode()).decode()]:
        r = gw.get("/twilio/x", headers={"Authorization": f"Basic {pair}", "X-Forwarded-Authorization": f"Basic {copy}"})
        assert r.status_code == 400 and r.json()["error"] == "bad_request", copy
    assert gw.vendor.take() == []
    # One copy, where the target reads it: forwarded with the vendor's own credential only.
    assert gw.get("/twilio/x", headers={"Authorization": f"Basic {pair}"}).status_code == 200
    (req,) = gw.vendor.take()
    assert harness.header_values(req, "x-forwarded-authorization") == []


# ------------------------------------------------------------------ response scrubbing

@pytest.mark.parametrize("target,path,headers,secret", [
    ("charges", "/charges/reflect", lambda t: {"Authorization": f"Bearer {t}"}, "stripe"),
    ("anthropic", "/anthropic/reflect", lambda t: {"x-api-key": t}, "anthropic"),
    ("maps", "/maps/reflect?q=1", lambda t: {"Authorization": f"Bearer {t}"}, "maps"),
    ("twilio", "/twilio/reflect", None, "twilio_token"),
])
def test_a_vendor_reflecting_the_secret_never_shows_it_to_the_workload(gw, target, path, headers, secret):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    before = gw.envoy.stats().get("wasmcustom.keyward_responses_scrubbed_total", 0)
    if headers is None:
        h = {"Authorization": "Basic " + base64.b64encode(f"ACany:{t}".encode()).decode()}
    else:
        h = headers(t)
    r = gw.get(path, headers=h, allow_redirects=False)
    assert r.status_code == 302
    (req,) = gw.vendor.take()  # the vendor did get the key (and echoed it)
    blob = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    assert gw.s[secret] not in blob, blob
    if target == "twilio":
        pair = base64.b64encode(f"{gw.s['twilio_sid']}:{gw.s['twilio_token']}".encode()).decode()
        assert pair not in blob
    assert not {k.lower() for k in r.headers} & {"x-echo-authorization", "x-echo-api-key", "x-echo-query",
                                                  "x-echo-lower-hex", "x-echo-partial", "x-echo-hex", "x-echo-hex-upper", "x-echo-base64"}
    # The redirect is removed where it carried the key (a query credential), kept where it did not.
    assert ("location" in {k.lower() for k in r.headers}) == (target != "maps")
    assert r.headers.get("x-harmless") == "kept", "other headers are untouched"
    assert gw.envoy.stats().get("wasmcustom.keyward_responses_scrubbed_total", 0) > before


def test_a_redirect_without_the_secret_is_left_alone(gw):
    gw.vendor.take()
    t = forge(gw, HS, claims())
    r = gw.get("/charges/reflect?next=/home", headers={"Authorization": f"Bearer {t}"}, allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["location"] == "https://vendor.test/callback?next=/home"
    assert "x-echo-authorization" not in {k.lower() for k in r.headers}
    (req,) = gw.vendor.take()
    assert harness.header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"]
