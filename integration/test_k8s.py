"""The Kubernetes manifests' Envoy, run as the pod runs it: deploy/k8s/envoy-configmap.yaml's
envoy.yaml, sds.yaml and keyward-filter.yaml in directories laid out as the kubelet lays out
ConfigMap and Secret volumes (a `..data` symlink swapped atomically on every update), changed
only where this machine needs it (ports, the vault logging in with a token, clusters on loopback).

TLS from the workloads: plaintext is refused, a real TLS client that checks the certificate gets
through, and a renewed certificate is served to new connections without a restart. Policy without
a restart: the filter ConfigMap changed applies to the next requests on an open connection; one the
filter refuses is counted and logged and the last good one keeps serving. The pod's drain call
reaches the filter on its loopback listener."""
import datetime
import http.client
import json
import os
import ssl
import time

import pytest
import requests
import yaml

import executor
import harness

ROOT = harness.ROOT
ISS = "https://keyward.example.internal"


def manifests():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "envoy-configmap.yaml").read_text()) if d]
    by = {d["metadata"]["name"]: d["data"] for d in docs}
    return yaml.safe_load(by["keyward-envoy"]["envoy.yaml"]), yaml.safe_load(by["keyward-envoy"]["sds.yaml"]), yaml.safe_load(by["keyward-filter"]["keyward-filter.yaml"])


def pod_volumes():
    """Mount path of each volume of the gateway Deployment: name -> path."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return {m["name"]: m["mountPath"] for m in c["volumeMounts"]}


class Volume:
    """A directory as the kubelet keeps a ConfigMap or Secret volume: the files are symlinks into
    `..data`, itself a symlink to a timestamped directory, swapped by one rename on each update."""

    def __init__(self, path):
        self.path = path
        path.mkdir(parents=True)
        self.n = 0

    def write(self, files: dict):
        self.n += 1
        ts = self.path / f"..2026_12_07_00_00_{self.n:02d}.{self.n}"
        ts.mkdir()
        for name, content in files.items():
            (ts / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        tmp = self.path / "..data_tmp"
        os.symlink(ts.name, tmp)
        os.rename(tmp, self.path / "..data")
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)


def certificate(ca, serial):
    """(cert PEM, key PEM) for the gateway's service name, signed by `ca` (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cn = "keyward test CA" if ca is None else "keyward-gateway.keyward.svc"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key()).serial_number(serial)
         .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("keyward-gateway.keyward.svc"), x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False))
    if ca is None:
        b = b.issuer_name(name).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        cert = b.sign(key, hashes.SHA256())
    else:
        cert = b.issuer_name(ca[0].subject).sign(ca[1], hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    harness.SECRETS.add(key_pem.decode().splitlines()[1])
    return cert, key, pem, key_pem


def localise_filter(resource, vault_authority="vault.local"):
    """The filter ConfigMap's resource as it can run here: the wasm from dist/, the vault with a
    token, the AWS-held targets and the ledger left out (no AWS here)."""
    r = json.loads(json.dumps(resource))
    c = r["resources"][0]["typed_config"]["config"]
    c["vm_config"]["code"]["local"]["filename"] = str(harness.WASM)
    c["vm_config"]["environment_variables"]["host_env_keys"] = ["KEYWARD_KEY_K1", "VAULT_TOKEN"]
    cfg = json.loads(c["configuration"]["value"])
    vault = cfg["stores"]["vault"]
    vault.pop("approle")
    vault["token_env"] = "VAULT_TOKEN"
    vault["authority"] = vault_authority
    del cfg["stores"]["aws"]
    cfg.pop("ledger")
    cfg["targets"] = {k: v for k, v in cfg["targets"].items() if v["secret"]["store"] == "vault"}
    cfg["revocation"]["refresh_s"] = 1
    c["configuration"]["value"] = json.dumps(cfg)
    return r, cfg


def with_config(resource, cfg):
    r = json.loads(json.dumps(resource))
    if executor.is_native():
        # The documented EKS step for the native module: the ConfigMap's file rewritten by
        # `keyward native-config`.
        r = executor.native(r)
        r["resources"][0]["typed_config"]["filter_config"]["value"] = json.dumps(cfg)
    else:
        r["resources"][0]["typed_config"]["config"]["configuration"]["value"] = json.dumps(cfg)
    return yaml.safe_dump(r)


class Pod:
    def __init__(self, gw, workdir):
        doc, sds, resource = manifests()
        mounts = pod_volumes()
        base = workdir / "pod"
        self.config, self.filter, self.tls = Volume(base / "config"), Volume(base / "filter"), Volume(base / "tls")
        where = {mounts["config"]: self.config.path, mounts["filter"]: self.filter.path, mounts["tls"]: self.tls.path}

        # Every file the bootstrap and the SDS resource name lives on one of the pod's volumes.
        text = json.dumps([doc, sds])
        for mount, local in sorted(where.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f'"{mount}/', f'"{local}/').replace(f'"{mount}"', f'"{local}"')
        doc, sds = json.loads(text)
        self.ports = {"admin": harness.free_port(), "egress": harness.free_port(), "local": harness.free_port(), "metrics": harness.free_port()}
        doc["admin"]["address"]["socket_address"]["port_value"] = self.ports["admin"]
        listeners = {l["name"]: l for l in doc["static_resources"]["listeners"]}
        for name, l in listeners.items():
            l["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": self.ports[name]}
        hcm = listeners["egress"]["filter_chains"][0]["filters"][0]["typed_config"]
        self.access = workdir / "access-k8s.log"
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(self.access),
            "log_format": hcm["access_log"][0]["typed_config"]["log_format"]}}]
        self.vendor = harness.Vendor()
        # The vault is OpenBao; every vendor is the fake vendor; the AWS clusters are not used here.
        ports = {"vault": gw.bao.port, "admin": self.ports["admin"]}
        import shipped
        doc["static_resources"]["clusters"] = [shipped.to_loopback(cl, ports.get(cl["name"], self.vendor.port))
                                               for cl in doc["static_resources"]["clusters"] if cl["name"] not in ("sts", "aws_secrets_manager", "ledger")]
        self.resource, self.cfg = localise_filter(resource)
        # The volumes as the kubelet writes them.
        self.ca = certificate(None, 1)
        leaf = certificate(self.ca, 1001)
        self.serial = 1001
        self.tls.write({"tls.crt": leaf[2], "tls.key": leaf[3]})
        self.ca_file = workdir / "ca.pem"
        self.ca_file.write_bytes(self.ca[2])
        self.filter.write({"keyward-filter.yaml": with_config(self.resource, self.cfg)})
        self.config.write({"envoy.yaml": yaml.safe_dump(doc), "sds.yaml": yaml.safe_dump(sds)})
        gw.bao.put("keyward/stripe", {"api_key": gw.s["stripe"]})
        gw.bao.put("keyward/revoked", {"jti:seed": "x"})
        self.envoy = harness.Envoy(workdir, doc, gw.env, name="envoy-k8s")
        self.url = f"https://localhost:{self.ports['egress']}"
        harness.wait_until(lambda: requests.get(self.url + "/keyward/health", verify=str(self.ca_file), timeout=5).status_code == 200,
                           timeout=20, what="the pod's gateway ready over TLS")

    def served_serial(self):
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        import socket
        with socket.create_connection(("127.0.0.1", self.ports["egress"]), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="keyward-gateway.keyward.svc") as s:
                from cryptography import x509
                return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    def stats(self):
        text = requests.get(f"http://127.0.0.1:{self.ports['admin']}/stats", timeout=5).text
        return {k: int(v) for k, v in (l.split(": ", 1) for l in text.splitlines() if ": " in l) if v.strip().isdigit()}

    def stop(self):
        self.envoy.stop()
        self.vendor.stop()


@pytest.fixture(scope="module")
def pod(gw, workdir):
    p = Pod(gw, workdir)
    yield p
    p.stop()


def test_tls_only_from_workloads_checked_by_a_real_client(gw, pod):
    t = gw.token(["stripe GET /v1/**"], iss=ISS)
    r = requests.get(pod.url + "/stripe/v1/charges", headers={"Authorization": f"Bearer {t}"}, verify=str(pod.ca_file), timeout=10)
    assert r.status_code == 200, r.text
    assert pod.vendor.take()[-1]["headers"] and r.json()
    # Plaintext to the same port: no HTTP answer, so no credential ever crosses it in clear.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{pod.ports['egress']}/stripe/v1/charges", headers={"Authorization": f"Bearer {t}"}, timeout=5)
    # A client that checks the name, against another CA: refused.
    other = pod.ca_file.with_name("other-ca.pem")
    other.write_bytes(certificate(None, 7)[2])
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(pod.url + "/keyward/health", verify=str(other), timeout=5)
    assert pod.served_serial() == pod.serial


def test_a_renewed_certificate_is_served_without_a_restart(gw, pod):
    pid = pod.envoy.proc.pid
    conn = http.client.HTTPSConnection("127.0.0.1", pod.ports["egress"], timeout=10, context=ssl.create_default_context(cafile=str(pod.ca_file)))
    conn.request("GET", "/keyward/health", headers={"Host": "localhost"})
    assert conn.getresponse().read()
    leaf = certificate(pod.ca, 1002)
    pod.tls.write({"tls.crt": leaf[2], "tls.key": leaf[3]})
    deadline = time.time() + 15
    while time.time() < deadline and pod.served_serial() != 1002:
        time.sleep(0.2)
    assert pod.served_serial() == 1002, "new connections get the renewed certificate"
    conn.request("GET", "/keyward/health", headers={"Host": "localhost"})
    assert conn.getresponse().status == 200, "the open connection goes on"
    assert pod.envoy.proc.pid == pid and pod.envoy.proc.poll() is None
    pod.serial = 1002


def test_the_filter_configmap_applies_without_a_restart_and_a_bad_one_is_refused(gw, pod):
    t = gw.token(["stripe * /**"], iss=ISS)
    conn = http.client.HTTPSConnection("127.0.0.1", pod.ports["egress"], timeout=10, context=ssl.create_default_context(cafile=str(pod.ca_file)))

    def code(path="/stripe/v1/customers"):
        conn.request("GET", path, headers={"Host": "localhost", "Authorization": f"Bearer {t}"})
        r = conn.getresponse()
        r.read()
        return r.status

    assert code() == 200
    sock = conn.sock
    cfg = json.loads(json.dumps(pod.cfg))
    cfg["targets"]["stripe"]["allow"] = ["GET /v1/charges"]
    pod.filter.write({"keyward-filter.yaml": with_config(pod.resource, cfg)})
    deadline = time.time() + 15
    while time.time() < deadline and code() != 403:
        time.sleep(0.2)
    assert code() == 403 and code("/stripe/v1/charges") == 200, "the new rule, on the next requests"
    assert conn.sock is sock, "on the same connection"
    before = pod.stats().get("extension_config_discovery.http_filter.keyward.update_rejected", 0)
    bad = dict(cfg, targets={"stripe": dict(cfg["targets"]["stripe"], inject={"type": "nonsense"})})
    pod.filter.write({"keyward-filter.yaml": with_config(pod.resource, bad)})
    deadline = time.time() + 15
    while time.time() < deadline and pod.stats().get("extension_config_discovery.http_filter.keyward.update_rejected", 0) == before:
        time.sleep(0.2)
    assert pod.stats().get("extension_config_discovery.http_filter.keyward.update_rejected", 0) > before, "counted"
    log = pod.envoy.log_path.read_text(errors="replace")
    assert "targets.stripe.inject" in log, "logged, with what is wrong"
    assert code() == 403 and code("/stripe/v1/charges") == 200 and conn.sock is sock, "the last good one serves"
    pod.filter.write({"keyward-filter.yaml": with_config(pod.resource, pod.cfg)})
    deadline = time.time() + 15
    while time.time() < deadline and code() != 200:
        time.sleep(0.2)
    assert code() == 200
    conn.close()


def test_the_pods_drain_call_reaches_the_filter_on_loopback(pod):
    r = requests.post(f"http://127.0.0.1:{pod.ports['local']}/keyward/drain", timeout=5)
    assert r.status_code == 200 and r.json() == {"returning": 0, "held": 0}
    # Nothing else is served there: no vendor route (Keyward refuses what names no target).
    pod.vendor.take()
    r = requests.get(f"http://127.0.0.1:{pod.ports['local']}/stripe/v1/charges", timeout=5)
    assert r.status_code == 403 and r.json()["error"] == "unknown_target"
    assert pod.vendor.take() == []


def test_the_filter_configmap_checks_clean_as_documented(tmp_path):
    """docs/deploying.md: the keyward-filter ConfigMap's file goes through `keyward check-config`."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "envoy-configmap.yaml").read_text()) if d]
    (data,) = [d["data"] for d in docs if d["metadata"]["name"] == "keyward-filter"]
    f = tmp_path / "f.yaml"
    f.write_text(data["keyward-filter.yaml"])
    r = harness.cli("check-config", str(f), "--no-env")
    assert r.returncode == 0 and r.stdout.startswith("ok: audience=keyward"), r.stdout + r.stderr
    f.write_text(data["keyward-filter.yaml"].replace('"audience": "keyward"', '"audience": 5'))
    r = harness.cli("check-config", str(f), "--no-env")
    assert r.returncode == 1 and "audience" in r.stderr
