#!/usr/bin/env python3
"""A model vendor for `make run` and the tests: OpenAI-compatible chat/completions and responses,
and Anthropic messages, answered as JSON or as server-sent events with realistic usage.

Token counts are what a tokenizer would give for English (about four bytes a token, a few more
per message for the chat format); the answer is `max_tokens` long unless `x-test-output-tokens`
says less. `x-test-vendor` picks a misbehaviour: `cut` (the answer stops half way, the connection
closes), `nousage` (no usage anywhere), `error` (500 without usage), `gzip` (compressed whatever
the request accepts), `slow` (each event a little later). Usage: model_vendor.py [PORT]
(listens on 127.0.0.1 only).
"""
import gzip
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def text_tokens(value) -> int:
    """Tokens of every string in a message's content (about four bytes each)."""
    if isinstance(value, str):
        return math.ceil(len(value.encode()) / 4)
    if isinstance(value, list):
        return sum(text_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(text_tokens(v) for k, v in value.items() if k not in ("type", "role"))
    return 0


def input_tokens(req: dict) -> int:
    msgs = req.get("messages") or req.get("input") or req.get("prompt") or []
    if isinstance(msgs, str):
        return text_tokens(msgs) + 3
    return sum(text_tokens(m) + 4 for m in msgs) + text_tokens(req.get("system") or "") + 3


def output_tokens(req: dict, headers) -> int:
    limit = req.get("max_completion_tokens") or req.get("max_output_tokens") or req.get("max_tokens") or 16
    wanted = int(headers.get("x-test-output-tokens") or limit)
    return max(1, min(limit, wanted))


def finish(req: dict, out: int) -> str:
    """`length` when the answer stopped at the call's limit, `stop` when it ended by itself."""
    limit = req.get("max_completion_tokens") or req.get("max_output_tokens") or req.get("max_tokens") or 16
    return "length" if out >= limit else "stop"


def words(n: int) -> list:
    return [("Hello" if i == 0 else " there") for i in range(n)]


def openai_usage(inp: int, out: int, responses: bool) -> dict:
    if responses:
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def json_answer(path: str, req: dict, inp: int, out: int, usage: bool) -> dict:
    model, text = req.get("model"), "".join(words(out))
    if path.endswith("/messages"):
        a = {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
             "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens" if finish(req, out) == "length" else "end_turn",
             "stop_sequence": None,
             "usage": {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
    elif path.endswith("/responses"):
        a = {"id": "resp_demo", "object": "response", "created_at": int(time.time()), "status": "completed", "model": model,
             "output": [{"type": "message", "id": "msg_demo", "status": "completed", "role": "assistant",
                         "content": [{"type": "output_text", "text": text, "annotations": []}]}],
             "usage": openai_usage(inp, out, True)}
    else:
        a = {"id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(req, out)}],
             "usage": openai_usage(inp, out, False)}
    if not usage:
        a.pop("usage", None)
    return a


def sse_events(path: str, req: dict, inp: int, out: int, usage: bool):
    """The stream's events, as (event name or None, data) pairs."""
    model = req.get("model")
    if path.endswith("/messages"):
        u0 = {"input_tokens": inp, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        yield "message_start", {"type": "message_start", "message": {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
                                                                     "content": [], "stop_reason": None, "stop_sequence": None, "usage": u0}}
        yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        for w in words(out):
            yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                "usage": {"output_tokens": out} if usage else {}}
        yield "message_stop", {"type": "message_stop"}
    elif path.endswith("/responses"):
        base = {"id": "resp_demo", "object": "response", "created_at": int(time.time()), "model": model, "output": [], "usage": None}
        item = {"type": "message", "id": "msg_demo", "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        yield "response.created", {"type": "response.created", "sequence_number": 0, "response": dict(base, status="in_progress")}
        yield "response.output_item.added", {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item}
        yield "response.content_part.added", {"type": "response.content_part.added", "sequence_number": 2, "item_id": "msg_demo",
                                              "output_index": 0, "content_index": 0, "part": part}
        for i, w in enumerate(words(out)):
            yield "response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": i + 3, "item_id": "msg_demo",
                                                 "output_index": 0, "content_index": 0, "delta": w}
        text = "".join(words(out))
        yield "response.output_text.done", {"type": "response.output_text.done", "sequence_number": out + 3, "item_id": "msg_demo",
                                            "output_index": 0, "content_index": 0, "text": text}
        done_item = dict(item, status="completed", content=[dict(part, text=text)])
        yield "response.output_item.done", {"type": "response.output_item.done", "sequence_number": out + 4, "output_index": 0, "item": done_item}
        done = dict(base, status="completed", output=[done_item], usage=openai_usage(inp, out, True) if usage else None)
        yield "response.completed", {"type": "response.completed", "sequence_number": out + 5, "response": done}
    else:
        chunk = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        asked = bool((req.get("stream_options") or {}).get("include_usage"))
        for w in words(out):
            yield None, dict(chunk, choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}], **({"usage": None} if asked else {}))
        yield None, dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": finish(req, out)}], **({"usage": None} if asked else {}))
        if asked and usage:
            yield None, dict(chunk, choices=[], usage=openai_usage(inp, out, False))
        yield None, "[DONE]"


class ModelHandler(BaseHTTPRequestHandler):
    """Answers model calls; anything else gets a small JSON echo. `server.record` (if set) is
    called with each request as (method, path, headers, body)."""
    protocol_version = "HTTP/1.1"
    # Whole answers also say what the vendor received (the demo shows the injected key).
    echo_fields = False

    def handle_any(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        record = getattr(self.server, "record", None)
        if record:
            record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        path = self.path.split("?", 1)[0]
        if self.command != "POST" or not path.endswith(MODEL_PATHS):
            return self.echo(body)
        try:
            req = json.loads(body)
        except ValueError:
            return self.send_json(400, {"error": {"type": "invalid_request_error", "message": "the body is not JSON"}})
        how = (self.headers.get("x-test-vendor") or "").lower()
        if how == "error":
            return self.send_json(500, {"error": {"type": "server_error", "message": "the model is overloaded"}})
        inp, out = input_tokens(req), output_tokens(req, self.headers)
        usage = how != "nousage"
        if req.get("stream"):
            return self.send_stream(path, req, inp, out, usage, how)
        a = json_answer(path, req, inp, out, usage)
        if self.echo_fields:
            a.update({"vendor": "keyward-demo-vendor", "method": self.command, "path": self.path,
                      "headers": {k.lower(): v for k, v in self.headers.items()}, "body_bytes": len(body)})
        answer = json.dumps(a).encode()
        if how == "cut":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_json(200, answer, gzip_it=how == "gzip")

    def echo(self, body: bytes):
        """Anything but a model call: what was received, as JSON."""
        self.send_json(200, {"vendor": "keyward-model-vendor", "method": self.command, "path": self.path,
                             "headers": {k.lower(): v for k, v in self.headers.items()}, "body_bytes": len(body)})

    def send_json(self, status: int, payload, gzip_it=False):
        out = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if gzip_it:
            out = gzip.compress(out)
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def send_stream(self, path, req, inp, out, usage, how):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = list(sse_events(path, req, inp, out, usage))
        if how == "cut":
            events = events[: max(1, len(events) // 2)]
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            frame = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
            raw = frame.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
            if how == "slow":
                time.sleep(0.05)
        if how == "cut":
            # Gone without the last chunk: the vendor's connection dropped mid-answer.
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: several gateways opening connections at once
    # would have SYNs dropped and retried after 1 s, Envoy's connect timeout to the vendor.
    request_queue_size = 128


def serve(port: int, record=None) -> ThreadingHTTPServer:
    """Start the vendor on 127.0.0.1:`port` in a daemon thread (the tests' way)."""
    srv = Server(("127.0.0.1", port), ModelHandler)
    srv.daemon_threads = True
    srv.record = record
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8082
    Server(("127.0.0.1", port), ModelHandler).serve_forever()


if __name__ == "__main__":
    main()
