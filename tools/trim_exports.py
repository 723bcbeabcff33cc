#!/usr/bin/env python3
"""Keep only the named exports of a wasm module (the rest become dead code for wasm-opt to drop).

proxy-wasm-cpp-host calls a stream callback only when the module exports it; the Rust SDK exports
every callback, so each request would pay a VM entry for on_log, on_response_body and the rest.
Usage: trim_exports.py IN OUT NAME... (a NAME ending in * keeps every export with that prefix)."""
import sys


def leb(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def uleb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def kept(name, keep):
    return any(name == k or (k.endswith("*") and name.startswith(k[:-1])) for k in keep)


def trim(data, keep, names=None):
    if data[:8] != b"\0asm\x01\0\0\0":
        raise SystemExit("trim_exports: not a wasm module")
    out, i = bytearray(data[:8]), 8
    names = [] if names is None else names
    while i < len(data):
        sid = data[i]
        size, body = leb(data, i + 1)
        end = body + size
        if sid == 7:
            count, j = leb(data, body)
            entries = []
            for _ in range(count):
                start = j
                length, j = leb(data, j)
                name = data[j:j + length].decode()
                j += length + 1
                _, j = leb(data, j)
                names.append(name)
                if kept(name, keep):
                    entries.append(data[start:j])
            section = uleb(len(entries)) + b"".join(entries)
            out += bytes([7]) + uleb(len(section)) + section
        else:
            out += data[i:end]
        i = end
    missing = [k for k in keep if not any(kept(n, [k]) for n in names)]
    if missing:
        raise SystemExit(f"trim_exports: the module does not export {', '.join(missing)}")
    return bytes(out)


def export_names(data):
    """The names a wasm module exports, in order."""
    names = []
    trim(data, [], names)
    return names


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    src, dst, keep = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(trim(data, keep))
