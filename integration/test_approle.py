"""Vault AppRole authentication (issue 3) against real Envoy and real OpenBao: the filter logs in
with role_id/secret_id from the environment, renews its token before expiry, logs in again when
the role's max TTL is near or the store refuses the token (403), and a login that fails gives a
clean 503. A relay in front of OpenBao counts logins, renewals and reads, and sees which token
each read carried."""
import time
from pathlib import Path

import pytest
import requests

import envoy_config
import harness
from conftest import assert_no_leaks

LOGIN = "/v1/auth/approle/login"
RENEW = "/v1/auth/token/renew-self"
POLICY = 'path "secret/data/approle/*" { capabilities = ["read"] }'


class AppRoleEnv:
    def __init__(self, workdir: Path):
        self.vendor = harness.Vendor()
        self.bao = harness.Bao(workdir, name="bao-approle")
        self.relay = harness.Relay(self.bao.addr)
        self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("PUT", "sys/policies/acl/keyward", {"policy": POLICY})
        # "fast": a 3 s token with a 7 s max TTL, to watch renewals and the re-login at max TTL.
        # "slow": a 60 s token, so a refused token is replaced by the read path, not a renewal.
        self.roles = {}
        for role, ttl, max_ttl in (("fast", "3s", "7s"), ("slow", "60s", "120s")):
            self.api("POST", f"auth/approle/role/{role}",
                     {"token_policies": ["keyward"], "token_ttl": ttl, "token_max_ttl": max_ttl})
            role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
            secret_id = self.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
            harness.SECRETS.update([role_id, secret_id])
            self.roles[role] = (role_id, secret_id)
        self.values = {}
        for name in ("fast", "slow", "wrong"):
            v = harness.fake_secret("ar")
            self.bao.put(f"approle/{name}", {"k": v})
            self.values[name] = v
        self.k1 = harness.secrets.token_bytes(32)
        k1_b64 = harness.base64.b64encode(self.k1).decode()
        harness.SECRETS.add(k1_b64)
        env = {"KEYWARD_KEY_K1": k1_b64,
               "FAST_ROLE_ID": self.roles["fast"][0], "FAST_SECRET_ID": self.roles["fast"][1],
               "SLOW_ROLE_ID": self.roles["slow"][0], "SLOW_SECRET_ID": self.roles["slow"][1],
               "WRONG_SECRET_ID": "not-the-secret-id"}
        cfg = envoy_config.filter_config()
        cfg.pop("revocation")
        cfg.pop("signing_keys")
        cfg["signing_keys"] = {"k1": {"env": "KEYWARD_KEY_K1"}}
        cfg["cache"] = {"ttl_s": 1}

        def store(role, secret_env):
            return {"type": "vault_kv2", "cluster": "vault", "authority": "vault.test", "timeout_ms": 1000,
                    "approle": {"role_id_env": f"{role}_ROLE_ID", "secret_id_env": secret_env}}
        cfg["stores"] = {"fast": store("FAST", "FAST_SECRET_ID"), "slow": store("SLOW", "SLOW_SECRET_ID"),
                         "wrong": store("SLOW", "WRONG_SECRET_ID")}
        bearer = {"credential": "bearer", "inject": {"type": "bearer"}}
        cfg["targets"] = {name: {**bearer, "secret": {"store": name, "path": f"approle/{name}", "field": "k"}}
                          for name in ("fast", "slow", "wrong")}
        ports = {"admin": harness.free_port(), "hardened": harness.free_port(), "raw": harness.free_port(),
                 "vendor": self.vendor.port, "bao": self.relay.port, "rev": self.bao.port,
                 "dead": harness.free_port(), "hang": harness.free_port()}
        self.access_log = workdir / "access-approle.log"
        keys = ["KEYWARD_KEY_K1"] + [k for k in env if k != "KEYWARD_KEY_K1"]
        self.envoy = harness.Envoy(workdir, envoy_config.bootstrap(ports, self.access_log, cfg, keys), env,
                                   name="envoy-approle")
        self.url = f"http://127.0.0.1:{ports['hardened']}"

    def api(self, method, path, body=None):
        r = requests.request(method, f"{self.bao.addr}/v1/{path}", json=body,
                             headers={"X-Vault-Token": self.bao.token}, timeout=5)
        r.raise_for_status()
        return r.json() if r.content else {}

    def get(self, target):
        t = harness.mint(self.k1, harness.claims([f"{target} GET /**"]))
        return requests.get(f"{self.url}/{target}/x", headers={"Authorization": f"Bearer {t}"}, timeout=10)

    def calls(self):
        """(path, token or None) for every call the relay forwarded."""
        with self.relay.lock:
            return list(zip(self.relay.paths, [h.get("x-vault-token") for h in self.relay.headers]))

    def tokens_seen(self):
        return {t for _, t in self.calls() if t}

    def logs(self):
        out = self.envoy.log_path.read_text(errors="replace")
        if self.access_log.exists():
            out += self.access_log.read_text(errors="replace")
        return out

    def stat(self, name):
        return self.envoy.stats().get(f"wasmcustom.keyward_{name}", 0)

    def stop(self):
        self.envoy.stop()
        self.relay.stop()
        self.bao.stop()
        self.vendor.stop()


@pytest.fixture(scope="module")
def ar(workdir):
    env = AppRoleEnv(workdir)
    yield env
    harness.SECRETS.update(env.tokens_seen())
    assert_no_leaks(env.logs(), "the AppRole Envoy's logs")
    env.stop()


def test_login_with_role_and_secret_id_then_read_with_the_issued_token(ar):
    r = ar.get("slow")
    assert r.status_code == 200, r.text
    got = ar.vendor.take()
    assert [harness.header_values(g, "authorization") for g in got] == [[f"Bearer {ar.values['slow']}"]]
    calls = ar.calls()
    paths = [p for p, _ in calls]
    assert paths.count(LOGIN) >= 1
    read = [t for p, t in calls if p == "/v1/secret/data/approle/slow"]
    assert read and read[0] not in (None, "", ar.bao.token), "the read carried the AppRole token, not root"
    assert all(t is None for p, t in calls if p == LOGIN), "a login carries no token"


def test_token_is_renewed_before_expiry_and_replaced_at_max_ttl(ar):
    """A 3 s token (max 7 s): renewed at two thirds of its lease, replaced by a fresh login when
    renewals stop buying time, and no request ever fails on the way."""
    start = len(ar.calls())
    statuses = []
    deadline = time.time() + 9
    while time.time() < deadline:
        statuses.append(ar.get("fast").status_code)
        time.sleep(0.25)
    assert set(statuses) == {200}, statuses
    after = ar.calls()[start:]
    paths = [p for p, _ in after]
    print(f"in 9 s: {paths.count(LOGIN)} login(s), {paths.count(RENEW)} renewal(s), "
          f"{paths.count('/v1/secret/data/approle/fast')} read(s), {len(statuses)} requests")
    assert paths.count(RENEW) >= 2, paths
    assert paths.count(LOGIN) >= 1, "a fresh login once the max TTL is near"
    # A renewal carries the token it renews; the login that follows yields a different one.
    renewed = [t for p, t in after if p == RENEW]
    assert all(renewed)
    assert len({t for p, t in after if p == "/v1/secret/data/approle/fast"}) >= 2
    assert ar.stat("vault_renewals_total") >= 2
    assert ar.stat("secret_fetches_total;result=error") == 0


def test_a_revoked_token_means_a_fresh_login_not_a_503(ar):
    assert ar.get("slow").status_code == 200
    current = [t for p, t in ar.calls() if p == "/v1/secret/data/approle/slow"][-1]
    ar.api("POST", "auth/token/revoke", {"token": current})
    logins_before = [p for p, _ in ar.calls()].count(LOGIN)
    time.sleep(1.2)  # past the 1 s cache TTL: the next request reads again
    r = ar.get("slow")
    assert r.status_code == 200, r.text
    assert harness.header_values(ar.vendor.take()[-1], "authorization") == [f"Bearer {ar.values['slow']}"]
    calls = ar.calls()
    assert [p for p, _ in calls].count(LOGIN) > logins_before
    reads = [t for p, t in calls if p == "/v1/secret/data/approle/slow"]
    assert reads[-2] == current and reads[-1] != current, "refused read, login, read with the new token"


def test_a_failing_login_gives_503_quickly_and_no_secret(ar):
    before = [p for p, _ in ar.calls()].count(LOGIN)
    t0 = time.time()
    r = ar.get("wrong")
    took = time.time() - t0
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "secret_unavailable"
    assert took < 3, took
    assert not ar.vendor.take()
    assert [p for p, _ in ar.calls()].count(LOGIN) > before
    assert ar.stat("vault_auth_errors_total") >= 1
    text = ar.envoy.log_path.read_text(errors="replace")
    assert "AppRole login failed" in text
    assert "not-the-secret-id" not in text
