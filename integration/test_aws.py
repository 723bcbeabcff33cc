"""The AWS Secrets Manager store end to end (issue 3): Keyward's callouts are signed by Envoy
(environment credentials only), both as an upstream HTTP filter on the store cluster and through
a loopback signing listener, against moto's Secrets Manager. A relay in front of moto shows what
arrived."""
import json
import time

import pytest
import requests

import aws
import envoy_config
import harness
from conftest import assert_no_leaks


@pytest.fixture(scope="module")
def sm(workdir):
    moto = aws.Moto(workdir)
    relay = harness.Relay(moto.addr)
    vendor = harness.Vendor()
    env = aws.credentials_env()
    client = moto.client(env)
    k1 = harness.secrets.token_bytes(32)
    k1_b64 = harness.base64.b64encode(k1).decode()
    harness.SECRETS.add(k1_b64)
    values = {"anthropic": harness.fake_secret("sk-ant"), "stripe": harness.fake_secret("sk_test")}
    client.create_secret(Name="prod/anthropic", SecretString=json.dumps({"api_key": values["anthropic"]}))
    client.create_secret(Name="prod/stripe", SecretString=json.dumps({"api_key": values["stripe"]}))
    client.create_secret(Name="prod/notjson", SecretString="plain text, not a JSON object")

    cfg = envoy_config.filter_config()
    cfg.pop("revocation")
    cfg["signing_keys"] = {"k1": {"env": "KEYWARD_KEY_K1"}}
    cfg["cache"] = {"ttl_s": 2, "stale_if_error_s": 0}
    cfg["stores"] = {
        "aws": {"type": "aws_secrets_manager", "cluster": "aws_sm", "authority": aws.AUTHORITY, "timeout_ms": 2000},
        "aws_lb": {"type": "aws_secrets_manager", "cluster": "aws_loopback", "authority": aws.AUTHORITY, "timeout_ms": 2000},
    }
    cfg["targets"] = {
        "anthropic": {"credential": "header:x-api-key", "secret": {"store": "aws", "path": "prod/anthropic", "field": "api_key"},
                      "inject": {"type": "header", "name": "x-api-key"}},
        "stripe": {"credential": "bearer", "secret": {"store": "aws_lb", "path": "prod/stripe", "field": "api_key"},
                   "inject": {"type": "bearer"}},
        "missing": {"credential": "bearer", "secret": {"store": "aws", "path": "prod/nope", "field": "k"}, "inject": {"type": "bearer"}},
        "nofield": {"credential": "bearer", "secret": {"store": "aws", "path": "prod/notjson", "field": "k"}, "inject": {"type": "bearer"}},
    }
    ports = {"admin": harness.free_port(), "hardened": harness.free_port(), "raw": harness.free_port(),
             "vendor": vendor.port, "bao": harness.free_port(), "rev": harness.free_port(),
             "dead": harness.free_port(), "hang": harness.free_port()}
    log = workdir / "access-aws.log"
    boot = envoy_config.bootstrap(ports, log, cfg)
    signer_port = harness.free_port()
    boot["static_resources"]["clusters"] += [
        aws.signed_cluster("aws_sm", relay.port),
        envoy_config.static_cluster("aws_loopback", signer_port),
        envoy_config.static_cluster("aws_sm_raw", relay.port),
    ]
    boot["static_resources"]["listeners"].append(aws.signing_listener("aws_signer", signer_port, "aws_sm_raw"))
    envoy = harness.Envoy(workdir, boot, {"KEYWARD_KEY_K1": k1_b64, **env}, name="envoy-aws")

    class SM:
        pass
    s = SM()
    s.moto, s.relay, s.vendor, s.client, s.envoy, s.values, s.log = moto, relay, vendor, client, envoy, values, log
    s.url = f"http://127.0.0.1:{ports['hardened']}"
    s.token = lambda allow: harness.mint(k1, harness.claims(allow))
    yield s
    assert_no_leaks(envoy.log_path.read_text(errors="replace") + (log.read_text() if log.exists() else ""), "the AWS Envoy's logs")
    envoy.stop()
    relay.stop()
    vendor.stop()
    moto.stop()


def entries(sm):
    return [json.loads(x) for x in sm.log.read_text().splitlines()] if sm.log.exists() else []


@pytest.mark.parametrize("target,path,header", [
    ("anthropic", "/anthropic/v1/messages", "x-api-key"),  # signed by the cluster's upstream filter
    ("stripe", "/stripe/v1/charges", "authorization"),     # signed by the loopback listener
])
def test_aws_store_end_to_end(sm, target, path, header):
    t = sm.token([f"{target} * /**"])
    sent_header = {"x-api-key": t} if header == "x-api-key" else {"Authorization": f"Bearer {t}"}
    before = len(sm.relay.headers)
    r = requests.post(sm.url + path, headers=sent_header, data=b"{}", timeout=10)
    assert r.status_code == 200, r.text
    [got] = sm.vendor.take()
    want = sm.values[target] if header == "x-api-key" else f"Bearer {sm.values[target]}"
    assert harness.header_values(got, header) == [want]
    # What reached "AWS": a SigV4-signed GetSecretValue, never a workload token.
    calls = sm.relay.headers[before:]
    assert calls, "the store was called"
    for h in calls:
        assert h["x-amz-target"] == "secretsmanager.GetSecretValue"
        assert h["authorization"].startswith("AWS4-HMAC-SHA256 Credential=keyward-fake-access-key-id/")
        assert "x-amz-date" in h and h.get("x-amz-content-sha256", "") != "UNSIGNED-PAYLOAD"
        assert t not in json.dumps(h)
    version = sm.client.describe_secret(SecretId=f"prod/{target}")
    current = [v for v, stages in version["VersionIdsToStages"].items() if "AWSCURRENT" in stages]
    harness.wait_until(lambda: any(e["target"] == target and e["secret_version"] == current[0] for e in entries(sm)),
                       timeout=10, what="secret_version in the access log")


def test_aws_rotation_and_version(sm):
    t = sm.token(["anthropic * /**"])
    assert requests.get(sm.url + "/anthropic/x", headers={"x-api-key": t}, timeout=10).status_code == 200
    new = harness.fake_secret("sk-ant-rotated")
    put = sm.client.put_secret_value(SecretId="prod/anthropic", SecretString=json.dumps({"api_key": new}))
    sm.vendor.take()

    def rotated():
        assert requests.get(sm.url + "/anthropic/y", headers={"x-api-key": t}, timeout=10).status_code == 200
        return harness.header_values(sm.vendor.take()[-1], "x-api-key") == [new]
    harness.wait_until(rotated, timeout=6, what="the rotated key")
    harness.wait_until(lambda: any(e["secret_version"] == put["VersionId"] for e in entries(sm)), timeout=10,
                       what="the new VersionId in the access log")


def test_aws_not_found_and_unusable_secrets_answer_503(sm):
    t = sm.token(["missing * /**", "nofield * /**"])
    for path in ("/missing/a", "/nofield/a"):
        r = requests.get(sm.url + path, headers={"Authorization": f"Bearer {t}"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "secret_unavailable", (path, r.text)
    assert sm.vendor.take() == []
    log = sm.envoy.log_path.read_text(errors="replace")
    assert "prod/nope failed: secret not found" in log
    assert "SecretString is not JSON" in log
