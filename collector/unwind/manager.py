"""Keeps the kernel walker's tables current, in a thread of its own.

The kernel asks (map `unwind_wanted`) for processes it sampled without a
mapping table, or whose pc fell outside every mapping (dlopen, exec). This
thread answers: it reads the process's mappings, takes tables from the disk
cache at once, has the missing ones built (one at a time, most-sampled
first) by a second thread that waits for a child process
(collector.unwind.build), and writes them into the row pool and the
process's entry. A build that takes minutes on a busy host holds up no
other process. Nothing of this runs on the collection path; a sample taken
before its table exists is walked by frame pointers and still counted.
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..metadata.process import alive
from .pool import RowPool
from .procs import BinaryIdentity, exec_mappings, mapping_bias, pack_proc
from .rows import UnwindTable
from .table import transient

log = logging.getLogger("otelbpf.unwind")

POLL_S = 0.2
REFRESH_MIN_S = 5.0         # a process's mappings are re-read at most this often (garbage pcs of a
                            # frame-pointer walk ask for it too)
REAP_EVERY_S = 5.0          # entries of exited processes are removed this often
MIN_SAMPLES_TO_BUILD = 3    # a binary seen in fewer walked samples is not worth a build child
_PID = struct.Struct("=I")
_WANT = struct.Struct("=IIQ")    # struct want_key: pid, why, mapping start
WANT_PROCESS, WANT_MAPPING, WANT_REFRESH = 1, 2, 3
MAP_NO_TABLE = 1                 # UNW_MAP_NO_TABLE


@dataclass
class TrackedProcess:
    mappings: list                     # ExecMapping, as last read
    keys: dict                         # ExecMapping -> binary key
    biases: dict                       # ExecMapping -> pc - link-time address (None: unknown)
    refreshed: float
    sampled: float
    binaries: set = field(init=False)

    def __post_init__(self):
        self.binaries = {k for k in self.keys.values() if k is not None}


class UnwindManager:
    def __init__(self, obj, builder, max_processes: int, python: Optional[Callable] = None,
                 on_new_process: Optional[Callable[[int], None]] = None, last_pid: Optional[int] = None):
        """builder: a collector.unwind.builder.TableBuilder; python(pid)
        -> (py_procs value or None, whether to ask again later: an
        interpreter not initialised yet); on_new_process(pid): a process is
        seen for the first time (the symbolizer reads its mappings then, so a
        process that exits within the interval still resolves); last_pid:
        answered after every other process (the agent itself: busiest while it
        starts, it would hold up the processes being profiled)."""
        self._procs_map = obj.map("unwind_procs")
        self._wanted_map = obj.map("unwind_wanted")
        self._py_map = obj.map("py_procs") if python else None
        self._builder = builder
        self._python = python
        self._on_new_process = on_new_process
        self._last_pid = last_pid
        self._max_processes = max_processes
        self.pool = RowPool(obj.map("unwind_rows"), self._evicted)
        self._ids = BinaryIdentity()
        self._procs: dict = {}          # pid -> TrackedProcess
        self._failed: dict = {}         # binary key -> why no table (not retried)
        self._queue: dict = {}          # binary key -> [samples that lacked it, pid, mapping]
        self._lock = threading.Lock()   # _sampled is filled by collect(); _procs read by stats
        self._stop = threading.Event()
        self._gen = 0
        self._python_later: set = set()   # pids whose interpreter was not ready yet
        self._sampled: set = set()        # pids with samples since the upkeep thread last looked
        self.build_seconds: dict = {}   # binary path -> seconds, the most recent builds
        self.stats = {"tables_built": 0, "tables_from_cache": 0, "tables_failed": 0, "build_seconds": 0.0,
                      "processes_evicted": 0}
        self._building = None            # binary key whose table the build thread is making
        self._to_build: "queue.Queue" = queue.Queue()
        self._built: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="otelbpf-unwind", daemon=True)
        self._build_thread = threading.Thread(target=self._build_loop, name="otelbpf-unwind-build", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._build_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._to_build.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if not self._thread.is_alive():   # the pool is only written by that thread
            self.pool.close()
        # a build still running finishes in its own daemon thread, unused

    def sampled(self, pids) -> None:
        """From collect(): these processes had samples (their tables stay
        warm). Only noted here: the pool is the upkeep thread's alone."""
        with self._lock:
            self._sampled.update(pids)

    def _touch_sampled(self) -> None:
        with self._lock:
            pids, self._sampled = self._sampled, set()
            entries = [self._procs[p] for p in pids if p in self._procs]
        now = time.monotonic()
        for entry in entries:
            entry.sampled = now
            for key in entry.binaries:
                self.pool.touch(key)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        last_reap = time.monotonic()
        while not self._stop.is_set():
            try:
                for pid, why, start, samples in self._take_wanted():
                    if why == WANT_MAPPING:
                        self._wanted_mapping(pid, start, samples)
                    else:
                        self._refresh(pid, forced=(why == WANT_PROCESS), samples=samples)
                self._touch_sampled()
                self._take_built()
                if self._queue and self._building is None:
                    self._start_build()
                if time.monotonic() - last_reap > REAP_EVERY_S:
                    self._reap()
                    last_reap = time.monotonic()
            except Exception:   # the profiler keeps running on frame pointers
                log.exception("unwind table upkeep failed")
            self._stop.wait(POLL_S)

    def _take_wanted(self) -> list:
        """(pid, why, mapping start, samples): processes before their
        mappings, the most sampled first (on a busy host the thread may take
        a while to read them all)."""
        out = []
        for k in list(self._wanted_map.keys()):
            v = self._wanted_map.lookup_and_delete(k)
            if v is not None:
                out.append(_WANT.unpack(k) + _PID.unpack(v))
        return sorted(out, key=lambda w: (w[0] == self._last_pid, w[1], -w[3]))

    def _wanted_mapping(self, pid: int, start: int, samples: int) -> None:
        """Samples walked through a mapping without rows: its table moves up the queue."""
        with self._lock:
            entry = self._procs.get(pid)
        if entry is None:
            return
        for m, key in entry.keys.items():
            if m.start != start or key is None or key in self._failed:
                continue
            if key in self._queue:
                self._queue[key][0] += samples
            elif self.pool.get(key) is None and key != self._building:   # evicted since: wanted again
                self._queue[key] = [samples, pid, m]

    def _refresh(self, pid: int, forced: bool, samples: int = 0) -> None:
        """samples: how many samples of the process lacked a table; each of
        its binaries starts that wanted."""
        with self._lock:
            entry = self._procs.get(pid)
        now = time.monotonic()
        if entry is not None and not forced and now - entry.refreshed < REFRESH_MIN_S:
            return
        mappings = exec_mappings(pid)
        if not mappings:
            return
        if entry is not None and entry.mappings == mappings:
            entry.refreshed = now
            return
        if entry is None and len(self._procs) >= self._max_processes:
            self._evict_process()
        keys = {}
        for m in mappings:
            key = self._ids.key(pid, m)
            keys[m] = key
            if key is None:
                continue   # anonymous (JIT) code: in the table, walked by frame pointers
            if (self.pool.get(key) is None and key not in self._failed and key not in self._queue
                    and key != self._building):   # being built: a second build would leak the first rows
                if not self._from_cache(key, pid, m):
                    self._queue[key] = [samples, pid, m]
        tracked = TrackedProcess(mappings, keys, {m: mapping_bias(pid, m) for m in mappings}, now, now)
        with self._lock:
            self._procs[pid] = tracked
        self._write(pid)
        if entry is None and self._on_new_process is not None:
            self._on_new_process(pid)   # right after its tables: a short-lived process is still there
        if self._python is not None and (entry is None or pid in self._python_later):
            self._register_python(pid)

    def _register_python(self, pid: int) -> None:
        value, later = self._python(pid)
        if later:
            self._python_later.add(pid)
        else:
            self._python_later.discard(pid)
        if value is not None:
            self._py_map.update(_PID.pack(pid), value)

    def _write(self, pid: int) -> None:
        with self._lock:
            entry = self._procs.get(pid)
        if entry is None:
            return
        rows = []
        for m in entry.mappings:
            bias = entry.biases[m]
            if bias is None:
                continue
            key = entry.keys[m]
            t = self.pool.get(key) if key is not None else None
            never = key is None or key in self._failed
            rows.append((m.start, bias, min(m.end - m.start, 0xFFFFFFFF),
                         t.start if t else 0, t.n_rows if t else 0, MAP_NO_TABLE if never else 0))
        self._gen += 1
        try:
            self._procs_map.update(_PID.pack(pid), pack_proc(rows, self._gen))
        except OSError as e:
            log.debug("pid %d: mapping table not written: %s", pid, e)

    def _start_build(self) -> None:
        key = max(self._queue, key=lambda k: self._queue[k][0])   # the most wanted; ties: the oldest
        if self._queue[key][0] < MIN_SAMPLES_TO_BUILD:
            return   # nothing sampled enough to be worth a child process yet
        wanted, pid, m = self._queue.pop(key)
        if not m.is_vdso and not os.path.exists(m.open_path(pid)):
            self._requeue_from_another_process(key, wanted)   # that process exited: not the binary's fault
            return
        self._building = key
        self._to_build.put((key, pid, m))

    def _build_loop(self) -> None:
        """The build thread: waits for one child process at a time."""
        while True:
            job = self._to_build.get()
            if job is None or self._stop.is_set():
                return
            key, pid, m = job
            t0 = time.monotonic()
            try:
                table = self._builder.get_vdso() if m.is_vdso else self._builder.get(m.open_path(pid), known_as=m.path)
            except Exception as e:   # the builder never raises by design; a bug must not stop the profiler
                log.exception("unwind table build failed")
                table = UnwindTable(reason=f"build failed: {e}")
            self._built.put((key, m, table, time.monotonic() - t0))

    def _take_built(self) -> None:
        while True:
            try:
                key, m, table, took = self._built.get_nowait()
            except queue.Empty:
                return
            self._building = None
            self.stats["build_seconds"] += took
            self._install(key, m, table, took)

    def _install(self, key, m, table, took: float = 0.0) -> None:
        if self.pool.get(key) is not None:
            return   # loaded from the disk cache meanwhile
        if not table and transient(table):
            log.info("no unwind table for %s yet: %s (asked again when sampled)", m.path, table.reason)
            return
        if not table or self.pool.load(key, table.rows) is None:
            self._failed[key] = table.reason or "does not fit the row pool"
            self.stats["tables_failed"] += 1
            log.info("no unwind table for %s: %s (frame pointers there)", m.path, self._failed[key])
            self._rewrite_users(key)   # the kernel stops asking for it
            return
        self.stats["tables_built"] += 1
        if took:
            self.build_seconds[m.path] = took
        # what bench/profiler_overhead.py reports per binary
        log.debug("unwind table for %s: %d rows in %.0f ms (built: child %d ms, peak RSS %d KiB)", m.path,
                  table.n_rows, took * 1000, table.stats.get("build_ms", 0), table.stats.get("max_rss_kb", 0))
        self._rewrite_users(key)

    def _from_cache(self, key, pid: int, m) -> bool:
        """Load a table the disk cache already holds, now (no child process)."""
        if key == self._building:
            return False
        table = self._builder.cached(None if m.is_vdso else m.open_path(pid))
        if table is None or not table or self.pool.load(key, table.rows) is None:
            return False
        self.stats["tables_from_cache"] += 1
        log.debug("unwind table for %s: %d rows in 0 ms (from the cache)", m.path, table.n_rows)
        self._rewrite_users(key)   # other processes that map it
        return True

    def _requeue_from_another_process(self, key, wanted: int) -> None:
        with self._lock:
            for pid, e in self._procs.items():
                for m, k in e.keys.items():
                    if k == key and os.path.exists(m.open_path(pid)):
                        self._queue[key] = [wanted, pid, m]
                        return

    def _evicted(self, key) -> None:
        """The pool drops this table: rewrite the entries that point at it."""
        self._rewrite_users(key)

    def _rewrite_users(self, key) -> None:
        with self._lock:
            users = [p for p, e in self._procs.items() if key in e.binaries]
        for p in users:
            self._write(p)

    def _evict_process(self) -> None:
        with self._lock:
            pid = min(self._procs, key=lambda p: self._procs[p].sampled)
        self._forget(pid)
        self.stats["processes_evicted"] += 1

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)
        self._procs_map.delete(_PID.pack(pid))
        if self._py_map is not None:
            self._py_map.delete(_PID.pack(pid))

    def _reap(self) -> None:
        with self._lock:
            pids = list(self._procs)
        for pid in pids:
            if not alive(pid):
                self._forget(pid)
        for pid in list(self._python_later):
            if pid in self._procs:
                self._register_python(pid)
            else:
                self._python_later.discard(pid)

    @property
    def processes(self) -> int:
        return len(self._procs)
