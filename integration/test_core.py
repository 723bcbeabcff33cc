"""The core request path end to end: real Envoy running dist/keyward.wasm, real OpenBao, a recording vendor."""
import base64
import json
from pathlib import Path
import socket
import time

import pytest

import harness
from harness import header_values


def access_entries(gw, jti=None):
    out = []
    if gw.access_log.exists():
        for line in gw.access_log.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if jti is None or e.get("jti") == jti:
                out.append(e)
    return out


def wait_access(gw, jti, n=1):
    harness.wait_until(lambda: len(access_entries(gw, jti)) >= n, timeout=10, what="access log entry")
    return access_entries(gw, jti)


def assert_denied(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and "\n" not in body["message"]
    assert set(body) == {"error", "message"}
    if status == 401:
        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# ------------------------------------------------------------------ the happy paths

def test_bearer_injects_the_real_key_and_audits(gw):
    gw.vendor.take()
    c = harness.claims(["stripe POST /v1/payment_intents"], run="sqs/msg-1")
    t = harness.mint(gw.k1, c)
    r = gw.get("/stripe/v1/payment_intents?expand=x", t, method="POST", data=b"amount=100")
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    assert req["method"] == "POST"
    assert req["path"] == "/v1/payment_intents?expand=x"
    assert header_values(req, "authorization") == [f"Bearer {gw.s['stripe']}"]
    assert req["body"] == b"amount=100"
    assert not [k for k, _ in req["headers"] if k.startswith("x-envoy-")]
    (e,) = wait_access(gw, c["jti"])
    assert e["subject"] == "lambda/it" and e["target"] == "stripe" and e["run"] == "sqs/msg-1"
    assert e["decision"] == "allow" and e["cache"] in ("hit", "miss")


def test_basic_password_for_twilio_sdks(gw):
    gw.vendor.take()
    t = gw.token(["twilio POST /2010-04-01/Accounts/*/Messages.json"])
    basic = base64.b64encode(f"ACworkload:{t}".encode()).decode()
    r = gw.get("/twilio/2010-04-01/Accounts/AC1/Messages.json", method="POST", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    want = base64.b64encode(f"{gw.s['twilio_sid']}:{gw.s['twilio_token']}".encode()).decode()
    assert header_values(req, "authorization") == [f"Basic {want}"]


def test_header_source_and_header_injection(gw):
    gw.vendor.take()
    t = gw.token(["anthropic POST /v1/messages", "vendorhdr GET /**"])
    r = gw.get("/anthropic/v1/messages", method="POST", headers={"x-api-key": t, "Authorization": "Bearer stray"})
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    assert header_values(req, "x-api-key") == [gw.s["anthropic"]]
    assert header_values(req, "authorization") == [], "no other credential passes through"
    # Bearer in, custom header with a prefix out; a workload-supplied copy of that header is dropped.
    r = gw.get("/vendorhdr/a", t, headers={"x-vendor-key": "Token forged"})
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    assert header_values(req, "x-vendor-key") == [f"Token {gw.s['vendorhdr']}"]
    assert header_values(req, "authorization") == []


def test_query_injection_replaces_existing_parameter(gw):
    gw.vendor.take()
    t = gw.token(["maps GET /geo"])
    r = gw.get("/maps/geo?q=x&key=mine&KEY=other", t)
    assert r.status_code == 200, r.text
    (req,) = gw.vendor.take()
    assert req["path"] == f"/geo?q=x&key={gw.s['maps']}"
    assert header_values(req, "authorization") == []


def test_envoys_default_access_log_format_prints_the_path_the_workload_sent(gw):
    """Envoy's default format prints %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%: for a target that injects
    its key in the query, the filter sets x-envoy-original-path to the path as the workload sent
    it, so the line never holds the key."""
    t = gw.token(["maps GET /geo"])
    assert gw.get("/maps/geo?q=logged&key=mine", t).status_code == 200
    gw.vendor.take()
    default_log = Path(str(gw.access_log) + ".default")
    harness.wait_until(lambda: "q=logged" in default_log.read_text(), timeout=10, what="the default-format line")
    line = next(line for line in default_log.read_text().splitlines() if "q=logged" in line)
    assert '"GET /maps/geo?q=logged&key=mine HTTP/1.1"' in line, line
    assert gw.s["maps"] not in default_log.read_text()


def test_cache_is_shared_and_vault_is_off_the_hot_path(gw):
    t = gw.token(["stripe GET /v1/**"])
    assert gw.get("/stripe/v1/warm", t).status_code == 200
    before = gw.envoy.stats()
    for i in range(30):
        assert gw.get(f"/stripe/v1/c/{i}", t).status_code == 200
    after = gw.envoy.stats()
    assert after.get("cluster.vault.upstream_rq_total", 0) == before.get("cluster.vault.upstream_rq_total", 0)
    assert after["wasmcustom.keyward_cache_lookups_total;outcome=hit"] - before["wasmcustom.keyward_cache_lookups_total;outcome=hit"] == 30
    prom = gw.envoy.prometheus()
    # Defined up front, in Prometheus's form: a family with its label.
    for name in ['keyward_requests_total{decision="allow"}', 'keyward_requests_total{decision="forbidden"}', 'keyward_secret_fetches_total{result="ok"}',
                 'keyward_secret_fetches_total{result="error"}', 'keyward_cache_lookups_total{outcome="hit"}', 'keyward_cache_lookups_total{outcome="miss"}',
                 'keyward_cache_lookups_total{outcome="stale"}', 'keyward_revocation_refreshes_total{result="ok"}', 'keyward_revocation_refreshes_total{result="error"}']:
        assert f"\n{name} " in prom, name
    gw.vendor.take()


def test_store_held_signing_key(gw):
    gw.vendor.take()
    t = gw.token(["stripe GET /v1/**"], kid="k2")
    assert gw.get("/stripe/v1/k2", t).status_code == 200
    forged = gw.token(["stripe GET /v1/**"], kid="k2", key=gw.k1)
    assert_denied(gw.get("/stripe/v1/k2", forged), 401, "invalid_credential")
    assert len(gw.vendor.take()) == 1


def test_cli_minted_token_works(gw):
    gw.vendor.take()
    r = harness.cli("mint", "--kid", "k1", "--key-env", "KEYWARD_KEY_K1", "--sub", "lambda/cli", "--iss", "https://issuer.test",
                    "--allow", "stripe GET /v1/**", "--run", "cli/1", "--ttl", "120", env=gw.env)
    assert r.returncode == 0, r.stderr
    t = r.stdout.strip()
    harness.TOKENS.add(t)
    assert gw.get("/stripe/v1/cli", t).status_code == 200
    ok = harness.cli("inspect", t, "--key-env", "KEYWARD_KEY_K1", "--iss", "https://issuer.test", env=gw.env)
    assert ok.returncode == 0 and "valid: sub=lambda/cli" in ok.stdout, ok.stdout + ok.stderr
    bad = harness.cli("inspect", t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1], "--key-env", "KEYWARD_KEY_K1", env=gw.env)
    assert bad.returncode != 0 and "signature" in bad.stderr


# ------------------------------------------------------------------ rules

@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/stripe/v1/customers/cus_1", True),
    ("GET", "/stripe/v1", True),
    ("POST", "/stripe/v1/payment_intents", True),
    ("DELETE", "/stripe/v1/customers/cus_1", False),   # token allows, ceiling does not
    ("POST", "/stripe/v1/refunds", False),
    ("GET", "/stripe/v2/x", False),
])
def test_token_rules_and_target_ceiling(gw, method, path, allowed):
    gw.vendor.take()
    t = gw.token(["stripe * /**"])
    r = gw.get(path, t, method=method)
    if allowed:
        assert r.status_code == 200, r.text
        assert len(gw.vendor.take()) == 1
    else:
        assert_denied(r, 403, "forbidden")
        assert gw.vendor.take() == []


def test_narrow_token_and_trailing_slash(gw):
    gw.vendor.take()
    t = gw.token(["stripe GET /v1/customers/*"])
    assert gw.get("/stripe/v1/customers/cus_1", t).status_code == 200
    for p in ["/stripe/v1/customers/cus_1/", "/stripe/v1/customers", "/stripe/v1/customers/a/b"]:
        assert_denied(gw.get(p, t), 403, "forbidden")
    assert gw.get("/stripe/v1/customers/cus_1", t, method="HEAD").status_code == 403, "methods match exactly"
    assert len(gw.vendor.take()) == 1


def test_routes_without_target_are_denied(gw):
    gw.vendor.take()
    t = gw.token(["stripe * /**", "paypal * /**"])
    assert_denied(gw.get("/nometa/x", t), 403, "unknown_target")
    assert_denied(gw.get("/unknown/x", t), 403, "unknown_target")
    assert gw.vendor.take() == []


# ------------------------------------------------------------------ credentials

def test_credential_failures(gw):
    gw.vendor.take()
    now = int(time.time())
    good = harness.claims(["stripe * /**"])
    cases = [
        (None, 401, "missing_credential"),
        ("Basic dXNlcjpwYXNz", 401, "invalid_credential"),
        ("Bearer not.a.jwt", 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "exp": now - 120}), 401, "expired_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "aud": "other"}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "iss": "https://evil.test"}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "exp": now + 7200}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "nbf": now + 600}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, good, kid="nope"), 401, "invalid_credential"),
        ("Bearer " + harness.mint(b"w" * 32, good), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, good, header={"alg": "none", "kid": "k1"}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, good, header={"alg": "HS512", "kid": "k1"}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, good, header={"alg": "HS256", "kid": "k1", "crit": ["exp"]}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, '{"sub":"a","sub":"b"}'), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "exp": str(now + 60)}), 401, "invalid_credential"),
        ("Bearer " + harness.mint(gw.k1, {**good, "allow": ["stripe get /"]}), 401, "invalid_credential"),
    ]
    for auth, status, code in cases:
        h = {"Authorization": auth} if auth else {}
        assert_denied(gw.get("/stripe/v1/x", headers=h), status, code)
    assert gw.vendor.take() == []


def test_unsigned_variants_of_a_valid_token(gw):
    gw.vendor.take()
    t = gw.token(["stripe * /**"])
    h, p, s = t.split(".")
    for bad in [f"{h}.{p}.", f"{h}.{p}", f"{h}.{p}.{s}=", f"{h}.{p}.{s[:-4]}", f"{h}..{s}", f"{h}.{p}.{s}.{s}"]:
        assert gw.get("/stripe/v1/x", bad).status_code in (400, 401)
    assert gw.vendor.take() == []


def raw_request(port, lines):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def test_duplicate_credential_headers_are_refused(gw):
    gw.vendor.take()
    t = gw.token(["stripe * /**"])
    resp = raw_request(gw.ports["hardened"], ["GET /stripe/v1/x HTTP/1.1", "Host: x",
                                              f"Authorization: Bearer {t}", f"Authorization: Bearer {t}", "Connection: close"])
    assert resp.startswith("HTTP/1.1 400"), resp
    assert '"bad_request"' in resp
    assert_denied(gw.get("/stripe/v1/x", headers={"Authorization": f"Bearer {t},Bearer {t}"}), 400, "bad_request")
    t2 = gw.token(["anthropic * /**"])
    resp = raw_request(gw.ports["hardened"], ["POST /anthropic/v1/messages HTTP/1.1", "Host: x", f"x-api-key: {t2}",
                                              "x-api-key: other", "Content-Length: 0", "Connection: close"])
    assert resp.startswith("HTTP/1.1 400"), resp
    assert gw.vendor.take() == []


def test_duplicate_authorization_over_http2(gw):
    """Envoy joins repeated authorization fields with commas over HTTP/2 too; the filter refuses."""
    import subprocess
    gw.vendor.take()
    t = gw.token(["stripe * /**"])
    for second in [t, "other"]:
        out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", gw.url + "/stripe/v1/x",
                              "-H", f"Authorization: Bearer {t}", "-H", f"Authorization: Bearer {second}"],
                             capture_output=True, text=True, timeout=10).stdout
        assert json.loads(out)["error"] == "bad_request", out
    assert gw.vendor.take() == []


# ------------------------------------------------------------------ paths

@pytest.mark.parametrize("path", [
    "/stripe/v1/../admin", "/stripe/v1/%2e%2e/admin", "/stripe/v1/./x", "/stripe/v1//x",
    "/stripe/v1%2fadmin", "/stripe/v1%5cadmin", "/stripe/v1/%00", "/stripe/v1\\admin", "/stripe/v1/%zz",
])
def test_filter_path_checks_without_envoy_normalisation(gw, path):
    """The raw listener has no path normalisation: the filter's own checks must refuse."""
    gw.vendor.take()
    t = gw.token(["stripe * /**", "stripe * /admin"])
    resp = raw_request(gw.ports["raw"], [f"GET {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {t}", "Connection: close"])
    assert resp.startswith("HTTP/1.1 400"), resp
    assert gw.vendor.take() == []


@pytest.mark.parametrize("path,status", [
    ("/stripe/v1/%2fx", 400), ("/stripe/v1/%5cx", 400), ("/stripe/v1/../../admin", 403), ("/stripe//v1/x", 200),
])
def test_paths_with_production_normalisation(gw, path, status):
    gw.vendor.take()
    t = gw.token(["stripe GET /v1/**"])
    resp = raw_request(gw.ports["hardened"], [f"GET {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {t}", "Connection: close"])
    assert resp.startswith(f"HTTP/1.1 {status}"), resp
    got = gw.vendor.take()
    if status == 200:
        assert [g["path"] for g in got] == ["/v1/x"]
    else:
        assert got == []


# ------------------------------------------------------------------ secrets unavailable

def test_missing_secret_or_field_gives_503(gw):
    gw.vendor.take()
    t = gw.token(["missing * /**", "nofield * /**"])
    for p in ["/missing/x", "/nofield/x"]:
        r = gw.get(p, t)
        assert_denied(r, 503, "secret_unavailable")
        assert int(r.headers["retry-after"]) > 0
    assert gw.vendor.take() == []


def test_dead_store_answers_within_its_timeout(gw):
    gw.vendor.take()
    t = gw.token(["deadstore * /**"])
    start = time.time()
    r = gw.get("/deadstore/x", t)
    assert_denied(r, 503, "secret_unavailable")
    assert time.time() - start < 2.0
    assert gw.vendor.take() == []


def test_deleted_secret_is_not_found_never_empty(gw):
    """A deleted latest KV v2 version is "not found" (503), never an empty credential."""
    gw.vendor.take()
    gw.bao.delete("it/deleted")
    t = gw.token(["deleted * /**"])
    assert_denied(gw.get("/deleted/x", t), 503, "secret_unavailable")
    assert gw.vendor.take() == []


# ------------------------------------------------------------------ access log and metrics

def test_denials_are_audited(gw):
    c = harness.claims(["stripe GET /v1/**"], run="job/7")
    t = harness.mint(gw.k1, c)
    assert_denied(gw.get("/stripe/v1/x", t, method="DELETE"), 403, "forbidden")
    (e,) = wait_access(gw, c["jti"])
    assert (e["subject"], e["target"], e["decision"], e["run"]) == ("lambda/it", "stripe", "forbidden", "job/7")
    assert e["status"] == 403
    stats = gw.envoy.stats()
    assert stats["wasmcustom.keyward_requests_total;decision=forbidden"] >= 1


# ------------------------------------------------------------------ the callout state machine

def test_concurrent_cold_requests_park_and_resume(gw):
    """40 concurrent requests for a cold secret: every one is answered with the real key, and the
    vault sees one call for the whole process (the fetch lease), never one per request."""
    from concurrent.futures import ThreadPoolExecutor
    gw.vendor.take()
    t = gw.token(["burst GET /**"])
    # This secret's store has a cluster of its own: other secrets' refreshes ahead of their TTL
    # (on the shared vault cluster) cannot land in the count.
    before = gw.envoy.stats().get("cluster.vault_burst.upstream_rq_total", 0)
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda i: gw.get(f"/burst/item/{i}", t).status_code, range(40)))
    assert codes == [200] * 40
    calls = gw.envoy.stats().get("cluster.vault_burst.upstream_rq_total", 0) - before
    assert calls == 1, calls
    got = gw.vendor.take()
    assert len(got) == 40
    assert all(header_values(g, "authorization") == [f"Bearer {gw.s['burst']}"] for g in got)
    assert sorted(g["path"] for g in got) == sorted(f"/item/{i}" for i in range(40))


def test_hanging_store_times_out_with_503(gw):
    gw.vendor.take()
    t = gw.token(["hangstore * /**"])
    start = time.time()
    r = gw.get("/hangstore/x", t)
    elapsed = time.time() - start
    assert_denied(r, 503, "secret_unavailable")
    assert elapsed < 1.5, f"took {elapsed:.2f}s with timeout_ms=400"
    assert gw.vendor.take() == []


def test_client_leaving_while_parked_does_not_wedge_the_worker(gw):
    gw.vendor.take()
    t = gw.token(["hangstore * /**", "stripe GET /v1/**"])
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gw.ports["hardened"]), timeout=5) as s:
            s.sendall(f"GET /hangstore/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n".encode())
        # closed at once, while the request is parked on the hanging store
    time.sleep(1.0)  # past the store's timeout: the abandoned callouts finish or are cancelled
    assert gw.get("/stripe/v1/after", t).status_code == 200
    assert_denied(gw.get("/hangstore/x", t), 503, "secret_unavailable")
    assert [g["path"] for g in gw.vendor.take()] == ["/v1/after"]


# ------------------------------------------------------------------ garbage from the store

GARBAGE = {
    "crlf": {"k": "fake_vendor_key\r\nX-Injected: 1"},
    "lf": {"k": "fake_vendor_key\nsecond-line"},
    "number": {"k": 12345},
    "object": {"k": {"nested": "sk"}},
    "big": {"k": "A" * (70 * 1024)},  # the whole answer is over 64 KiB
    "missing": {"other": "sk_other"},
    "empty": {"k": ""},
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_from_the_store_gives_503_and_injects_nothing(gw, case):
    import envoy_config
    assert case in envoy_config.GARBAGE_CASES
    gw.bao.put(f"it/garbage-{case}", GARBAGE[case])
    t = gw.token([f"g_{case} GET /**"])
    for _ in range(3):
        r = gw.get(f"/g_{case}/x", t)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "secret_unavailable" and "retry-after" in r.headers
    assert [v for v in gw.vendor.take() if v["path"] == "/x"] == []
    # The reason is logged, never the value.
    log = gw.envoy.log_path.read_text(errors="replace")
    assert f"it/garbage-{case}" in log
    assert "X-Injected" not in log and "second-line" not in log and "sk_other" not in log


def test_module_exports_only_the_callbacks_it_handles():
    """Envoy enters the VM for every stream callback a module exports: dist/keyward.wasm exports the
    Makefile's list, without the SDK's on_log and on_done callbacks it does not handle; a stream's
    end is handled in proxy_on_delete. Request trailers are handled: they end a body that is still
    to be decided. Response bodies are handled: a model call's usage is read from them."""
    import sys
    sys.path.insert(0, str(harness.ROOT / "tools"))
    import trim_exports
    names = set(trim_exports.export_names(harness.WASM.read_bytes()))
    assert {"proxy_on_request_headers", "proxy_on_response_headers", "proxy_on_delete", "proxy_on_tick",
            "proxy_on_http_call_response", "proxy_on_queue_ready", "proxy_on_request_body", "proxy_on_request_trailers",
            "proxy_on_response_body"} <= names
    assert not names & {"proxy_on_log", "proxy_on_done",
                        "proxy_on_new_connection", "proxy_on_downstream_data", "proxy_on_upstream_data"}, names
