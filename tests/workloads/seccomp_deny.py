"""Run a command with some syscalls denied by a seccomp filter, as a
container runtime's default profile denies perf_event_open or mount.

usage: seccomp_deny.py SYSCALL[,SYSCALL...] ERRNO_NAME -- COMMAND [ARGS...]

Tests use it to give the agent a kernel that refuses a hook for real
(the filter is inherited across exec), instead of mocking the refusal.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from probes import syscall_tables  # noqa: E402

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def build_filter(numbers: list, err: int, audit_arch: int) -> bytes:
    prog = [insn(LD_W_ABS, 0, 0, 4),                       # seccomp_data.arch
            insn(JEQ_K, 1, 0, audit_arch),
            insn(RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),    # another ABI: refuse to guess
            insn(LD_W_ABS, 0, 0, 0)]                        # seccomp_data.nr
    for i, nr in enumerate(numbers):
        # equal: jump over the remaining compares and the ALLOW to the ERRNO
        prog.append(insn(JEQ_K, len(numbers) - i, 0, nr))
    prog += [insn(RET_K, 0, 0, SECCOMP_RET_ALLOW), insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | err)]
    return b"".join(prog)


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    audit_arch = ARCHES[platform.machine()]
    table = {name: nr for nr, name in syscall_tables.TABLES[platform.machine()].items()}
    numbers = [table[name] for name in sys.argv[1].split(",")]
    err = getattr(errno, sys.argv[2])
    code = build_filter(numbers, err, audit_arch)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0):
        sys.exit(f"seccomp_deny: {os.strerror(ctypes.get_errno())}")
    os.execvp(sys.argv[4], sys.argv[4:])


if __name__ == "__main__":
    main()
