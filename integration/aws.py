"""AWS Secrets Manager for the tests: moto's server, and the two ways Envoy signs Keyward's
callouts (an upstream HTTP filter on the store cluster, or a loopback listener)."""
import subprocess

import harness

REGION = "us-east-1"
AUTHORITY = f"secretsmanager.{REGION}.amazonaws.com"


def signing_filter() -> dict:
    return {"name": "envoy.filters.http.aws_request_signing", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning",
        "service_name": "secretsmanager", "region": REGION, "use_unsigned_payload": False,
        # Environment credentials only: never the instance metadata address.
        "credential_provider": {"custom_credential_provider_chain": True, "environment_credential_provider": {}}}}


def signed_cluster(name: str, port: int) -> dict:
    """Way 1: the store cluster signs every request with an upstream HTTP filter."""
    c = {"name": name, "connect_timeout": "1s", "type": "STATIC",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
         "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
             "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
             "explicit_http_config": {"http_protocol_options": {}},
             "http_filters": [signing_filter(), {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                 "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}]}}}
    return c


def signing_listener(name: str, port: int, upstream_cluster: str) -> dict:
    """Way 2: a loopback listener that signs and forwards; the store cluster points at it."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": name,
           "route_config": {"virtual_hosts": [{"name": "aws", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster, "host_rewrite_literal": AUTHORITY}}]}]},
           "http_filters": [signing_filter(), {"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def credentials_env() -> dict:
    """Test-only credentials for Envoy's environment provider and boto3: obviously fake, not in
    AWS's key format (moto does not check them), and random per run."""
    secret = "fake-aws-secret-" + harness.secrets.token_hex(16)
    harness.SECRETS.add(secret)
    return {"AWS_ACCESS_KEY_ID": "keyward-fake-access-key-id", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION}


class Moto:
    def __init__(self, workdir):
        self.port = harness.free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto.log", "wb")
        self.proc = subprocess.Popen([str(harness.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        harness.SPAWNED.append(self.proc)
        harness.wait_until(lambda: harness.requests.get(f"{self.addr}/moto-api/", timeout=1).status_code < 500,
                           what="moto ready")

    def client(self, env: dict):
        import boto3
        return boto3.client("secretsmanager", endpoint_url=self.addr, region_name=REGION,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def stop(self):
        harness.stop_process(self.proc, 5)
        self.log.close()
