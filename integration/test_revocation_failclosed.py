"""Revocation fails closed (issue 13): from the first request after start, and whatever odd answer
the store (or something in front of it) gives once a list is in force."""
import json
import time

import pytest
import requests

import envoy_config
import harness
from test_revocation import revoke


def test_a_revoked_credential_is_refused_from_the_first_request_after_start(gw, workdir):
    """A second gateway starts while its revocation store is slow (0.8 s): a revoked credential
    sent from the first moment is never served; it waits for the list and gets 401 (or 503 if the
    list cannot come in time), never 200."""
    c = harness.claims(["stripe GET /v1/**"], sub="lambda/boot")
    t = harness.mint(gw.k1, c)
    revoke(gw, **{f"jti:{c['jti']}": "revoked before the gateway started"})
    relay = harness.Relay(gw.bao.addr)
    relay.mode = "slow"
    ports = {**gw.ports, "rev": relay.port, "admin": harness.free_port(), "hardened": harness.free_port(), "raw": harness.free_port()}
    envoy = harness.Envoy(workdir, envoy_config.bootstrap(ports, workdir / "access-boot.log"), gw.env, name="envoy-boot")
    try:
        url = f"http://127.0.0.1:{ports['hardened']}/stripe/v1/boot"
        statuses = []
        t0 = time.time()
        while time.time() - t0 < 2.5:
            statuses.append(requests.get(url, headers={"Authorization": f"Bearer {t}"}, timeout=10).status_code)
        assert 200 not in statuses, statuses
        assert statuses[-1] == 401, statuses
        # A credential that is not revoked is served once the list is in.
        ok = gw.token(["stripe GET /v1/**"], sub="lambda/boot-ok")
        assert requests.get(url, headers={"Authorization": f"Bearer {ok}"}, timeout=10).status_code == 200
    finally:
        envoy.stop()
        relay.stop()
    gw.vendor.take()


def kv_answer(gw, path, version=None):
    q = f"?version={version}" if version else ""
    r = requests.get(f"{gw.bao.addr}/v1/secret/data/{path}{q}", headers={"X-Vault-Token": gw.bao.token}, timeout=5)
    r.raise_for_status()
    return r.content


ODD = {
    "an HTML 404 from an ingress": (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>"),
    "a bare 404": (404, b""),
    "a response-wrapped body": (200, json.dumps({"wrap_info": {"token": "hvs.wrapped", "ttl": 300}, "data": None}).encode()),
    "a KV v1-shaped body": (200, json.dumps({"data": {"jti:someone-else": "v1"}}).encode()),
}


@pytest.mark.parametrize("what", list(ODD) + ["an older KV version (a lagging replica)"])
def test_an_odd_store_answer_never_lifts_the_revocations_in_force(gw, what):
    c = harness.claims(["stripe GET /v1/**"], sub="lambda/odd")
    t = harness.mint(gw.k1, c)
    revoke(gw, **{f"jti:{c['jti']}": "leaked"})
    harness.wait_until(lambda: gw.get("/stripe/v1/odd", t).status_code == 401, timeout=5, what="revoked")
    if what in ODD:
        gw.rev_relay.canned = ODD[what]
    else:
        current = json.loads(kv_answer(gw, "it/revoked"))["data"]["metadata"]["version"]
        gw.rev_relay.canned = (200, kv_answer(gw, "it/revoked", version=current - 1))
    before = gw.envoy.stats()["wasmcustom.keyward_revocation_refreshes_total;result=error"]
    gw.rev_relay.mode = "canned"
    try:
        harness.wait_until(lambda: gw.envoy.stats()["wasmcustom.keyward_revocation_refreshes_total;result=error"] >= before + 2,
                           timeout=8, what=f"{what}: counted as a failed refresh")
        statuses = [gw.get("/stripe/v1/odd", t).status_code for _ in range(20)]
        assert statuses == [401] * 20, f"{what}: {statuses}"
    finally:
        gw.rev_relay.mode = "pass"
    gw.vendor.take()
