"""The CLI scripts well (issue 15): per-command --help, --name=value, --json on every command,
exit codes that tell a usage error (2) from a failed check (1) and from a command that could not
run to the end (3), and `mint --json` giving the token with its jti, sub and expiry. Runs the
built `keyward` binary; tokens are checked with an HS256 verifier written here in Python."""
import base64
import hashlib
import hmac
import json
import time

import pytest

import harness

ROOT = harness.ROOT
KEY = bytes(range(32))
ENV = {"KW_KEY": base64.b64encode(KEY).decode()}
COMMANDS = ["mint", "inspect", "check-config", "check-envoy", "revoke", "unrevoke", "revoked", "report", "token", "version"]


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify(token):
    h, c, s = token.split(".")
    assert hmac.compare_digest(b64d(s), hmac.new(KEY, f"{h}.{c}".encode(), hashlib.sha256).digest())
    return json.loads(b64d(c))


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_its_own_help(cmd):
    for flag in ("--help", "-h"):
        r = harness.cli(cmd, flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("USAGE:\n  keyward " + cmd), r.stdout
        assert "EXIT CODES" in r.stdout and r.stderr == ""
    r = harness.cli("help", cmd)
    assert r.returncode == 0 and r.stdout.startswith("USAGE:\n  keyward " + cmd)


def test_mint_json_gives_what_scripts_need_and_equals_forms_work():
    before = int(time.time())
    r = harness.cli("mint", "--kid=k1", "--key-env=KW_KEY", "--sub=lambda/pay", "--allow=stripe POST /v1/payment_intents",
                    "--allow", "stripe GET /v1/*", "--ttl=600", "--run=batch-7", "--rpm=30", "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    claims = verify(out["token"])
    assert out["jti"] == claims["jti"] and len(out["jti"]) == 32
    assert out["sub"] == claims["sub"] == "lambda/pay" and out["kid"] == "k1" and out["run"] == "batch-7"
    assert out["exp"] == claims["exp"] and before + 600 <= out["exp"] <= int(time.time()) + 600
    assert claims["allow"] == ["stripe POST /v1/payment_intents", "stripe GET /v1/*"] and claims["lim"] == {"rpm": 30}
    # The plain form prints only the token, as before.
    r = harness.cli("mint", "--kid", "k1", "--key-env", "KW_KEY", "--sub", "s", "--allow", "stripe GET /x", env=ENV)
    assert r.returncode == 0 and r.stdout.count(".") == 2 and verify(r.stdout.strip())["sub"] == "s"


def test_inspect_json_verdicts_and_exit_codes():
    tok = json.loads(harness.cli("mint", "--kid=k1", "--key-env=KW_KEY", "--sub=a", "--allow=stripe GET /x", "--json", env=ENV).stdout)["token"]
    r = harness.cli("inspect", tok, "--key-env=KW_KEY", "--json", env=ENV)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["valid"] is True and out["claims"]["sub"] == "a" and 800 < out["expires_in"] <= 900
    other = {"KW_KEY": base64.b64encode(b"\x01" * 32).decode()}
    r = harness.cli("inspect", tok, "--key-env=KW_KEY", "--json", env=other)
    out = json.loads(r.stdout)
    assert r.returncode == 1, "a failed check is exit 1"
    assert out["valid"] is False and out["error"]["kind"] == "failed" and "signature does not verify" in out["error"]["message"]
    assert out["claims"]["sub"] == "a", "the unverified claims are still shown"
    assert r.stderr == ""
    # The token never leaks into errors of another kind.
    r = harness.cli("inspect", tok, "--key-env=NOT_SET", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["kind"] == "usage" and tok not in r.stdout + r.stderr


@pytest.mark.parametrize("argv,code", [
    (["mint", "--kid"], 2),                                    # a flag without its value
    (["mint", "--kid=k1", "--sub=a", "--allow=stripe GET /x"], 2),  # no key
    (["mint", "--kid=k1", "--key-env=KW_KEY", "--sub=a", "--allow=stripe GET /x", "--ttl=-5"], 2),
    (["mint", "--kid=k1", "--key-env=KW_KEY", "--sub=a", "--allow=nonsense"], 2),
    (["mint", "--bogus=1"], 2),
    (["mint", "--json=yes"], 2),
    (["nope"], 2),
    (["help", "nope"], 2),
    (["check-config"], 2),
    (["check-config", "a.json", "b.json"], 2),
    (["check-config", "/nonexistent/keyward.json"], 3),
    (["report", "/nonexistent/access.log"], 3),
    (["check-envoy", "/nonexistent/envoy.yaml"], 3),
])
def test_exit_codes_tell_usage_from_failure(argv, code):
    r = harness.cli(*argv, env=ENV)
    assert r.returncode == code, (argv, r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("keyward: ") and r.stdout == ""
    r = harness.cli(*argv, "--json", env=ENV)
    if argv == ["mint", "--json=yes"]:
        return
    assert r.returncode == code
    err = json.loads(r.stdout)["error"]
    assert err["kind"] == {1: "failed", 2: "usage", 3: "unavailable"}[code] and err["message"]


def test_checks_fail_with_1_and_report_in_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text((ROOT / "tests" / "fixtures" / "contract-config.json").read_text().replace('"store": "aws"', '"store": "aws2"'))
    r = harness.cli("check-config", str(bad), "--no-env", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["ok"] is False and "unknown store" in out["error"]["message"]
    r = harness.cli("check-config", str(ROOT / "tests" / "fixtures" / "contract-config.json"), "--no-env", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = harness.cli("check-envoy", str(ROOT / "envoy" / "egress-gateway.yaml"), "--no-env", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["ok"] is True and out["routes"] >= 1 and out["problems"] == []
    broken = tmp_path / "envoy.yaml"
    broken.write_text((ROOT / "envoy" / "egress-gateway.yaml").read_text().replace("FAIL_RELOAD", "FAIL_OPEN"))
    r = harness.cli("check-envoy", str(broken), "--no-env", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["ok"] is False and any("failure_policy" in p for p in out["problems"])


def test_version_and_report_json(tmp_path):
    r = harness.cli("version", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"]
    log = tmp_path / "a.log"
    log.write_text(json.dumps({"subject": "a", "target": "stripe", "decision": "allow", "status": 200}) + "\n")
    r = harness.cli("report", f"--top=3", str(log), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)
