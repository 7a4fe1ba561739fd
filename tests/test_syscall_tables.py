"""Syscall number tables for x86_64 and aarch64."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes.syscall_tables import AARCH64, X86_64

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("table,nr,name", [
    (X86_64, 0, "read"), (X86_64, 39, "getpid"), (X86_64, 110, "getppid"), (X86_64, 35, "nanosleep"),
    (X86_64, 231, "exit_group"), (X86_64, 257, "openat"), (X86_64, 262, "newfstatat"),
    (AARCH64, 63, "read"), (AARCH64, 173, "getppid"), (AARCH64, 101, "nanosleep"), (AARCH64, 94, "exit_group"),
    (AARCH64, 56, "openat"), (AARCH64, 79, "newfstatat"), (AARCH64, 25, "fcntl"), (AARCH64, 222, "mmap"),
    (AARCH64, 435, "clone3"),
])
def test_known_numbers(table, nr, name):
    assert table[nr] == name


def test_names_are_unique_per_arch():
    for table in (X86_64, AARCH64):
        assert len(set(table.values())) == len(table)


@pytest.mark.skipif(not os.path.exists("/usr/include/asm-generic/unistd.h"), reason="needs linux-libc-dev")
def test_committed_tables_match_the_generator():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_syscall_tables.py")], capture_output=True,
                         text=True, check=True).stdout
    assert out == (ROOT / "probes" / "syscall_tables.py").read_text(), "run `make syscall-tables`"
