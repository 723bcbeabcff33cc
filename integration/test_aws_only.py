"""The AWS-only deployment as shipped, run here: the stack's filter configuration (the SSM
parameter of deploy/aws/keyward-gateway.yaml, with the stack's values put in) and its secrets as
the stack creates them, in moto with SigV4 and IAM checked; the gateway's own credentials allowed
exactly what the stack's task role allows; envoy/aws-gateway.yaml started by the image's
entrypoint (deploy/keyward-envoy.sh), which writes the region into it and the configuration from
SSM for Envoy's ECDS with `keyward config-sync`. Changed only where this machine needs it: ports
on loopback, clusters to moto and a fake vendor without TLS, AWS signing from the environment.

It proves health, a call with the key from Secrets Manager, a revocation, a rule changed in SSM
applied without a restart (on a connection that stays open), and a bad configuration refused with
the last good one serving, by config-sync and by Envoy itself."""
import base64
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import time

import pytest
import requests
import yaml

import harness
import ledger

ROOT = harness.ROOT
STACK = "kwtest"
REGION = "us-east-1"
PARAM = f"/keyward/{STACK}/filter-config"
TABLE = "keyward-ledger"


def cfn():
    from cfnlint.decode import decode
    t, errors = decode(str(ROOT / "deploy" / "aws" / "keyward-gateway.yaml"))
    assert not errors, errors
    return t


def stack_config(t) -> str:
    """The SSM parameter's value with the stack's values in place of its !Sub variables."""
    sub = t["Resources"]["FilterConfig"]["Properties"]["Value"]["Fn::Sub"]
    text, variables = sub[0], sub[1]
    assert set(variables) == {"Credential"}
    values = {"AWS::StackName": STACK, "AWS::Region": REGION, "LedgerTable": TABLE, "Credential": "bearer"}
    out = re.sub(r"\$\{([A-Za-z:]+)\}", lambda m: values[m.group(1)], text)
    json.loads(out)
    return out


def resources_of(t, kind):
    return {name: r for name, r in t["Resources"].items() if r["Type"] == kind}


def localised_bootstrap(workdir, ports, moto_port, vendor_port):
    """envoy/aws-gateway.yaml as it can run here, __AWS_REGION__ left for the entrypoint."""
    doc = yaml.safe_load((ROOT / "envoy" / "aws-gateway.yaml").read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    listeners = doc["static_resources"]["listeners"]
    (egress,) = [l for l in listeners if l["name"] == "egress"]
    egress["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports["envoy"]}
    doc["static_resources"]["listeners"] = [egress]
    hcm = egress["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(workdir / "access-aws-only.log"),
        "log_format": hcm["access_log"][0]["typed_config"]["log_format"]}}]
    (kw,) = [f for f in hcm["http_filters"] if f["name"] == "keyward"]
    src = kw["config_discovery"]["config_source"]["path_config_source"]
    src["path"] = str(workdir / "run" / "keyward-filter.json")
    src["watched_directory"]["path"] = str(workdir / "run")
    where = {"aws_secrets_manager": moto_port, "ledger": moto_port, "stripe": vendor_port, "openai": vendor_port, "anthropic": vendor_port}
    import shipped
    doc["static_resources"]["clusters"] = [shipped.to_loopback(cl, where[cl["name"]]) for cl in doc["static_resources"]["clusters"] if cl["name"] in where]
    doc = shipped.runnable_here(doc)
    text = yaml.safe_dump(doc, sort_keys=False)
    assert "__AWS_REGION__" in text, "the region is left for the entrypoint"
    path = workdir / "aws-gateway.yaml"
    path.write_text(text)
    return path


class Stack:
    def __init__(self, workdir):
        import boto3
        self.workdir = workdir
        self.t = cfn()
        self.moto, self.url, admin, self.moto_log = ledger.moto_dynamodb(workdir, name="moto-aws-only")
        self.port = int(self.url.rsplit(":", 1)[1])
        kw = dict(region_name=REGION, endpoint_url=self.url, aws_access_key_id=admin["AWS_ACCESS_KEY_ID"], aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])
        self.sm, self.ssm, self.iam, ddb = (boto3.client(s, **kw) for s in ("secretsmanager", "ssm", "iam", "dynamodb"))
        # The stack's secrets, as it creates them: a generated signing key (64 base64 characters),
        # the empty revocation list, and the vendor keys (here fake, in the operator's place).
        res = self.t["Resources"]
        gen = res["SigningKeySecret"]["Properties"]["GenerateSecretString"]
        assert gen["PasswordLength"] == 64 and gen["ExcludePunctuation"] is True
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        self.k1_text = "".join(secrets.choice(alphabet) for _ in range(64))
        harness.SECRETS.add(self.k1_text)
        self.k1 = base64.b64decode(self.k1_text)
        self.stripe_key = harness.fake_secret("sk_live")
        self.arns = {}
        for name, value in [("SigningKeySecret", json.dumps({gen["GenerateStringKey"]: self.k1_text})),
                            ("RevocationListSecret", res["RevocationListSecret"]["Properties"]["SecretString"]),
                            ("StripeKeySecret", json.dumps({"api_key": self.stripe_key})),
                            ("OpenAIKeySecret", json.dumps({"api_key": harness.fake_secret("sk")})),
                            ("AnthropicKeySecret", json.dumps({"api_key": harness.fake_secret("sk-ant")}))]:
            secret_name = res[name]["Properties"]["Name"]["Fn::Sub"].replace("${AWS::StackName}", STACK)
            self.arns[name] = self.sm.create_secret(Name=secret_name, SecretString=value)["ARN"]
        self.config = stack_config(self.t)
        self.ssm.put_parameter(Name=PARAM, Value=self.config, Type="String")
        table = res["LedgerTable"]["Properties"]
        ddb.create_table(TableName=TABLE, BillingMode=table["BillingMode"], AttributeDefinitions=table["AttributeDefinitions"], KeySchema=table["KeySchema"])
        # The gateway's identity: the task role's actions, nothing more. (moto checks a normal
        # action against the resource "*" only, so the statements' resources are widened here;
        # test_aws_templates checks that they name exactly the stack's secrets, parameter and table.)
        self.iam.create_user(UserName="gateway")
        for p in res["TaskRole"]["Properties"]["Policies"]:
            doc = self.resolve(p["PolicyDocument"])
            for st in doc["Statement"]:
                st["Resource"] = "*"
            self.iam.put_user_policy(UserName="gateway", PolicyName=p["PolicyName"], PolicyDocument=json.dumps(doc))
        key = self.iam.create_access_key(UserName="gateway")["AccessKey"]
        harness.SECRETS.add(key["SecretAccessKey"])
        self.creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        self.vendor = harness.Vendor()
        self.ports = {"admin": harness.free_port(), "envoy": harness.free_port()}
        self.gw = f"http://127.0.0.1:{self.ports['envoy']}"
        self.start()

    def resolve(self, node):
        """The task role's policy with its references as they are here."""
        if isinstance(node, list):
            return [self.resolve(v) for v in node]
        if isinstance(node, dict):
            if set(node) == {"Ref"}:
                return self.arns[node["Ref"]]
            if set(node) == {"Fn::GetAtt"}:
                assert node["Fn::GetAtt"] == ["LedgerTable", "Arn"]
                return f"arn:aws:dynamodb:{REGION}:123456789012:table/{TABLE}"
            if set(node) == {"Fn::Sub"}:
                return (node["Fn::Sub"].replace("${AWS::Partition}", "aws").replace("${AWS::Region}", REGION)
                        .replace("${AWS::AccountId}", "123456789012").replace("${AWS::StackName}", STACK))
            return {k: self.resolve(v) for k, v in node.items()}
        return node

    def start(self):
        (self.workdir / "run").mkdir(exist_ok=True)
        boot = localised_bootstrap(self.workdir, self.ports, self.port, self.vendor.port)
        template = json.loads((ROOT / "envoy" / "keyward-filter.template.json").read_text())
        code = template["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]
        assert code["filename"] == "/etc/envoy/keyward.wasm"
        code["filename"] = str(ROOT / "dist" / "keyward.wasm")
        (self.workdir / "template.json").write_text(json.dumps(template))
        (c,) = self.t["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
        env_of = {e["Name"]: e["Value"] for e in c["Environment"]}
        assert env_of["KEYWARD_CONFIG_SOURCE"] == {"Fn::Sub": "ssm:${FilterConfig}"}
        env = dict(os.environ, **self.creds, AWS_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
                   AWS_ENDPOINT_URL_SSM=self.url, KEYWARD_CONFIG_SOURCE=f"ssm:{PARAM}", KEYWARD_CONFIG_EVERY="1",
                   KEYWARD_RUN_DIR=str(self.workdir / "run"), KEYWARD_FILTER_TEMPLATE=str(self.workdir / "template.json"),
                   ENVOY=str(harness.BIN / "envoy"), KEYWARD=str(harness.CLI), ADMIN=f"127.0.0.1:{self.ports['admin']}",
                   LEDGER_DRAIN=f"127.0.0.1:{self.ports['envoy']}", DRAIN_S="2")
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(k, None)
        self.log_path = self.workdir / "aws-only-entrypoint.log"
        self.log = open(self.log_path, "wb")
        # c["Command"] is what ECS runs: -c /etc/envoy/aws-gateway.yaml ...; here the local copy.
        assert c["Command"][:2] == ["-c", "/etc/envoy/aws-gateway.yaml"]
        args = ["-c", str(boot), *c["Command"][2:]]
        self.proc = subprocess.Popen(["bash", str(ROOT / "deploy" / "keyward-envoy.sh"), *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        harness.SPAWNED.append(self.proc)
        harness.wait_until(lambda: requests.get(self.gw + "/keyward/health", timeout=2).status_code == 200, timeout=30, what="the AWS-only gateway healthy")

    def token(self, jti, allow=("stripe * /**",), ttl=300):
        now = int(time.time())
        t = harness.mint(self.k1, {"sub": "lambda/checkout", "aud": "keyward", "iat": now, "exp": now + ttl, "jti": jti, "allow": list(allow)})
        harness.TOKENS.add(t)
        return t

    def stats(self):
        text = requests.get(f"http://127.0.0.1:{self.ports['admin']}/stats", timeout=5).text
        return {k: int(v) for k, v in (l.split(": ", 1) for l in text.splitlines() if ": " in l) if v.strip().isdigit()}

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # the entrypoint drains, then stops the rest
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        self.vendor.stop()
        harness.stop_process(self.moto, 5)
        self.moto_log.close()


@pytest.fixture(scope="module")
def stack(workdir):
    s = Stack(workdir)
    yield s
    s.stop()


def test_the_stack_creates_what_its_configuration_reads(stack):
    """Every secret the configuration names is one the stack creates and the task role may read;
    no vault, no environment key, nothing else."""
    cfg = json.loads(stack.config)
    assert set(cfg["stores"]) == {"aws"} and cfg["stores"]["aws"]["type"] == "aws_secrets_manager"
    names = {stack.t["Resources"][n]["Properties"]["Name"]["Fn::Sub"].replace("${AWS::StackName}", STACK) for n in stack.arns}
    used = {t["secret"]["path"] for t in cfg["targets"].values()} | {cfg["revocation"]["path"]} | {k["secret"]["path"] for k in cfg["signing_keys"].values()}
    assert used == names
    assert "vault" not in json.dumps([stack.t["Parameters"], stack.t["Resources"]]).lower()
    path = stack.workdir / "stack-config.json"
    path.write_text(stack.config)
    r = subprocess.run([str(harness.CLI), "check-config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_healthy_calls_with_the_key_from_secrets_manager_and_checks_clean(stack):
    assert requests.get(stack.gw + "/keyward/health", timeout=5).json() == {"status": "ok"}
    tok = stack.token("aws-only-1")
    r = requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 200, r.text
    seen = stack.vendor.requests[-1]
    assert dict(seen["headers"])["authorization"] == f"Bearer {stack.stripe_key}"
    # The bootstrap as the entrypoint wrote it, and the ECDS file config-sync wrote, lint clean.
    rendered = stack.workdir / "run" / "envoy.yaml"
    assert REGION in rendered.read_text() and "__AWS_REGION__" not in rendered.read_text()
    r = subprocess.run([str(harness.CLI), "check-envoy", str(rendered), "--ecds", str(stack.workdir / "run" / "keyward-filter.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # The gateway read SSM, Secrets Manager and DynamoDB as the task role: moto checked each signature.
    assert "applied ssm:" in stack.log_text()


def test_a_revocation_in_secrets_manager_is_enforced(stack):
    tok = stack.token("aws-only-revoked")
    assert requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {tok}"}, timeout=10).status_code == 200
    exp = int(time.time()) + 300
    stack.sm.put_secret_value(SecretId=stack.arns["RevocationListSecret"],
                              SecretString=json.dumps({"format": "keyward-revocations/2", "entries": f"jti:aws-only-revoked\t{exp}\tleaked\n"}))
    refresh = json.loads(stack.config)["revocation"]["refresh_s"]
    deadline = time.time() + refresh + 3
    code = 200
    while time.time() < deadline and code == 200:
        code = requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {tok}"}, timeout=10).status_code
        time.sleep(0.2)
    assert code == 401
    other = stack.token("aws-only-other")
    assert requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {other}"}, timeout=10).status_code == 200


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


def test_a_rule_changed_in_ssm_applies_without_a_restart_and_a_bad_one_is_refused(stack):
    tok = stack.token("aws-only-rules")
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports["envoy"], timeout=10)

    def get_code():
        conn.request("GET", "/stripe/v1/customers/cus_1", headers={"Authorization": f"Bearer {tok}"})
        r = conn.getresponse()
        r.read()
        return r.status

    assert get_code() == 200
    sock = conn.sock
    pid = stack.proc.pid
    cfg = json.loads(stack.config)
    cfg["targets"]["stripe"]["allow"] = ["GET /v1/charges", "POST /v1/payment_intents"]
    stack.ssm.put_parameter(Name=PARAM, Value=json.dumps(cfg), Type="String", Overwrite=True)
    wait_for(lambda: get_code() == 403, 10, "the new rule applied")
    assert conn.sock is sock, "the same connection, never dropped"
    assert stack.proc.poll() is None and stack.proc.pid == pid
    # A configuration that does not compile: config-sync refuses it and says why; the last good
    # one keeps serving.
    stack.ssm.put_parameter(Name=PARAM, Value=json.dumps({**cfg, "audience": 5}), Type="String", Overwrite=True)
    wait_for(lambda: "refused ssm:" in stack.log_text(), 10, "config-sync refuses it")
    assert "audience" in stack.log_text()
    assert get_code() == 403
    get = requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert get.status_code == 200
    # Past config-sync (a hand edit, another xDS source): Envoy and the filter refuse it, count it
    # and log it, and the last good configuration keeps serving.
    before = stack.stats().get("extension_config_discovery.http_filter.keyward.update_rejected", 0)
    ecds = stack.workdir / "run" / "keyward-filter.json"
    doc = json.loads(ecds.read_text())
    tc = doc["resources"][0]["typed_config"]
    # The wasm filter's configuration slot, or the native module's (KEYWARD_EXECUTOR=native).
    slot = tc["config"]["configuration"] if "config" in tc else tc["filter_config"]
    slot["value"] = '{"audience": "keyward", "targets": {}}'
    tmp = ecds.with_name(".hand-edit.tmp")
    tmp.write_text(json.dumps(doc))
    os.rename(tmp, ecds)
    wait_for(lambda: stack.stats().get("extension_config_discovery.http_filter.keyward.update_rejected", 0) > before, 10, "Envoy rejects it")
    assert get_code() == 403 and conn.sock is sock
    assert requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {tok}"}, timeout=10).status_code == 200
    envoy_log = stack.log_text()
    assert "keyward" in envoy_log and ("rejected" in envoy_log or "invalid" in envoy_log)
    # A good configuration again: applied again.
    stack.ssm.put_parameter(Name=PARAM, Value=stack.config, Type="String", Overwrite=True)
    wait_for(lambda: get_code() == 200, 10, "the original rules again")
    conn.close()


def test_the_documented_revocation_command_revokes_each_credential(stack):
    """docs/deploying.md's jq program, run as written, twice: two entries, two lines, both
    enforced by the gateway."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    block = text[text.index("<!-- revoke on AWS"):].split("```sh\n", 1)[1].split("```", 1)[0]
    (jq_line,) = [l.strip().lstrip("| ").strip() for l in block.splitlines() if "jq " in l]
    jq_cmd = jq_line.split(" > revoked.json")[0]
    toks = {j: stack.token(j) for j in ("aws-only-jq-1", "aws-only-jq-2")}
    for t in toks.values():
        assert requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {t}"}, timeout=10).status_code == 200
    current = stack.sm.get_secret_value(SecretId=stack.arns["RevocationListSecret"])["SecretString"]
    for jti in toks:
        r = subprocess.run(["bash", "-c", jq_cmd], input=current, capture_output=True, text=True, timeout=10,
                           env=dict(os.environ, JTI=jti, EXP=str(int(time.time()) + 600)))
        assert r.returncode == 0, r.stderr
        current = r.stdout
    entries = json.loads(current)["entries"]
    assert [l.split("\t")[0] for l in entries.splitlines() if l.startswith("jti:aws-only-jq")] == ["jti:aws-only-jq-1", "jti:aws-only-jq-2"]
    stack.sm.put_secret_value(SecretId=stack.arns["RevocationListSecret"], SecretString=current)
    for t in toks.values():
        wait_for(lambda t=t: requests.get(stack.gw + "/stripe/v1/charges", headers={"Authorization": f"Bearer {t}"}, timeout=10).status_code == 401,
                 10, "revoked")


def test_sigterm_stops_config_sync_and_envoy(stack):
    """The entrypoint drains and takes config-sync down with Envoy (last: the module fixture is
    done with the gateway)."""
    os.kill(stack.proc.pid, signal.SIGTERM)
    assert stack.proc.wait(timeout=30) == 0
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"config-sync.*{stack.workdir}"], capture_output=True, text=True).stdout.split()
    assert left == [], "config-sync stopped with the gateway"


def test_config_sync_checks_with_the_environment_the_vm_gets(tmp_path):
    """A variable this process has but the template does not hand the VM (host_env_keys) is one
    the filter would not see: config-sync refuses the configuration, as the filter would."""
    t = cfn()
    cfg = json.loads(stack_config(t))
    cfg["signing_keys"]["k2"] = {"env": "KEYWARD_KEY_K2"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    template = json.loads((ROOT / "envoy" / "keyward-filter.template.json").read_text())
    assert "KEYWARD_KEY_K2" not in template["resources"][0]["typed_config"]["config"]["vm_config"]["environment_variables"]["host_env_keys"]
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    harness.SECRETS.add(key)
    r = harness.cli("config-sync", "--source", f"file:{tmp_path / 'config.json'}", "--template", str(ROOT / "envoy" / "keyward-filter.template.json"),
                    "--out", str(tmp_path / "keyward-filter.json"), env={"KEYWARD_KEY_K2": key})
    assert r.returncode == 1 and "KEYWARD_KEY_K2" in r.stderr, r.stderr
    assert not (tmp_path / "keyward-filter.json").exists()
    assert key not in r.stdout + r.stderr
