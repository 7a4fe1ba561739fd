"""Profile records -> pprof (profile.proto, gzipped) and folded stacks.

pprof is written with a small protobuf wire encoder (the schema has no
Python package here); `go tool pprof` and Pyroscope read the result.
"""
from __future__ import annotations

import gzip

from .profiles_otlp import KERNEL_MAPPING


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v) if v else b""


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _packed(num: int, values) -> bytes:
    values = list(values)
    return _field_bytes(num, b"".join(_varint(v) for v in values)) if values else b""


class _Tables:
    def __init__(self):
        self.strings = {"": 0}
        self.functions: dict = {}
        self.mappings: dict = {}
        self.locations: dict = {}

    def s(self, text: str) -> int:
        return self.strings.setdefault(text, len(self.strings))


def to_pprof(profiles: list) -> bytes:
    """One pprof profile (gzipped) merging the given records."""
    t = _Tables()
    samples = []
    for prof in profiles:
        for smp in prof.samples:
            loc_ids = []
            for f in smp.frames:
                if f.kernel:
                    mkey, mapping = KERNEL_MAPPING, None
                elif f.mapping is not None:
                    mkey, mapping = (f.mapping.start, f.mapping.path), f.mapping
                else:
                    mkey, mapping = None, None
                mid = 0
                if mkey is not None:
                    mid = t.mappings.setdefault(mkey, (len(t.mappings) + 1, mapping))[0]
                fid = 0
                if f.function:
                    fid = t.functions.setdefault((f.function, f.file or ""), len(t.functions) + 1)
                # an interpreted frame has no machine address: its location
                # is its function and line
                addr = 0 if f.frame_type else f.address
                loc_ids.append(t.locations.setdefault((mid, addr, fid, f.line), len(t.locations) + 1))
            labels = b"".join(_field_bytes(3, _field_varint(1, t.s(k)) + (
                _field_varint(3, v) if isinstance(v, int) else _field_varint(2, t.s(str(v)))))
                for k, v in sorted(_labels(smp).items()))
            samples.append(_packed(1, loc_ids) + _packed(2, [smp.count]) + labels)
    first = profiles[0] if profiles else None
    out = bytearray()
    st_type, st_unit = (first.sample_type if first else ("samples", "count"))
    out += _field_bytes(1, _field_varint(1, t.s(st_type)) + _field_varint(2, t.s(st_unit)))
    for smp in samples:
        out += _field_bytes(2, smp)
    for key, (mid, m) in t.mappings.items():
        if m is None:
            body = _field_varint(1, mid) + _field_varint(5, t.s(KERNEL_MAPPING))
        else:
            body = (_field_varint(1, mid) + _field_varint(2, m.start) + _field_varint(3, m.end) +
                    _field_varint(4, m.file_offset) + _field_varint(5, t.s(m.path)) +
                    _field_varint(6, t.s(m.build_id or "")))
        out += _field_bytes(3, body)
    for (mid, addr, fid, line), lid in t.locations.items():
        body = _field_varint(1, lid) + _field_varint(2, mid) + _field_varint(3, addr)
        if fid:
            body += _field_bytes(4, _field_varint(1, fid) + _field_varint(2, line))
        out += _field_bytes(4, body)
    for (name, filename), fid in t.functions.items():
        out += _field_bytes(5, _field_varint(1, fid) + _field_varint(2, t.s(name)) + _field_varint(3, t.s(name)) +
                            _field_varint(4, t.s(filename)))
    pt_type, pt_unit = (first.period_type if first else ("cpu", "nanoseconds"))
    period_type = _field_varint(1, t.s(pt_type)) + _field_varint(2, t.s(pt_unit))
    for text in sorted(t.strings, key=t.strings.get):  # string_table after every s() call
        out += _field_bytes(6, text.encode())
    if first:
        out += _field_varint(9, first.start_time_ns)
        out += _field_varint(10, sum(p.duration_ns for p in profiles))
        out += _field_bytes(11, period_type)
        out += _field_varint(12, first.period_ns)
    return gzip.compress(bytes(out))


def _labels(smp) -> dict:
    """A sample's attributes, and its request's ids as the hex string labels
    Pyroscope and Grafana join span profiles on (a number label would lose
    a 128-bit trace id)."""
    if smp.link is None:
        return smp.attributes
    trace_id, span_id = smp.link
    return {**smp.attributes, "trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"}


def to_folded(profiles: list, root_attribute: str = "process.executable.name") -> str:
    """flamegraph.pl / speedscope input: 'root;caller;...;leaf count' lines."""
    merged: dict = {}
    for prof in profiles:
        for smp in prof.samples:
            names = [_frame_name(f) for f in reversed(smp.frames)]
            line = ";".join([str(smp.attributes.get(root_attribute, "?"))] + names)
            merged[line] = merged.get(line, 0) + smp.count
    return "".join(f"{k} {v}\n" for k, v in sorted(merged.items()))


def _frame_name(f) -> str:
    return frame_label(f) + ("_[k]" if f.kernel and f.function else "")


def frame_label(f) -> str:
    """A frame's display name: its function, else binary+file offset, else the address."""
    if f.function:
        return f.function
    if f.mapping is not None:
        return f"{f.mapping.path.rsplit('/', 1)[-1]}+0x{f.address - f.mapping.start + f.mapping.file_offset:x}"
    return f"0x{f.address:x}"
