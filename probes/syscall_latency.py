"""Syscall latency: kernel-built log2 histograms per (syscall, process).

Kernel side: bpf/syscall_latency.bpf.c (raw_syscalls enter/exit). Each
interval this reads the cumulative histograms, turns them into per-interval
deltas, and adds them to bounded series: per-pid for the busiest processes
(top_processes), per executable for the rest, so forking servers do not
explode the series count.
"""
from __future__ import annotations

import difflib
import mmap
import platform
import struct
import time
from array import array

from collector.config import ConfigError, Field, check_power_of_two
from collector.metadata.cgroup import CgroupPaths
from collector.metadata.process import ProcessNames, alive
from collector.probe import BpfProbe, ProbeError
from collector.records import Counter, Instrument, Log2Histogram
from collector.selftelemetry import dropped, overflow

from .syscall_tables import TABLES

NBUCKETS = 40          # OTB_LOG2_BUCKETS in bpf/log2_hist.h
MAX_SYSCALLS = 1024    # MAX_SYSCALLS in the .bpf.c
# struct sc_hist as u64 words: owner, nr (+pad), comm (2 words), buckets, sum_ns, errors
_WORDS = 4 + NBUCKETS + 2
_COMM = struct.Struct("=QQ")
_ENTRY_BYTES = _WORDS * 8
_ZERO_ENTRY = bytes(_ENTRY_BYTES)
_INDEX = struct.Struct("=I")
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
        "max_keys": Field("int", 16384, "kernel map entries (syscall, process), open addressing: a key takes one "
                          "of 16 entries from its hashed position, so some keys find none before the map is "
                          "full (about 1% at 3/4 full); their events go to a per-syscall overflow histogram "
                          "and are counted", minimum=64),
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
        obj.map("sc_lat_claims").set_max_entries(self.config["max_keys"])
        obj.set_global("hist_entries", struct.pack("=I", self.config["max_keys"]))
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
        self._claims = obj.map("sc_lat_claims")
        self._ovf = obj.map("sc_lat_ovf")
        self._hist_words = _HistView(self._hist)
        self._stats = obj.map("sc_lat_stats")
        for prog in obj.programs():
            prog.attach()
        self.start_ns = time.time_ns()
        self._last_tick_ns = self.start_ns
        self._prev: dict = {}        # sc_lat_hist index -> entry (array of u64 words) last read
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
        self._procs.begin_pass()
        now = time.time_ns()
        self._tick += 1
        for pid in self._retiring:  # exited last tick; their final values went out then
            self._retire_pid(pid)
        self._retiring = set()
        # every taken entry is claimed first: the claims name the entries to read
        claimed = [_INDEX.unpack(k)[0] for k, _v in self._claims.items()]
        deltas = self._read_deltas(self._hist_words.taken(claimed), self._prev)
        self._route(deltas, now)
        self._collect_overflow()
        self._reap_exited(now)
        self._last_tick_ns = now
        return self._records()

    @staticmethod
    def _read_deltas(entries, prev: dict) -> list:
        """(owner, nr, comm, delta buckets, delta sum, delta errors) per entry
        (index, u64 words) that moved. prev keeps each entry's words last read:
        an unchanged entry costs one tuple comparison."""
        out = []
        for ident, vals in entries:
            old = prev.get(ident)
            if old == vals:
                continue
            prev[ident] = vals
            owner, nr = vals[0], vals[1] & 0xFFFFFFFF
            comm = _COMM.pack(vals[2], vals[3]).split(b"\0", 1)[0].decode(errors="replace")
            buckets, s, errs = vals[4:4 + NBUCKETS], vals[4 + NBUCKETS], vals[5 + NBUCKETS]
            if old is None or old[:2] != vals[:2]:  # new, or an entry now holding another key
                if any(buckets):
                    out.append((owner, nr, comm, buckets, s, errs))
                continue
            db = [a - b for a, b in zip(buckets, old[4:4 + NBUCKETS])]
            out.append((owner, nr, comm, db, s - old[4 + NBUCKETS], errs - old[5 + NBUCKETS]))
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
        items = []
        for k, v in self._ovf.items():
            if v == _ZERO_ENTRY:  # most syscalls never overflow
                continue
            nr = _INDEX.unpack(k)[0]  # indexed by syscall nr; the key words stay 0
            items.append((nr, (0, nr) + _words(v)[2:]))
        for _o, nr, _c, db, s, e in self._read_deltas(items, self._prev_ovf):
            self._add({"syscall.name": self._table.get(nr, f"syscall_{nr}"), "otelbpf.overflow": True}, db, s, e)

    def _reap_exited(self, now: int) -> None:
        """Free kernel entries of processes (or cgroups) that are gone, after
        their last counts were read above, and retire their per-pid series."""
        owners = {vals[0] for vals in self._prev.values()}
        if self._cgroups is not None:
            paths = self._cgroups.resolve_all(owners)  # rewalks the tree for unknown ids
            dead = {o for o in owners if paths.get(o) is None}
        else:
            dead = {o for o in owners if o and not alive(o)}
        if not dead:
            return
        # Each entry's last value is read just before it is zeroed and
        # released, so nothing counted since the read above is lost.
        freed = [i for i, vals in self._prev.items() if vals[0] in dead]
        late = self._read_deltas(((i, self._hist_words.entry(i)) for i in freed), self._prev)
        if late:
            self._route(late, now)
        for i in freed:
            key = _INDEX.pack(i)
            self._hist.update(key, _ZERO_ENTRY)  # free before the claim goes, so no CPU sees a stale key
            self._claims.delete(key)
            del self._prev[i]
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

    def stop(self) -> None:
        view = getattr(self, "_hist_words", None)
        if view is not None:
            view.close()  # the mapping holds the map: release it first
            self._hist_words = None
        super().stop()


def _words(value: bytes) -> tuple:
    return tuple(memoryview(value).cast("Q"))


class _HistView:
    """sc_lat_hist (BPF_F_MMAPABLE) mapped read-only: entries are read with
    no syscall each, as aligned u64 words, so no counter is seen torn."""

    def __init__(self, m):
        self.n = m.max_entries
        size = -(-self.n * _ENTRY_BYTES // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mm = mmap.mmap(m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._words = memoryview(self._mm).cast("Q")[:self.n * _WORDS]

    def entry(self, i: int) -> array:
        # array('Q') from the view reads word by word (no torn counter) and
        # holds 8 bytes a word: as a tuple of ints an entry was ~1.5 KB, and
        # the last values of every taken entry are kept (8k of them under a
        # fork-heavy load: 12 MB of tuples)
        return array("Q", self._words[i * _WORDS:(i + 1) * _WORDS])

    def taken(self, indices) -> list:
        """(index, words) of those entries that hold a key (owner set)."""
        w = self._words
        return [(i, self.entry(i)) for i in indices if 0 <= i < self.n and w[i * _WORDS]]

    def close(self) -> None:
        self._words.release()
        self._mm.close()
