"""The fleet ledger for the tests: dynalite (DynamoDB on LevelDB, from npm) and moto's DynamoDB,
the ledger cluster Envoy signs (aws_request_signing as an upstream HTTP filter, environment
credentials only), and gateways that share one table."""
import json
import os
import subprocess
import time

import requests

import aws
import envoy_config
import harness

DYNALITE = harness.ROOT / "tools" / "dynalite" / "node_modules" / ".bin" / "dynalite"
AUTHORITY = "dynamodb.us-east-1.amazonaws.com"


def signing_filter() -> dict:
    f = aws.signing_filter()
    f["typed_config"]["service_name"] = "dynamodb"
    return f


def ledger_cluster(name: str, port: int, timeout="1s") -> dict:
    c = aws.signed_cluster(name, port)
    c["connect_timeout"] = timeout
    opts = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    opts["http_filters"][0] = signing_filter()
    return c


def client(url: str, env: dict):
    import boto3
    return boto3.client("dynamodb", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def create_table(ddb, table: str):
    """The table as the contract fixes it: one string partition key `pk`, TTL on `ttl`."""
    ddb.create_table(TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    deadline = time.time() + 10
    while ddb.describe_table(TableName=table)["Table"]["TableStatus"] != "ACTIVE":
        assert time.time() < deadline, "table never became active"
        time.sleep(0.05)


class Dynalite:
    """dynalite on LevelDB in the test's directory."""

    def __init__(self, workdir, name="dynalite"):
        assert DYNALITE.exists(), "make test installs dynalite into tools/dynalite"
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.path = workdir / f"{name}-db"
        self.log = open(workdir / f"{name}.log", "wb")
        self.name = name
        self.start()

    def start(self):
        self.proc = subprocess.Popen([str(DYNALITE), "--host", "127.0.0.1", "--port", str(self.port), "--path", str(self.path),
                                      "--createTableMs", "0", "--deleteTableMs", "0", "--updateTableMs", "0"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        harness.SPAWNED.append(self.proc)
        harness.wait_until(lambda: requests.post(self.url, timeout=1).status_code in (400, 403), what=f"{self.name} ready")

    def stop(self):
        harness.stop_process(self.proc, 5)

    def close(self):
        self.stop()
        self.log.close()


def ledger_section(cluster="ledger", table="keyward-ledger", timeout_ms=800, lease_s=5, budgets=None) -> dict:
    l = {"type": "dynamodb", "cluster": cluster, "authority": AUTHORITY, "table": table, "timeout_ms": timeout_ms, "lease_s": lease_s}
    if budgets:
        l["budgets"] = budgets
    return l


def item(ddb, table: str, pk: str) -> dict:
    return ddb.get_item(TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True).get("Item", {})


def live_leases(it: dict) -> list:
    """The gateways holding a lease in an item (an end mark, `q` 0, holds none)."""
    return [k for k, v in it.items() if k.startswith("l_") and v["M"]["q"]["N"] != "0"]


def held(ddb, table: str, pk: str) -> tuple:
    """(spend, count) the ledger holds for an account."""
    it = item(ddb, table, pk)
    return int(it.get("s", {}).get("N", "0")), int(it.get("n", {}).get("N", "0"))


def credential_pk(key: bytes, jti: str) -> str:
    """The ledger's name of a credential's account: the key's identity (as core computes it)
    and the jti."""
    return f"c/{key_identity(key):016x}/{jti}"


def key_identity(key: bytes) -> int:
    """`HmacKey::id`: the first 8 bytes (big-endian) of HMAC-SHA256(key, a fixed label)."""
    import hashlib
    import hmac
    d = hmac.new(key, b"keyward/v1/key-identity", hashlib.sha256).digest()
    return int.from_bytes(d[:8], "big")


def shipped_drain():
    """The drain route and the RBAC filter of envoy/egress-gateway.yaml."""
    import yaml
    doc = yaml.safe_load((harness.ROOT / "envoy" / "egress-gateway.yaml").read_text())
    (egress,) = [l for l in doc["static_resources"]["listeners"] if l["name"] == "egress"]
    hcm = egress["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r.get("name") == "keyward_drain"]
    (rbac,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.rbac"]
    return route, rbac


def gateway_bootstrap(ports: dict, log, cfg: dict, ledger_port: int, ledger_cluster_timeout="1s") -> dict:
    """A gateway like the suite's (hardened listener, the vendor, OpenBao), with the buffer filter
    on the routes whose bodies Keyward reads, the ledger cluster, and the drain route."""
    b = envoy_config.bootstrap(ports, log, cfg, env_keys=envoy_config.ENV_KEYS + ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    priced = [n for n, t in cfg["targets"].items() if "cost" in t and ({"form_field", "json_field", "usage"} & set(t["cost"]))]
    envoy_config.buffer_on(b, priced, 1048576)
    for lst in b["static_resources"]["listeners"]:
        h = lst["filter_chains"][0]["filters"][0]["typed_config"]
        filters = h["http_filters"]
        routes = h["route_config"]["virtual_hosts"][0]["routes"]
        # The shipped drain route and its RBAC (loopback peers only), as egress-gateway.yaml has them.
        drain_route, rbac = shipped_drain()
        routes.insert(0, drain_route)
        filters.insert(0, rbac)
    b["static_resources"]["clusters"].append(ledger_cluster("ledger", ledger_port, ledger_cluster_timeout))
    return b


class Gateway:
    def __init__(self, workdir, name, cfg, env, ledger_port, base_ports, concurrency=2):
        self.name = name
        self.ports = dict(base_ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port())
        self.workdir, self.cfg, self.env, self.ledger_port, self.concurrency = workdir, cfg, env, ledger_port, concurrency
        self.access_log = workdir / f"access-{name}.log"
        self.start()

    def start(self):
        bootstrap = gateway_bootstrap(self.ports, self.access_log, self.cfg, self.ledger_port)
        self.envoy = harness.Envoy(self.workdir, bootstrap, self.env, name=self.name, concurrency=self.concurrency)
        self.url = f"http://127.0.0.1:{self.ports['hardened']}"
        harness.wait_until(lambda: requests.get(self.url + "/keyward/health", timeout=5).status_code == 200, timeout=15, what=f"{self.name} ready")

    def kill(self):
        """SIGKILL: no drain, no give-back."""
        self.envoy.proc.kill()
        self.envoy.proc.wait()
        self.envoy.log.close()

    def stop(self):
        if self.envoy.proc.poll() is None:
            self.envoy.stop()

    def drain(self, timeout=5.0):
        """What the image's entrypoint does on SIGTERM: ask the filter to give everything back
        until nothing is held."""
        deadline = time.time() + timeout
        while True:
            r = requests.post(self.url + "/keyward/drain", timeout=5)
            assert r.status_code == 200, r.text
            if r.json()["held"] == 0 or time.time() > deadline:
                return r.json()
            time.sleep(0.1)

    def stats(self):
        return self.envoy.stats()

    def ledger_calls(self) -> int:
        return sum(v for k, v in self.stats().items() if k.startswith("wasmcustom.keyward_ledger_calls_total"))


def env_for(gw_env: dict, creds: dict) -> dict:
    return dict(gw_env, **creds)


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def moto_dynamodb(workdir, name="moto-ddb"):
    """moto's server with SigV4 checked (the first 4 requests set up an admin; then every
    request is authenticated against moto's IAM): (process, url, admin credentials)."""
    import boto3
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / f"{name}.log", "wb")
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    proc = subprocess.Popen([str(harness.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    harness.SPAWNED.append(proc)
    harness.wait_until(lambda: requests.get(f"{url}/moto-api/", timeout=1).status_code < 500, what="moto ready")
    anon = dict(aws_access_key_id="anon", aws_secret_access_key="anon", region_name="us-east-1", endpoint_url=url)
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="ledger")
    key = iam.create_access_key(UserName="ledger")["AccessKey"]
    iam.put_user_policy(UserName="ledger", PolicyName="ledger", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    harness.SECRETS.add(key["SecretAccessKey"])
    creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    return proc, url, creds, log
