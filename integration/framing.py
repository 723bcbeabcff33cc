"""Requests in every framing a client can choose, sent byte for byte: HTTP/1.1 with a length,
chunked, chunked with trailers, a client that leaves mid-body; HTTP/2 (cleartext, prior knowledge)
with DATA frames, with trailers, headers only, and a reset mid-body. Each returns
`Answer(status, headers, body)`, or None when the client left on purpose."""
import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class Answer:
    status_code: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        import json
        return json.loads(self.body)


H1 = ["length", "chunked", "trailers", "h1-reset"]
H2 = ["h2-data", "h2-trailers", "h2-reset"]
# Every framing of a request with a body, and whether the client stays to hear the answer.
WITH_BODY = ["length", "chunked", "trailers", "h2-data", "h2-trailers"]
RESETS = ["h1-reset", "h2-reset"]


def send(port: int, framing: str, method: str, path: str, headers: dict, body: bytes, timeout=10.0, burst=False):
    """Send one request in `framing` (one of H1, H2, or "h1-empty"/"h2-empty": headers that end
    the request). `burst`: every byte of the request in one write (headers, body and trailers
    arrive together), instead of the body in separate pieces."""
    if framing.startswith("h2"):
        return _h2(port, framing, method, path, headers, body, timeout, burst)
    return _h1(port, framing, method, path, headers, body, timeout, burst)


def _pieces(body: bytes, n=3):
    """`body` in up to `n` pieces (separate writes: separate chunks or DATA frames)."""
    if not body:
        return [b""]
    step = max(1, -(-len(body) // n))
    return [body[i:i + step] for i in range(0, len(body), step)]


class _Batch:
    """A socket whose writes are held and sent in one piece at `flush`."""

    def __init__(self, s):
        self.s, self.out = s, b""

    def sendall(self, b):
        self.out += b

    def flush(self):
        self.s.sendall(self.out)
        self.out = b""


def _h1(port, framing, method, path, headers, body, timeout, burst=False):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s = _Batch(raw) if burst else raw
    try:
        head = [f"{method} {path} HTTP/1.1", "Host: gateway.test", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if framing in ("length", "h1-empty"):
            head.append(f"Content-Length: {len(body) if framing == 'length' else 0}")
        else:
            head.append("Transfer-Encoding: chunked")
            if framing == "trailers":
                head.append("Trailer: x-checksum")
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if framing == "length":
            try:
                for p in _pieces(body):
                    s.sendall(p)
                    time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered before the body was all sent: read the answer
        elif framing in ("chunked", "trailers", "h1-reset"):
            pieces = _pieces(body)
            if framing == "h1-reset":
                # Half the body, then the client goes away.
                s.sendall(f"{len(pieces[0]):x}\r\n".encode() + pieces[0] + b"\r\n")
                time.sleep(0.2)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return None
            for p in pieces:
                if p:
                    s.sendall(f"{len(p):x}\r\n".encode() + p + b"\r\n")
                    time.sleep(0.01)
            s.sendall(b"0\r\n" + (b"x-checksum: 0\r\n" if framing == "trailers" else b"") + b"\r\n")
        if burst:
            s.flush()
        return _read_h1(raw)
    finally:
        raw.close()


def _read_h1(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"no answer: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hs[k.strip().lower()] = v.strip()
    n = int(hs.get("content-length", "0") or 0)
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Answer(status, hs, rest[:n])


def _h2(port, framing, method, path, headers, body, timeout, burst=False):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s = _Batch(raw) if burst else raw
    try:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        hs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "gateway.test")]
        hs += [(k.lower(), str(v)) for k, v in headers.items()]
        empty = framing == "h2-empty"
        conn.send_headers(sid, hs, end_stream=empty)
        s.sendall(conn.data_to_send())
        if not empty:
            pieces = _pieces(body)
            if framing == "h2-reset":
                conn.send_data(sid, pieces[0], end_stream=False)
                s.sendall(conn.data_to_send())
                time.sleep(0.2)
                conn.reset_stream(sid)
                s.sendall(conn.data_to_send())
                time.sleep(0.1)
                return None
            for i, p in enumerate(pieces):
                last = i == len(pieces) - 1 and framing == "h2-data"
                conn.send_data(sid, p, end_stream=last)
                s.sendall(conn.data_to_send())
                time.sleep(0.01)
            if framing == "h2-trailers":
                conn.send_headers(sid, [("x-checksum", "0")], end_stream=True)
                s.sendall(conn.data_to_send())
        if burst:
            s.flush()
        s = raw
        status, rh, rb = None, {}, b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    rh = {k: v for k, v in ev.headers}
                    status = int(rh.get(":status", "0"))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    rb += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    return Answer(status or 0, rh, rb)
            out = conn.data_to_send()
            if out:
                s.sendall(out)
        raise ConnectionError(f"no complete answer on stream {sid} (status {status})")
    finally:
        raw.close()
