"""Real components for the integration tests: OpenBao (dev server), a recording vendor, Envoy
running dist/keyward.wasm. Every server listens on 127.0.0.1 on a free port."""
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

import executor

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
WASM = ROOT / "dist" / "keyward.wasm"
CLI = ROOT / "target" / "release" / "keyward"

# Every secret value and every token the tests create, for the leak checks.
SECRETS: set = set()
# Every server a test starts, so that none outlives the session (conftest kills leftovers, e.g.
# when a fixture failed halfway through starting its components).
SPAWNED: list = []
TOKENS: set = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace=10.0):
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# The filter hands its counters to Envoy on the root's tick (200 ms): a read of Envoy's stats waits
# one tick and a little more, so it sees everything counted before it was asked.
COUNTER_FLUSH_S = 0.25


def flush_wait():
    time.sleep(COUNTER_FLUSH_S)


def wait_until(fn, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout}s ({last})")


def fake_secret(prefix: str) -> str:
    """Obviously fake, unique per run, so a leak check cannot be fooled by a coincidence."""
    v = f"{prefix}_kwtest_{secrets.token_hex(12)}"
    SECRETS.add(v)
    return v


# ------------------------------------------------------------------ tokens (independent minter)

def b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint(key: bytes, claims: dict | str, kid="k1", header: dict | str | None = None) -> str:
    """An HS256 JWT minted in Python, independently of the Rust code under test."""
    if header is None:
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    c = claims if isinstance(claims, str) else json.dumps(claims, separators=(",", ":"))
    signing_input = f"{b64u(h.encode())}.{b64u(c.encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    tok = f"{signing_input}.{b64u(sig)}"
    TOKENS.add(tok)
    return tok


def claims(allow, sub="lambda/it", ttl=300, **extra) -> dict:
    now = int(time.time())
    c = {"sub": sub, "aud": "keyward", "iss": "https://issuer.test", "iat": now, "exp": now + ttl,
         "jti": "jti-" + secrets.token_hex(6), "allow": list(allow)}
    c.update(extra)
    return c


# ------------------------------------------------------------------ the recording vendor

def send_json(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers=()):
    handler.send_response(status)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def read_chunked(rfile):
    """A chunked HTTP/1.1 body and its trailers, read from `rfile`: (body, [(name, value)])."""
    body = b""
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        body += rfile.read(size)
        rfile.readline()
    trailers = []
    while True:
        line = rfile.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        trailers.append((k.strip().lower(), v.strip()))
    return body, trailers


class Vendor:
    """A vendor that records every request it receives and answers 200 with a small JSON body."""

    def __init__(self):
        self.port = free_port()
        self.requests = []
        self.history = []  # every request ever received (the leak check reads it)
        self.lock = threading.Lock()
        # When set, requests whose Authorization is not one of these get 401 (a rotated key).
        self.valid_authorizations = None
        self.slow_s = 3.0
        vendor = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                trailers = []
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    body, trailers = read_chunked(self.rfile)
                else:
                    n = int(self.headers.get("content-length") or 0)
                    body = self.rfile.read(n) if n else b""
                rec = {"method": self.command, "path": self.path,
                       "headers": [(k.lower(), v) for k, v in self.headers.items()], "body": body, "trailers": trailers}
                with vendor.lock:
                    vendor.requests.append(rec)
                    vendor.history.append(rec)
                valid = vendor.valid_authorizations
                if "/slow" in self.path:
                    # A slow vendor (an LLM writing a long answer): answers after `vendor.slow_s`.
                    time.sleep(vendor.slow_s)
                if "/reflect" in self.path:
                    # A careless vendor: echoes the credential it got in headers and a redirect.
                    query = self.path.split("?", 1)[1] if "?" in self.path else ""
                    cred = (self.headers.get("authorization") or self.headers.get("x-api-key") or "").encode()
                    key = cred.decode(errors="replace").split(" ")[-1]
                    named = [(f"x-echo-{key}", "1")] if key and key.replace("_", "").isalnum() else []
                    echo = [("x-echo-authorization", self.headers.get("authorization") or ""),
                            ("x-echo-api-key", self.headers.get("x-api-key") or ""),
                            # URL-encoded as some vendors do: every byte in lower-case hex, or every other one.
                            ("x-echo-lower-hex", "".join(f"%{b:02x}" for b in cred)),
                            ("x-echo-partial", "".join(f"%{b:02x}" if i % 2 else chr(b) for i, b in enumerate(cred))),
                            # A hex dump of what it got (a debug header), in either case.
                            ("x-echo-hex", (cred or query.encode()).hex()),
                            ("x-echo-hex-upper", (cred or query.encode()).hex().upper()),
                            ("x-echo-base64", base64.b64encode(cred or query.encode()).decode()),
                            ("x-echo-query", query),
                            # The key as a header's name (a vendor that names a debug header after it).
                            *named,
                            ("location", f"https://vendor.test/callback?{query}"),
                            ("x-harmless", "kept")]
                    send_json(self, 302, b'{"vendor":"redirect"}', [(k, v) for k, v in echo if v])
                elif self.headers.get("x-test-status", "").isdigit():
                    # A vendor answering with the status a test asks for (a card declined: 402).
                    send_json(self, int(self.headers["x-test-status"]), b'{"vendor":"as asked"}')
                elif valid is not None and self.headers.get("authorization") not in valid:
                    send_json(self, 401, b'{"error":"invalid api key"}')
                else:
                    send_json(self, 200, b'{"vendor":"ok"}')

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self):
        with self.lock:
            r, self.requests = self.requests, []
        return r

    def stop(self):
        self.server.shutdown()


def header_values(req, name):
    return [v for k, v in req["headers"] if k == name]


class Hang:
    """A store that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def stop(self):
        self.sock.close()
        for c in self.conns:
            c.close()


class Relay:
    """A relay in front of a real server (OpenBao), so that a test can make the store fail on
    demand: `mode` is "pass" (forward), "slow" (forward after `delay` seconds), "error" (answer 500),
    "garbage" (200 with a body that is not a store answer) or "canned" (answer `canned`: a status
    and a body)."""

    def __init__(self, upstream: str):
        self.port = free_port()
        self.mode = "pass"
        self.served = {"pass": 0, "error": 0, "garbage": 0, "hang": 0, "slow": 0, "canned": 0}
        self.delay = 0.8  # seconds, in "slow" mode
        self.canned = (404, b"")  # status and body, in "canned" mode
        self.paths = []  # every request path, in order
        self.headers = []  # every request's headers (lower-case names), in order
        self.lock = threading.Lock()
        relay = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                mode = relay.mode
                with relay.lock:
                    relay.served[mode] += 1
                    relay.paths.append(self.path)
                    relay.headers.append({k.lower(): v for k, v in self.headers.items()})
                if mode == "hang":
                    time.sleep(5)
                    return
                if mode == "slow":
                    time.sleep(relay.delay)
                if mode in ("pass", "slow"):
                    hop = {"host", "connection", "content-length", "transfer-encoding"}
                    try:
                        r = requests.request(self.command, upstream + self.path, data=body, timeout=5,
                                             headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
                        status, out = r.status_code, r.content
                    except requests.RequestException:
                        status, out = 502, b'{"errors":["upstream unreachable"]}'

                elif mode == "canned":
                    status, out = relay.canned
                elif mode == "error":
                    status, out = 500, b'{"errors":["injected failure"]}'
                else:
                    status, out = 200, b"<html>captive portal</html>"
                send_json(self, status, out)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @contextlib.contextmanager
    def failing(self, mode: str):
        """Fail in `mode` ("error", "garbage" or "hang") inside the block, then pass again."""
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "pass"

    def count(self, suffix: str) -> int:
        with self.lock:
            return sum(1 for p in self.paths if p.endswith(suffix))

    def stop(self):
        self.server.shutdown()


# ------------------------------------------------------------------ OpenBao

class Bao:
    def __init__(self, workdir: Path, name="bao"):
        self.port = free_port()
        self.token = "it-root-" + secrets.token_hex(8)
        SECRETS.add(self.token)
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"{name}.log", "ab")
        self.start()

    def start(self):
        """Start (or restart, on the same port and root token) the dev server. Dev mode keeps
        nothing across a restart: the caller seeds it again."""
        self.proc = subprocess.Popen(
            [str(BIN / "bao"), "server", "-dev", f"-dev-root-token-id={self.token}",
             f"-dev-listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        SPAWNED.append(self.proc)
        wait_until(lambda: requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code == 200,
                   what="OpenBao ready")

    def put(self, path: str, data: dict):
        r = requests.post(f"{self.addr}/v1/secret/data/{path}", json={"data": data},
                          headers={"X-Vault-Token": self.token}, timeout=5)
        r.raise_for_status()

    def delete(self, path: str):
        requests.delete(f"{self.addr}/v1/secret/data/{path}", headers={"X-Vault-Token": self.token},
                        timeout=5).raise_for_status()

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        stop_process(self.proc, 5)
        self.log.close()


# ------------------------------------------------------------------ Envoy

class Envoy:
    def __init__(self, workdir: Path, bootstrap: dict, env: dict, name="envoy", concurrency=2):
        self.workdir = workdir
        self.admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        bootstrap, env = executor.prepare(bootstrap, env)
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env)
        self.proc = subprocess.Popen(
            # Access logs are written out every 200 ms (Envoy's default is 10 s): a test reads its
            # request's line soon after the answer.
            [str(BIN / "envoy"), "-c", str(self.config_path), "--concurrency", str(concurrency), "--file-flush-interval-msec", "200",
             "--log-level", os.environ.get("KEYWARD_IT_ENVOY_LOG", "info"), "--base-id", str(free_port())],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True)
        SPAWNED.append(self.proc)
        deadline = time.time() + 60
        while not self.ready():
            if time.time() > deadline:
                raise TimeoutError(f"Envoy not ready in 60 s: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def ready(self):
        """`False` until Envoy is ready; an Envoy that exited raises at once (a refused
        configuration is reported, not waited for)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"Envoy exited: {self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{self.admin}/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stats(self) -> dict:
        flush_wait()
        text = requests.get(f"http://127.0.0.1:{self.admin}/stats", timeout=5).text
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k] = int(v)
        return executor.stat_names(out)

    def prometheus(self) -> str:
        flush_wait()
        return requests.get(f"http://127.0.0.1:{self.admin}/stats/prometheus", timeout=5).text

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def validate(workdir: Path, bootstrap: dict, env: dict, name="validate"):
    """`envoy --mode validate`: (exit code, log text)."""
    bootstrap, env = executor.prepare(bootstrap, env)
    p = workdir / f"{name}.json"
    p.write_text(json.dumps(bootstrap))
    full_env = dict(os.environ)
    full_env.update(env)
    r = subprocess.run([str(BIN / "envoy"), "--mode", "validate", "-c", str(p), "--log-level", "info"],
                       capture_output=True, env=full_env, cwd=ROOT, timeout=120)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def start_local(*args):
    """scripts/run-local.sh with `args`, until it prints the demo credential: (process, token, output).
    The process leads its own session: stop it with os.killpg(proc.pid, SIGTERM)."""
    import re
    import signal
    # As from a terminal: Ctrl-C's signal is not ignored (a shell that starts a job in the
    # background, or a CI runner, may have left SIGINT ignored, which no script can undo).
    # With Envoy, the script runs the suite's executor (make run KEYWARD_EXECUTOR=...); without
    # (func-e runs Envoy), the wasm filter.
    env = dict(os.environ)
    if "--no-envoy" in args:
        env.pop("KEYWARD_EXECUTOR", None)
    proc = subprocess.Popen([str(ROOT / "scripts" / "run-local.sh"), *args], cwd=ROOT, stdout=subprocess.PIPE, env=env,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, token = [], None
    deadline = time.time() + 90
    while time.time() < deadline and token is None:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        m = re.search(r"export KEYWARD_TOKEN='([^']+)'", line)
        if m:
            token = m.group(1)
    if token is None:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError("run-local.sh did not come up:\n" + "".join(out))
    TOKENS.add(token)
    return proc, token, "".join(out)


def cli(*args, env=None, stdin=None):
    # The AWS credential chain never probes the instance metadata address here (forbidden).
    full_env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    full_env.update(env or {})
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, env=full_env, input=stdin, timeout=30)
