import base64
import os
import signal
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
import requests

import envoy_config
import executor
import harness
from harness import SECRETS, TOKENS


class Gateway:
    """One Envoy (two workers) with keyward, real OpenBao, and a recording vendor."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.vendor = harness.Vendor()
        self.bao = harness.Bao(workdir)
        self.k1 = secrets.token_bytes(32)
        self.k2 = secrets.token_bytes(32)
        self.k1_b64 = base64.b64encode(self.k1).decode()
        SECRETS.update({self.k1_b64, base64.b64encode(self.k2).decode()})
        self.s = {
            "stripe": harness.fake_secret("sk_test_stripe"),
            "twilio_sid": harness.fake_secret("AC"),
            "twilio_token": harness.fake_secret("twtoken"),
            "anthropic": harness.fake_secret("sk-ant"),
            "vendorhdr": harness.fake_secret("vh"),
            "maps": harness.fake_secret("AIza"),
        }
        self.bao.put("it/stripe", {"api_key": self.s["stripe"]})
        self.bao.put("it/twilio", {"account_sid": self.s["twilio_sid"], "auth_token": self.s["twilio_token"]})
        self.bao.put("it/anthropic", {"api_key": self.s["anthropic"]})
        self.bao.put("it/vendorhdr", {"key": self.s["vendorhdr"]})
        self.bao.put("it/maps", {"key": self.s["maps"]})
        self.s["burst"] = harness.fake_secret("burst")
        self.bao.put("it/burst", {"k": self.s["burst"]})
        self.s["coldlim"] = harness.fake_secret("coldlim")
        self.bao.put("it/coldlim", {"k": self.s["coldlim"]})
        self.bao.put("it/revoked", {"jti:seed-entry": "kept so the list is never empty"})
        self.bao.put("it/deleted", {"k": harness.fake_secret("deleted")})
        self.bao.put("it/signing", {"k2": base64.b64encode(self.k2).decode()})
        self.hang = harness.Hang()
        # The revocation store is reached through a relay the tests can break.
        self.rev_relay = harness.Relay(self.bao.addr)
        self.ports = {"hang": self.hang.port, "rev": self.rev_relay.port, "admin": harness.free_port(), "hardened": harness.free_port(), "raw": harness.free_port(),
                      "vendor": self.vendor.port, "bao": self.bao.port, "dead": harness.free_port()}
        self.access_log = workdir / "access.log"
        self.env = {"KEYWARD_KEY_K1": self.k1_b64, "VAULT_TOKEN": self.bao.token}
        self.envoy = harness.Envoy(workdir, envoy_config.bootstrap(self.ports, self.access_log), self.env)
        self.url = f"http://127.0.0.1:{self.ports['hardened']}"
        self.raw_url = f"http://127.0.0.1:{self.ports['raw']}"

    def token(self, allow, kid="k1", key=None, **kw):
        return harness.mint(key or (self.k1 if kid == "k1" else self.k2), harness.claims(allow, **kw), kid=kid)

    def get(self, path, token=None, method="GET", headers=None, raw=False, **kw):
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return requests.request(method, (self.raw_url if raw else self.url) + path, headers=h, timeout=10, **kw)

    def logs(self) -> str:
        text = self.envoy.log_path.read_text(errors="replace")
        if self.access_log.exists():
            text += self.access_log.read_text(errors="replace")
        return text

    def stop(self):
        self.envoy.stop()
        self.hang.stop()
        self.rev_relay.stop()
        self.bao.stop()
        self.vendor.stop()


def pytest_report_header(config):
    return f"keyward executor: {executor.current()} (KEYWARD_EXECUTOR; make test runs wasm, then native)"


@pytest.fixture(scope="session")
def executor_name():
    """The executor every Envoy of this run loads (`wasm` or `native`)."""
    return executor.current()


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="keyward-it-"))
    yield d
    if os.environ.get("KEEP_IT_LOGS"):
        print(f"logs kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def gw(workdir):
    for p in (harness.WASM, harness.CLI, harness.BIN / "envoy", harness.BIN / "bao"):
        assert p.exists(), f"{p} is missing: run `make build` and let the Makefile create .venv"
    g = Gateway(workdir)
    yield g
    g.stop()


def assert_no_leaks(text: str, where: str):
    for s in SECRETS:
        assert s not in text, f"a secret leaked into {where}"
    for t in TOKENS:
        assert t not in text, f"a workload token leaked into {where}"
        # The signature alone identifies a token too.
        assert t.rsplit(".", 1)[-1] not in text, f"a token signature leaked into {where}"


@pytest.fixture(autouse=True)
def leak_check(request):
    """After every test: no secret or token in Envoy's log or access log, and the vendor never
    saw a workload token."""
    yield
    if "gw" not in request.fixturenames:
        return
    g = request.getfixturevalue("gw")
    assert_no_leaks(g.logs(), "Envoy's log or access log")
    # Envoy's default access-log format, which prints the path and its query, on every route (the
    # one whose target injects its key in the query included): no secret. (A workload that puts
    # its own token in a query has it logged by any format that prints queries; Keyward refuses
    # such requests but cannot unlog them.)
    default_log = Path(str(g.access_log) + ".default")
    if default_log.exists():
        text = default_log.read_text(errors="replace")
        for s in SECRETS:
            assert s not in text, "a secret leaked into the default-format access log"
    for req in g.vendor.history:
        blob = req["path"] + "\n" + "\n".join(f"{k}: {v}" for k, v in req["headers"])
        for t in TOKENS:
            assert t not in blob, "the vendor received a workload token"
            assert t.rsplit(".", 1)[-1] not in blob, "the vendor received a token signature"


def pytest_sessionfinish(session, exitstatus):
    """No server outlives the session, even one whose fixture failed while starting."""
    for proc in harness.SPAWNED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
