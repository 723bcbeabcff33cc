"""The Envoy bootstrap the integration tests run, built from the contract (not from envoy/)."""
import json
import os

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

GARBAGE_CASES = ["crlf", "lf", "number", "object", "big", "missing", "empty"]

FILTER_STATE_KEYS = ["subject", "target", "jti", "run", "decision", "cache", "idempotency_key", "secret_version", "issued", "cost", "spend", "budgets",
                     "model", "reserved", "usage", "tokens_in", "tokens_out"]


def filter_config(bao_cluster="vault", timeout_ms=1500) -> dict:
    return {
        "audience": "keyward",
        "issuer": "https://issuer.test",
        "clock_skew_s": 30,
        "max_token_lifetime_s": 3600,
        "signing_keys": {
            "k1": {"env": "KEYWARD_KEY_K1"},
            "k2": {"secret": {"store": "bao", "path": "it/signing", "field": "k2"}},
        },
        "stores": {
            "bao": {"type": "vault_kv2", "cluster": bao_cluster, "authority": "vault.test",
                    "mount": "secret", "token_env": "VAULT_TOKEN", "timeout_ms": timeout_ms},
            "dead": {"type": "vault_kv2", "cluster": "deadvault", "authority": "dead.test",
                     "token_env": "VAULT_TOKEN", "timeout_ms": 500},
            # Same OpenBao, own cluster: tests count secret fetches on "vault" alone.
            "bao_rev": {"type": "vault_kv2", "cluster": "vault_rev", "authority": "vault.test",
                        "token_env": "VAULT_TOKEN", "timeout_ms": 1000},
            # Same OpenBao, own cluster: the cold-burst test counts this secret's fetches alone.
            "bao_burst": {"type": "vault_kv2", "cluster": "vault_burst", "authority": "vault.test",
                          "mount": "secret", "token_env": "VAULT_TOKEN", "timeout_ms": timeout_ms},
            "hang": {"type": "vault_kv2", "cluster": "hangvault", "authority": "hang.test",
                     "token_env": "VAULT_TOKEN", "timeout_ms": 400},
        },
        "cache": {"ttl_s": 300},
        "revocation": {"store": "bao_rev", "path": "it/revoked", "refresh_s": 1},
        "targets": {
            "stripe": {"credential": "bearer", "secret": {"store": "bao", "path": "it/stripe", "field": "api_key"},
                       "inject": {"type": "bearer"}, "allow": ["POST /v1/payment_intents", "GET /v1/**"]},
            "twilio": {"credential": "basic_password", "secret": {"store": "bao", "path": "it/twilio"},
                       "inject": {"type": "basic", "username_field": "account_sid", "password_field": "auth_token"}},
            "anthropic": {"credential": "header:x-api-key",
                          "secret": {"store": "bao", "path": "it/anthropic", "field": "api_key"},
                          "inject": {"type": "header", "name": "x-api-key"}},
            "vendorhdr": {"credential": "bearer", "secret": {"store": "bao", "path": "it/vendorhdr", "field": "key"},
                          "inject": {"type": "header", "name": "x-vendor-key", "prefix": "Token "}},
            "maps": {"credential": "bearer", "secret": {"store": "bao", "path": "it/maps", "field": "key"},
                     "inject": {"type": "query", "name": "key"}},
            "missing": {"credential": "bearer", "secret": {"store": "bao", "path": "it/does-not-exist", "field": "k"},
                        "inject": {"type": "bearer"}},
            "deleted": {"credential": "bearer", "secret": {"store": "bao", "path": "it/deleted", "field": "k"},
                        "inject": {"type": "bearer"}},
            "nofield": {"credential": "bearer", "secret": {"store": "bao", "path": "it/stripe", "field": "nope"},
                        "inject": {"type": "bearer"}},
            "burst": {"credential": "bearer", "secret": {"store": "bao_burst", "path": "it/burst", "field": "k"},
                      "inject": {"type": "bearer"}},
            "charges": {"credential": "bearer", "secret": {"store": "bao", "path": "it/stripe", "field": "api_key"},
                        "inject": {"type": "bearer"}, "require_idempotency_key": ["POST"]},
            "coldlim": {"credential": "bearer", "secret": {"store": "bao", "path": "it/coldlim", "field": "k"},
                        "inject": {"type": "bearer"}},
            **{f"g_{case}": {"credential": "bearer", "secret": {"store": "bao", "path": f"it/garbage-{case}", "field": "k"},
                             "inject": {"type": "bearer"}} for case in GARBAGE_CASES},
            "hangstore": {"credential": "bearer", "secret": {"store": "hang", "path": "it/x", "field": "k"},
                          "inject": {"type": "bearer"}},
            "deadstore": {"credential": "bearer", "secret": {"store": "dead", "path": "it/x", "field": "k"},
                          "inject": {"type": "bearer"}},
            # A fixed cost (no body read): spend metrics exist on this gateway from the start.
            "priced": {"credential": "bearer", "secret": {"store": "bao", "path": "it/stripe", "field": "api_key"},
                       "inject": {"type": "bearer"}, "cost": {"per_request": 1}, "refund_on": [402]},
        },
    }


def route(name, target=None, prefix=None, cluster="vendor", host="vendor.test"):
    r = {"name": name, "match": {"prefix": f"/{name}/"},
         "route": {"cluster": cluster, "prefix_rewrite": "/", "host_rewrite_literal": host}}
    if target is not None:
        meta = {"target": target}
        meta["prefix"] = prefix if prefix is not None else f"/{name}"
        r["metadata"] = {"filter_metadata": {"keyward": meta}}
    return r


def static_cluster(name, port, timeout="1s"):
    return {"name": name, "connect_timeout": timeout, "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


ENV_KEYS = ["KEYWARD_KEY_K1", "VAULT_TOKEN"]
# The module under test; KEYWARD_TEST_WASM runs the suite against another build (an earlier
# commit's, to show that a test fails without the change it covers).
WASM = os.environ.get("KEYWARD_TEST_WASM", "dist/keyward.wasm")


def hcm(stat_prefix, access_log_path, cfg: dict, hardened: bool, env_keys=None) -> dict:
    fixed = ["stripe", "twilio", "anthropic", "vendorhdr", "maps", "missing", "deleted", "nofield", "deadstore", "burst",
             "hangstore", "charges", "coldlim"] + [f"g_{c}" for c in GARBAGE_CASES]
    # A route per target, named after it (the fixed ones first, as the core tests expect).
    targets = cfg.get("targets")
    routes = [HEALTH_ROUTE] + [route(t, t) for t in dict.fromkeys(fixed + list(targets if isinstance(targets, dict) else {}))]
    routes += [route("nometa"), route("unknown", "paypal")]
    h = {
        "@type": HCM,
        "stat_prefix": stat_prefix,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log_path),
            "log_format": {"json_format": {
                "listener": stat_prefix, "method": "%REQ(:METHOD)%", "path": "%PATH(NQ:PATH)%",
                "status": "%RESPONSE_CODE%",
                **{k: f"%FILTER_STATE(wasm.keyward.{k}:PLAIN)%" for k in FILTER_STATE_KEYS}}}}},
            # Envoy's default format too, for the leak check. It prints the path with its query,
            # the one route whose target injects its key there included: the filter sets
            # x-envoy-original-path to the path the workload sent, which the format prints instead.
            {"name": "envoy.access_loggers.file",
             "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log_path) + ".default"}}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "keyward", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {"name": "keyward", "root_id": "keyward", "failure_policy": "FAIL_RELOAD",
                           "reload_config": {"backoff": {"base_interval": "0.1s", "max_interval": "1s"}},
                           "vm_config": {"vm_id": "keyward", "runtime": "envoy.wasm.runtime.v8",
                                         "code": {"local": {"filename": WASM}},
                                         "environment_variables": {"host_env_keys": list(env_keys or ENV_KEYS)}},
                           "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                             "value": json.dumps(cfg)}}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True}},
        ],
    }
    if hardened:
        # The production settings (envoy/egress-gateway.yaml), as keyward check-envoy requires them.
        h.update({"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST",
                  "max_request_headers_kb": 32, "request_headers_timeout": "10s", "request_timeout": "300s",
                  "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST",
                                                   "max_headers_count": 64, "idle_timeout": "300s"}})
    return h


def listener(name, port, h):
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": h}]}]}


# As in the shipped bootstraps: the filter answers it; the 503 is sent only when the filter did not run.
HEALTH_ROUTE = {"name": "keyward_health", "match": {"path": "/keyward/health"},
                "direct_response": {"status": 503, "body": {"inline_string": '{"status":"unavailable","message":"the keyward filter is not running"}'}},
                "metadata": {"filter_metadata": {"keyward": {"endpoint": "health"}}}}


BUFFER = "envoy.filters.http.buffer"


def buffer_on(b: dict, route_names, max_bytes=65536):
    """Envoy's buffer filter after keyward in every listener of bootstrap `b`, off everywhere but
    on the named routes (those whose bodies keyward reads), as the shipped configurations have it.
    Returns the routes it turned on, by listener."""
    on = []
    for lst in b["static_resources"]["listeners"]:
        h = lst["filter_chains"][0]["filters"][0]["typed_config"]
        filters = h["http_filters"]
        filters.insert(len(filters) - 1, {"name": BUFFER, "disabled": True, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": max_bytes}})
        for r in h["route_config"]["virtual_hosts"][0]["routes"]:
            if r["name"] in route_names:
                r["typed_per_filter_config"] = {BUFFER: {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                    "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                               "buffer": {"max_request_bytes": max_bytes}}}}
                on.append(r)
    return on


def shipped_stats_config() -> dict:
    """The tag extraction every shipped bootstrap carries (test_observability checks they agree)."""
    import pathlib
    import yaml
    root = pathlib.Path(__file__).resolve().parent.parent
    return yaml.safe_load((root / "envoy" / "egress-gateway.yaml").read_text())["stats_config"]


def bootstrap(ports: dict, access_log_path, cfg: dict | None = None, env_keys=None) -> dict:
    cfg = cfg if cfg is not None else filter_config()
    return {
        "node": {"id": "keyward-it", "cluster": "keyward-it"},
        "stats_config": shipped_stats_config(),
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["admin"]}}},
        "static_resources": {
            "listeners": [
                listener("hardened", ports["hardened"], hcm("hardened", access_log_path, cfg, True, env_keys)),
                listener("raw", ports["raw"], hcm("raw", access_log_path, cfg, False, env_keys)),
            ],
            "clusters": [
                static_cluster("vendor", ports["vendor"]),
                static_cluster("vault", ports["bao"]),
                static_cluster("vault_rev", ports["rev"]),
                static_cluster("vault_burst", ports["bao"]),
                static_cluster("deadvault", ports["dead"], "0.25s"),
                static_cluster("hangvault", ports["hang"]),
            ],
        },
    }
