"""A shipped gateway config (envoy/*.yaml) as it can run here, changed only where it must be:
the wasm from dist/, AWS signing from the environment, one listener on a free port, a file access
log, clusters pointing at local servers without TLS, the vault store logging in with a token
instead of AppRole, and the targets held in AWS Secrets Manager left out."""
import json

ENV_ONLY = {"custom_credential_provider_chain": True, "environment_credential_provider": {}}


def runnable_here(node):
    """A shipped config as it can run on this machine: the wasm from dist/ instead of the image's
    /etc/envoy, and AWS signing from the environment only (the default chain would probe the
    instance metadata address, which is forbidden here). Nothing else changes."""
    if isinstance(node, dict):
        if node.get("@type", "").endswith("AwsRequestSigning") and "credential_provider" not in node:
            node["credential_provider"] = dict(ENV_ONLY)
        local = node.get("local")
        if isinstance(local, dict) and str(local.get("filename", "")).endswith("keyward.wasm"):
            local["filename"] = "dist/keyward.wasm"
        for v in node.values():
            runnable_here(v)
    elif isinstance(node, list):
        for v in node:
            runnable_here(v)
    return node



def to_loopback(cl, port):
    """A shipped cluster pointed at a local server on `port`, without TLS."""
    cl.pop("transport_socket", None)
    cl["type"] = "STATIC"
    cl.pop("dns_lookup_family", None)
    cl["load_assignment"] = {"cluster_name": cl["name"], "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    return cl


def localise(doc, ports, clusters, log_path, keep_routes=None):
    """`clusters`: name -> local port (other clusters are dropped); `ports` has admin and envoy."""
    doc = runnable_here(doc)
    doc["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    (egress,) = [l for l in doc["static_resources"]["listeners"] if l["name"] == "egress"]
    egress["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports["envoy"]}
    doc["static_resources"]["listeners"] = [egress]
    hcm = egress["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(log_path),
        "log_format": hcm["access_log"][0]["typed_config"]["log_format"]}}]
    vh = hcm["route_config"]["virtual_hosts"][0]
    if keep_routes is not None:
        vh["routes"] = [r for r in vh["routes"] if r.get("name") in keep_routes]
    (wasm,) = [f for f in hcm["http_filters"] if f["name"] == "keyward"]
    c = wasm["typed_config"]["config"]
    c["vm_config"]["environment_variables"]["host_env_keys"] = ["KEYWARD_KEY_K1", "VAULT_TOKEN"]
    cfg = json.loads(c["configuration"]["value"])
    vault = cfg["stores"]["vault"]
    vault.pop("approle")
    vault["token_env"] = "VAULT_TOKEN"
    vault["authority"] = "vault.local"
    del cfg["stores"]["aws"]
    cfg["targets"] = {k: v for k, v in cfg["targets"].items() if v["secret"]["store"] == "vault"}
    cfg["revocation"]["refresh_s"] = 1
    c["configuration"]["value"] = json.dumps(cfg)
    kept = []
    for cl in doc["static_resources"]["clusters"]:
        port = clusters.get(cl["name"])
        if port is None:
            continue
        kept.append(to_loopback(cl, port))
    doc["static_resources"]["clusters"] = kept
    return doc
