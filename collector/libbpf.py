"""The project's ctypes binding to the system libbpf (libbpf.so.1).

Only what the agent uses is bound: objects, programs, maps, ring buffers,
links and perf events. Every call checks its result and raises BpfError naming
the object, program or map and the errno, with libbpf's own log lines (the
verifier log among them) captured instead of printed on stderr.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno as errno_mod
import mmap
import os
import threading
from typing import Callable, Iterator, Optional

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int
_c_char_p = ctypes.c_char_p
_c_size_t = ctypes.c_size_t


class BpfError(OSError):
    """A libbpf or bpf() failure, with the libbpf log lines that explain it."""

    def __init__(self, err: int, what: str, log: str = ""):
        self.log = log
        msg = f"{what}: {os.strerror(err)} (errno {err})"
        super().__init__(err, msg)

    def __str__(self) -> str:  # OSError's default puts "[Errno n]" first
        return self.args[1] + (f"\n{self.log}" if self.log else "")

    def reason(self) -> str:
        """Why, in one line: the verifier's verdict (the line before its
        "processed N insns" summary), a missing kernel symbol, or the errno."""
        lines = [ln.strip() for ln in self.log.splitlines() if ln.strip()]
        for i, ln in enumerate(lines):
            if ln.startswith("processed ") and " insns" in ln and i > 0:
                return f"{self.args[1]}: verifier: {lines[i - 1]}"
        for ln in lines:
            if "not found in kernel" in ln or "failed to find kernel BTF type" in ln:
                return f"{self.args[1]}: {ln.removeprefix('libbpf: ')}"
        return self.args[1]


# --------------------------------------------------------------------------
# Library loading and log capture

_LIB_NAMES = ("libbpf.so.1", ctypes.util.find_library("bpf") or "libbpf.so")
_lib: Optional[ctypes.CDLL] = None
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()

# libbpf's print callback gets a va_list; libc's vsnprintf formats it. On
# x86_64 and aarch64 alike the va_list arrives as a pointer.
_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)
_libc.vsnprintf.argtypes = [_c_char_p, _c_size_t, _c_char_p, _c_void_p]
_LOG_LINES: "collections.deque[str]" = collections.deque(maxlen=4000)
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


_log_total = [0]  # lines ever captured, so marks survive the deque wrapping


# One message can be a whole verifier log: room for it, reserved once in an
# anonymous mapping, so only the pages a message reaches become resident
# (a ctypes string buffer is zero-filled: 4 MiB of the agent's RSS for good).
_PRINT_MAP = mmap.mmap(-1, 4 << 20)
_PRINT_BUF = (ctypes.c_char * len(_PRINT_MAP)).from_buffer(_PRINT_MAP)


def _print_cb(level: int, fmt: bytes, args: int) -> int:
    if level > LIBBPF_INFO:
        return 0
    buf = _PRINT_BUF
    _libc.vsnprintf(buf, len(buf), fmt, args)
    for line in buf.value.decode(errors="replace").splitlines():
        _LOG_LINES.append(line)
        _log_total[0] += 1
    return 0


_print_cb_ref = _PRINT_FN(_print_cb)  # kept alive for the process lifetime


def log_mark() -> int:
    """A position in the captured libbpf log, for log_since()."""
    return _log_total[0]


def log_since(mark: int, max_lines: int = 60) -> str:
    """libbpf's log lines since mark; verifier logs can be huge, so keep the
    end, where the error is."""
    new = min(_log_total[0] - mark, len(_LOG_LINES))
    tail = list(_LOG_LINES)[len(_LOG_LINES) - new:] if new > 0 else []
    if len(tail) > max_lines:
        tail = ["..."] + tail[-max_lines:]
    return "\n".join(tail)


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with prototypes declared and logging captured."""
    global _lib
    with _lock:
        if _lib is None:
            last_err = None
            for name in _LIB_NAMES:
                try:
                    _lib = ctypes.CDLL(name, use_errno=True)
                    break
                except OSError as e:
                    last_err = e
            else:
                raise BpfError(errno_mod.ENOENT, f"cannot load libbpf.so.1 ({last_err}); install libbpf1")
            _declare(_lib)
            _lib.libbpf_set_print(_print_cb_ref)
    return _lib


def _declare(l: ctypes.CDLL) -> None:
    P, I, S, U32, U64, SZ = _c_void_p, _c_int, _c_char_p, ctypes.c_uint32, ctypes.c_uint64, _c_size_t
    protos = {
        "libbpf_set_print": (P, [_PRINT_FN]),
        "libbpf_major_version": (U32, []),
        "libbpf_minor_version": (U32, []),
        "libbpf_probe_bpf_prog_type": (I, [I, P]),
        "libbpf_probe_bpf_map_type": (I, [I, P]),
        "libbpf_probe_bpf_helper": (I, [I, I, P]),
        "libbpf_num_possible_cpus": (I, []),
        "bpf_object__open_file": (P, [S, P]),
        "bpf_object__load": (I, [P]),
        "bpf_object__close": (None, [P]),
        "bpf_object__name": (S, [P]),
        "bpf_object__find_program_by_name": (P, [P, S]),
        "bpf_object__next_program": (P, [P, P]),
        "bpf_object__find_map_by_name": (P, [P, S]),
        "bpf_object__next_map": (P, [P, P]),
        "bpf_object__btf": (P, [P]),
        "bpf_program__name": (S, [P]),
        "bpf_program__section_name": (S, [P]),
        "bpf_program__set_autoload": (I, [P, ctypes.c_bool]),
        "bpf_program__autoload": (ctypes.c_bool, [P]),
        "bpf_program__fd": (I, [P]),
        "bpf_program__attach": (P, [P]),
        "bpf_program__attach_raw_tracepoint": (P, [P, S]),
        "bpf_program__attach_tracepoint": (P, [P, S, S]),
        "bpf_program__attach_perf_event": (P, [P, I]),
        "bpf_program__attach_cgroup": (P, [P, I]),
        "bpf_program__attach_uprobe_opts": (P, [P, I, S, SZ, P]),
        "bpf_link__destroy": (I, [P]),
        "bpf_link__fd": (I, [P]),
        "bpf_iter_create": (I, [I]),
        "bpf_map__name": (S, [P]),
        "bpf_map__fd": (I, [P]),
        "bpf_map__type": (I, [P]),
        "bpf_map__key_size": (U32, [P]),
        "bpf_map__value_size": (U32, [P]),
        "bpf_map__max_entries": (U32, [P]),
        "bpf_map__set_max_entries": (I, [P, U32]),
        "bpf_map__reuse_fd": (I, [P, I]),
        "bpf_map__initial_value": (P, [P, ctypes.POINTER(SZ)]),
        "bpf_map_lookup_elem": (I, [I, P, P]),
        "bpf_map_update_elem": (I, [I, P, P, U64]),
        "bpf_map_delete_elem": (I, [I, P]),
        "bpf_map_lookup_and_delete_elem": (I, [I, P, P]),
        "bpf_map_get_next_key": (I, [I, P, P]),
        "bpf_map_lookup_batch": (I, [I, P, P, P, P, ctypes.POINTER(U32), P]),
        "bpf_map_delete_batch": (I, [I, P, ctypes.POINTER(U32), P]),
        "bpf_obj_get_info_by_fd": (I, [I, P, ctypes.POINTER(U32)]),
        "btf__find_by_name_kind": (I, [P, S, U32]),
        "btf__load_vmlinux_btf": (P, []),
        "btf__free": (None, [P]),
        "btf__type_by_id": (P, [P, U32]),
        "btf__name_by_offset": (S, [P, U32]),
        "ring_buffer__new": (P, [I, P, P, P]),
        "ring_buffer__poll": (I, [P, I]),
        "ring_buffer__consume": (I, [P]),
        "ring_buffer__epoll_fd": (I, [P]),
        "ring_buffer__free": (None, [P]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(l, name)
        fn.restype = res
        fn.argtypes = args


def _errno_of(ret: int) -> int:
    """libbpf 1.x returns -errno, or NULL/-1 with errno set."""
    if ret is not None and ret < -1:
        return -ret
    return ctypes.get_errno() or errno_mod.EINVAL


# --------------------------------------------------------------------------
# Structures

class _OpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", _c_size_t),
        ("object_name", _c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", _c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", _c_char_p),
        ("btf_custom_path", _c_char_p),
        ("kernel_log_buf", _c_char_p),
        ("kernel_log_size", _c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _UprobeOpts(ctypes.Structure):
    _fields_ = [
        ("sz", _c_size_t),
        ("ref_ctr_offset", _c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", _c_char_p),
    ]


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


BTF_KIND_DATASEC = 15

# bpf_map_type values used by the agent
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_STACK_TRACE = 7
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
ENOTSUPP = 524  # the kernel's internal "operation not supported", seen by user space as-is
_UNSUPPORTED = (errno_mod.EINVAL, errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP, errno_mod.ENOSYS, ENOTSUPP)


def num_possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n < 0:
        raise BpfError(-n, "libbpf_num_possible_cpus")
    return n


# --------------------------------------------------------------------------
# Links

class Link:
    """An attachment; destroyed on close() (and so detached from the kernel)."""

    def __init__(self, ptr: int, what: str):
        self._ptr = ptr
        self.what = what

    def close(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None

    def run_iter(self, chunk: int = 1 << 16) -> bytes:
        """For an iterator link (SEC("iter/...")): run one pass and return
        what the program wrote with bpf_seq_write/printf."""
        if not self._ptr:
            raise BpfError(errno_mod.EBADF, f"{self.what}: link is closed")
        fd = lib().bpf_iter_create(lib().bpf_link__fd(self._ptr))
        if fd < 0:
            raise BpfError(_errno_of(fd), f"{self.what}: bpf_iter_create")
        out = []
        try:
            while True:
                try:
                    data = os.read(fd, chunk)
                except InterruptedError:
                    continue
                if not data:
                    return b"".join(out)
                out.append(data)
        finally:
            os.close(fd)

    def __del__(self):
        self.close()


# --------------------------------------------------------------------------
# Maps

class Map:
    """A BPF map of an open object; key/value are bytes of the declared sizes."""

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        l = lib()
        self.name = l.bpf_map__name(ptr).decode()
        self.type = l.bpf_map__type(ptr)
        self.key_size = l.bpf_map__key_size(ptr)
        self.value_size = l.bpf_map__value_size(ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._ptr)

    def set_max_entries(self, n: int) -> None:
        ret = lib().bpf_map__set_max_entries(self._ptr, n)
        if ret < 0:
            raise BpfError(-ret, f"{self._obj.name}: map {self.name}: set_max_entries({n})")

    def reuse_fd(self, fd: int) -> None:
        """Before load: use the existing map behind fd (another object's)
        instead of creating this one; its definition must match."""
        ret = lib().bpf_map__reuse_fd(self._ptr, fd)
        if ret < 0:
            raise BpfError(-ret, f"{self._obj.name}: map {self.name}: reuse_fd({fd})")

    @property
    def fd(self) -> int:
        fd = lib().bpf_map__fd(self._ptr)
        if fd < 0:
            raise BpfError(errno_mod.EBADF, f"{self._obj.name}: map {self.name} is not loaded")
        return fd

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    def _value_buf_size(self) -> int:
        if self.percpu:  # per-CPU values are 8-byte aligned, one per possible CPU
            return ((self.value_size + 7) // 8) * 8 * num_possible_cpus()
        return self.value_size

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")

    def lookup(self, key: bytes) -> Optional[bytes]:
        self._check_key(key)
        val = ctypes.create_string_buffer(self._value_buf_size())
        ret = lib().bpf_map_lookup_elem(self.fd, key, val)
        if ret < 0:
            err = _errno_of(ret)
            if err == errno_mod.ENOENT:
                return None
            raise BpfError(err, f"{self._obj.name}: map {self.name}: lookup")
        return val.raw

    def lookup_percpu(self, key: bytes) -> list:
        """Per-CPU map: the value on each possible CPU, as bytes."""
        raw = self.lookup(key)
        if raw is None:
            return []
        stride = ((self.value_size + 7) // 8) * 8
        return [raw[i:i + self.value_size] for i in range(0, len(raw), stride)]

    def counters(self, n: int) -> list:
        """A PERCPU_ARRAY of u64 counters indexed 0..n-1: each summed over CPUs."""
        out = []
        for i in range(n):
            per_cpu = self.lookup_percpu(i.to_bytes(4, "little"))
            out.append(sum(int.from_bytes(v[:8], "little") for v in per_cpu))
        return out

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check_key(key)
        if len(value) != self._value_buf_size():
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, expected {self._value_buf_size()}")
        ret = lib().bpf_map_update_elem(self.fd, key, value, flags)
        if ret < 0:
            raise BpfError(_errno_of(ret), f"{self._obj.name}: map {self.name}: update")

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        ret = lib().bpf_map_delete_elem(self.fd, key)
        if ret < 0:
            err = _errno_of(ret)
            if err == errno_mod.ENOENT:
                return False
            raise BpfError(err, f"{self._obj.name}: map {self.name}: delete")
        return True

    def lookup_and_delete(self, key: bytes) -> Optional[bytes]:
        """Remove a key and return its last value in one step (hash maps,
        kernel 5.14+), so nothing added between a read and a delete is lost;
        on older kernels a lookup, then a delete."""
        self._check_key(key)
        val = ctypes.create_string_buffer(self._value_buf_size())
        ret = lib().bpf_map_lookup_and_delete_elem(self.fd, key, val)
        if ret == 0:
            return val.raw
        err = _errno_of(ret)
        if err == errno_mod.ENOENT:
            return None
        if err not in _UNSUPPORTED:
            raise BpfError(err, f"{self._obj.name}: map {self.name}: lookup_and_delete")
        last = self.lookup(key)
        self.delete(key)
        return last

    def delete_many(self, keys: list) -> int:
        """Delete keys in one syscall where the kernel supports batch ops for
        this map type, else one by one. Missing keys are not an error."""
        if not keys:
            return 0
        for k in keys:
            self._check_key(k)
        count = ctypes.c_uint32(len(keys))
        ret = lib().bpf_map_delete_batch(self.fd, b"".join(keys), ctypes.byref(count), None)
        if ret == 0:
            return count.value
        err = _errno_of(ret)
        if err != errno_mod.ENOENT and err not in _UNSUPPORTED:
            raise BpfError(err, f"{self._obj.name}: map {self.name}: delete_batch")
        if err in _UNSUPPORTED:
            count.value = 0
        # ENOENT stops the batch at the first missing key: finish one by one.
        return count.value + sum(self.delete(k) for k in keys[count.value:])

    def keys(self) -> Iterator[bytes]:
        """Iterate keys with get_next_key (works on every map type and kernel)."""
        fd = self.fd
        key = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = lib().bpf_map_get_next_key(fd, key, nxt)
            if ret < 0:
                err = _errno_of(ret)
                if err == errno_mod.ENOENT:
                    return
                raise BpfError(err, f"{self._obj.name}: map {self.name}: get_next_key")
            key = nxt.raw
            yield key

    def items(self) -> list:
        """All (key, value) pairs: one batch syscall per chunk where the kernel
        supports it for this map type, else get_next_key + lookup."""
        try:
            return self._items_batch()
        except BpfError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        out = []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def _items_batch(self, chunk: int = 256) -> list:
        vsz = self._value_buf_size()
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        vals = ctypes.create_string_buffer(vsz * chunk)
        # Hash maps use a bucket cursor of 4 bytes; arrays of the key size.
        in_batch = ctypes.create_string_buffer(max(8, self.key_size))
        out_batch = ctypes.create_string_buffer(max(8, self.key_size))
        out = []
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = lib().bpf_map_lookup_batch(self.fd, None if first else in_batch, out_batch,
                                             keys, vals, ctypes.byref(count), None)
            err = _errno_of(ret) if ret < 0 else 0
            if ret < 0 and err != errno_mod.ENOENT:
                if first or count.value == 0:
                    raise BpfError(err, f"{self._obj.name}: map {self.name}: lookup_batch")
            n = count.value
            kr, vr = keys.raw, vals.raw
            for i in range(n):
                out.append((kr[i * self.key_size:(i + 1) * self.key_size], vr[i * vsz:(i + 1) * vsz]))
            if ret < 0:  # ENOENT: that was the last chunk
                return out
            ctypes.memmove(in_batch, out_batch, len(out_batch))
            first = False


# --------------------------------------------------------------------------
# Ring buffers

_RB_SAMPLE_FN = ctypes.CFUNCTYPE(_c_int, _c_void_p, _c_void_p, _c_size_t)


class RingBuffer:
    """Consumes a BPF_MAP_TYPE_RINGBUF map; callback(bytes) per record."""

    def __init__(self, m: Map, callback: Callable[[bytes], None]):
        self.map_name = m.name
        self._errors = 0

        def _sample(_ctx, data, size):
            try:
                callback(ctypes.string_at(data, size))
            except Exception:  # an exception must not cross into C
                self._errors += 1
            return 0

        self._cb = _RB_SAMPLE_FN(_sample)
        ptr = lib().ring_buffer__new(m.fd, self._cb, None, None)
        if not ptr:
            raise BpfError(_errno_of(None), f"ring_buffer__new({m.name})")
        self._ptr = ptr

    @property
    def callback_errors(self) -> int:
        return self._errors

    def poll(self, timeout_ms: int = 0) -> int:
        ret = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if ret < 0 and -ret != errno_mod.EINTR:
            raise BpfError(-ret, f"ring_buffer__poll({self.map_name})")
        return max(ret, 0)

    def fileno(self) -> int:
        """An epoll fd that is readable when the kernel woke the ring: wait on
        it (select) without consuming, where two threads share the ring."""
        return lib().ring_buffer__epoll_fd(self._ptr)

    def consume(self) -> int:
        ret = lib().ring_buffer__consume(self._ptr)
        if ret < 0:
            raise BpfError(-ret, f"ring_buffer__consume({self.map_name})")
        return ret

    def close(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


# --------------------------------------------------------------------------
# Programs

class Program:
    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        l = lib()
        self.name = l.bpf_program__name(ptr).decode()
        self.section = l.bpf_program__section_name(ptr).decode()

    def set_autoload(self, enabled: bool) -> None:
        ret = lib().bpf_program__set_autoload(self._ptr, enabled)
        if ret < 0:
            raise BpfError(-ret, f"{self._obj.name}: program {self.name}: set_autoload")

    @property
    def autoload(self) -> bool:
        """Whether load() loads it (programs set not to are never attachable)."""
        return bool(lib().bpf_program__autoload(self._ptr))

    @property
    def fd(self) -> int:
        return lib().bpf_program__fd(self._ptr)

    # struct bpf_prog_info (UAPI, append-only): recursion_misses at 208
    _INFO_SIZE, _MISSES_OFF = 232, 208

    def recursion_misses(self) -> int:
        """Times the kernel skipped this program because it was already
        running on that CPU (an event it never saw); 0 where not reported."""
        fd = self.fd
        if fd < 0:
            return 0
        buf = ctypes.create_string_buffer(self._INFO_SIZE)
        size = ctypes.c_uint32(self._INFO_SIZE)
        if lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) < 0 or size.value < self._MISSES_OFF + 8:
            return 0
        return int.from_bytes(buf.raw[self._MISSES_OFF:self._MISSES_OFF + 8], "little")

    def _link(self, ptr: int, what: str, mark: int) -> Link:
        if not ptr:
            err = _errno_of(None)
            raise BpfError(err, f"{self._obj.name}: program {self.name}: {what}", log_since(mark))
        link = Link(ptr, f"{self.name}:{what}")
        self._obj._links.append(link)
        return link

    def attach(self) -> Link:
        """Attach as the SEC() name says (raw_tp/, tp/, uprobe/path:func...)."""
        mark = log_mark()
        return self._link(lib().bpf_program__attach(self._ptr), f"attach {self.section}", mark)

    def attach_raw_tracepoint(self, tp_name: str) -> Link:
        mark = log_mark()
        return self._link(lib().bpf_program__attach_raw_tracepoint(self._ptr, tp_name.encode()),
                          f"attach raw_tp {tp_name}", mark)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        mark = log_mark()
        return self._link(lib().bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode()),
                          f"attach tracepoint {category}:{name}", mark)

    def attach_perf_event(self, pfd: int) -> Link:
        mark = log_mark()
        return self._link(lib().bpf_program__attach_perf_event(self._ptr, pfd),
                          f"attach perf_event fd {pfd}", mark)

    def attach_cgroup(self, cgroup_fd: int, what: str = "") -> Link:
        """cgroup programs (cgroup_skb...), as a BPF link: detached on close."""
        mark = log_mark()
        return self._link(lib().bpf_program__attach_cgroup(self._ptr, cgroup_fd),
                          f"attach cgroup {what or cgroup_fd}", mark)

    def attach_uprobe(self, binary: str, func_name: str = None, offset: int = 0,
                      pid: int = -1, retprobe: bool = False) -> Link:
        opts = _UprobeOpts(sz=ctypes.sizeof(_UprobeOpts), retprobe=retprobe,
                           func_name=func_name.encode() if func_name else None)
        mark = log_mark()
        ptr = lib().bpf_program__attach_uprobe_opts(self._ptr, pid, binary.encode(), offset,
                                                     ctypes.byref(opts))
        kind = "uretprobe" if retprobe else "uprobe"
        return self._link(ptr, f"attach {kind} {binary}:{func_name or hex(offset)}", mark)


# --------------------------------------------------------------------------
# Objects

class BpfObject:
    """An opened (then loaded) .bpf.o. Use as a context manager or call close():
    closing destroys every link it made and frees its programs and maps."""

    def __init__(self, path: str, btf_custom_path: Optional[str] = None):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self._links: list = []
        self._rings: list = []
        self._ptr = None
        self._loaded = False
        if not os.path.exists(self.path):
            raise BpfError(errno_mod.ENOENT, f"BPF object {self.path} not found (build it with `make bpf`)")
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts),
                         btf_custom_path=btf_custom_path.encode() if btf_custom_path else None)
        mark = log_mark()
        ptr = lib().bpf_object__open_file(self.path.encode(), ctypes.byref(opts))
        if not ptr:
            raise BpfError(_errno_of(None), f"open {self.path}", log_since(mark))
        self._ptr = ptr

    # -- lookup
    def program(self, name: str) -> Program:
        ptr = lib().bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no program named {name}")
        return Program(self, ptr)

    def programs(self) -> list:
        out, p = [], None
        while True:
            p = lib().bpf_object__next_program(self._ptr, p)
            if not p:
                return out
            out.append(Program(self, p))

    def map(self, name: str) -> Map:
        ptr = lib().bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no map named {name}")
        return Map(self, ptr)

    def maps(self) -> list:
        out, p = [], None
        while True:
            p = lib().bpf_object__next_map(self._ptr, p)
            if not p:
                return out
            out.append(Map(self, p))

    # -- globals (.rodata/.data/.bss), set before load
    def _datasec_vars(self, sec: str) -> dict:
        l = lib()
        btf = l.bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: object has no BTF (build with clang -g)")
        tid = l.btf__find_by_name_kind(btf, sec.encode(), BTF_KIND_DATASEC)
        if tid < 0:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no {sec} section")
        t = _BtfType.from_address(l.btf__type_by_id(btf, tid))
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(vlen):
            si = _BtfVarSecinfo.from_address(base + i * ctypes.sizeof(_BtfVarSecinfo))
            var = _BtfType.from_address(l.btf__type_by_id(btf, si.type))
            out[l.btf__name_by_offset(btf, var.name_off).decode()] = (si.offset, si.size)
        return out

    def set_global(self, name: str, value: bytes, section: str = ".rodata") -> None:
        """Write a `const volatile` global before load (libbpf's way of passing
        settings without recompiling)."""
        if self._loaded:
            raise BpfError(errno_mod.EBUSY, f"{self.name}: set {name} after load")
        offset, size = self._datasec_vars(section).get(name, (None, None))
        if offset is None:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no global {name} in {section}")
        if len(value) != size:
            raise ValueError(f"{self.name}: global {name} is {size} bytes, got {len(value)}")
        m = None
        for cand in self.maps():
            if cand.name.endswith(section):
                m = cand
                break
        if m is None:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no {section} map")
        sz = _c_size_t()
        ptr = lib().bpf_map__initial_value(m._ptr, ctypes.byref(sz))
        if not ptr or offset + size > sz.value:
            raise BpfError(errno_mod.EINVAL, f"{self.name}: {section} initial value unavailable")
        ctypes.memmove(ptr + offset, value, size)

    def write_global(self, name: str, value: bytes, section: str = ".bss") -> None:
        """Change a writable global (.bss/.data) of a loaded object: read the
        section's single map element, patch the variable, write it back."""
        if not self._loaded:
            raise BpfError(errno_mod.EINVAL, f"{self.name}: write {name} before load (use set_global)")
        offset, size = self._datasec_vars(section).get(name, (None, None))
        if offset is None:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no global {name} in {section}")
        if len(value) != size:
            raise ValueError(f"{self.name}: global {name} is {size} bytes, got {len(value)}")
        m = next((c for c in self.maps() if c.name.endswith(section)), None)
        if m is None:
            raise BpfError(errno_mod.ENOENT, f"{self.name}: no {section} map")
        zero = b"\0\0\0\0"
        cur = bytearray(m.lookup(zero))
        cur[offset:offset + size] = value
        m.update(zero, bytes(cur))

    # -- lifecycle
    @property
    def loaded(self) -> bool:
        return self._loaded and bool(self._ptr)

    def load(self) -> None:
        mark = log_mark()
        ret = lib().bpf_object__load(self._ptr)
        if ret < 0:
            raise BpfError(-ret, f"load {self.name}", log_since(mark))
        self._loaded = True

    def ring_buffer(self, map_name: str, callback: Callable[[bytes], None]) -> RingBuffer:
        rb = RingBuffer(self.map(map_name), callback)
        self._rings.append(rb)
        return rb

    def close(self) -> None:
        for rb in self._rings:
            rb.close()
        self._rings.clear()
        for link in self._links:
            link.close()
        self._links.clear()
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# --------------------------------------------------------------------------
# Feature probes (used by `otelbpf check` and the agent before loading)

BPF_PROG_TYPE = {"kprobe": 2, "tracepoint": 5, "perf_event": 7, "raw_tracepoint": 17,
                 "tracing": 26, "lsm": 29, "sched_cls": 3, "cgroup_skb": 8}


def probe_prog_type(kind: str) -> bool:
    return lib().libbpf_probe_bpf_prog_type(BPF_PROG_TYPE[kind], None) == 1


def probe_map_type(map_type: int) -> bool:
    return lib().libbpf_probe_bpf_map_type(map_type, None) == 1


BPF_FUNC_LOOP = 181


def probe_helper(kind: str, helper_id: int) -> bool:
    """Whether programs of this type may call the helper on this kernel."""
    return lib().libbpf_probe_bpf_helper(BPF_PROG_TYPE[kind], helper_id, None) == 1


BTF_KIND_STRUCT, BTF_KIND_TYPEDEF, BTF_KIND_FUNC = 4, 8, 12
_kernel_types: dict = {}


def kernel_has_type(name: str, kind: int) -> bool:
    """Whether the running kernel's BTF has this type: how a probe learns that
    a hook exists (raw tracepoint `x` <-> typedef btf_trace_x; iterator `y`
    <-> struct bpf_iter__y) without tracefs."""
    key = (name, kind)
    if key not in _kernel_types:
        btf = lib().btf__load_vmlinux_btf()
        if not btf:
            return False
        try:
            _kernel_types[key] = lib().btf__find_by_name_kind(btf, name.encode(), kind) > 0
        finally:
            lib().btf__free(btf)
    return _kernel_types[key]


def version() -> str:
    l = lib()
    return f"{l.libbpf_major_version()}.{l.libbpf_minor_version()}"
