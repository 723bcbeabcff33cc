"""Credentials issued by the gateway (issue 14), in real Envoy against moto with its IAM
authentication on (every request after the first few is checked against moto's IAM: unknown keys
and wrong signatures are refused by moto itself), IAM roles created in moto, and temporary
credentials from AssumeRole, exactly what a Lambda function holds. The caller's proof is built by
the example helper (examples/python/keyward_credentials.py). The issuing key is store-held (k2,
in OpenBao). STS down is a cluster that never answers."""
import json
import os
import subprocess
import sys
import time

import pytest
import requests

import envoy_config
import harness
from conftest import assert_no_leaks

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "examples" / "python"))
SERVER_ID = "keyward-it"
ISS = "https://issuer.test"
ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/checkout"


BUFFER = "envoy.filters.http.buffer"


def issue_route():
    """As a shipped config has it: the filter answers; the buffer filter (enabled on this route
    only) keeps the headers from the router until the body has passed Keyward; the 503 is sent
    only when the filter does not run."""
    return {"name": "keyward_issue", "match": {"path": "/keyward/v1/credentials"},
            "direct_response": {"status": 503, "body": {"inline_string": '{"error":"secret_unavailable","message":"the keyward filter is not running"}'}},
            "typed_per_filter_config": {BUFFER: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                "buffer": {"max_request_bytes": 16384}}}},
            "metadata": {"filter_metadata": {"keyward": {"endpoint": "issue"}}}}


def buffer_filter():
    return {"name": BUFFER, "disabled": True, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 16384}}


def sts_cluster(port):
    return {"name": "sts", "connect_timeout": "1s", "type": "STATIC",
            "load_assignment": {"cluster_name": "sts", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


class IamMoto:
    """moto_server with IAM authentication: the first requests set up an admin user; after that
    moto checks every signature against its own IAM."""

    def __init__(self, workdir):
        import boto3
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto-iam.log", "wb")
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
        self.proc = subprocess.Popen([str(harness.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        harness.SPAWNED.append(self.proc)
        harness.wait_until(lambda: requests.get(f"{self.url}/moto-api/", timeout=1).status_code < 500, what="moto ready")
        anon = dict(aws_access_key_id="anon", aws_secret_access_key="anon", region_name="us-east-1", endpoint_url=self.url)
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="admin")
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.admin = dict(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
                          region_name="us-east-1", endpoint_url=self.url)
        harness.SECRETS.add(key["SecretAccessKey"])
        iam = boto3.client("iam", **self.admin)
        trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/admin"}, "Action": "sts:AssumeRole"}]})
        for role in ("checkout", "other"):
            iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)
            iam.put_role_policy(RoleName=role, PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))

    def role_credentials(self, role):
        """What a Lambda function running as `role` holds: AssumeRole's temporary credentials."""
        import boto3
        from botocore.credentials import Credentials
        c = boto3.client("sts", **self.admin).assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}", RoleSessionName="fn-1")["Credentials"]
        harness.SECRETS.add(c["SecretAccessKey"])
        return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])

    def stop(self):
        harness.stop_process(self.proc, 5)
        self.log.close()


def gateway(gw, workdir, name, sts_port, sts_timeout_ms=1000):
    cfg = envoy_config.filter_config()
    cfg.pop("issuer")
    cfg["issuer"] = {"iss": ISS, "kid": "k2", "max_ttl_s": 900, "attenuate": True,
                     "aws_iam": {"cluster": "sts", "authority": "sts.amazonaws.com", "timeout_ms": sts_timeout_ms, "server_id": SERVER_ID,
                                 "roles": {ROLE_ARN: {"sub": "lambda/checkout", "allow": ["stripe POST /v1/payment_intents", "stripe GET /v1/**"],
                                                      "lim": {"rpm": 600}, "ttl_s": 600}}}}
    ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port())
    log = workdir / f"access-{name}.log"
    b = envoy_config.bootstrap(ports, log, cfg)
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"].insert(0, issue_route())
    kw = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == "keyward")
    hcm["http_filters"].insert(kw + 1, buffer_filter())
    b["static_resources"]["clusters"].append(sts_cluster(sts_port))
    e = harness.Envoy(workdir, b, gw.env, name=name)
    e.url = f"http://127.0.0.1:{ports['hardened']}"
    e.access = log
    return e


@pytest.fixture(scope="module")
def issuing(gw, workdir):
    moto = IamMoto(workdir)
    hang = harness.Hang()
    live = gateway(gw, workdir, "envoy-issue", moto.port)
    down = gateway(gw, workdir, "envoy-issue-down", hang.port, sts_timeout_ms=800)
    yield moto, live, down
    for e in (live, down):
        assert_no_leaks(e.log_path.read_text(errors="replace") + (e.access.read_text(errors="replace") if e.access.exists() else ""), "the issuing gateway's logs")
        e.stop()
    hang.stop()
    moto.stop()


def ask(e, grant, token=None):
    h = {"Content-Type": "application/json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return requests.post(e.url + "/keyward/v1/credentials", data=json.dumps(grant), headers=h, timeout=15)


def proof(creds, server_id=SERVER_ID, **kw):
    from keyward_credentials import iam_proof
    return iam_proof(server_id, credentials=creds, **kw)


def test_a_role_gets_a_credential_with_nothing_but_its_identity(gw, issuing):
    moto, live, _ = issuing
    from keyward_credentials import KeywardCredential
    kw = KeywardCredential(live.url, SERVER_ID, credentials=moto.role_credentials("checkout"), run="invoke/1")
    token = kw.token()
    harness.TOKENS.add(token)
    claims = json.loads(harness.b64d(token.split(".")[1]))
    assert claims["sub"] == "lambda/checkout" and claims["iss"] == ISS and claims["lim"] == {"rpm": 600} and claims["run"] == "invoke/1"
    assert claims["exp"] - claims["iat"] <= 600 and json.loads(harness.b64d(token.split(".")[0]))["kid"] == "k2"
    assert kw.token() == token, "cached until a minute before expiry"
    # An ordinary credential: the vendor gets the real key.
    r = requests.get(live.url + "/stripe/v1/customers", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    # Narrowing is allowed; over-asking is refused (403), never silently widened.
    r = ask(live, {"grant": "aws_iam", "iam_request": proof(moto.role_credentials("checkout")), "allow": ["stripe GET /v1/customers/*"], "ttl_s": 60})
    assert r.status_code == 200 and r.json()["allow"] == ["stripe GET /v1/customers/*"] and r.headers["cache-control"] == "no-store"
    harness.TOKENS.add(r.json()["token"])
    for over in ({"allow": ["stripe DELETE /v1/customers/*"]}, {"allow": ["openai POST /v1/responses"]}, {"ttl_s": 601}):
        r = ask(live, {"grant": "aws_iam", "iam_request": proof(moto.role_credentials("checkout")), **over})
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (over, r.text)


def test_identities_and_proofs_that_are_refused(gw, issuing):
    moto, live, _ = issuing
    from botocore.credentials import Credentials
    good = moto.role_credentials("checkout")
    # A role STS knows but the gateway does not map.
    r = ask(live, {"grant": "aws_iam", "iam_request": proof(moto.role_credentials("other"))})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # A wrong signature and an unknown key: moto (STS) refuses them.
    wrong = Credentials(good.access_key, "not-the-secret-" + harness.secrets.token_hex(8), good.token)
    r = ask(live, {"grant": "aws_iam", "iam_request": proof(wrong)})
    assert r.status_code == 401 and r.json()["error"] == "invalid_credential", r.text
    unknown = Credentials("keyward-fake-unknown-key-id", "keyward-fake-secret", None)
    r = ask(live, {"grant": "aws_iam", "iam_request": proof(unknown)})
    assert r.status_code == 401, r.text
    # A proof made for another server id (a replay to this gateway), or without the header.
    r = ask(live, {"grant": "aws_iam", "iam_request": proof(good, server_id="vault-prod")})
    assert r.status_code == 401 and r.json()["error"] == "invalid_credential"
    p = proof(good)
    p["headers"] = {k: v for k, v in p["headers"].items() if k.lower() != "x-keyward-server-id"}
    assert ask(live, {"grant": "aws_iam", "iam_request": p}).status_code == 401
    # The header present but not signed: STS would accept the proof, the gateway does not.
    p = proof(good)
    p["headers"]["Authorization"] = p["headers"]["Authorization"].replace(";x-keyward-server-id", "")
    assert ask(live, {"grant": "aws_iam", "iam_request": p}).status_code == 401
    # A tampered header after signing: STS refuses it.
    p = proof(good)
    p["headers"]["X-Amz-Date"] = "20200101T000000Z"
    assert ask(live, {"grant": "aws_iam", "iam_request": p}).status_code == 401
    # Malformed grants.
    assert ask(live, {"grant": "password"}).status_code == 400
    assert requests.post(live.url + "/keyward/v1/credentials", data="x" * 20000, headers={"Content-Type": "application/json"}, timeout=10).status_code == 400
    assert requests.get(live.url + "/keyward/v1/credentials", timeout=10).status_code == 400
    stats = live.stats()
    assert stats.get("wasmcustom.keyward_issue_requests_total;decision=invalid_credential", 0) >= 4
    assert stats.get("wasmcustom.keyward_issue_requests_total;decision=forbidden", 0) >= 1


def test_sts_down_gets_503_within_the_timeout(gw, issuing):
    moto, _, down = issuing
    p = proof(moto.role_credentials("checkout"))
    started = time.monotonic()
    r = ask(down, {"grant": "aws_iam", "iam_request": p})
    took = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"] == "secret_unavailable", r.text
    # timeout_ms is 800 here: Envoy gives the callout up then (the filter's own deadline is 0.5 s later).
    assert 0.7 < took < 1.8, f"{took:.2f} s"
    # The next one is refused the same way, as promptly.
    proof2 = proof(moto.role_credentials("checkout"))
    started = time.monotonic()
    assert ask(down, {"grant": "aws_iam", "iam_request": proof2}).status_code == 503
    assert time.monotonic() - started < 1.8


def test_per_message_children_and_their_parent(gw, issuing):
    moto, live, _ = issuing
    from keyward_credentials import KeywardCredential, KeywardError
    kw = KeywardCredential(live.url, SERVER_ID, credentials=moto.role_credentials("checkout"))
    parent = kw.token()
    harness.TOKENS.add(parent)
    pjti = json.loads(harness.b64d(parent.split(".")[1]))["jti"]
    msg = "msg-" + harness.secrets.token_hex(4)
    child = kw.child(allow=["stripe POST /v1/payment_intents"], ttl_s=300, run=f"sqs/{msg}", lim={"total": 1})
    harness.TOKENS.add(child["token"])
    c = json.loads(harness.b64d(child["token"].split(".")[1]))
    assert c["par"] == pjti and c["sub"] == "lambda/checkout" and c["run"] == f"sqs/{msg}" and c["lim"] == {"rpm": 600, "total": 1}
    h = {"Authorization": f"Bearer {child['token']}", "Idempotency-Key": msg}
    assert requests.post(live.url + "/stripe/v1/payment_intents", headers=h, data=b"amount=100", timeout=10).status_code == 200
    # Its cap: one call.
    r = requests.post(live.url + "/stripe/v1/payment_intents", headers=h, data=b"amount=100", timeout=10)
    assert r.status_code == 429 and r.json()["error"] == "quota_exhausted"
    # Outside its rules (the parent could): refused.
    assert requests.get(live.url + "/stripe/v1/customers", headers=h, timeout=10).status_code == 403
    # A child over-asking: refused.
    for over in ({"allow": ["stripe DELETE /v1/customers/*"]}, {"lim": {"rpm": 601}}, {"ttl_s": 901}):
        with pytest.raises(KeywardError) as e:
            kw.child(**over)
        assert e.value.status == 403, over
    # A child cannot be attenuated again.
    r = ask(live, {"grant": "attenuate"}, token=child["token"])
    assert r.status_code == 403
    # Revoking the parent revokes its children (refresh_s 1).
    other = kw.child(allow=["stripe GET /v1/**"], ttl_s=300)
    harness.TOKENS.add(other["token"])
    oh = {"Authorization": f"Bearer {other['token']}"}
    assert requests.get(live.url + "/stripe/v1/customers", headers=oh, timeout=10).status_code == 200
    gw.bao.put("it/revoked", {"jti:seed-entry": "kept", f"jti:{pjti}": "the parent leaked"})
    try:
        # Every worker refreshes its list on its own (refresh_s 1): wait until several requests in
        # a row, on whichever worker, are refused, for the child and for the parent alike.
        def refused(h):
            return all(requests.get(live.url + "/stripe/v1/customers", headers=h, timeout=10).status_code == 401 for _ in range(6))
        harness.wait_until(lambda: refused(oh), timeout=10, what="the child revoked with its parent")
        harness.wait_until(lambda: refused({"Authorization": f"Bearer {parent}"}), timeout=10, what="the parent revoked")
    finally:
        gw.bao.put("it/revoked", {"jti:seed-entry": "kept so the list is never empty"})
    # The access log records the issuance.
    def issued():
        return [json.loads(l) for l in live.access.read_text(errors="replace").splitlines() if l.startswith("{") and '"issued"' in l]
    harness.wait_until(lambda: any(e.get("issued") == c["jti"] for e in issued()), timeout=15, what="the issuance in the access log")


def test_sqs_batch_handler_gives_each_message_its_own_capped_credential(gw, issuing, monkeypatch):
    moto, live, _ = issuing
    import sqs_handler
    from keyward_credentials import KeywardCredential
    monkeypatch.setenv("KEYWARD_URL", live.url)
    monkeypatch.setenv("KEYWARD_SERVER_ID", SERVER_ID)
    monkeypatch.setattr(sqs_handler, "_kw", KeywardCredential(live.url, SERVER_ID, credentials=moto.role_credentials("checkout")))
    tag = harness.secrets.token_hex(3)
    ids = [f"{tag}-a", f"{tag}-b", f"{tag}-c"]
    event = {"Records": [
        {"messageId": ids[0], "body": json.dumps({"amount": 1200})},
        {"messageId": ids[1], "body": json.dumps({"amount": 500, "charges": 2})},  # over its cap of one call
        {"messageId": ids[2], "body": json.dumps({"amount": 700})},
    ]}
    gw.vendor.take()
    assert sqs_handler.handler(event) == {"batchItemFailures": [{"itemIdentifier": ids[1]}]}
    got = gw.vendor.take()
    keys = [harness.header_values(r, "idempotency-key") for r in got]
    assert keys == [[ids[0]], [ids[1]], [ids[2]]], "one charge per message, the second of b refused before the vendor"
    assert all(harness.header_values(r, "authorization") == [f"Bearer {gw.s['stripe']}"] for r in got)

    def lines():
        return [json.loads(l) for l in live.access.read_text(errors="replace").splitlines() if l.startswith("{") and tag in l]
    harness.wait_until(lambda: len(lines()) >= 7, timeout=15, what="the batch's access-log lines")
    calls, issued = {}, {}
    for e in lines():
        if e["decision"] == "issued":
            issued[e["run"]] = e["issued"]
        else:
            calls.setdefault(e["run"], []).append((e["decision"], e["jti"]))
    # Each message: its own credential, issued with its run label, then its calls under it.
    assert set(issued) == {f"sqs/{i}" for i in ids}
    assert [d for d, _ in calls[f"sqs/{ids[0]}"]] == ["allow"] and [d for d, _ in calls[f"sqs/{ids[2]}"]] == ["allow"]
    assert [d for d, _ in calls[f"sqs/{ids[1]}"]] == ["allow", "quota_exhausted"]
    assert all(j == issued[run] for run, cs in calls.items() for _, j in cs)


def test_check_envoy_requires_the_issue_route_s_guards(gw, tmp_path):
    cfg = envoy_config.filter_config()
    cfg["issuer"] = {"iss": ISS, "kid": "k2", "attenuate": True}
    ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port())
    b = envoy_config.bootstrap(ports, tmp_path / "a.log", cfg)
    hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, issue_route())
    kw = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == "keyward")
    hcm["http_filters"].insert(kw + 1, buffer_filter())

    def problems(doc):
        p = tmp_path / "envoy.json"
        p.write_text(json.dumps(doc))
        r = harness.cli("check-envoy", str(p), "--no-env", "--json")
        return [x for x in json.loads(r.stdout)["problems"] if "keyward_issue" in x]

    assert problems(b) == []
    without_buffer = json.loads(json.dumps(b))
    h = without_buffer["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    h["http_filters"] = [f for f in h["http_filters"] if f["name"] != BUFFER]
    assert any("envoy.filters.http.buffer" in x for x in problems(without_buffer))
    upstream = json.loads(json.dumps(b))
    r0 = upstream["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    del r0["direct_response"]
    r0["route"] = {"cluster": "vendor"}
    assert any("direct_response" in x for x in problems(upstream))


def test_the_cli_gets_and_derives_credentials(gw, issuing):
    moto, live, _ = issuing
    creds = moto.role_credentials("checkout")
    env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key, "AWS_SESSION_TOKEN": creds.token}
    r = harness.cli("token", "--aws", f"--url={live.url}", f"--server-id={SERVER_ID}", "--allow", "stripe GET /v1/**", "--ttl=120", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    harness.TOKENS.add(out["token"])
    assert out["sub"] == "lambda/checkout" and out["allow"] == ["stripe GET /v1/**"]
    r = harness.cli("token", "--attenuate", f"--url={live.url}", "--token-env=PARENT", "--allow=stripe GET /v1/customers/*", "--total=2", "--run=cli",
                    env={"PARENT": out["token"]})
    assert r.returncode == 0, r.stderr
    child = r.stdout.strip()
    harness.TOKENS.add(child)
    c = json.loads(harness.b64d(child.split(".")[1]))
    assert c["par"] == out["jti"] and c["lim"] == {"rpm": 600, "total": 2} and c["run"] == "cli"
    # Over-asking is a failed check (1); a proof for another server id too; no credentials is usage (2).
    r = harness.cli("token", "--attenuate", f"--url={live.url}", "--token-env=PARENT", "--allow=stripe DELETE /v1/x", env={"PARENT": out["token"]})
    assert r.returncode == 1 and "forbidden" in r.stderr
    r = harness.cli("token", "--aws", f"--url={live.url}", "--server-id=someone-else", env=env)
    assert r.returncode == 1 and "invalid_credential" in r.stderr
    # No credentials anywhere in the chain: it could not run (3), and says what to do.
    nowhere = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
               "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials"}
    r = harness.cli("token", "--aws", f"--url={live.url}", f"--server-id={SERVER_ID}", env=nowhere)
    assert r.returncode == 3 and "no AWS credentials" in r.stderr, r.stderr
    for secret in (creds.secret_key, creds.token):
        assert secret not in r.stdout + r.stderr


def test_the_cli_finds_credentials_in_a_named_profile(gw, issuing, tmp_path):
    """The AWS SDK's chain, not only environment variables: a named profile in a shared
    credentials file (what `aws configure --profile` writes), signed as moto's STS checks it."""
    moto, live, _ = issuing
    creds = moto.role_credentials("checkout")
    (tmp_path / "credentials").write_text(
        f"[checkout]\naws_access_key_id = {creds.access_key}\naws_secret_access_key = {creds.secret_key}\naws_session_token = {creds.token}\n")
    (tmp_path / "config").write_text("[profile checkout]\nregion = us-east-1\n")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "checkout",
           "AWS_CONFIG_FILE": str(tmp_path / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    r = harness.cli("token", "--aws", f"--url={live.url}", f"--server-id={SERVER_ID}", "--allow", "stripe GET /v1/**", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    harness.TOKENS.add(out["token"])
    assert out["sub"] == "lambda/checkout"
    for secret in (creds.secret_key, creds.token):
        assert secret not in r.stdout + r.stderr


def test_the_node_helper_gets_a_credential_and_a_child(gw, issuing):
    """examples/node/keyward_credentials.mjs with the AWS SDK's signer and credential chain (the
    role's credentials in the environment, as Lambda sets them)."""
    import shutil
    moto, live, _ = issuing
    node_dir = ROOT / "examples" / "node"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js is not installed")
    if not (node_dir / "node_modules" / "@smithy" / "signature-v4").exists():
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=node_dir, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    creds = moto.role_credentials("checkout")
    script = f"""
import {{ KeywardCredential }} from './keyward_credentials.mjs';
const kw = new KeywardCredential({json.dumps(live.url)}, {json.dumps(SERVER_ID)}, {{ ttlS: 300 }});
const token = await kw.token();
const again = await kw.token();
const child = await kw.child({{ allow: ['stripe POST /v1/payment_intents'], ttlS: 60, run: 'sqs/node-1', lim: {{ total: 1 }} }});
console.log(JSON.stringify({{ token, same: token === again, child: child.token }}));
"""
    env = dict(os.environ, AWS_ACCESS_KEY_ID=creds.access_key, AWS_SECRET_ACCESS_KEY=creds.secret_key, AWS_SESSION_TOKEN=creds.token,
               AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    r = subprocess.run(["node", "--input-type=module", "-e", script], cwd=node_dir, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    harness.TOKENS.update({out["token"], out["child"]})
    parent = json.loads(harness.b64d(out["token"].split(".")[1]))
    child = json.loads(harness.b64d(out["child"].split(".")[1]))
    assert out["same"] and parent["sub"] == "lambda/checkout" and parent["exp"] - parent["iat"] <= 300
    assert child["par"] == parent["jti"] and child["run"] == "sqs/node-1" and child["lim"]["total"] == 1
