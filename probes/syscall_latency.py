"""Syscall latency: kernel-built log2 histograms per (syscall, process).

Kernel side: bpf/syscall_latency.bpf.c (raw_syscalls enter/exit). Each
interval this reads the cumulative histograms, turns them into per-interval
deltas, and adds them to bounded series: per-pid for the busiest processes
(top_processes), per executable for the rest, so forking servers do not
explode the series count.
"""
from __future__ import annotations

import difflib
import platform
import struct
import time

from collector.config import ConfigError, Field, check_power_of_two
from collector.metadata.cgroup import CgroupPaths
from collector.metadata.process import ProcessNames, alive
from collector.probe import BpfProbe, ProbeError
from collector.records import Counter, Instrument, Log2Histogram
from collector.selftelemetry import dropped, overflow

from .syscall_tables import TABLES

NBUCKETS = 40          # OTB_LOG2_BUCKETS in bpf/log2_hist.h
MAX_SYSCALLS = 1024    # MAX_SYSCALLS in the .bpf.c
_KEY = struct.Struct("=QII")                       # struct sc_key
_VALUE = struct.Struct(f"=16s{NBUCKETS}QQQ")       # struct sc_hist
STATS = ("overflow", "slot_collision", "no_enter")  # enum sc_stat order
IDLE_TICKS = 6         # a per-pid series idle this many intervals frees its top_processes slot

DURATION = Instrument("otelbpf.syscall.duration", "ns",
                      "Syscall latency from raw_syscalls sys_enter to sys_exit. In ns so the kernel's "
                      "log2 buckets map exactly onto an exponential histogram (scale 0)")
ERRORS = Instrument("otelbpf.syscall.errors", "{syscall}", "Syscalls that returned an error (negative value)")
UNMATCHED = Instrument("otelbpf.syscall.unmatched_exits", "{syscall}",
                       "Syscall exits without a recorded enter: running when the probe attached, or whose "
                       "measurement a slot collision overwrote (counted in otelbpf.dropped)")


def syscall_table() -> dict:
    machine = platform.machine()
    if machine not in TABLES:
        raise ProbeError(f"no syscall table for {machine} (have: {', '.join(TABLES)})")
    return TABLES[machine]


def _check_syscalls(names: list, key: str) -> list:
    table = syscall_table()
    by_name = {v: k for k, v in table.items()}
    for i, n in enumerate(names):
        if n not in by_name:
            close = difflib.get_close_matches(n, list(by_name), n=1)
            raise ConfigError(f"{key}[{i}]", f"unknown syscall {n!r} on {platform.machine()}",
                              f"did you mean {close[0]!r}?" if close else "use names like read, openat")
    return names


class _Acc:
    """A cumulative series: buckets, sum (ns) and errors since start_ns."""
    __slots__ = ("buckets", "sum", "errors", "start_ns")

    def __init__(self, start_ns: int):
        self.buckets = [0] * NBUCKETS
        self.sum = 0
        self.errors = 0
        self.start_ns = start_ns

    def add(self, buckets, s: int, errors: int) -> None:
        b = self.buckets
        for i, c in enumerate(buckets):
            if c:
                b[i] += c
        self.sum += s
        self.errors += errors


class SyscallLatencyProbe(BpfProbe):
    name = "syscall_latency"
    description = "syscall latency histograms and error counts per syscall and process (raw_syscalls)"
    bpf_object = "syscall_latency.bpf.o"
    requires = ("btf", "cap_bpf", "raw_tracepoint")
    config_schema = {
        "syscalls": Field("str_list", [], "syscall names to trace; empty traces all", check=_check_syscalls),
        "key_by": Field("str", "process", "aggregate in the kernel per process or per cgroup",
                        choices=("process", "cgroup")),
        "top_processes": Field("int", 50, "processes exported with process.pid; the rest are aggregated "
                               "per executable name", minimum=0),
        "max_series": Field("int", 2000, "(syscall, process/executable) series exported at most; the rest "
                            "go to an overflow series and are counted", minimum=1),
        "max_keys": Field("int", 16384, "kernel map entries (syscall, process); beyond it events go to a "
                          "per-syscall overflow histogram and are counted", minimum=64),
        "inflight_slots": Field("int", 262144, "per-thread slots for in-flight syscalls (power of two); "
                                "threads whose tids collide lose a measurement, counted",
                                minimum=1024, check=check_power_of_two),
        "exclude_agent": Field("bool", True, "do not measure the agent's own syscalls"),
    }

    def start(self) -> None:
        self._table = syscall_table()
        by_name = {v: k for k, v in self._table.items()}
        obj = self.open_object()
        if self.config["exclude_agent"]:
            obj.set_global("self_tgid", struct.pack("=I", self.ctx.agent_pid))
        slots = self.config["inflight_slots"]
        obj.set_global("slot_mask", struct.pack("=I", slots - 1))
        obj.map("sc_lat_slots").set_max_entries(slots)
        obj.map("sc_lat_hist").set_max_entries(self.config["max_keys"])
        obj.set_global("key_by_cgroup", struct.pack("=?", self.config["key_by"] == "cgroup"))
        if self.config["syscalls"]:
            enabled = bytearray(MAX_SYSCALLS)
            for n in self.config["syscalls"]:
                enabled[by_name[n]] = 1
            obj.set_global("filter_syscalls", b"\x01")
            obj.set_global("syscall_enabled", bytes(enabled))
        for name in ("exit", "exit_group"):
            if name in by_name:
                obj.set_global(f"nr_{name}", struct.pack("=i", by_name[name]))
        obj.load()
        self._hist = obj.map("sc_lat_hist")
        self._ovf = obj.map("sc_lat_ovf")
        self._stats = obj.map("sc_lat_stats")
        for prog in obj.programs():
            prog.attach()
        self.start_ns = time.time_ns()
        self._last_tick_ns = self.start_ns
        self._prev: dict = {}        # kernel key -> raw value last read
        self._prev_ovf: dict = {}    # same, for the overflow histograms
        self._retiring: set = set()  # pids whose series go after one last export
        self._series: dict = {}      # attribute tuple -> _Acc
        self._pid_series: dict = {}  # pids exported with process.pid -> last tick they were active
        self._tick = 0
        self._procs = ProcessNames()
        self._cgroups = CgroupPaths() if self.config["key_by"] == "cgroup" else None
        self._series_overflow = 0

    # ------------------------------------------------------------- collect
    def collect(self) -> list:
        now = time.time_ns()
        self._tick += 1
        for pid in self._retiring:  # exited last tick; their final values went out then
            self._retire_pid(pid)
        self._retiring = set()
        deltas = self._read_deltas(self._hist.items(), self._prev)
        self._route(deltas, now)
        self._collect_overflow()
        self._reap_exited(now)
        self._last_tick_ns = now
        return self._records()

    @staticmethod
    def _read_deltas(items, prev: dict) -> list:
        """(owner, nr, comm, delta buckets, delta sum, delta errors) per key
        that moved. prev keeps each key's raw value: an unchanged entry costs
        one bytes comparison."""
        out = []
        for kb, vb in items:
            old = prev.get(kb)
            if old == vb:
                continue
            prev[kb] = vb
            owner, nr, _ = _KEY.unpack(kb)
            vals = _VALUE.unpack(vb)
            comm = vals[0].split(b"\0", 1)[0].decode(errors="replace")
            buckets, s, errs = vals[1:1 + NBUCKETS], vals[1 + NBUCKETS], vals[2 + NBUCKETS]
            if old is None:
                if any(buckets):
                    out.append((owner, nr, comm, buckets, s, errs))
                continue
            ovals = _VALUE.unpack(old)
            db = [a - b for a, b in zip(buckets, ovals[1:1 + NBUCKETS])]
            out.append((owner, nr, comm, db, s - ovals[1 + NBUCKETS], errs - ovals[2 + NBUCKETS]))
        return out

    def _route(self, deltas: list, now: int) -> None:
        """Assign each delta to a series: per pid for the busiest processes,
        per executable for the rest, overflow beyond max_series."""
        by_cgroup = self._cgroups is not None
        if by_cgroup:
            paths = self._cgroups.resolve_all({d[0] for d in deltas})
        else:
            # Promote the busiest live pids while there is room; a slot is kept while
            # its process stays active (see _demote_idle).
            activity: dict = {}
            for owner, _nr, _c, db, _s, _e in deltas:
                activity[owner] = activity.get(owner, 0) + sum(db)
            for pid in activity:
                if pid in self._pid_series:
                    self._pid_series[pid] = self._tick
            self._demote_idle()
            room = self.config["top_processes"] - len(self._pid_series)
            if room > 0:
                # an already-exited process gets no series of its own
                new = sorted((p for p in activity if p not in self._pid_series and alive(p)), key=activity.get,
                             reverse=True)
                for pid in new[:room]:
                    self._pid_series[pid] = self._tick
        names: dict = {}  # one /proc read per process per tick
        for owner, nr, comm, db, s, errs in deltas:
            attrs = {"syscall.name": self._table.get(nr, f"syscall_{nr}")}
            if by_cgroup:
                attrs["otelbpf.cgroup.id"] = owner
                attrs["otelbpf.cgroup.path"] = paths.get(owner) or "unknown"
            else:
                exe = names.get(owner)
                if exe is None:
                    exe = names[owner] = self._procs.executable_name(owner, fallback=comm) or "unknown"
                attrs["process.executable.name"] = exe
                if owner in self._pid_series:
                    attrs["process.pid"] = owner
            self._add(attrs, db, s, errs)

    def _demote_idle(self) -> None:
        """A per-pid slot idle for IDLE_TICKS goes back to the pool (its series
        after one last export), so new busy processes can get one."""
        if len(self._pid_series) < self.config["top_processes"]:
            return
        for pid, last in list(self._pid_series.items()):
            if self._tick - last >= IDLE_TICKS:
                del self._pid_series[pid]
                self._retiring.add(pid)

    def _add(self, attrs: dict, buckets, s: int, errs: int) -> None:
        key = tuple(sorted(attrs.items()))
        acc = self._series.get(key)
        if acc is None:
            if len(self._series) >= self.config["max_series"]:
                self._series_overflow += sum(buckets)
                key = (("otelbpf.overflow", True), ("syscall.name", attrs["syscall.name"]))
                acc = self._series.get(key)
            if acc is None:
                acc = self._series[key] = _Acc(self._last_tick_ns)
        acc.add(buckets, s, errs)

    def _collect_overflow(self) -> None:
        """Events whose key did not fit in the kernel map."""
        # Re-key the array (u32 syscall nr) like the hash map so one decoder serves both.
        items = ((_KEY.pack(0, struct.unpack("=I", k)[0], 0), v) for k, v in self._ovf.items())
        for _o, nr, _c, db, s, e in self._read_deltas(items, self._prev_ovf):
            self._add({"syscall.name": self._table.get(nr, f"syscall_{nr}"), "otelbpf.overflow": True}, db, s, e)

    def _reap_exited(self, now: int) -> None:
        """Free kernel entries of processes (or cgroups) that are gone, after
        their last counts were read above, and retire their per-pid series."""
        owners = {_KEY.unpack(kb)[0] for kb in self._prev}
        if self._cgroups is not None:
            paths = self._cgroups.resolve_all(owners)  # rewalks the tree for unknown ids
            dead = {o for o in owners if paths.get(o) is None}
        else:
            dead = {o for o in owners if o and not alive(o)}
        if not dead:
            return
        # each key goes with its last value, so nothing counted since the read
        # above is lost
        last = [(kb, self._hist.lookup_and_delete(kb)) for kb in self._prev if _KEY.unpack(kb)[0] in dead]
        late = self._read_deltas([(kb, vb) for kb, vb in last if vb is not None], self._prev)
        if late:
            self._route(late, now)
        for kb, _vb in last:
            del self._prev[kb]
        if self._cgroups is not None:
            return
        for pid in dead:
            if self._pid_series.pop(pid, None) is not None:
                self._retiring.add(pid)

    def _retire_pid(self, pid: int) -> None:
        # Its final cumulative values were exported in earlier ticks; drop the
        # series so memory stays bounded by live processes.
        for key in [k for k in self._series if ("process.pid", pid) in k]:
            del self._series[key]

    # ------------------------------------------------------------- records
    def _records(self) -> list:
        out = []
        for key, acc in self._series.items():
            attrs = dict(key)
            out.append(Log2Histogram(DURATION, attrs, list(acc.buckets), float(acc.sum), acc.start_ns))
            if acc.errors:
                out.append(Counter(ERRORS, attrs, acc.errors, acc.start_ns))
        stats = self._kernel_stats()
        # Each collision overwrote one in-flight measurement: those are the losses.
        out.append(dropped(self.name, "slot_collision", stats["slot_collision"], self.start_ns))
        # Exits without a recorded enter: the collisions' victims plus syscalls
        # already running at attach (expected): shown, but not as drops.
        out.append(Counter(UNMATCHED, {}, stats["no_enter"], self.start_ns))
        out.append(overflow(self.name, "kernel_map_full", stats["overflow"], self.start_ns))
        out.append(overflow(self.name, "max_series", self._series_overflow, self.start_ns))
        return out

    def _kernel_stats(self) -> dict:
        return dict(zip(STATS, self._stats.counters(len(STATS))))
