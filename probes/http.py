"""HTTP/1.x, HTTP/2 and gRPC: RED metrics and spans, server and client
side, TLS included.

Kernel side: bpf/http.bpf.c captures socket reads and writes (socket-layer
tracepoints, or the sys_exit raw tracepoint before 6.3; uprobes on OpenSSL
for TLS plaintext) and hands each connection to its protocol's parser.
HTTP/1 (bpf/l7/http1.h) is paired and timed in the kernel: every
transaction lands in a histogram per (process, role, method, status, port,
path hash), and sampled ones come up as span records through a ring buffer.
HTTP/2 (bpf/l7/http2.h) comes up as frames: probes/l7/http2.py decodes HPACK
and pairs streams, probes/l7/exchanges.py names their metrics and spans.

Here: paths become bounded routes (probes/http_routes.py), kernel series
become http.server.request.duration / http.client.request.duration
(semantic-convention explicit buckets in seconds, or the exact exponential
form), ring-buffer records become SERVER/CLIENT spans that join the caller's
trace when the request carried a W3C traceparent.
"""
from __future__ import annotations

import collections
import ipaddress
import os
import random
import select
import struct
import subprocess
import threading
import time
from typing import Optional

from collector import features, libbpf
from collector.config import ConfigError, Field, check_power_of_two
from collector.metadata.process import ProcessNames, alive
from collector.probe import BpfProbe, ProbeError
from collector.records import Counter, Instrument, Log2Histogram, Span
from collector.selftelemetry import dropped, overflow
from collector.shared import HTTP_REQUEST_ATTRIBUTES

from .http_routes import OVERFLOW_ROUTE, RouteTable, check_patterns
from .l7 import exchanges as h2x
from .l7.http2 import Http2Tracker
from .l7.http2_ring import frame_events
from .syscall_latency import syscall_table
from .uprobe_placement import place_in_child

NBUCKETS = 40                      # OTB_LOG2_BUCKETS
NS_PER_S = 1_000_000_000           # kernel times are bpf_ktime_get_ns() ns; metrics are in s
NS_PER_US = 1_000
# The kernel's log2 buckets count durations in units of 2^-30 s (count_request
# in the .bpf.c: units = ceil(ns * 2^30 / 10^9)), so kernel bucket i holds
# (2^(i-1), 2^i] units = (2^(i-1-30), 2^(i-30)] s: buckets[i] of a
# Log2Histogram with exp_offset -30 in seconds, OTLP scale-0 index i-31.
EXP_OFFSET = -30
# Semantic-convention bounds (s); the kernel's sem_bucket compares ns, each
# bound x NS_PER_S (5000000ULL is 0.005 s).
SEM_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
HEAD_MAX, PATH_MAX = 4096, 256     # SCRATCH and PATH_CAP in the .bpf.c
OVERFLOW_TGID = 0xFFFFFFFF
_KEY = struct.Struct("=IHHBBBB16sIQ")                        # struct http_key
_HIST = struct.Struct(f"=QQ{NBUCKETS}Q{len(SEM_BOUNDS) + 1}Q16s")  # struct http_hist
_PATH = struct.Struct("=I256s")                              # struct http_path
# struct http_event (the kernel pads it to a multiple of 8)
_EVENT = struct.Struct("=QQII16s16sHHB3sHHBBBB16sI256s56s128s64s16s12xQQ")  # struct http_event
_CONN_LAST_NS = struct.Struct("=56xQ")                       # struct http_conn: last_ns
_H2_HKEY = struct.Struct("=QQI4xQI4xQI4xI4x")                # struct h2_hkey
_H2_HIST = struct.Struct(f"=QQ{NBUCKETS}Q{len(SEM_BOUNDS) + 1}Q")  # struct h2_hist
_H2_SKEY = struct.Struct("=QI4x")                            # struct h2_stream_key
_H2_STREAM = struct.Struct("=QQI4xQI4xQI4xIB3x")             # struct h2_stream
STATS = ("conn_table_full", "agg_full", "sampled_out", "rate_limited", "ringbuf_full", "no_response",
         "unpaired_response", "tls_no_socket", "detail_full", "detail_lost", "tls_slot_collision",
         "thread_slot_collision", "h2_ringbuf_full", "h2_block_cut", "h2_resync", "h2_state_lost")  # enum http_stat
METHODS = {0: "_OTHER", 1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "HEAD", 6: "PATCH", 7: "OPTIONS",
           8: "CONNECT", 9: "TRACE"}
ROLE_SERVER, ROLE_CLIENT = 1, 2
AF_INET = 2
# uprobe_placement's site groups -> entry programs (each but the lifecycle
# ones has a "<name>_ret" return program too). "read"/"write" are the internal
# functions both SSL_read and SSL_read_ex call: the _ex convention (a count
# pointer; > 0 on success).
SSL_PROGRAMS = {"read": "http_ssl_read_ex", "write": "http_ssl_write_ex",
                "SSL_read": "http_ssl_read", "SSL_read_ex": "http_ssl_read_ex",
                "SSL_write": "http_ssl_write", "SSL_write_ex": "http_ssl_write_ex",
                "SSL_do_handshake": "http_ssl_handshake",
                "SSL_set_fd": "http_ssl_set_fd", "SSL_free": "http_ssl_free"}
SSL_LIFECYCLE_FUNCS = ("SSL_set_fd", "SSL_free")   # entry only
# bpf globals -> syscall names (the first this architecture has)
SYSCALLS = {"nr_read": ("read",), "nr_write": ("write",), "nr_recvfrom": ("recvfrom",), "nr_sendto": ("sendto",),
            "nr_readv": ("readv",), "nr_writev": ("writev",), "nr_recvmsg": ("recvmsg",),
            "nr_sendmsg": ("sendmsg",), "nr_sendfile": ("sendfile", "sendfile64")}
MAX_EXCLUDED = 4          # MAX_EXCLUDED in the .bpf.c
MAX_TLS_LIBRARIES = 64   # distinct libssl files probed at most
IDLE_TICKS = 3           # kernel histogram keys unchanged this many collections are retired
UPROBE_WARN_NS = 3000   # above this per uprobe hit, TLS tracing costs TLS servers dearly: say so
SPAN_DRAIN_MS = 200      # how often the span ring is drained (the kernel does not wake us per span)
SOCK_CAPTURE = {"http_sock_send", "http_sock_recv"}    # one of these two paths is loaded
SYSCALL_CAPTURE = {"http_sys_exit"}

SERVER_DURATION = Instrument("http.server.request.duration", "s",
                             "Duration of HTTP server requests, first request byte read to last response "
                             "byte written, timed in the kernel")
UNSAMPLED = Instrument("otelbpf.http.spans.unsampled", "{span}",
                       "Requests counted in the metrics but not exported as spans (sample_ratio, or the "
                       "caller's traceparent said not sampled)")
PARTIAL = Instrument("otelbpf.http.partial", "{request}",
                     "HTTP/2 requests and gRPC calls counted with some header not decodable (a connection "
                     "joined mid-way, or its header compression state lost): their series carry "
                     "otelbpf.partial=true")
# the decoder's counts (probes/l7/http2.py STATS) that are losses
H2_LOSSES = ("hpack_error", "truncated_block", "oversized", "bad_frame", "streams_dropped", "connections_dropped",
             "not_http2", "unpaired", "internal_error")
CLIENT_DURATION = Instrument("http.client.request.duration", "s",
                             "Duration of HTTP client requests, first request byte written to last response "
                             "byte read, timed in the kernel")


def _check_excluded(names: list, key: str) -> list:
    if len(names) > MAX_EXCLUDED:
        raise ConfigError(key, f"{len(names)} names; the kernel side takes {MAX_EXCLUDED}",
                          f"keep the {MAX_EXCLUDED} that matter most")
    for i, n in enumerate(names):
        if not n or len(n.encode()) > 15:
            raise ConfigError(f"{key}[{i}]", f"{n!r} is not a thread name (1 to 15 bytes)",
                              "use the name ps -o comm shows")
    return names


def libc_path():
    """The C library's file (a uprobe target every process has), or None."""
    return next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6",
                             "/lib64/libc.so.6") if os.path.exists(p)), None)


def find_libssl() -> list:
    """libssl shared objects this host's dynamic linker knows (ldconfig -p)."""
    found = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if "libssl.so." in line and "=>" in line:
            path = line.split("=>", 1)[1].strip()
            real = os.path.realpath(path)
            if real not in {os.path.realpath(f) for f in found}:
                found.append(path)
    return found


def _addr(raw: bytes, family: int) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if family == AF_INET and ip.ipv4_mapped else str(ip)


def _cstr(b: bytes, limit: int = None) -> str:
    b = b.split(b"\0", 1)[0]
    if limit is not None:
        b = b[:limit]
    return b.decode("utf-8", errors="replace")


def parse_traceparent(text: str):
    """(trace_id, parent span id) of a valid W3C traceparent, else None."""
    parts = text.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
        int(parts[0], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id


_SEM_BOUNDS_NS = tuple(int(b * NS_PER_S) for b in SEM_BOUNDS)


class _Series:
    __slots__ = ("log2", "sem", "sum_ns", "start_ns", "inst")

    def __init__(self, start_ns: int, inst: Instrument):
        self.log2 = [0] * NBUCKETS
        self.sem = [0] * (len(SEM_BOUNDS) + 1)
        self.sum_ns = 0
        self.start_ns = start_ns
        self.inst = inst

    def add(self, dur_ns: int) -> None:
        """One duration measured in user space (HTTP/2), into the buckets the
        kernel's count_request() would have chosen."""
        self.sum_ns += dur_ns
        self.log2[log2_bucket(dur_ns)] += 1
        self.sem[sum(1 for b in _SEM_BOUNDS_NS if dur_ns > b)] += 1


def _add_moved(acc: _Series, vals: tuple, ov, moved: tuple) -> None:
    """A kernel histogram's change since its last read (ov: that read, or
    None) into a series: sum, then the log2 and explicit buckets."""
    acc.sum_ns += vals[1] - (ov[1] if ov else 0)
    for i in range(NBUCKETS):
        acc.log2[i] += moved[i]
    for i in range(len(SEM_BOUNDS) + 1):
        acc.sem[i] += moved[NBUCKETS + i]


def log2_bucket(dur_ns: int) -> int:
    """count_request()'s bucket: units of 2^-30 s, rounded up; bucket i holds
    (2^(i-1), 2^i] units, the last one everything above."""
    dur_ns = min(dur_ns, 1 << 43)
    units = -(-(dur_ns << 30) // NS_PER_S)
    return min((units - 1).bit_length() if units > 1 else 0, NBUCKETS - 1)


class HttpProbe(BpfProbe):
    name = "http"
    description = "HTTP/1.x RED metrics and server/client spans from socket syscalls and OpenSSL (TLS)"
    bpf_object = "http.bpf.o"
    # bpf_rdonly_cast is 6.2+, bpf_loop 5.17+ (the Makefile builds each)
    bpf_variants = (("http.bpf.o", ("bpf_loop", "kfunc_rdonly_cast")),
                    ("http.nocast.bpf.o", ("bpf_loop",)),
                    ("http.noloop.bpf.o", ()))
    requires = ("btf", "cap_bpf", "cap_perfmon", "raw_tracepoint", "ringbuf")
    shared_maps = ("otb_thread_requests",)   # the request each thread serves: the CPU profiler reads it
    config_schema = {
        "capture": Field("str", "auto", "how reads and writes are seen: auto (socket-layer tracepoints where the "
                         "kernel has them, 6.3+, else sys_exit), sockets, syscalls",
                         choices=("auto", "sockets", "syscalls")),
        "spans": Field("bool", True, "export a span per sampled request (metrics count every request anyway)"),
        "sample_ratio": Field("float", 1.0, "share of requests without a traceparent that become spans",
                              minimum=0.0, maximum=1.0),
        "parent_based": Field("bool", True, "a request's W3C traceparent decides its sampling (its sampled flag)"),
        "max_spans_per_second": Field("int", 1000, "spans sent to user space per second at most; the rest are "
                                      "counted in otelbpf.dropped{reason=rate_limited}", minimum=0),
        "capture_query": Field("bool", False, "keep query strings in spans (url.query); off: they never leave "
                               "the kernel"),
        "head_bytes": Field("int", 1024, "payload bytes parsed at the start of each request and response "
                            "(request line and headers)", minimum=64, maximum=HEAD_MAX),
        "path_bytes": Field("int", 128, "path bytes kept for spans and route learning", minimum=8,
                            maximum=PATH_MAX),
        "routes": Field("str_list", [], "http.route patterns, first match wins: /users/{id}, /static/**",
                        check=check_patterns),
        "learn_routes": Field("bool", True, "paths no pattern matches get a learned template (ids become *); "
                              "off: they all report http.route=/**"),
        "max_routes": Field("int", 500, "distinct learned routes at most; then /**, counted", minimum=1),
        "per_pid": Field("bool", False, "add process.pid to metric series (forking servers multiply them)"),
        "max_series": Field("int", 2000, "metric series at most; the rest go to an overflow series, counted",
                            minimum=1),
        "max_keys": Field("int", 16384, "kernel histogram entries; beyond it an overflow series, counted",
                          minimum=64),
        "max_connections": Field("int", 65536, "connections tracked at once in the kernel (LRU)", minimum=256),
        "connection_idle": Field("duration", 300.0, "a connection without traffic this long loses its state"),
        "tls": Field("bool", True, "uprobes on OpenSSL's SSL_read/SSL_write for TLS plaintext"),
        "tls_discovery": Field("duration", 30.0, "how often running processes are searched for libssl copies "
                               "not probed yet (containers' own, vendored)"),
        "tls_libraries": Field("str_list", [], "libssl paths to probe; empty: every libssl.so the dynamic "
                               "linker knows (ldconfig -p)"),
        "ring_buffer_bytes": Field("int", 4 << 20, "size of the span ring buffer and of HTTP/2's frame ring "
                                   "buffer, each (a power of two)",
                                   minimum=4096, check=check_power_of_two),
        "exclude": Field("str_list", [], "thread names (comm, up to 15 characters) whose HTTP is not traced: "
                         "load generators, health checkers (at most 4)", check=_check_excluded),
        "span_queue": Field("int", 20000, "spans held between collections; beyond it dropped, counted",
                            minimum=100),
        "http2": Field("bool", True, "HTTP/2 and gRPC (kernels with bpf_loop, 5.17+): frames go to user space, "
                       "which decodes their headers"),
    }

    def start(self) -> None:
        cfg = self.config
        obj = self.open_object()
        obj.set_global("self_tgid", struct.pack("=I", self.ctx.agent_pid))
        obj.set_global("head_bytes", struct.pack("=I", cfg["head_bytes"]))
        obj.set_global("path_bytes", struct.pack("=I", cfg["path_bytes"]))
        threshold = min(int(cfg["sample_ratio"] * 0x100000000), 0xFFFFFFFF)
        spans_on = cfg["spans"] and (cfg["sample_ratio"] > 0 or cfg["parent_based"])
        obj.set_global("sample_threshold", struct.pack("=I", threshold if cfg["sample_ratio"] > 0 else 0))
        obj.set_global("spans_enabled", struct.pack("=B", spans_on))
        obj.set_global("parent_based", struct.pack("=B", cfg["parent_based"]))
        obj.set_global("capture_query", struct.pack("=B", cfg["capture_query"]))
        obj.set_global("max_spans_per_second", struct.pack("=Q", cfg["max_spans_per_second"]))
        obj.set_global("overflow_tgid", struct.pack("=I", OVERFLOW_TGID))
        if cfg["exclude"]:
            names = b"".join(n.encode().ljust(16, b"\0") for n in cfg["exclude"])
            obj.set_global("excluded_comm", names.ljust(16 * MAX_EXCLUDED, b"\0"))
            obj.set_global("n_excluded", struct.pack("=B", len(cfg["exclude"])))
        by_name = {v: k for k, v in syscall_table().items()}
        for var, names in SYSCALLS.items():
            nr = next((by_name[n] for n in names if n in by_name), -1)
            obj.set_global(var, struct.pack("=q", nr))
        obj.map("http_hist").set_max_entries(cfg["max_keys"])
        obj.map("http_conns").set_max_entries(cfg["max_connections"])
        obj.map("http_events").set_max_entries(cfg["ring_buffer_bytes"])
        obj.set_global("ring_bytes", struct.pack("=I", cfg["ring_buffer_bytes"]))
        self.http2 = self._configure_http2(obj)
        self._choose_capture(obj)
        self.load_object(obj)
        self._hist = obj.map("http_hist")
        self._paths = obj.map("http_paths")
        self._conns = obj.map("http_conns")
        self._stats = obj.map("http_stats")
        for prog in obj.programs():
            if prog.autoload and prog.section.startswith(("tp_btf/", "raw_tp/")):
                prog.attach()
        self._tls_usable = cfg["tls"]
        self.tls_placements: list = []  # one line per libssl: where its uprobes went (`otelbpf check`)
        self.tls_libraries = self._attach_tls(obj) if cfg["tls"] else []
        self.check_notes = list(self.tls_placements)
        if self.http2:
            self.check_notes.append("HTTP/2 and gRPC: frames found in the kernel, headers decoded here")
        self._tls_scanned = 0.0   # the first collection looks for other libssl copies
        self.start_ns = self._last_tick_ns = time.time_ns()
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()
        self._prev: dict = {}           # kernel key -> (its value at the last read, the tick it changed)
        self._series: dict = {}
        self._path_names: dict = {}     # path hash -> path, for the active keys
        self._routes = RouteTable(cfg["routes"], cfg["max_routes"], cfg["learn_routes"])
        self._procs = ProcessNames()
        self._series_overflow = 0
        self._tick = 0
        self._pending = collections.deque()
        self._queue_full = 0
        self._bad_events = 0
        self._stop = threading.Event()
        self._spans_on = spans_on
        self._pollers = []
        if spans_on:
            self._ring = obj.ring_buffer("http_events", self._on_event)
            self._pollers.append(threading.Thread(target=self._poll, args=(self._ring,), name="http-spans",
                                                  daemon=True))
        self._h2 = None
        if self.http2:
            self._h2 = Http2Tracker()
            self._h2_lock = threading.Lock()
            self._h2_bad = 0
            self._h2_no_response = 0
            self._h2_span_window = (0, 0)       # (second, spans sent in it): max_spans_per_second
            self._h2_sampled_out = 0
            self._h2_rate_limited = 0
            self._h2_ring = obj.ring_buffer("h2_events", self._on_h2_record)
            self._h2_ring_lock = threading.Lock()  # consumed by its poller and by collect()
            self._h2_hist = obj.map("h2_hist")
            self._h2_streams = obj.map("h2_streams")
            self._h2_prev: dict = {}        # kernel key -> (value at the last read, tick it changed)
            self._h2_kernel_partial = 0     # requests counted in the kernel whose blocks were not all decoded
            self._h2_unresolved = 0         # kernel entries of connections no longer held
            self._pollers.append(threading.Thread(target=self._poll_shared, args=(self._h2_ring, self._h2_ring_lock),
                                                  name="http2-frames", daemon=True))
        for t in self._pollers:
            t.start()
        if self.ctx.shared is not None:
            self.ctx.shared.offer(HTTP_REQUEST_ATTRIBUTES, self.request_attributes)

    def request_attributes(self, route_key: int, method: int) -> dict:
        """What the CPU profiler puts on a sample taken in a server request:
        its route and method, as the request's series names them (a path no
        longer in the path table is the overflow route, as there)."""
        return {"http.request.method": METHODS.get(method, "_OTHER"),
                "http.route": self._routes.route(self._path(route_key) if route_key else None)}

    def _configure_http2(self, obj) -> bool:
        """HTTP/2 on or off in the kernel (the 5.10 build has none: say so)."""
        names = {m.name for m in obj.maps()}
        if "h2_events" not in names:
            if self.config["http2"]:
                note = "HTTP/2 and gRPC: not on this kernel (needs bpf_loop, 5.17+); HTTP/1 is traced"
                self.log.warning("%s", note)
                self.variant_note = "; ".join(x for x in (self.variant_note, note) if x)
            return False
        obj.set_global("h2_enabled", struct.pack("=B", self.config["http2"]))
        spans = self.config["spans"] and (self.config["sample_ratio"] > 0 or self.config["parent_based"])
        obj.set_global("h2_max_spans_per_second", struct.pack("=Q", self.config["max_spans_per_second"]
                                                                    if spans else 0))
        obj.map("h2_hist").set_max_entries(self.config["max_keys"])
        obj.set_global("h2_ring_bytes", struct.pack("=I", self.config["ring_buffer_bytes"]))
        obj.map("h2_events").set_max_entries(self.config["ring_buffer_bytes"])
        if not self.config["http2"]:
            # nothing comes: no memory for it (hash maps are allocated
            # whole when loaded: a connection's state, with its streams in
            # flight, is 1.4 KB)
            obj.map("h2_events").set_max_entries(4096)
            for name in ("h2_conns", "h2_streams", "h2_known", "h2_hist"):
                obj.map(name).set_max_entries(64)
        return self.config["http2"]

    def _uprobe_cost_ns(self, obj) -> float:
        """ns one uprobe hit adds here: an empty program on libc's getppid,
        for this process only, timed over a few hundred calls."""
        libc = libc_path()
        if libc is None:
            return 0.0

        def per_call(n=300):
            t = time.perf_counter_ns()
            for _ in range(n):
                os.getppid()
            return (time.perf_counter_ns() - t) / n
        bare = min(per_call() for _ in range(3))
        link = obj.program("http_uprobe_calibrate").attach_uprobe(libc, "getppid", pid=os.getpid())
        try:
            hit = min(per_call() for _ in range(3))
        finally:
            link.close()
        return max(hit - bare, 0.0)

    def _attach_tls(self, obj) -> list:
        self._tls_seen: set = set()     # (major, minor, inode) of every libssl probed or refused
        try:
            cost = self._uprobe_cost_ns(obj)
        except libbpf.BpfError as e:
            # no uprobes at all (a seccomp profile denying perf_event_open, a
            # kernel without CONFIG_UPROBE_EVENTS): say it once, stop looking
            self.log.warning("TLS: uprobes cannot be attached here (%s); HTTPS plaintext is not seen, "
                             "plain HTTP is", str(e).splitlines()[0])
            self._tls_usable = False
            return []
        self.uprobe_cost_ns = cost      # getppid starts with a mov: what a single-stepped hit costs
        attached = []
        for lib in self.config["tls_libraries"] or find_libssl():
            if not os.path.exists(lib):
                self.log.warning("TLS: %s not found; its plaintext is not seen", lib)
                continue
            st = os.stat(lib)
            if self._probe_libssl(obj, lib, (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)):
                attached.append(lib)
        if not attached:
            self.log.warning("TLS: no OpenSSL library found by ldconfig; HTTPS is seen once a process maps one "
                             "(searched every %gs)", self.config["tls_discovery"])
        return attached

    def _probe_libssl(self, obj, path: str, ident: tuple) -> bool:
        """Uprobes on one libssl file (they fire in every process mapping it),
        each where uprobe_placement found it cheapest."""
        if ident in self._tls_seen:
            return False
        self._tls_seen.add(ident)
        placement = place_in_child(path)   # capstone stays out of the agent
        self.log.info("%s", placement.summary())
        self.tls_placements.append(placement.summary())
        n = 0
        for group, site in placement.sites.items():
            prog = SSL_PROGRAMS[group]
            func = None if site.offset is not None else site.covers[0]
            offset = site.offset or 0
            try:
                obj.program(prog).attach_uprobe(path, func, offset)
                if group not in SSL_LIFECYCLE_FUNCS:
                    obj.program(prog + "_ret").attach_uprobe(path, func, offset, retprobe=True)
                    n += 1
            except libbpf.BpfError as e:  # e.g. a libssl 1.1 without the _ex calls
                self.log.debug("TLS: %s:%s not probed: %s", path, site.describe(), str(e).splitlines()[0])
        if not n:
            self.log.warning("TLS: no SSL_read/SSL_write in %s; its plaintext is not seen", path)
        stepped = [f for g, s in placement.sites.items() if g not in SSL_LIFECYCLE_FUNCS and not s.emulated
                   for f in s.covers]
        if n and stepped and self.uprobe_cost_ns > UPROBE_WARN_NS:
            self.log.warning("TLS: %s: %s probed where the kernel single-steps: a hit costs %.1f us on this "
                             "machine, paid by every call (bench/uprobe_cost.py measures it); set "
                             "probes.http.tls: false if TLS servers' speed matters more than their spans and "
                             "metrics", path, "/".join(stepped), self.uprobe_cost_ns / NS_PER_US)
        return n > 0

    def _discover_libssl(self) -> None:
        """libssl files mapped by running processes that are not probed yet:
        a container's own copy, a vendored one. Reached through
        /proc/PID/root, so the file is the one the process really maps."""
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            if len(self._tls_seen) >= MAX_TLS_LIBRARIES:
                return
            try:
                with open(f"/proc/{pid}/maps") as f:
                    lines = [line for line in f if "libssl.so" in line]
            except OSError:
                continue
            for line in lines:
                parts = line.split(None, 5)
                if len(parts) < 6 or "(deleted)" in parts[5]:
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                ident = (major, minor, int(parts[4]))
                if ident in self._tls_seen:
                    continue
                path = f"/proc/{pid}/root{parts[5].strip()}"
                if self._probe_libssl(self.obj, path, ident):
                    self.tls_libraries.append(path)
                    self.log.info("TLS: probing %s (mapped by pid %s)", parts[5].strip(), pid)

    def _choose_capture(self, obj) -> None:
        """Socket-layer tracepoints where the kernel has them (one program per
        socket send/receive, none for other syscalls), else sys_exit; the
        other path's programs are not loaded."""
        names = {p.name for p in obj.programs()}
        lacking = features.missing(("sock_length_tp",), features.program_features())
        wanted = self.config["capture"]
        if wanted == "sockets" and (lacking or not SOCK_CAPTURE <= names):
            why = "; ".join(lacking) or f"{self.variant_note.split(':')[0]} is loaded: no socket-layer capture"
            raise ProbeError(f"probes.http.capture: sockets cannot run here ({why}); use auto")
        sock_path = wanted != "syscalls" and SOCK_CAPTURE <= names and not lacking
        for name in (SOCK_CAPTURE if not sock_path else SYSCALL_CAPTURE):
            if name in names:
                obj.program(name).set_autoload(False)
        if sock_path:
            note = "capture: sock_send_length/sock_recv_length tracepoints"
        elif wanted == "syscalls":
            note = "capture: sys_exit (capture: syscalls)"
        else:
            note = "capture: sys_exit (" + ("this kernel lacks sock:sock_send_length, 6.3+" if
                                            SOCK_CAPTURE <= names else "this build has no socket-layer capture") + ")"
        self.variant_note = "; ".join(x for x in (self.variant_note, note) if x)
        self.log.info("%s", note)

    # ------------------------------------------------------------- spans
    def _poll(self, ring) -> None:
        # The kernel adds records without waking us (a wake-up per record costs
        # the traced host a context switch), except when the ring fills past an
        # eighth: so drain on a timer, and early when woken.
        while not self._stop.is_set():
            try:
                ring.poll(SPAN_DRAIN_MS)
                ring.consume()
            except libbpf.BpfError as e:
                self.log.error("%s ring buffer: %s", ring.map_name, e)
                return

    def _poll_shared(self, ring, lock) -> None:
        """_poll for a ring collect() also drains: wait for a wake-up without
        consuming, then consume under the lock."""
        fd = ring.fileno()
        while not self._stop.is_set():
            try:
                select.select([fd], [], [], SPAN_DRAIN_MS / 1000)
                with lock:
                    ring.consume()
            except (OSError, libbpf.BpfError) as e:
                self.log.error("%s ring buffer: %s", ring.map_name, e)
                return

    def _on_h2_record(self, raw: bytes) -> None:
        try:
            events = frame_events(raw)
        except struct.error:
            self._h2_bad += 1
            return
        with self._h2_lock:
            for ev in events:
                self._h2.feed(ev)

    def _on_event(self, raw: bytes) -> None:
        if len(self._pending) >= self.config["span_queue"]:
            self._queue_full += 1
            return
        self._pending.append(raw)

    def _span(self, raw: bytes):
        (start, end, tgid, tid, laddr, raddr, lport, rport, family, _pad, status, path_len, role, method, tls,
         flags, comm, route_len, path, tparent, ua, host, trace_raw, span_id, cpu_samples) = _EVENT.unpack_from(raw)
        path_s = _cstr(path, path_len)
        route_path = path_s[:route_len] if route_len < len(path_s) else path_s
        query = path_s[route_len + 1:] if route_len < len(path_s) else None
        method_s = METHODS.get(method, "_OTHER")
        scheme = "https" if tls else "http"
        thread = _cstr(comm)
        attrs = {"http.request.method": method_s, "http.response.status_code": status, "url.scheme": scheme,
                 "network.protocol.name": "http", "network.transport": "tcp",
                 "network.peer.address": _addr(raddr, family), "network.peer.port": rport,
                 "process.pid": tgid, "process.executable.name":
                     self._procs.executable_name(tgid, fallback=thread) or thread}
        agent = _cstr(ua)
        if agent:
            attrs["user_agent.original"] = agent
        host_s = _cstr(host)
        if role == ROLE_SERVER:
            route = self._routes.route(route_path)
            attrs.update({"url.path": route_path, "http.route": route, "server.port": lport,
                          "client.address": attrs["network.peer.address"]})
            if host_s:
                attrs["server.address"] = host_s.rsplit(":", 1)[0] if not host_s.endswith("]") else host_s
            if query is not None:
                attrs["url.query"] = query
            name, kind, error = f"{method_s} {route}", "server", status >= 500
        else:
            server = host_s or attrs["network.peer.address"]
            attrs.update({"server.address": server.rsplit(":", 1)[0] if ":" in server and not
                          server.endswith("]") else server, "server.port": rport,
                          "url.full": f"{scheme}://{host_s or attrs['network.peer.address']}{path_s}"})
            name, kind, error = method_s, "client", status >= 400
        if flags & 1:
            attrs["otelbpf.url.truncated"] = True
        if error:
            attrs["error.type"] = str(status)
        if cpu_samples:
            # the profile samples taken while its thread served it carry
            # this span's id (the label Grafana's span profiles look up)
            attrs["otelbpf.cpu.samples"] = cpu_samples
            attrs["pyroscope.profile.id"] = f"{span_id:016x}"
        # the ids the kernel chose (its samples link to them); the parent
        # only from a traceparent of the same trace
        trace_id = int.from_bytes(trace_raw, "big") or random.getrandbits(128) or 1   # (never zero ids)
        span_id = span_id or random.getrandbits(64) or 1
        parent = parse_traceparent(_cstr(tparent))
        parent_id = parent[1] if parent and parent[0] == trace_id else None
        return Span(name, kind, trace_id, span_id, parent_id,
                    start + self._mono_to_wall, end + self._mono_to_wall, attrs, error)

    def _ring_callback_errors(self) -> int:
        ring = getattr(self, "_ring", None)
        return ring.callback_errors if ring is not None else 0

    # ------------------------------------------------------------- HTTP/2
    def _h2_exchanges(self, more: list = ()) -> list:
        """Ended HTTP/2 streams into the series; sampled ones as spans."""
        with self._h2_lock:
            done = self._h2.take_exchanges()
        done.extend(more)
        spans = []
        for ex in done:
            if ex.role not in (ROLE_SERVER, ROLE_CLIENT):
                continue
            if not ex.is_grpc and ex.status is None:
                self._h2_no_response += 1       # reset or closed before its response: as HTTP/1's no_response
                continue
            if not ex.counted:                  # (the kernel counted the streams it paired and ended)
                self._series_for(*self._h2_series_key(ex)).add(max(ex.end_ns - ex.start_ns, 0))
            if self._spans_on and self._h2_sampled(ex):
                spans.append(self._h2_span(ex, _addr(ex.raddr, ex.family)))
        return spans

    def _h2_kernel_series(self) -> list:
        """What the kernel counted for the streams it paired (bpf/l7/http2_pair.h),
        named from the header blocks it sent: the changes since the last read
        into the series. Entries that did not change for a while, or whose
        connection closed, are taken out of the map (their last counts read)."""
        with self._h2_ring_lock:
            self._h2_ring.consume()     # the blocks of what the kernel counted so far, first
        with self._h2_lock:
            idle = []
            for kb, vb in self._h2_hist.items():
                old, changed = self._h2_prev.get(kb, (None, self._tick))
                conn_id = _H2_HKEY.unpack_from(kb)[0]
                if old == vb:
                    if self._tick - changed >= IDLE_TICKS or self._h2.is_closed(conn_id):
                        idle.append(kb)
                    continue
                # a block the entry names may still be in the ring: wait a few
                # collections for it before counting the entry partial
                now = self._h2_add_delta(kb, vb, old, self._tick - changed < IDLE_TICKS)
                self._h2_prev[kb] = (now, changed) if now is old else (now, self._tick)
            for kb in idle:
                last = self._h2_hist.lookup_and_delete(kb)
                old = self._h2_prev.pop(kb)[0]
                if last is not None and last != old:
                    self._h2_add_delta(kb, last, old, wait=False)
            left = self._h2_left_open()
            self._h2.tick()
        return left

    def _h2_left_open(self) -> list:
        """Streams the kernel still holds for connections that closed: out of
        its map, into exchanges (their responses end with the close)."""
        closed = self._h2.take_newly_closed()
        if not closed:
            return []
        entries, keys = [], []
        for kb, vb in self._h2_streams.items():
            conn_id, sid = _H2_SKEY.unpack(kb)
            if conn_id in closed:
                start, rqh, rqg, rsh, rsg, tlh, tlg, _tid, state = _H2_STREAM.unpack(vb)
                entries.append((conn_id, sid, start, (rqg, rqh), (rsg, rsh), (tlg, tlh), state))
                keys.append(kb)
        if keys:
            self._h2_streams.delete_many(keys)
        return self._h2.streams_left_open(entries)

    def _h2_add_delta(self, kb: bytes, vb: bytes, old, wait: bool = True):
        """Add the kernel's counts since `old` to the entry's series; returns
        the value now accounted for (`old` again while its blocks are on
        their way)."""
        conn_id, rqh, rqg, rsh, rsg, tlh, tlg, _outcome = _H2_HKEY.unpack(kb)
        vals = _H2_HIST.unpack(vb)
        ov = _H2_HIST.unpack(old) if old is not None else None
        lo, end = 2, 2 + NBUCKETS + len(SEM_BOUNDS) + 1
        moved = vals[lo:end] if ov is None else tuple(a - b for a, b in zip(vals[lo:end], ov[lo:end]))
        if not any(moved):
            return old      # count or sum ahead of its bucket (see _add_delta)
        count = sum(moved[:NBUCKETS])
        ex = self._h2.resolve(conn_id, (rqg, rqh), (rsg, rsh), (tlg, tlh), wait)
        if ex is Http2Tracker.PENDING:
            return old
        if ex is None:
            self._h2_unresolved += count
            return vb
        if ex.role not in (ROLE_SERVER, ROLE_CLIENT):
            return vb
        if ex.partial:
            self._h2_kernel_partial += count
        _add_moved(self._series_for(*self._h2_series_key(ex), count), vals, ov, moved)
        return vb

    def _h2_series_key(self, ex) -> tuple:
        """(instrument, attributes) of an HTTP/2 request or gRPC call."""
        kind, attrs = h2x.metric_attributes(ex, self._routes.route, self._h2_exe(ex), _addr(ex.raddr, ex.family))
        if self.config["per_pid"]:
            attrs["process.pid"] = ex.tgid
        if kind == "rpc":
            return (h2x.RPC_SERVER_DURATION if ex.role == ROLE_SERVER else h2x.RPC_CLIENT_DURATION), attrs
        return (SERVER_DURATION if ex.role == ROLE_SERVER else CLIENT_DURATION), attrs

    def _h2_exe(self, ex) -> str:
        return self._procs.executable_name(ex.tgid, fallback=ex.comm) or ex.comm

    def _h2_sampled(self, ex) -> bool:
        """The kernel's span rules for HTTP/1, applied here: a traceparent's
        sampled flag, else sample_ratio; at most max_spans_per_second."""
        cfg = self.config
        parent = ex.traceparent.strip().split("-") if ex.traceparent else None
        flag = None
        if cfg["parent_based"] and parent and len(parent) >= 4 and len(parent[3]) >= 2:
            try:
                flag = int(parent[3][:2], 16) & 1
            except ValueError:
                flag = None
        if flag == 0 or (flag is None and random.random() >= cfg["sample_ratio"]):
            self._h2_sampled_out += 1
            return False
        second = ex.end_ns // NS_PER_S
        window, used = self._h2_span_window
        if window != second:
            window, used = second, 0
        if used >= cfg["max_spans_per_second"]:
            self._h2_rate_limited += 1
            return False
        self._h2_span_window = (window, used + 1)
        return True

    def _h2_span(self, ex, peer: str) -> Span:
        name, kind, attrs, error = h2x.span_fields(ex, self._routes.route, peer)
        thread = ex.comm
        attrs["process.executable.name"] = self._procs.executable_name(ex.tgid, fallback=thread) or thread
        parent = parse_traceparent(ex.traceparent or "")
        trace_id, parent_id = parent if parent else (random.getrandbits(128) or 1, None)
        return Span(name, kind, trace_id, random.getrandbits(64) or 1, parent_id,
                    ex.start_ns + self._mono_to_wall, ex.end_ns + self._mono_to_wall, attrs, error)

    def _drain_spans(self) -> list:
        out = []
        while self._pending:
            raw = self._pending.popleft()
            try:
                out.append(self._span(raw))
            except (struct.error, ValueError):
                self._bad_events += 1
        return out

    # ------------------------------------------------------------- metrics
    def collect(self) -> list:
        self._procs.begin_pass()
        now = time.time_ns()
        self._tick += 1
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()
        idle = []
        for kb, vb in self._hist.items():
            old, changed = self._prev.get(kb, (None, self._tick))
            if old == vb:
                if self._tick - changed >= IDLE_TICKS:
                    idle.append(kb)
                continue
            self._prev[kb] = (self._add_delta(kb, vb, old), self._tick)
        self._retire(idle)
        self._reap_exited()
        if self._tick % 6 == 0:
            self._reap_idle_connections()
        every = self.config["tls_discovery"]
        if self._tls_usable and time.monotonic() - self._tls_scanned >= every:
            self._tls_scanned = time.monotonic()
            self._discover_libssl()
        h2_spans = []
        if self._h2 is not None:     # (before the tick moves: a new series starts at the last one)
            left = self._h2_kernel_series()
            h2_spans = self._h2_exchanges(left)
        self._last_tick_ns = now
        records = self._records()
        records.extend(self._drain_spans())
        records.extend(h2_spans)
        return records

    def _path(self, path_hash: int):
        name = self._path_names.get(path_hash)
        if name is None:
            raw = self._paths.lookup(struct.pack("=Q", path_hash))
            if raw is None:
                return None
            length, path = _PATH.unpack(raw)
            name = _cstr(path, length)
            if len(self._path_names) >= 4 * self._paths.max_entries:
                self._path_names.clear()
            self._path_names[path_hash] = name
        return name

    def _attributes(self, key: tuple, comm: str) -> dict:
        tgid, status, port, role, method, tls, family, addr, _pad, path_hash = key
        if tgid == OVERFLOW_TGID:
            return {"otelbpf.overflow": True, "http.request.method": "_OTHER"}
        method_s = METHODS.get(method, "_OTHER")
        attrs = {"http.request.method": method_s, "http.response.status_code": status,
                 "url.scheme": "https" if tls else "http", "server.port": port,
                 "process.executable.name": self._procs.executable_name(tgid, fallback=comm) or comm}
        if role == ROLE_SERVER:
            attrs["http.route"] = self._routes.route(self._path(path_hash)) if path_hash else OVERFLOW_ROUTE
            if status >= 500:
                attrs["error.type"] = str(status)
        else:
            attrs["server.address"] = _addr(addr, family)
            if status >= 400:
                attrs["error.type"] = str(status)
        if self.config["per_pid"]:
            attrs["process.pid"] = tgid
        return attrs

    def _add_delta(self, kb: bytes, vb: bytes, old) -> Optional[bytes]:
        """Add what the kernel counted since `old` to the key's series; returns
        the value now accounted for (what the next read is compared with)."""
        key = _KEY.unpack(kb)
        vals = _HIST.unpack(vb)
        ov = _HIST.unpack(old) if old is not None else None
        # The kernel bumps count, sum and buckets one after the other, so a
        # read can land between them: the buckets are the truth (count is
        # their sum on export), and a bucket that moves alone still counts.
        lo, end = 2, 2 + NBUCKETS + len(SEM_BOUNDS) + 1
        moved = vals[lo:end] if ov is None else tuple(a - b for a, b in zip(vals[lo:end], ov[lo:end]))
        if not any(moved):
            # count or sum ahead of its bucket: take none of it now, or the
            # sum would be passed over; the next read has the bucket too
            return old
        count = sum(moved[:NBUCKETS])
        role = key[3]
        attrs = self._attributes(key, _cstr(vals[-1]))
        inst = SERVER_DURATION if role == ROLE_SERVER else CLIENT_DURATION
        _add_moved(self._series_for(inst, attrs, count), vals, ov, moved)
        return vb

    def _series_for(self, inst: Instrument, attrs: dict, count: int = 1) -> _Series:
        """The series of (instrument, attributes); past max_series, the
        instrument's overflow series (count is what overflowed)."""
        skey = (inst.name, tuple(sorted(attrs.items())))
        acc = self._series.get(skey)
        if acc is None:
            if len(self._series) >= self.config["max_series"]:
                self._series_overflow += count
                attrs = {"otelbpf.overflow": True, "http.request.method": "_OTHER"}
                skey = (inst.name, tuple(sorted(attrs.items())))
                acc = self._series.get(skey)
            if acc is None:
                acc = self._series[skey] = _Series(self._last_tick_ns, inst)
        return acc

    def _retire(self, keys: list) -> None:
        """Take keys out of the kernel map, adding what they counted since
        the last read: their series keep their totals in user space, and the
        map (and _prev) hold only what is active. A path with an id in it
        (/items/123) is one request's key: without this, such paths would
        fill max_keys and every collection would re-read them all."""
        for kb in keys:
            last = self._hist.lookup_and_delete(kb)
            old = self._prev.pop(kb)[0]
            if last is not None and last != old:
                self._add_delta(kb, last, old)
            self._path_names.pop(_KEY.unpack(kb)[-1], None)  # the kernel re-learns it if the path returns

    def _reap_exited(self) -> None:
        """Kernel series of exited processes go once their last counts are read."""
        dead = {}
        for kb in self._prev:
            tgid = _KEY.unpack_from(kb)[0]
            if tgid != OVERFLOW_TGID and tgid not in dead:
                dead[tgid] = not alive(tgid)
        gone = [kb for kb in self._prev if dead.get(_KEY.unpack_from(kb)[0])]
        if gone:
            self._retire(gone)

    def _reap_idle_connections(self) -> None:
        """Connections quiet for connection_idle lose their state (the LRU
        bounds them anyway; this frees what closed without close())."""
        # last_ns is bpf_ktime_get_ns(): CLOCK_MONOTONIC ns, as time.monotonic_ns()
        limit = time.monotonic_ns() - int(self.config["connection_idle"] * NS_PER_S)
        stale = [k for k, v in self._conns.items() if _CONN_LAST_NS.unpack_from(v)[0] < limit]
        if stale:
            self._conns.delete_many(stale)

    def _records(self) -> list:
        out = []
        for (_name, akey), acc in self._series.items():
            out.append(Log2Histogram(acc.inst, dict(akey), list(acc.log2), acc.sum_ns / NS_PER_S, acc.start_ns,
                                     exp_offset=EXP_OFFSET, explicit_bounds=SEM_BOUNDS,
                                     explicit_counts=list(acc.sem)))
        stats = dict(zip(STATS, self._stats.counters(len(STATS))))
        s = self.start_ns
        out += [dropped(self.name, r, stats[r], s) for r in ("conn_table_full", "ringbuf_full",
                                                             "rate_limited", "tls_no_socket", "detail_full",
                                                             "detail_lost", "tls_slot_collision",
                                                             "thread_slot_collision")]
        out += [Counter(UNSAMPLED, {}, stats["sampled_out"], s),
                dropped(self.name, "span_queue_full", self._queue_full, s),
                dropped(self.name, "span_undecodable", self._bad_events + self._ring_callback_errors(), s),
                dropped(self.name, "no_response", stats["no_response"], s),
                dropped(self.name, "unpaired_response", stats["unpaired_response"], s),
                overflow(self.name, "kernel_map_full", stats["agg_full"], s),
                overflow(self.name, "max_series", self._series_overflow, s),
                overflow(self.name, "max_routes", self._routes.overflowed, s)]
        if self._h2 is not None:
            out += self._h2_counters(stats, s)
        return out

    def _h2_counters(self, stats: dict, s: int) -> list:
        """HTTP/2's losses: the kernel's, the decoder's, and spans not sent."""
        h2 = dict(self._h2.stats)
        out = [dropped(self.name, "h2_ringbuf_full", stats["h2_ringbuf_full"], s),
               dropped(self.name, "h2_block_cut", stats["h2_block_cut"], s),
               dropped(self.name, "h2_resync", stats["h2_resync"], s),
               dropped(self.name, "h2_state_lost", stats["h2_state_lost"], s),
               dropped(self.name, "h2_undecodable", self._h2_bad + self._h2_ring.callback_errors, s),
               dropped(self.name, "h2_no_response", self._h2_no_response, s),
               dropped(self.name, "h2_rate_limited", self._h2_rate_limited, s),
               dropped(self.name, "h2_unresolved", self._h2_unresolved, s),
               Counter(UNSAMPLED, {"network.protocol.version": "2"}, self._h2_sampled_out, s)]
        out += [dropped(self.name, "h2_" + k, h2[k], s) for k in H2_LOSSES]
        out.append(Counter(PARTIAL, {}, h2["partial"] + self._h2_kernel_partial, s))
        return out

    def stop(self) -> None:
        if hasattr(self, "_stop"):   # not there when start() failed before its threads
            self._stop.set()
        for t in getattr(self, "_pollers", []):
            t.join(timeout=2)
        self._pollers = []
        self._leave_thread_requests()
        super().stop()

    def _leave_thread_requests(self) -> None:
        """The shared map of the request each thread serves outlives this
        probe: the requests it holds end with it (or the profiler would
        keep giving them samples)."""
        shared = self.ctx.shared
        if shared is None or self.obj is None or not self.obj.loaded:
            return
        shared.withdraw(HTTP_REQUEST_ATTRIBUTES, self.request_attributes)
        slots = self.obj.map("otb_thread_requests")
        zero = bytes(slots.value_size)
        for i in range(slots.max_entries):
            slots.update(struct.pack("=I", i), zero)
