"""What this kernel and this process can do: BTF, tracefs, program and map
types, hooks, privileges. Used by `otelbpf check` and by the agent before it
loads a probe, so a probe whose hooks are missing is skipped with one line.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Optional

from . import libbpf, perf
from .mounts import find_mount

SYS_BTF = "/sys/kernel/btf/vmlinux"
# Where the running kernel's BTF is looked for; the variable exists so the
# no-BTF path can be exercised on a kernel that has BTF.
SYS_BTF_ENV = "OTELBPF_KERNEL_BTF"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# Linux capability numbers
CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 12, 19, 21, 24
CAP_PERFMON, CAP_BPF = 38, 39
CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
             CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


@dataclass
class Feature:
    name: str
    available: bool
    detail: str


def effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_cap(cap: int, caps: Optional[int] = None) -> bool:
    return bool((effective_caps() if caps is None else caps) >> cap & 1)


def tracefs_mount_point() -> Optional[str]:
    """Where tracefs is mounted (None when it is not)."""
    return find_mount("tracefs")


class TracefsError(RuntimeError):
    pass


def ensure_tracefs(preferred: str = "/sys/kernel/tracing") -> str:
    """Return tracefs's mount point, mounting it at `preferred` if needed."""
    found = tracefs_mount_point()
    if found:
        return found
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if not os.path.isdir(preferred):
        raise TracefsError(f"tracefs is not mounted and {preferred} does not exist "
                           "(kernel without CONFIG_TRACING?)")
    if libc.mount(b"nodev", preferred.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TracefsError(f"tracefs is not mounted and mounting it on {preferred} failed: "
                           f"{os.strerror(err)} (needs CAP_SYS_ADMIN; or mount it: "
                           f"mount -t tracefs nodev {preferred})")
    return preferred


def _btf_feature(btf_path: Optional[str]) -> Feature:
    if btf_path:
        ok = os.path.isfile(btf_path)
        return Feature("btf", ok, f"custom BTF {btf_path}" + ("" if ok else " is missing"))
    sys_btf = os.environ.get(SYS_BTF_ENV, SYS_BTF)
    if os.path.isfile(sys_btf):
        return Feature("btf", True, sys_btf)
    return Feature("btf", False, f"{sys_btf} missing (kernel without CONFIG_DEBUG_INFO_BTF): "
                   "set kernel.btf to a BTF file for this kernel")


def _tracefs_feature() -> Feature:
    mp = tracefs_mount_point()
    if mp:
        return Feature("tracefs", True, f"mounted at {mp}")
    if has_cap(CAP_SYS_ADMIN):
        return Feature("tracefs", True, "not mounted; the agent mounts it at start")
    return Feature("tracefs", False, "not mounted, and mounting it needs CAP_SYS_ADMIN")


def _pmu_feature(name: str, pmu: str, what: str) -> Feature:
    ok = os.path.exists(f"/sys/bus/event_source/devices/{pmu}/type")
    return Feature(name, ok, f"{what} PMU " + ("present" if ok else f"absent (no /sys/bus/event_source/devices/{pmu})"))


def _prog_type_feature(name: str, kind: str) -> Feature:
    try:
        ok = libbpf.probe_prog_type(kind)
    except (libbpf.BpfError, OSError) as e:
        return Feature(name, False, f"cannot probe: {e}")
    return Feature(name, ok, f"{kind} programs " + ("load" if ok else "are rejected by this kernel"))


def _fentry_feature(bpf_dir: str) -> Feature:
    """fentry needs more than the program type: load a real one."""
    path = os.path.join(bpf_dir, "feature_probe.bpf.o")
    try:
        with libbpf.BpfObject(path) as obj:
            for p in obj.programs():
                p.set_autoload(p.name == "probe_fentry")
            obj.load()
        return Feature("fentry", True, "fentry/vfs_read loads")
    except libbpf.BpfError as e:
        return Feature("fentry", False, f"fentry/vfs_read does not load: {os.strerror(e.errno)}")


def _perf_event_feature() -> Feature:
    try:
        fd = perf.open_cpu_clock(cpu=0, freq=99)
    except OSError as e:
        paranoid = _read("/proc/sys/kernel/perf_event_paranoid")
        return Feature("perf_event", False, f"perf_event_open failed: {os.strerror(e.errno)} "
                       f"(perf_event_paranoid={paranoid}; needs CAP_PERFMON, and a seccomp profile that "
                       "allows perf_event_open: container runtimes' default ones deny it)")
    os.close(fd)
    return Feature("perf_event", True, "software cpu-clock sampling opens")


def _ringbuf_feature() -> Feature:
    try:
        ok = libbpf.probe_map_type(libbpf.BPF_MAP_TYPE_RINGBUF)
    except (libbpf.BpfError, OSError) as e:
        return Feature("ringbuf", False, f"cannot probe: {e}")
    return Feature("ringbuf", ok, "BPF ring buffer " + ("available" if ok else "missing (kernel < 5.8)"))


_program_features: Optional[dict] = None


def program_features() -> dict:
    """The kernel features that choose between a probe's builds, by name
    (detected once: they do not change while the kernel runs)."""
    global _program_features
    if _program_features is None:
        _program_features = {f.name: f for f in _kernel_program_features()}
    return _program_features


def _kernel_program_features() -> list:
    """What decides between a probe's builds (BpfProbe.bpf_variants)."""
    try:
        loop = libbpf.probe_helper("raw_tracepoint", libbpf.BPF_FUNC_LOOP)
    except (libbpf.BpfError, OSError):
        loop = False
    cast = libbpf.kernel_has_type("bpf_rdonly_cast", libbpf.BTF_KIND_FUNC)
    sock_tp = libbpf.kernel_has_type("btf_trace_sock_send_length", libbpf.BTF_KIND_TYPEDEF)
    return [
        Feature("bpf_loop", loop, "bpf_loop helper " + ("available" if loop else "missing (kernel < 5.17)")),
        Feature("kfunc_rdonly_cast", cast, "bpf_rdonly_cast kfunc " + ("available" if cast else
                "missing (kernel < 6.2)")),
        Feature("sock_length_tp", sock_tp, "sock:sock_send_length/sock_recv_length tracepoints " +
                ("present" if sock_tp else "missing (kernel < 6.3)")),
    ]


def _privilege_features() -> list:
    caps = effective_caps()
    bpf_ok = has_cap(CAP_BPF, caps) or has_cap(CAP_SYS_ADMIN, caps)
    perfmon_ok = has_cap(CAP_PERFMON, caps) or has_cap(CAP_SYS_ADMIN, caps)
    have = [n for c, n in sorted(CAP_NAMES.items()) if has_cap(c, caps)]
    return [
        Feature("cap_bpf", bpf_ok, "CAP_BPF or CAP_SYS_ADMIN " + ("held" if bpf_ok else "missing: run as root "
                "or grant CAP_BPF")),
        Feature("cap_perfmon", perfmon_ok, "CAP_PERFMON or CAP_SYS_ADMIN " + ("held" if perfmon_ok else
                "missing: grant CAP_PERFMON")),
        Feature("capabilities", True, "effective: " + (", ".join(have) or "none of the BPF-related ones")),
    ]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def detect(bpf_dir: str, btf_path: Optional[str] = None) -> dict:
    """Everything `check` prints, by feature name."""
    feats = [_btf_feature(btf_path), _tracefs_feature()]
    feats += _privilege_features()
    try:
        libbpf.lib()
        feats.append(Feature("libbpf", True, f"libbpf {libbpf.version()}"))
    except libbpf.BpfError as e:
        feats.append(Feature("libbpf", False, str(e)))
        return {f.name: f for f in feats}
    feats += [
        _prog_type_feature("raw_tracepoint", "raw_tracepoint"),
        _prog_type_feature("tracepoint", "tracepoint"),
        _prog_type_feature("perf_event_prog", "perf_event"),
        _perf_event_feature(),
        _pmu_feature("uprobe", "uprobe", "uprobe"),
        _pmu_feature("kprobe", "kprobe", "kprobe"),
        _fentry_feature(bpf_dir),
        _ringbuf_feature(),
    ] + list(program_features().values())
    return {f.name: f for f in feats}


def missing(required: tuple, features: dict) -> list:
    """Reasons a probe needing `required` cannot run, [] when it can."""
    out = []
    for name in required:
        f = features.get(name)
        if f is None:
            out.append(f"{name}: unknown feature")
        elif not f.available:
            out.append(f"{name}: {f.detail}")
    return out


def errno_hint(err: int, log: str = "") -> str:
    if err == errno.EACCES and "processed" in log:
        return "rejected by the verifier: set log_level: debug for its log"
    if err in (errno.EPERM, errno.EACCES):
        return "not permitted: run as root or grant CAP_BPF and CAP_PERFMON"
    return os.strerror(err)
