"""What `otelbpf top` shows, without drawing it: snapshots (collector/top/
snapshot.py) in, the rows of each view out. Rates and percentiles cover the
window between the last two collections (the difference of two cumulative
series, as a backend's rate() would take it); totals are since the series
started. Percentiles are the upper bounds of the log2 buckets holding them,
computed exactly as the console exporter does, so they agree with the
exported histograms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..export.console import NO_REQUEST, _fmt_duration, quantile_upper_bound, request_of

HTTP_SERVER, HTTP_CLIENT = "http.server.request.duration", "http.client.request.duration"
SYSCALL_DURATION, SYSCALL_ERRORS = "otelbpf.syscall.duration", "otelbpf.syscall.errors"
NET_IO, TCP_RETRANSMITS = "otelbpf.network.io", "otelbpf.tcp.retransmits"

# What the process/container filter looks at.
FILTER_KEYS = ("process.executable.name", "process.pid", "container.id", "k8s.pod.name", "k8s.namespace.name",
               "service.name")
MAX_NAME = 160   # characters of a function name or route shown
NO_SAMPLES = "no CPU samples in the last interval (is cpu_profile enabled?)"
_WORKLOAD_KEYS = ("k8s.deployment.name", "k8s.statefulset.name", "k8s.daemonset.name", "k8s.job.name")


@dataclass
class Column:
    title: str
    fmt: Callable = str        # raw value -> cell text
    sortable: bool = False     # numeric: sorted largest first


@dataclass
class Table:
    columns: list
    rows: list                 # raw values, one tuple per row, formatted by the columns
    note: str = ""             # shown above the table: why it is empty, what the window is

    def cells(self) -> list:
        return [tuple(c.fmt(v) for c, v in zip(self.columns, row)) for row in self.rows]


def fmt_rate(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_count(v) -> str:
    return f"{v:.0f}"


def fmt_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}GiB"


def fmt_pct(v: float) -> str:
    return f"{v:.1f}"


def fmt_name(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 3] + "..."


def _fmt_quantile(unit: str) -> Callable:
    return lambda v: "-" if v is None else _fmt_duration(v, unit)


def _key(m: dict) -> tuple:
    return m["scope"], m["name"], tuple(sorted(m["attributes"].items()))


@dataclass
class Delta:
    """One series over the window: what it gained, in how many seconds."""
    metric: dict
    seconds: Optional[float]   # None: no window yet
    value: float               # counter/histogram count gained
    buckets: list              # histogram buckets gained

    @property
    def rate(self) -> Optional[float]:
        return self.value / self.seconds if self.seconds else None


def _sub_buckets(cur: list, prev: list) -> Optional[list]:
    out = [c - (prev[i] if i < len(prev) else 0) for i, c in enumerate(cur)]
    return None if any(v < 0 for v in out) or len(prev) > len(cur) and any(prev[len(cur):]) else out


def process_label(a: dict) -> str:
    if a.get("otelbpf.overflow"):
        return "(overflow)"   # what a full map or series set counted without its owner
    return str(a.get("process.executable.name") or a.get("otelbpf.cgroup.path") or "-")


def service_of(a: dict) -> str:
    if a.get("service.name"):
        return str(a["service.name"])
    for k in _WORKLOAD_KEYS:
        if a.get(k):
            return str(a[k])
    return process_label(a)


def matches(a: dict, needle: str) -> bool:
    """The filter: a case-insensitive substring of the process name, pid,
    container id, pod, namespace or service."""
    if not needle:
        return True
    n = needle.lower()
    return any(n in str(a[k]).lower() for k in FILTER_KEYS if a.get(k) is not None)


def _quantiles(buckets: list, exp_offset: int) -> tuple:
    if not sum(buckets):
        return None, None
    return quantile_upper_bound(buckets, .5, exp_offset), quantile_upper_bound(buckets, .99, exp_offset)


def _add_buckets(acc: list, b: list) -> list:
    if len(acc) < len(b):
        acc = acc + [0] * (len(b) - len(acc))
    for i, v in enumerate(b):
        acc[i] += v
    return acc


class TopModel:
    """Keeps the last two distinct snapshots and builds each view from them."""

    VIEWS = ("http", "syscalls", "flows", "cpu", "routes")
    TITLES = {"http": "HTTP", "syscalls": "Syscalls", "flows": "Flows", "cpu": "On-CPU", "routes": "CPU by route"}

    def __init__(self):
        self.current: Optional[dict] = None
        self.previous: Optional[dict] = None

    def update(self, snap: dict) -> bool:
        """True when snap is a new collection (the agent collects every
        interval; top polls more often)."""
        if snap.get("time_ns") is None or (self.current and snap["time_ns"] == self.current["time_ns"]):
            return False
        self.previous, self.current = self.current, snap
        return True

    @property
    def window(self) -> Optional[float]:
        if self.current and self.previous:
            return (self.current["time_ns"] - self.previous["time_ns"]) / 1e9
        return None

    def deltas(self, names: set, needle: str = "") -> list:
        """The current series named in names that pass the filter, with what each
        gained since the previous collection (since it started, before there is one)."""
        if not self.current:
            return []
        prev = {_key(m): m for m in self.previous["metrics"]} if self.previous else {}
        now_ns = self.current["time_ns"]
        out = []
        for m in self.current["metrics"]:
            if m["name"] not in names or not matches(m["attributes"], needle):
                continue
            p = prev.get(_key(m))
            hist = m["kind"] == "histogram"
            total = m["count"] if hist else m.get("value", 0)
            buckets = list(m["buckets"]) if hist else []
            seconds = self.window
            if p is not None:
                gained = total - (p["count"] if hist else p.get("value", 0))
                gained_b = _sub_buckets(buckets, p["buckets"]) if hist else []
                if gained >= 0 and gained_b is not None:
                    total, buckets = gained, gained_b
                # else: the series restarted (a probe restart): all it has is new
            elif self.previous is None and m.get("start_time_ns"):
                seconds = max((now_ns - m["start_time_ns"]) / 1e9, 1e-3)   # first view: since it started
            out.append(Delta(m, seconds, total, buckets))
        return out

    # ------------------------------------------------------------------ views
    def table(self, view: str, needle: str = "") -> Table:
        return getattr(self, f"_{view}")(needle)

    def _http(self, needle: str) -> Table:
        groups: dict = {}
        for d in self.deltas({HTTP_SERVER, HTTP_CLIENT}, needle):
            a, m = d.metric["attributes"], d.metric
            server = m["name"] == HTTP_SERVER
            where = a.get("http.route") if server else f"{a.get('server.address', '?')}:{a.get('server.port', '?')}"
            g = groups.setdefault((service_of(a), "server" if server else "client", str(where or "-")),
                                  {"rate": None, "err_rate": None, "total": 0, "errors": 0, "buckets": [],
                                   "exp": m["exp_offset"], "unit": m["unit"]})
            status = a.get("http.response.status_code")
            # Errors as the semantic conventions count them: 5xx on servers, 4xx too on clients.
            err = bool(a.get("error.type")) or (isinstance(status, int) and status >= (500 if server else 400))
            g["total"] += m["count"]
            g["errors"] += m["count"] if err else 0
            if d.rate is not None:
                g["rate"] = (g["rate"] or 0) + d.rate
                g["err_rate"] = (g["err_rate"] or 0) + (d.rate if err else 0)
            g["buckets"] = _add_buckets(g["buckets"], d.buckets)
        unit = next((g["unit"] for g in groups.values()), "s")
        q = _fmt_quantile(unit)
        cols = [Column("SERVICE"), Column("SIDE"), Column("ROUTE"), Column("REQ/S", fmt_rate, True),
                Column("ERR/S", fmt_rate, True), Column("REQS", fmt_count, True), Column("ERRORS", fmt_count, True),
                Column("P50<=", q, True), Column("P99<=", q, True)]
        rows = []
        for (svc, side, where), g in groups.items():
            p50, p99 = _quantiles(g["buckets"], g["exp"])
            rows.append((svc, side, where, g["rate"], g["err_rate"], g["total"], g["errors"], p50, p99))
        return Table(cols, rows, "" if rows else "no HTTP requests seen (is the http probe enabled?)")

    def _syscalls(self, needle: str) -> Table:
        groups: dict = {}
        unit = "ns"
        for d in self.deltas({SYSCALL_DURATION, SYSCALL_ERRORS}, needle):
            a, m = d.metric["attributes"], d.metric
            key = (process_label(a), a.get("process.pid", ""), str(a.get("syscall.name", "?")))
            g = groups.setdefault(key, {"rate": None, "err_rate": None, "total": 0, "errors": 0, "buckets": [],
                                        "exp": 0})
            if m["name"] == SYSCALL_ERRORS:
                g["errors"] += m["value"]
                if d.rate is not None:
                    g["err_rate"] = (g["err_rate"] or 0) + d.rate
                continue
            unit, g["exp"] = m["unit"], m["exp_offset"]
            g["total"] += m["count"]
            if d.rate is not None:
                g["rate"] = (g["rate"] or 0) + d.rate
            g["buckets"] = _add_buckets(g["buckets"], d.buckets)
        q = _fmt_quantile(unit)
        cols = [Column("PROCESS"), Column("PID"), Column("SYSCALL"), Column("CALLS/S", fmt_rate, True),
                Column("ERR/S", fmt_rate, True), Column("CALLS", fmt_count, True), Column("ERRORS", fmt_count, True),
                Column("P50<=", q, True), Column("P99<=", q, True), Column("MAX<=", q, True)]
        rows = []
        for (proc, pid, sc), g in groups.items():
            if not g["total"]:
                continue
            p50, p99 = _quantiles(g["buckets"], g["exp"])
            top = max((i for i, c in enumerate(g["buckets"]) if c), default=None)
            mx = None if top is None else float(2.0 ** (top + g["exp"]))
            rows.append((proc, pid, sc, g["rate"], g["err_rate"], g["total"], g["errors"], p50, p99, mx))
        return Table(cols, rows, "" if rows else "no syscalls seen (is the syscall_latency probe enabled?)")

    def _flows(self, needle: str) -> Table:
        groups: dict = {}
        for d in self.deltas({NET_IO, TCP_RETRANSMITS}, needle):
            a, m = d.metric["attributes"], d.metric
            role = a.get("otelbpf.tcp.role", "")
            port = a.get("network.peer.port") or a.get("network.local.port") or ""
            key = (process_label(a), str(a.get("network.peer.address", "?")), port, str(role),
                   str(a.get("network.transport", "")))
            g = groups.setdefault(key, {"rx_rate": None, "tx_rate": None, "rx": 0, "tx": 0, "retrans": 0})
            if m["name"] == TCP_RETRANSMITS:
                g["retrans"] += m["value"]
                continue
            direction = "rx" if a.get("network.io.direction") == "receive" else "tx"
            g[direction] += m["value"]
            if d.rate is not None:
                g[direction + "_rate"] = (g[direction + "_rate"] or 0) + d.rate
        rate = lambda v: "-" if v is None else fmt_bytes(v) + "/s"   # noqa: E731
        cols = [Column("PROCESS"), Column("PEER"), Column("PORT"), Column("ROLE"), Column("PROTO"),
                Column("RX/S", rate, True), Column("TX/S", rate, True), Column("RX", fmt_bytes, True),
                Column("TX", fmt_bytes, True), Column("RETRANS", fmt_count, True)]
        rows = [(*k, g["rx_rate"], g["tx_rate"], g["rx"], g["tx"], g["retrans"]) for k, g in groups.items()
                if g["rx"] or g["tx"] or g["retrans"]]
        return Table(cols, rows, "" if rows else "no flows seen (is the net_flows probe enabled?)")

    def _samples(self, needle: str) -> list:
        """The last interval's profile samples that pass the filter."""
        return [s for s in (self.current or {}).get("samples", []) if matches(s["attributes"], needle)]

    def _cpu(self, needle: str) -> Table:
        """Functions of the last interval's profile samples: self (the leaf) and
        total (anywhere on the stack), in % of the samples that pass the filter."""
        self_n: dict = {}
        total_n: dict = {}
        samples = 0
        for s in self._samples(needle):
            n, proc = s["count"], process_label(s["attributes"])
            samples += n
            if s["frames"]:
                k = (proc, s["frames"][0])
                self_n[k] = self_n.get(k, 0) + n
            for f in set(s["frames"]):
                total_n[(proc, f)] = total_n.get((proc, f), 0) + n
        # the function last: C++ and Rust names are long, the numbers must stay on screen
        cols = [Column("SELF%", fmt_pct, True), Column("TOTAL%", fmt_pct, True), Column("SAMPLES", fmt_count, True),
                Column("PROCESS"), Column("FUNCTION", fmt_name)]
        rows = [(100 * self_n.get((proc, fn), 0) / samples, 100 * n / samples, self_n.get((proc, fn), 0), proc, fn)
                for (proc, fn), n in total_n.items()] if samples else []
        return Table(cols, rows, "" if rows else NO_SAMPLES)

    def _routes(self, needle: str) -> Table:
        """The last interval's profile samples by the request their thread was
        serving (method and route), in % of the samples that pass the filter;
        each process's samples outside any request are one row."""
        groups: dict = {}
        samples = 0
        for s in self._samples(needle):
            a = s["attributes"]
            method, route = request_of(a) or ("-", NO_REQUEST)
            key = (process_label(a), method, route)
            groups[key] = groups.get(key, 0) + s["count"]
            samples += s["count"]
        cols = [Column("PROCESS"), Column("METHOD"), Column("ROUTE", fmt_name), Column("SAMPLES", fmt_count, True),
                Column("CPU%", fmt_pct, True)]
        rows = [(*key, n, 100 * n / samples) for key, n in groups.items()] if samples else []
        return Table(cols, rows, _routes_note(groups))


def _routes_note(groups: dict) -> str:
    """Why the routes view has no route to show, if it has none."""
    if not groups:
        return NO_SAMPLES
    if all(route == NO_REQUEST for _, _, route in groups):
        return "no CPU sample was taken while serving a request (is the http probe enabled?)"
    return ""


def sort_rows(table: Table, column: int, reverse: bool = True) -> list:
    """Rows by one column, largest first; missing values (no window yet) last."""
    def key(row):
        v = row[column]
        if v is None or v == "":
            return (0, 0)
        return (1, v) if isinstance(v, (int, float)) else (1, str(v))
    rows = sorted(table.rows, key=key, reverse=reverse)
    return rows
