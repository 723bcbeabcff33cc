"""A gRPC rate-limit service for Envoy's global rate-limit filter, with envoyproxy/ratelimit's
semantics, for integration/test_global_ratelimit.py: `envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit`, limits read from an envoyproxy/ratelimit config file (deploy/ratelimit/config.yaml),
fixed windows per unit, a counter per distinct descriptor. In-memory instead of Redis: one
instance here stands for the shared store a fleet of gateways uses. The protobuf messages are
encoded by hand (the few fields Envoy sends and reads), to need no generated code."""
import threading
import time
from concurrent import futures

import grpc
import yaml

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
UNIT_ENUM = {"second": 1, "minute": 2, "hour": 3, "day": 4}
OK, OVER_LIMIT = 1, 2


def _varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"wire type {wt}")
        yield num, v


def _enc_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num, v):
    if isinstance(v, int):
        return _enc_varint(num << 3) + _enc_varint(v)
    return _enc_varint(num << 3 | 2) + _enc_varint(len(v)) + v


def decode_request(buf):
    """RateLimitRequest -> (domain, [[(key, value), ...], ...], hits_addend)."""
    domain, descriptors, hits = "", [], 0
    for num, v in _fields(buf):
        if num == 1:
            domain = v.decode()
        elif num == 2:
            entries = []
            for dn, dv in _fields(v):
                if dn == 1:
                    e = dict(_fields(dv))
                    entries.append((e.get(1, b"").decode(), e.get(2, b"").decode()))
            descriptors.append(entries)
        elif num == 3:
            hits = v
    return domain, descriptors, hits or 1


def encode_response(overall, statuses):
    """statuses: [(code, (requests_per_unit, unit) or None, remaining)]."""
    out = _field(1, overall)
    for code, limit, remaining in statuses:
        st = _field(1, code)
        if limit:
            st += _field(2, _field(1, limit[0]) + _field(2, UNIT_ENUM[limit[1]]))
            st += _field(3, remaining)
        out += _field(2, st)
    return out


class RateLimitService:
    def __init__(self, config_path, port):
        self.config = yaml.safe_load(open(config_path))
        self.port = port
        self.lock = threading.Lock()
        self.counts = {}
        self.seen = []  # every descriptor asked about, in order
        self.down = False
        self.server = None

    def limit_for(self, entries):
        """The rate_limit that applies to a descriptor, as envoyproxy/ratelimit finds it."""
        nodes = self.config.get("descriptors", [])
        found = None
        for key, value in entries:
            exact = [n for n in nodes if n["key"] == key and n.get("value") == value]
            wild = [n for n in nodes if n["key"] == key and "value" not in n]
            node = (exact or wild or [None])[0]
            if node is None:
                return None
            found = node
            nodes = node.get("descriptors", [])
        return found.get("rate_limit") if found else None

    def should_rate_limit(self, raw, context):
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        domain, descriptors, hits = decode_request(raw)
        overall, statuses = OK, []
        now = time.time()
        with self.lock:
            for entries in descriptors:
                self.seen.append((domain, tuple(entries)))
                rl = self.limit_for(entries) if domain == self.config["domain"] else None
                if rl is None:
                    statuses.append((OK, None, 0))
                    continue
                window = int(now // UNITS[rl["unit"]])
                key = (domain, tuple(entries), window)
                self.counts[key] = self.counts.get(key, 0) + hits
                n, cap = self.counts[key], rl["requests_per_unit"]
                code = OK if n <= cap else OVER_LIMIT
                overall = max(overall, code)
                statuses.append((code, (cap, rl["unit"]), max(cap - n, 0)))
        return encode_response(overall, statuses)

    def start(self):
        handler = grpc.method_handlers_generic_handler("envoy.service.ratelimit.v3.RateLimitService", {
            "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(self.should_rate_limit),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self):
        if self.server:
            self.server.stop(0)
