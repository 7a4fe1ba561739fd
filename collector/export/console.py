"""The live terminal view: per instrument, the busiest series of the last
interval, with rates and latency percentiles read off the log2 buckets.
Knows no probe: it renders whatever records arrive."""
from __future__ import annotations

import sys
import time

from ..records import Counter, Gauge, Log2Histogram

_HIDDEN_ATTRS = ("otelbpf.probe",)


def _fmt_duration(v: float, unit: str) -> str:
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}.get(unit)
    if scale is None:
        return f"{v:.0f}{unit}"
    s = v * scale
    for limit, div, suffix in ((1e-6, 1e-9, "ns"), (1e-3, 1e-6, "us"), (1.0, 1e-3, "ms")):
        if s < limit:
            return f"{s / div:.0f}{suffix}"
    return f"{s:.2f}s"


def quantile_upper_bound(buckets: list, q: float, exp_offset: int = 0) -> float:
    """Upper bound (2^(i+exp_offset)) of the bucket holding the q-quantile."""
    total = sum(buckets)
    if not total:
        return 0.0
    target, seen = q * total, 0
    for i, c in enumerate(buckets):
        seen += c
        if seen >= target:
            return float(2.0 ** (i + exp_offset))
    return float(2.0 ** (len(buckets) - 1 + exp_offset))


NO_REQUEST = "(no request)"   # CPU samples taken while the thread served no request


def request_of(attributes: dict):
    """(method, route) of the request a profile sample's thread was serving,
    or None outside any request."""
    route = attributes.get("http.route")
    return (str(attributes.get("http.request.method") or "-"), str(route)) if route else None


_SHORT_NAMES = {"syscall.name": "syscall", "process.executable.name": "exe", "process.pid": "pid"}


def _label(attrs: dict) -> str:
    return " ".join(f"{_SHORT_NAMES.get(k, k)}={v}" for k, v in attrs.items() if k not in _HIDDEN_ATTRS) or "-"


class ConsoleExporter:
    name = "console"

    def __init__(self, cfg: dict, out=None):
        self.out = out or sys.stdout
        self.top = cfg["top"]
        self.clear = cfg["clear"] if cfg["clear"] is not None else self.out.isatty()
        self._prev: dict = {}
        self._prev_time = None

    def export(self, batch) -> bool:
        self.out.write(self.render(batch))
        self.out.flush()
        return True

    def render(self, batch) -> str:
        now = batch.time_ns
        dt = (now - self._prev_time) / 1e9 if self._prev_time else None
        self._prev_time = now
        lines = []
        if self.clear:
            lines.append("\x1b[H\x1b[2J")
        lines.append(f"otelbpf  {time.strftime('%H:%M:%S', time.localtime(now / 1e9))}"
                     + (f"  (last {dt:.1f}s)" if dt else ""))
        for scope, records in batch.metrics.items():
            by_inst: dict = {}
            for r in records:
                by_inst.setdefault(r.instrument, []).append(r)
            for inst, rs in by_inst.items():
                lines.extend(self._section(scope, inst, rs, dt))
        for scope, profiles in batch.profiles.items():
            lines.extend(self._profile_section(scope, profiles))
        lines.append("")
        return "\n".join(lines) + "\n"

    def _delta(self, inst, attrs: dict, value: float) -> float:
        key = (inst.name, tuple(sorted(attrs.items())))
        prev = self._prev.get(key, 0)
        self._prev[key] = value
        return value - prev

    def _section(self, scope, inst, rs, dt) -> list:
        first = rs[0]
        if isinstance(first, Log2Histogram):
            rows = []
            for r in rs:
                d = self._delta(inst, r.attributes, r.count)
                rows.append((d, r))
            rows = [x for x in rows if x[0] > 0]
            if not rows:
                return []
            rows.sort(key=lambda x: x[0], reverse=True)
            out = [f"\n{inst.name}  [{scope}]", f"  {'/s' if dt else 'new':>9} {'total':>10} {'p50<=':>7} "
                   f"{'p99<=':>7}  series"]
            for d, r in rows[:self.top]:
                rate = f"{d / dt:9.1f}" if dt else f"{d:9d}"
                out.append(f"  {rate} {r.count:10d} {_fmt_duration(quantile_upper_bound(r.buckets, .5, r.exp_offset), inst.unit):>7} "
                           f"{_fmt_duration(quantile_upper_bound(r.buckets, .99, r.exp_offset), inst.unit):>7}  {_label(r.attributes)}")
            if len(rows) > self.top:
                out.append(f"  ... {len(rows) - self.top} more series")
            return out
        if isinstance(first, Counter):
            rows = [(self._delta(inst, r.attributes, r.value), r) for r in rs]
            rows = [x for x in rows if x[1].value]
            if not rows:
                return []
            rows.sort(key=lambda x: (x[0], x[1].value), reverse=True)
            out = [f"\n{inst.name} ({inst.unit})  [{scope}]"]
            for d, r in rows[:self.top]:
                out.append(f"  +{d:<10g} total {r.value:<12g} {_label(r.attributes)}")
            return out
        if isinstance(first, Gauge):
            out = [f"\n{inst.name} ({inst.unit})  [{scope}]"]
            for r in rs[:self.top]:
                out.append(f"  {r.value:<14g} {_label(r.attributes)}")
            return out
        return []

    def _profile_section(self, scope, profiles) -> list:
        """Hottest functions of the interval: self (leaf) and total (anywhere on the stack)."""
        self_n, total_n, samples = {}, {}, 0
        for prof in profiles:
            for smp in prof.samples:
                samples += smp.count
                names = [f.function or "[unknown]" for f in smp.frames]
                if names:
                    self_n[names[0]] = self_n.get(names[0], 0) + smp.count
                for n in set(names):
                    total_n[n] = total_n.get(n, 0) + smp.count
        if not samples:
            return []
        out = [f"\ncpu profile: {samples} samples  [{scope}]", f"  {'self%':>6} {'total%':>6}  function"]
        for name, n in sorted(self_n.items(), key=lambda kv: kv[1], reverse=True)[:self.top]:
            out.append(f"  {100 * n / samples:6.1f} {100 * total_n[name] / samples:6.1f}  {name}")
        return out + self._route_lines(profiles, samples)

    def _route_lines(self, profiles, samples: int) -> list:
        """The busiest routes' share of the samples, when any sample was
        taken while serving a request."""
        by_route: dict = {}
        idle = 0
        for prof in profiles:
            for smp in prof.samples:
                req = request_of(smp.attributes)
                if req is None:
                    idle += smp.count
                else:
                    by_route[req] = by_route.get(req, 0) + smp.count
        if not by_route:
            return []
        out = ["  by route:", f"  {'cpu%':>6} {'samples':>8}  route"]
        for (method, route), n in sorted(by_route.items(), key=lambda kv: kv[1], reverse=True)[:self.top]:
            out.append(f"  {100 * n / samples:6.1f} {n:8d}  {method} {route}")
        if len(by_route) > self.top:
            out.append(f"  ... {len(by_route) - self.top} more routes")
        if idle:
            out.append(f"  {100 * idle / samples:6.1f} {idle:8d}  {NO_REQUEST}")
        return out

    def shutdown(self) -> None:
        pass
