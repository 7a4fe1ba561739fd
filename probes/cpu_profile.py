"""Whole-host CPU profiler: perf_event sampling on every online CPU, stacks
and counts aggregated in the kernel (bpf/cpu_profile.bpf.c), symbolized here
(kallsyms for the kernel, our own ELF symbol tables for user code), one profile per
interval.

User stacks are walked in the kernel with unwind tables built from each
binary's .eh_frame (collector/unwind), so binaries without frame pointers
give whole stacks; frame pointers are the fallback where no table covers a pc.
"""
from __future__ import annotations

import os
import struct
import threading
import time

from collector import perf
from collector.config import Field
from collector.metadata.process import ProcessNames, alive
from collector.probe import BpfProbe, ProbeError
from collector.records import Counter, Frame, Gauge, Instrument, Profile, ProfileSample
from collector.selftelemetry import dropped
from collector.shared import HTTP_REQUEST_ATTRIBUTES
from collector.symbolize.kernel import KernelSymbols
from collector.symbolize.user import UserSymbolizer
from collector.unwind.builder import TableBuilder
from collector.unwind.manager import UnwindManager
from collector.unwind.pool import ROW_BYTES
from collector.unwind import python
from collector.unwind import stacks as stacks_mod
from collector.unwind.stacks import UserStacks

STACK_DEPTH = 127                        # PROF_STACK_DEPTH in the .bpf.c
_KEY = struct.Struct("=Ii Q16s QQ16sBB6x")   # struct prof_key (with its struct prof_request)
_STACK = struct.Struct(f"={STACK_DEPTH}Q")
STATS = ("samples", "idle", "user_stack_lost", "kernel_stack_lost", "counts_full",   # enum prof_stat
         "unwind_no_table", "unwind_truncated", "unwind_read_fail", "unwind_fp_frames",
         "unwind_unsupported", "unwind_bad_frame", "tail_call_fail", "in_request")
PROG_SLOTS = ("prof_unwind", "prof_python")   # enum prof_prog: the walk's tail calls

UNWIND_FALLBACK = Instrument("otelbpf.profiler.unwind.fallback", "{event}",
                             "Samples walked by frame pointers because their process had no table yet "
                             "(reason=no_table_yet), frames no unwind row covered (frame_pointer_frames), "
                             "rows the kernel walker cannot follow (unsupported_rule)")
UNWIND_TABLE_MEMORY = Instrument("otelbpf.profiler.unwind.table.memory", "By",
                                 "Kernel memory of the unwind row pool: used and capacity")
UNWIND_TABLES = Instrument("otelbpf.profiler.unwind.tables", "{binary}", "Binaries with an unwind table loaded")
REQUEST_SAMPLES = Instrument("otelbpf.profiler.request.samples", "{sample}",
                             "CPU samples (idle excluded) of threads serving an HTTP request "
                             "(otelbpf.request=attributed: the sample carries it) or not (unattributed)")
UNWIND_EVICTIONS = Instrument("otelbpf.profiler.unwind.evictions", "{binary}",
                              "Unwind tables evicted to make room (binaries sampled least recently)")
NS_PER_S = 1_000_000_000                 # profile periods are in ns
DRAIN_GRACE_S = 0.002  # lets samples that read the old `active` finish before the drain


class PythonFrames:
    """Which sampled processes run CPython (their py_procs value, for the
    kernel walker) and the symbolizer of their code objects."""

    def __init__(self):
        self.symbols = python.PythonSymbolizer()
        self._lock = threading.Lock()   # register() runs in the unwind thread, the rest in collect()

    def register(self, pid: int):
        """From the unwind thread: (py_procs value or None, whether to ask again later)."""
        proc, why = python.detect(pid)
        if proc is None:
            return None, why.startswith("not ready")
        with self._lock:
            self.symbols.track(proc)
        return proc.pack(), False

    def merge(self, pid: int, frames: list, pairs: list) -> list:
        with self._lock:
            return python.merge(frames, pairs, lambda code, word: self.symbols.resolve(pid, code, word))

    def forget(self, pid: int) -> None:
        with self._lock:
            self.symbols.forget(pid)


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list:
    """'0-3,6' -> [0, 1, 2, 3, 6]"""
    with open(path) as f:
        text = f.read().strip()
    out = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


class CpuProfileProbe(BpfProbe):
    name = "cpu_profile"
    description = "whole-host CPU profiles: kernel+user stacks sampled on every CPU (perf_event)"
    bpf_object = "cpu_profile.bpf.o"
    requires = ("btf", "cap_bpf", "cap_perfmon", "perf_event", "perf_event_prog")
    shared_maps = ("otb_thread_requests",)   # the request each thread serves, written by the http probe
    config_schema = {
        "frequency": Field("int", 99, "samples per second per CPU", minimum=1, maximum=10000),
        "event": Field("str", "cpu-clock", "cpu-clock (software, works in VMs) or cycles (hardware; falls back "
                       "to cpu-clock where absent)", choices=("cpu-clock", "cycles")),
        "idle": Field("str", "drop", "samples of idle CPUs: drop (counted only) or keep",
                      choices=("drop", "keep")),
        "max_stacks": Field("int", 4096, "distinct kernel stacks per interval (1 KiB each, two buffers); "
                            "beyond it kernel stacks are lost, counted", minimum=256),
        "max_keys": Field("int", 16384, "distinct (process, thread, stacks) per interval; beyond it samples "
                          "are dropped, counted", minimum=256),
        "unwind": Field("str", "dwarf", "user stacks: dwarf (tables from .eh_frame, frame pointers where none) "
                        "or frame-pointers only", choices=("dwarf", "frame-pointers")),
        "unwind_table_memory": Field("bytes", 16 << 20, "kernel memory for unwind tables (8 bytes a row); "
                                     "beyond it the binaries sampled least recently are evicted",
                                     minimum=1 << 20, maximum=1 << 30),
        "unwind_cache_dir": Field("str", "/var/cache/otelbpf/unwind", "where built unwind tables are kept "
                                  "across restarts, by build id (empty: not kept)"),
        "max_processes": Field("int", 1024, "processes with a mapping table in the kernel; beyond it the one "
                               "sampled least recently is dropped (walked by frame pointers until sampled again)",
                               minimum=16),
        "max_user_stacks": Field("int", 4096, "distinct user stacks the kernel holds between collections "
                                 "(1.8 KiB each); beyond it stacks are lost, counted", minimum=256),
        "python": Field("bool", True, "read CPython's frames (function, file, line) in place of the "
                        "interpreter's native frames"),
    }

    def start(self) -> None:
        obj = self.open_object()
        obj.set_global("drop_idle", struct.pack("=?", self.config["idle"] == "drop"))
        for i in (0, 1):
            obj.map(f"prof_stacks{i}").set_max_entries(self.config["max_stacks"])
            obj.map(f"prof_counts{i}").set_max_entries(self.config["max_keys"])
        obj.map("prof_ustacks").set_max_entries(self.config["max_user_stacks"])
        obj.map("unwind_rows").set_max_entries(self.config["unwind_table_memory"] // ROW_BYTES)
        obj.map("unwind_procs").set_max_entries(self.config["max_processes"])
        self.load_object(obj)
        progs = obj.map("prof_progs")
        for slot, name in enumerate(PROG_SLOTS):
            progs.update(struct.pack("=I", slot), struct.pack("=I", obj.program(name).fd))
        self._prog = obj.program("prof_sample")
        self._ustacks = UserStacks(obj.map("prof_ustacks"))
        self._unwind = None
        self._python = None
        self._perf_fds: dict = {}   # cpu -> perf_event link (which owns the event's fd)
        self._event = self.config["event"]
        self._attach_cpus()
        if not self._perf_fds:
            raise ProbeError("no CPU could be sampled")
        self._active = 0
        self._stats = obj.map("prof_stats")
        self._ksyms = KernelSymbols()
        if not self._ksyms.available:
            self.log.warning("/proc/kallsyms shows no addresses (kptr_restrict): kernel frames stay unnamed")
        self._usyms = UserSymbolizer()
        self._procs = ProcessNames()
        self.start_ns = self._last_ns = time.time_ns()
        self.period_ns = round(NS_PER_S / self.config["frequency"])   # ns between samples at frequency Hz
        self.truncated = 0
        self.user_stack_missing = 0
        if self.config["unwind"] == "dwarf":   # last: nothing above can fail with its thread running
            self._unwind = UnwindManager(obj, self._table_builder(), self.config["max_processes"],
                                         python=self._python_reader(),
                                         on_new_process=lambda pid: self._usyms.refresh([pid]),
                                         last_pid=self.ctx.agent_pid)
            self._unwind.start()

    # ------------------------------------------------------------- perf events
    def _open_event(self, cpu: int) -> int:
        freq = self.config["frequency"]
        if self._event == "cycles":
            try:
                attr = perf.PerfEventAttr(type=perf.PERF_TYPE_HARDWARE, config=perf.PERF_COUNT_HW_CPU_CYCLES,
                                          sample_period_or_freq=freq, flags=1 << 10)
                return perf.perf_event_open(attr, -1, cpu)
            except OSError as e:
                self.log.warning("hardware cycles unavailable (%s); sampling cpu-clock instead", e.strerror)
                self._event = "cpu-clock"
        return perf.open_cpu_clock(cpu, freq)

    def _attach_cpus(self) -> None:
        """Cover every online CPU, including ones that came online since; an
        event of a CPU that went offline is dropped and reopened when it is back."""
        online = online_cpus()
        for cpu in [c for c in self._perf_fds if c not in online]:
            self._perf_fds.pop(cpu).close()  # the link owns the perf event fd
        for cpu in online:
            if cpu in self._perf_fds:
                continue
            try:
                fd = self._open_event(cpu)
            except OSError as e:
                self.log.warning("cpu %d: perf_event_open failed: %s", cpu, e.strerror)
                continue
            try:
                link = self._prog.attach_perf_event(fd)
            except Exception:
                os.close(fd)
                raise
            self._perf_fds[cpu] = link

    def stop(self) -> None:
        if getattr(self, "_unwind", None) is not None:
            self._unwind.stop()
        super().stop()  # destroying a perf_event link also closes its perf event fd
        self._perf_fds = {}

    def _table_builder(self):
        return TableBuilder(self.config["unwind_cache_dir"] or None)

    def _python_reader(self):
        if not self.config["python"]:
            return None
        self._python = PythonFrames()
        return self._python.register

    # ------------------------------------------------------------- collect
    def _drain(self) -> tuple:
        """Flip the active buffer, then read and clear the previous one."""
        old = self._active
        self._active ^= 1
        self.obj.write_global("active", struct.pack("=I", self._active))
        time.sleep(DRAIN_GRACE_S)
        counts_map = self.obj.map(f"prof_counts{old}")
        stacks_map = self.obj.map(f"prof_stacks{old}")
        counts = counts_map.items()
        counts_map.delete_many([k for k, _ in counts])
        stacks = {}
        for k in list(stacks_map.keys()):
            raw = stacks_map.lookup(k)
            if raw is not None:
                stacks[struct.unpack("=I", k)[0]] = raw
        stacks_map.delete_many(list(struct.pack("=I", s) for s in stacks))
        self._ustacks.drain()
        return counts, stacks

    def _kernel_frames(self, stacks: dict, kernel_id: int) -> list:
        if kernel_id < 0 or kernel_id not in stacks:
            return []
        raw = _STACK.unpack(stacks[kernel_id])
        addrs = raw[:raw.index(0)] if 0 in raw else raw
        frames = []
        for addr in addrs:
            sym = self._ksyms.resolve(addr)
            frames.append(Frame(sym[0] if sym else None, addr, None, kernel=True))
        return frames

    def _user_frames(self, pid: int, user_hash: int, samples: int) -> list:
        """The samples' user frames; what is missing or cut is counted per sample."""
        if user_hash == 0:
            return []
        walked = self._ustacks.get(user_hash)
        if walked is None:
            self.user_stack_missing += samples
            return []
        if walked.flags & (stacks_mod.TRUNCATED | stacks_mod.PY_TRUNC):
            self.truncated += samples
        frames = [self._usyms.resolve(pid, addr & ~stacks_mod.PC_EXACT, return_address=i > 0 and not addr & stacks_mod.PC_EXACT)
                  for i, addr in enumerate(walked.native)]
        if walked.python and self._python is not None:
            frames = self._python.merge(pid, frames, list(walked.python))
        return frames

    def collect(self) -> list:
        self._procs.begin_pass()
        self._attach_cpus()
        now = time.time_ns()
        counts, stacks = self._drain()
        keys = [(_KEY.unpack(k), struct.unpack("=Q", v)[0]) for k, v in counts]
        pids = {k[0] for k, _ in keys}
        live = {p for p in pids if p and alive(p)}
        self._usyms.refresh(live)
        if self._unwind is not None:
            self._unwind.sampled(pids)
        samples = []
        request_attributes = self.ctx.shared.lookup(HTTP_REQUEST_ATTRIBUTES) if self.ctx.shared else None
        for (pid, kernel_id, user_hash, comm, route, span_id, trace_id, method, in_request), n in keys:
            thread = comm.split(b"\0", 1)[0].decode(errors="replace")
            attrs = {"process.pid": pid, "thread.name": thread,
                     "process.executable.name": self._procs.executable_name(pid, fallback=thread) or thread}
            if in_request and request_attributes is not None:
                attrs.update(request_attributes(route, method))
            link = (int.from_bytes(trace_id, "big"), span_id) if span_id else None
            frames = self._kernel_frames(stacks, kernel_id) + self._user_frames(pid, user_hash, n)
            samples.append(ProfileSample(attrs, frames, n, link=link))
        self._ustacks.expire()
        # Only now, with their last samples resolved, forget processes that exited.
        for pid in self._usyms.known_pids():
            if pid not in live and not alive(pid):
                self._usyms.forget(pid)
                if self._python is not None:
                    self._python.forget(pid)
        profile = Profile(samples, start_time_ns=self._last_ns, duration_ns=now - self._last_ns,
                          period_ns=self.period_ns)
        self._last_ns = now
        return [profile] + self._stat_records()

    def _stat_records(self) -> list:
        vals = dict(zip(STATS, self._stats.counters(len(STATS))))
        out = [dropped(self.name, reason, vals[reason], self.start_ns)
               for reason in ("user_stack_lost", "kernel_stack_lost", "counts_full", "unwind_truncated",
                              "unwind_read_fail", "unwind_bad_frame", "tail_call_fail")]
        out.append(dropped(self.name, "stack_truncated", self.truncated, self.start_ns))
        out.append(dropped(self.name, "user_stack_missing", self.user_stack_missing, self.start_ns))
        if self.config["idle"] == "drop":
            out.append(dropped(self.name, "idle", vals["idle"], self.start_ns))
        busy = vals["samples"] - vals["idle"]
        out.append(Counter(REQUEST_SAMPLES, {"otelbpf.probe": self.name, "otelbpf.request": "attributed"},
                           vals["in_request"], self.start_ns))
        out.append(Counter(REQUEST_SAMPLES, {"otelbpf.probe": self.name, "otelbpf.request": "unattributed"},
                           max(busy - vals["in_request"], 0), self.start_ns))
        # Not drops, but what the walk fell back to: frame pointers before a table existed / where none covers
        out.append(Counter(UNWIND_FALLBACK, {"otelbpf.probe": self.name, "reason": "no_table_yet"},
                           vals["unwind_no_table"], self.start_ns))
        out.append(Counter(UNWIND_FALLBACK, {"otelbpf.probe": self.name, "reason": "frame_pointer_frames"},
                           vals["unwind_fp_frames"], self.start_ns))
        out.append(Counter(UNWIND_FALLBACK, {"otelbpf.probe": self.name, "reason": "unsupported_rule"},
                           vals["unwind_unsupported"], self.start_ns))
        if self._unwind is not None:
            pool = self._unwind.pool
            out.append(Gauge(UNWIND_TABLE_MEMORY, {"state": "used"}, pool.used_rows * ROW_BYTES))
            out.append(Gauge(UNWIND_TABLE_MEMORY, {"state": "capacity"}, pool.capacity * ROW_BYTES))
            out.append(Gauge(UNWIND_TABLES, {}, pool.tables))
            out.append(Counter(UNWIND_EVICTIONS, {}, pool.evictions, self.start_ns))
        return out
