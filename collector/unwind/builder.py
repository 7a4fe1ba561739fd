"""The agent's side of table building: a table comes from the disk cache
(one file per binary, named by GNU build id, else dev:inode:mtime:size), or
from a build child (build.py) started with a timeout and an address-space
limit, lowered priority, and no share of the agent's memory. A child that
times out or fails gives an empty table with a reason, remembered for the
agent's lifetime (not on disk: the next start may have more room)."""
from __future__ import annotations

import collections
import ctypes
import glob
import io
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Tuple

from ..symbolize.elf import build_id, build_id_of
from . import cachefile
from .build import EXIT_CANNOT_READ, EXIT_NO_MEMORY, VDSO
from .rows import UnwindTable
from .vdso import vdso_image

DEFAULT_CACHE_DIR = "/var/cache/otelbpf/unwind"
DEFAULT_TIMEOUT = 600.0            # wall clock: a busy host gives a nice-10 child little CPU
DEFAULT_CPU_LIMIT = 120            # CPU seconds (RLIMIT_CPU): postgres 15 takes about 4 here
DEFAULT_AS_LIMIT = 1 << 30         # postgres 15 (73k rows) peaks at 160 MB of address space
DEFAULT_CACHE_BYTES = 256 << 20    # disk the cache may use; the least recently built files go first
_PR_SET_PDEATHSIG = 1
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_key(path: str, bid: Optional[str]) -> Optional[str]:
    """File name of a binary's table: its build id, else what identifies
    this version of the file."""
    if bid and re.fullmatch(r"[0-9a-f]{2,128}", bid):
        return f"b-{bid}"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"i-{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def prune(cache_dir: str, limit: int) -> int:
    """Delete the oldest table files until the directory holds at most
    `limit` bytes; returns how many went."""
    try:
        files = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(cache_dir) if e.is_file()]
    except OSError:
        return 0
    total, gone = sum(f[1] for f in files), 0
    for _mtime, size, path in sorted(files):
        if total <= limit:
            break
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        gone += 1
    return gone
def _libc_prctl():
    """libc's prctl, looked up here: the child between fork and exec only calls it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class TableBuilder:
    def __init__(self, cache_dir: str = DEFAULT_CACHE_DIR, timeout: float = DEFAULT_TIMEOUT,
                 as_limit: int = DEFAULT_AS_LIMIT, python: str = sys.executable,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cpu_limit: int = DEFAULT_CPU_LIMIT):
        self.cache_dir = cache_dir
        self.cpu_limit = cpu_limit
        self.cache_bytes = cache_bytes
        self.timeout = timeout
        self.as_limit = as_limit
        self.python = python
        self.stats: collections.Counter = collections.Counter()   # cache_hits, children, timeouts, ...
        self._failed: Dict[str, UnwindTable] = {}
        self._prctl = _libc_prctl()
        self._parent = os.getpid()

    def get(self, path: str, known_as: Optional[str] = None) -> UnwindTable:
        """The table of the ELF file readable at path (e.g. a process's
        /proc/PID/map_files/... entry); known_as only names it in reasons."""
        key = cache_key(path, build_id(path))
        if key is None:
            self.stats["unreadable"] += 1
            return UnwindTable(reason=f"{known_as or path}: unreadable")
        return self._get(key, path)

    def cached(self, path: Optional[str]) -> Optional[UnwindTable]:
        """The table if the disk cache has it (no child started), else None.
        path None: the vdso."""
        key = self._vdso_key() if path is None else cache_key(path, build_id(path))
        cache_dir, _ = self._cache_dir()
        if not key or not cache_dir:
            return None
        table = cachefile.read(os.path.join(cache_dir, key))
        if table is not None:
            self.stats["cache_hits"] += 1
        return table

    def _vdso_key(self) -> Optional[str]:
        image = vdso_image()
        if not image:
            return None
        bid = build_id_of(io.BytesIO(image))
        return f"b-{bid}" if bid else f"vdso-{os.uname().release}"

    def get_vdso(self) -> UnwindTable:
        key = self._vdso_key()
        if key is None:
            return UnwindTable(reason="no vdso")
        return self._get(key, VDSO)

    def _get(self, key: str, src: str) -> UnwindTable:
        if key in self._failed:
            return self._failed[key]
        cache_dir, writable = self._cache_dir()
        if cache_dir:
            cached = cachefile.read(os.path.join(cache_dir, key))
            if cached is not None:
                self.stats["cache_hits"] += 1
                if writable:
                    os.utime(os.path.join(cache_dir, key))   # recently used: pruned last
                return cached
        if cache_dir and writable:
            table = self._run(src, key, os.path.join(cache_dir, key))
            if table:
                prune(cache_dir, self.cache_bytes)
            return table
        with tempfile.TemporaryDirectory(prefix="otelbpf-unwind-") as tmp:
            return self._run(src, key, os.path.join(tmp, key))

    def _cache_dir(self) -> Tuple[Optional[str], bool]:
        """(directory to read tables from, whether new ones can be kept there).
        A read-only cache (one built ahead, shipped in an image) is still read."""
        if not self.cache_dir:
            return None, False   # not kept across restarts: built in a temporary directory
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        except OSError:
            pass
        if not os.path.isdir(self.cache_dir):
            self.stats["cache_unwritable"] += 1
            return None, False
        writable = os.access(self.cache_dir, os.W_OK)
        if not writable:
            self.stats["cache_unwritable"] += 1
        return self.cache_dir, writable

    def _run(self, src: str, key: str, out: str) -> UnwindTable:
        self._parent = os.getpid()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        self.stats["children"] += 1
        try:
            proc = subprocess.run([self.python, "-m", "collector.unwind.build", src, out],
                                  env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout, preexec_fn=self._limits,
                                  close_fds=True)
        except subprocess.TimeoutExpired:
            for stale in glob.glob(glob.escape(out) + ".tmp*"):   # killed while writing
                os.unlink(stale)
            # not remembered: the host may be less busy next time
            return self._fail(key, "timeouts", f"build timed out after {self.timeout:g}s", remember=False)
        except (OSError, subprocess.SubprocessError) as e:    # no python, a limit refused
            return self._fail(key, "child_errors", f"build child not started: {e}")
        table = cachefile.read(out) if proc.returncode == 0 else None
        if table is None:
            err = proc.stderr.decode(errors="replace")
            oom = proc.returncode == EXIT_NO_MEMORY or "MemoryError" in err
            what = "out of memory" if oom else (err.strip().splitlines() or [""])[-1][:200]
            if proc.returncode == -signal.SIGXCPU:
                what = f"more than {self.cpu_limit} s of CPU"
            # a file that could not be read (its process exited) may be
            # readable through the next process that maps it: not remembered
            return self._fail(key, "child_errors", f"build child exited {proc.returncode}: {what}",
                              remember=proc.returncode != EXIT_CANNOT_READ)
        self.stats["built"] += 1
        return table

    def _limits(self) -> None:
        # in the child, before exec: it dies with the agent (killed, it would
        # otherwise go on building for minutes at nice 10; prctl was looked
        # up before the fork), yields the CPU, its address space and CPU time
        # are capped
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self._parent:
                os._exit(1)   # the agent died before prctl took effect
        # SIGXCPU at the soft limit, SIGKILL a second later if it was ignored
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_limit, self.cpu_limit + 1))
        os.nice(10)
        resource.setrlimit(resource.RLIMIT_AS, (self.as_limit, self.as_limit))

    def _fail(self, key: str, counter: str, reason: str, remember: bool = True) -> UnwindTable:
        self.stats[counter] += 1
        table = UnwindTable(reason=reason)
        if remember:
            self._failed[key] = table
        else:
            table.stats["transient"] = 1   # the caller may ask again later
        return table
