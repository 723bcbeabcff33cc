"""Fleet-wide limits (issue 15): the shipped envoy/global-ratelimit.yaml in real Envoy, with its
rate-limit filter asking a gRPC rate-limit service (integration/ratelimit_service.py:
envoyproxy/ratelimit's semantics, the shipped deploy/ratelimit/config.yaml with its numbers
lowered for the test). Descriptors come from Keyward's verified decision, never from what the
client sends; two gateways share the limits; the service failing fails closed."""
import json
import time

import pytest
import requests
import yaml

import harness
from conftest import assert_no_leaks
from ratelimit_service import RateLimitService
from shipped import localise

ROOT = harness.ROOT
ISS = "https://keyward.example.internal"
PER_SUBJECT, PER_JTI = 5, 3


@pytest.fixture(scope="module")
def fleet(gw, workdir):
    gw.bao.put("keyward/stripe", {"api_key": gw.s["stripe"]})
    gw.bao.put("keyward/revoked", {"jti:seed": "x"})
    cfg = yaml.safe_load((ROOT / "deploy" / "ratelimit" / "config.yaml").read_text())
    for d in cfg["descriptors"]:
        if d["key"] == "target" and "value" not in d:
            d["descriptors"][0]["rate_limit"]["requests_per_unit"] = PER_SUBJECT
        if d["key"] == "jti":
            d["rate_limit"]["requests_per_unit"] = PER_JTI
    (workdir / "ratelimit.yaml").write_text(yaml.safe_dump(cfg))
    rls = RateLimitService(workdir / "ratelimit.yaml", harness.free_port()).start()
    vendor = harness.Vendor()
    gateways = []
    for i in range(2):  # two replicas sharing one rate-limit service
        ports = {"admin": harness.free_port(), "envoy": harness.free_port()}
        log = workdir / f"access-rl-{i}.log"
        doc = localise(yaml.safe_load((ROOT / "envoy" / "global-ratelimit.yaml").read_text()), ports,
                       {"vault": gw.bao.port, "stripe": vendor.port, "ratelimit": rls.port}, log, keep_routes={"keyward_health", "stripe"})
        e = harness.Envoy(workdir, doc, gw.env, name=f"envoy-rl-{i}")
        e.url = f"http://127.0.0.1:{ports['envoy']}"
        e.access = log
        harness.wait_until(lambda: requests.get(e.url + "/keyward/health", timeout=5).status_code == 200, timeout=15, what="ready")
        gateways.append(e)
    yield rls, vendor, gateways
    for e in gateways:
        assert_no_leaks(e.log_path.read_text(errors="replace"), "the rate-limited gateway's log")
        e.stop()
    vendor.stop()
    rls.stop()


def same_window():
    """The limits count in fixed one-minute windows aligned on the clock, as envoyproxy/ratelimit's
    do: start a sequence that must land in one window at least ten seconds before its end."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def call(e, token, path="/stripe/v1/customers", headers=None):
    h = {"Authorization": f"Bearer {token}", **(headers or {})}
    return requests.get(e.url + path, headers=h, timeout=10)


def test_per_credential_limit_holds_across_gateways_with_verified_descriptors(gw, fleet):
    rls, vendor, (a, b) = fleet
    sub = "lambda/rl-" + harness.secrets.token_hex(3)
    t = gw.token(["stripe GET /v1/**"], sub=sub, iss=ISS)
    jti = json.loads(harness.b64d(t.split(".")[1]))["jti"]
    spoof = {"x-keyward-subject": "someone-else", "x-keyward-jti": "forged", "x-keyward-target": "openai"}
    same_window()
    codes = [call(g, t, headers=spoof).status_code for g in (a, b, a, b)]
    assert codes == [200, 200, 200, 429], codes
    r = call(a, t)
    assert r.status_code == 429 and r.json()["error"] == "rate_limited" and r.headers["content-type"].startswith("application/json")
    assert len(vendor.take()) == PER_JTI
    for req in vendor.history[-PER_JTI:]:
        assert not [k for k, _ in req["headers"] if k.startswith("x-keyward-")], "decision headers never reach the vendor"
    seen = [dict(entries) for domain, entries in rls.seen if domain == "keyward"]
    assert {"target": "stripe", "subject": sub} in seen and {"jti": jti} in seen
    assert not any("someone-else" in d.values() or "forged" in d.values() or d.get("target") == "openai" for d in seen), \
        "the client's x-keyward-* headers never become descriptors"


def test_per_workload_limit_spans_its_credentials(gw, fleet):
    rls, vendor, (a, b) = fleet
    sub = "lambda/rl-" + harness.secrets.token_hex(3)
    statuses = []
    same_window()
    for i in range(PER_SUBJECT + 1):  # a new credential each time: only (target, subject) counts
        statuses.append(call((a, b)[i % 2], gw.token(["stripe GET /v1/**"], sub=sub, iss=ISS)).status_code)
    assert statuses == [200] * PER_SUBJECT + [429], statuses
    # Another workload is not affected.
    assert call(a, gw.token(["stripe GET /v1/**"], sub=sub + "-other", iss=ISS)).status_code == 200
    vendor.take()


def test_keyward_denials_never_reach_the_rate_limit_service(gw, fleet):
    rls, vendor, (a, _) = fleet
    before = len(rls.seen)
    assert call(a, "not-a-token").status_code == 401
    assert requests.get(a.url + "/stripe/v1/customers", timeout=10).status_code == 401
    assert len(rls.seen) == before
    assert vendor.take() == []


def test_the_service_down_fails_closed_and_recovers(gw, fleet):
    rls, vendor, (a, _) = fleet
    t = gw.token(["stripe GET /v1/**"], sub="lambda/rl-down-" + harness.secrets.token_hex(3), iss=ISS)
    rls.down = True
    try:
        r = call(a, t)
        assert r.status_code == 503 and r.json()["error"] == "rate_limit_unavailable", r.text
        assert vendor.take() == []
    finally:
        rls.down = False
    assert call(a, t).status_code == 200
    vendor.take()


def test_check_envoy_refuses_unsafe_rate_limit_wiring(tmp_path):
    text = (ROOT / "envoy" / "global-ratelimit.yaml").read_text()
    cases = {
        "decision_headers off": text.replace('"decision_headers": true,', ""),
        "headers reach the vendor": text.replace(", x-keyward-subject, x-keyward-jti, x-keyward-target, x-keyward-run]", "]"),
    }
    doc = yaml.safe_load(text)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    f = hcm["http_filters"]
    kw = next(i for i, x in enumerate(f) if x["name"] == "keyward")
    rl = next(i for i, x in enumerate(f) if x["name"] == "envoy.filters.http.ratelimit")
    f[kw], f[rl] = f[rl], f[kw]
    cases["rate limit before keyward"] = yaml.safe_dump(doc)
    for what, body in cases.items():
        assert body != text, what
        p = tmp_path / "rl.yaml"
        p.write_text(body)
        r = harness.cli("check-envoy", str(p), "--no-env", "--json")
        assert r.returncode == 1, (what, r.stdout)
        assert any("x-keyward" in x or "decision_headers" in x for x in json.loads(r.stdout)["problems"]), (what, r.stdout)
