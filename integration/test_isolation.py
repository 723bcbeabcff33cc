"""Issue 12's three defects, against real Envoy and OpenBao, each with the consequence for the
next requests:
- a client that leaves while its request waits for a cold secret must not stall that secret (the
  callout belongs to the root, in the SDK's bookkeeping too);
- two keyward configurations in one VM (same vm_id) whose stores point at different mounts never
  serve each other's key (shared-data names carry the store's full identity);
- a token signed with a store-held key that was rotated out is refused on every request after the
  rotation, with the verified-credential cache warm (a key's identity is its bytes).
Run with KEYWARD_TEST_WASM=<an earlier keyward.wasm> to see them fail on the earlier build."""
import base64
import os
import secrets
import socket
import time
from pathlib import Path

import pytest
import requests

import envoy_config
import harness
from conftest import assert_no_leaks

TIMEOUT_MS = 1500
ROTATIONS = int(os.environ.get("ISO_ROTATIONS", 5))


def config(mount: str) -> dict:
    cfg = envoy_config.filter_config()
    cfg.pop("revocation")
    cfg["cache"] = {"ttl_s": 2, "stale_if_error_s": 6}
    cfg["signing_keys"] = {"k1": {"env": "KEYWARD_KEY_K1"}}
    cfg["signing_keyset"] = {"store": "bao", "path": "iso/keyset"}
    cfg["stores"] = {"bao": {"type": "vault_kv2", "cluster": "vault", "authority": "vault.test", "mount": mount,
                             "token_env": "VAULT_TOKEN", "timeout_ms": TIMEOUT_MS}}
    bearer = {"credential": "bearer", "inject": {"type": "bearer"}}
    cfg["targets"] = {
        "stripe": {**bearer, "secret": {"store": "bao", "path": "iso/stripe", "field": "k"}},
        "burst": {**bearer, "secret": {"store": "bao", "path": "iso/cold", "field": "k"}},
    }
    return cfg


class Iso:
    def __init__(self, workdir: Path):
        self.vendor = harness.Vendor()
        self.bao = harness.Bao(workdir, name="bao-iso")
        self.relay = harness.Relay(self.bao.addr)
        requests.post(f"{self.bao.addr}/v1/sys/mounts/tenant-b", headers={"X-Vault-Token": self.bao.token},
                      json={"type": "kv", "options": {"version": "2"}}, timeout=5).raise_for_status()
        self.k1 = secrets.token_bytes(32)
        k1_b64 = base64.b64encode(self.k1).decode()
        harness.SECRETS.add(k1_b64)
        self.a, self.b, self.cold = harness.fake_secret("sk_test_a"), harness.fake_secret("sk_test_b"), harness.fake_secret("sk_test_c")
        self.bao.put("iso/stripe", {"k": self.a})
        self.bao.put("iso/cold", {"k": self.cold})
        self.put_b("iso/stripe", {"k": self.b})
        self.keyset = {"ks1": secrets.token_bytes(32)}
        self.put_keyset()
        ports = {"admin": harness.free_port(), "a": harness.free_port(), "b": harness.free_port()}
        log = workdir / "access-iso.log"
        boot = envoy_config.bootstrap({**ports, "hardened": ports["a"], "raw": harness.free_port(), "vendor": self.vendor.port,
                                       "bao": self.relay.port, "rev": self.bao.port, "dead": harness.free_port(),
                                       "hang": harness.free_port()}, log, config("secret"))
        # Two listeners, one vm_id: the second one's store reads another mount.
        boot["static_resources"]["listeners"] = [
            envoy_config.listener("a", ports["a"], envoy_config.hcm("a", log, config("secret"), True)),
            envoy_config.listener("b", ports["b"], envoy_config.hcm("b", log, config("tenant-b"), True)),
        ]
        self.url = {k: f"http://127.0.0.1:{ports[k]}" for k in ("a", "b")}
        self.port = ports
        self.envoy = harness.Envoy(workdir, boot, {"KEYWARD_KEY_K1": k1_b64, "VAULT_TOKEN": self.bao.token},
                                   name="envoy-iso", concurrency=1)

    def put_b(self, path, data):
        requests.post(f"{self.bao.addr}/v1/tenant-b/data/{path}", headers={"X-Vault-Token": self.bao.token},
                      json={"data": data}, timeout=5).raise_for_status()

    def put_keyset(self):
        enc = {kid: base64.b64encode(k).decode() for kid, k in self.keyset.items()}
        harness.SECRETS.update(enc.values())
        self.bao.put("iso/keyset", enc)

    def token(self, key=None, kid="k1"):
        return harness.mint(key or self.k1, harness.claims(["stripe * /**", "burst * /**"]), kid=kid)

    def get(self, listener, path, token=None):
        t0 = time.time()
        r = requests.get(self.url[listener] + path, headers={"Authorization": f"Bearer {token or self.token()}"}, timeout=10)
        return r, time.time() - t0

    def stop(self):
        self.envoy.stop()
        self.relay.stop()
        self.bao.stop()
        self.vendor.stop()


@pytest.fixture(scope="module")
def iso(workdir):
    env = Iso(workdir)
    yield env
    assert_no_leaks(env.envoy.log_path.read_text(errors="replace"), "the isolation Envoy's log")
    env.stop()


def test_a_client_that_leaves_during_a_cold_fetch_does_not_stall_the_secret(iso):
    token = iso.token()
    with iso.relay.failing("slow"):
        s = socket.create_connection(("127.0.0.1", iso.port["a"]))
        s.sendall(f"GET /burst/v1/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        time.sleep(0.2)  # Envoy has parked it and the fetch is out
        s.close()  # the client leaves
        harness.wait_until(lambda: iso.relay.count("/iso/cold") >= 1, what="the fetch reached the store")
        time.sleep(iso.relay.delay + 0.3)  # the store has answered
    # The next requests are served from the cache, at once, without another fetch.
    for _ in range(3):
        r, took = iso.get("a", "/burst/v1/x", token)
        assert r.status_code == 200, r.text
        assert took < 0.5, took
    assert harness.header_values(iso.vendor.take()[-1], "authorization") == [f"Bearer {iso.cold}"]
    assert iso.relay.count("/iso/cold") == 1, "the first answer was kept"


def test_two_configurations_in_one_vm_do_not_share_secrets(iso):
    r, _ = iso.get("a", "/stripe/v1/charges")
    assert r.status_code == 200, r.text
    assert harness.header_values(iso.vendor.take()[-1], "authorization") == [f"Bearer {iso.a}"]
    r, _ = iso.get("b", "/stripe/v1/charges")
    assert r.status_code == 200, r.text
    assert harness.header_values(iso.vendor.take()[-1], "authorization") == [f"Bearer {iso.b}"], "listener b's own mount"
    assert iso.relay.count("/v1/tenant-b/data/iso/stripe") >= 1
    # And back: each keeps its own.
    r, _ = iso.get("a", "/stripe/v1/charges")
    assert harness.header_values(iso.vendor.take()[-1], "authorization") == [f"Bearer {iso.a}"]


def test_a_rotated_out_store_held_key_is_refused_on_every_request(iso):
    old = iso.token(iso.keyset["ks1"], kid="ks1")
    for _ in range(3):  # verified once, then remembered
        r, _ = iso.get("a", "/stripe/v1/x", old)
        assert r.status_code == 200, r.text
    for rotation in range(ROTATIONS):
        iso.keyset = {"ks1": secrets.token_bytes(32)}
        iso.put_keyset()
        new = iso.token(iso.keyset["ks1"], kid="ks1")
        # The keyset's TTL is 2 s: refreshed ahead while in use; the new key is in force soon.
        harness.wait_until(lambda: iso.get("a", "/stripe/v1/x", new)[0].status_code == 200, timeout=15,
                           what=f"rotation {rotation}: the new key in force")
        # Every request from now on refuses the old key, across the keyset's next refreshes (each
        # prepares the key afresh: an identity by address could then match the old one's).
        statuses = []
        for _ in range(24):
            statuses.append(iso.get("a", "/stripe/v1/x", old)[0].status_code)
            time.sleep(0.25)
        assert statuses == [401] * 24, f"rotation {rotation}: {statuses}"
        old = new
    iso.vendor.take()
