"""The ELF symbolizer on real binaries: a -O2 workload with exported and
static hot functions, stripped three ways (separate debug file by
.gnu_debuglink, MiniDebugInfo, nothing), resolved per sample against what
Linux perf names the same samples from the unstripped binary."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_root

from collector.symbolize.elf import build_id
from collector.symbolize.elf_symbols import SymbolTable
from collector.symbolize.perfmap import PerfMap
from collector.symbolize.user import BinarySymbols, UserSymbolizer

SRC = ROOT / "tests" / "workloads" / "static_hot.c"
STATIC = ("static_b", "static_c")


def _sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    """full (.symtab), debuglink (stripped + full.debug beside it), mini
    (stripped + .gnu_debugdata, gdb's documented recipe), bare (stripped)."""
    d = tmp_path_factory.mktemp("static_hot")
    full = d / "full"
    _sh("gcc", "-O2", "-rdynamic", "-o", str(full), str(SRC))
    out = {"full": full}
    # debuglink
    dl_dir = d / "dl"
    dl_dir.mkdir()
    _sh("objcopy", "--only-keep-debug", str(full), str(dl_dir / "static_hot.debug"))
    _sh("objcopy", "--strip-all", str(full), str(dl_dir / "static_hot"))
    _sh("objcopy", "--add-gnu-debuglink=static_hot.debug", "static_hot", cwd=dl_dir)
    out["debuglink"] = dl_dir / "static_hot"
    # MiniDebugInfo: the functions .dynsym lacks, in an xz-compressed ELF
    dyn = set(_sh("nm", "-D", "--format=posix", "--defined-only", str(full)).split("\n"))
    dyn = {line.split()[0] for line in dyn if line.strip()}
    funcs = {line.split()[0] for line in _sh("nm", "--format=posix", "--defined-only", str(full)).splitlines()
             if len(line.split()) > 1 and line.split()[1] in ("T", "t")}
    keep = d / "keep_symbols"
    keep.write_text("\n".join(sorted(funcs - dyn)) + "\n")
    _sh("objcopy", "--only-keep-debug", str(full), str(d / "debug"))
    _sh("objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
        f"--keep-symbols={keep}", str(d / "debug"), str(d / "mini_debuginfo"))
    _sh("xz", "-f", str(d / "mini_debuginfo"))
    mini = d / "mini"
    _sh("objcopy", "--strip-all", "-R", ".comment", str(full), str(mini))
    _sh("objcopy", f"--add-section=.gnu_debugdata={d / 'mini_debuginfo.xz'}", str(mini))
    out["mini"] = mini
    bare = d / "bare"
    _sh("objcopy", "--strip-all", str(full), str(bare))
    out["bare"] = bare
    return out


def _nm_funcs(path: Path) -> dict:
    """name -> (address, size) from binutils' nm, the reference for the table."""
    out = {}
    for line in _sh("nm", "-S", "--defined-only", str(path)).splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTiW":
            out[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return out


def _table(path: Path) -> SymbolTable:
    return BinarySymbols(str(path), str(path), build_id(str(path))).table


def test_every_source_names_the_static_functions(variants):
    ref = _nm_funcs(variants["full"])
    statics = {n: v for n, v in ref.items() if n.split(".")[0] in STATIC}
    assert len(statics) == 2, ref
    for kind in ("full", "debuglink", "mini"):
        t = _table(variants[kind])
        for name, (addr, size) in list(statics.items()) + [("hot_exported", ref["hot_exported"])]:
            assert t.lookup(addr) == name.encode() and t.lookup(addr + size - 1) == name.encode(), (kind, name)
    assert any(s.endswith(".debug") for s in _table(variants["debuglink"]).sources)
    assert ".gnu_debugdata" in _table(variants["mini"]).sources


def test_past_a_sized_symbol_is_unnamed_not_the_previous_export(variants):
    ref = _nm_funcs(variants["full"])
    bare = _table(variants["bare"])   # .dynsym only: hot_exported yes, statics no
    addr, size = ref["hot_exported"]
    assert bare.lookup(addr + 1) == b"hot_exported"
    assert bare.lookup(addr + size) != b"hot_exported"
    for name, (a, s) in ref.items():
        if name.split(".")[0] in STATIC:
            got = bare.lookup(a + s // 2)
            assert got is None, (name, got)


def test_sizes_and_zero_size_symbols():
    t = SymbolTable([(0x1000, 0x10, 1, b"exported"), (0x2000, 0, 0, b"asm_stub"), (0x3000, 0x8, 1, b"last")])
    assert t.lookup(0x1000) == b"exported" and t.lookup(0x100F) == b"exported"
    assert t.lookup(0x1010) is None and t.lookup(0x1FFF) is None        # past its size: no name
    assert t.lookup(0x2000) == b"asm_stub" and t.lookup(0x2FFF) == b"asm_stub"   # zero size: up to the next
    assert t.lookup(0x3008) is None and t.lookup(0xFFF) is None
    # aliases at one address: perf's choice (sized, global, fewer underscores)
    t = SymbolTable([(0x10, 4, 2, b"__memcpy_weak"), (0x10, 4, 1, b"memcpy"), (0x10, 0, 1, b"zz_unsized")])
    assert t.lookup(0x12) == b"memcpy"


def test_bad_debug_files_and_corrupt_elves_keep_addresses(variants, tmp_path):
    # a debug file whose CRC does not match the link is not used
    d = tmp_path / "dl"
    shutil.copytree(variants["debuglink"].parent, d)
    with open(d / "static_hot.debug", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    t = _table(d / "static_hot")
    assert not any(s.endswith(".debug") for s in t.sources) and len(t) > 0
    # a missing debug file: .dynsym only
    (d / "static_hot.debug").unlink()
    assert _table(d / "static_hot").lookup(_nm_funcs(variants["full"])["hot_exported"][0]) == b"hot_exported"
    # corrupt MiniDebugInfo: .dynsym only
    bad = tmp_path / "badmini"
    (tmp_path / "junk.xz").write_bytes(b"\xfd7zXZ\x00" + os.urandom(200))
    _sh("objcopy", "--strip-all", str(variants["full"]), str(bad))
    _sh("objcopy", f"--add-section=.gnu_debugdata={tmp_path / 'junk.xz'}", str(bad))
    assert ".gnu_debugdata" not in _table(bad).sources and len(_table(bad)) > 0
    # truncated and garbage ELF files, a missing file
    data = variants["full"].read_bytes()
    for i, blob in enumerate([data[:200], data[:len(data) // 2], b"\x7fELF" + os.urandom(4000), b""]):
        p = tmp_path / f"corrupt{i}"
        p.write_bytes(blob)
        b = BinarySymbols(str(p), str(p), None)
        assert b.resolve(0x1100) is None
    assert BinarySymbols(str(tmp_path / "nope"), None).resolve(0) is None


def test_perf_map_parsed_and_reread_when_changed():
    pid = os.getpid()
    path = Path(f"/tmp/perf-{pid}.map")
    try:
        path.write_text("7f0000001000 40 LazyCompile:*hot hot.js:3\nnot a line\n7f0000002000 zz bad\n")
        pm = PerfMap(pid)
        pm.refresh()
        assert pm.lookup(0x7F0000001000) == "LazyCompile:*hot hot.js:3"
        assert pm.lookup(0x7F000000103F) == "LazyCompile:*hot hot.js:3"
        assert pm.lookup(0x7F0000001040) is None and pm.lookup(0x7F0000002000) is None
        time.sleep(0.01)
        with open(path, "a") as f:
            f.write("7f0000003000 10 Function:cold\n")
        pm.refresh()
        assert pm.lookup(0x7F0000003004) == "Function:cold"
        path.unlink()
        pm.refresh()   # gone (process exited): keep the last names for its pending samples
        assert pm.lookup(0x7F0000003004) == "Function:cold"
    finally:
        path.unlink(missing_ok=True)


def _perf_leaves(perf_data: Path, pid: int, home: Path) -> list:
    """(ip, symbol) of each of pid's samples, as `perf script` names the leaf."""
    out = _sh("perf", "script", "-i", str(perf_data), "-F", "pid,ip,sym", "-G", env={**os.environ, "HOME": str(home)})
    leaves = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and int(parts[0]) == pid:
            leaves.append((int(parts[1], 16), parts[2]))
    return leaves


@needs_root
@pytest.mark.parametrize("kind", ["debuglink", "mini"])
def test_leaf_names_agree_with_perf_per_sample(variants, tmp_path, kind):
    """perf records the stripped binary's run; it names the samples from the
    unstripped copy (same build id, put in a private build-id cache). Our
    symbolizer names the same sample addresses from the stripped copy's debug
    file / MiniDebugInfo."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    _sh("perf", "buildid-cache", "--add", str(variants["full"]), env=env)
    w = subprocess.Popen([str(variants[kind]), "3"], stdout=subprocess.PIPE, text=True)
    pid = int(w.stdout.readline())
    usyms = UserSymbolizer()
    usyms.refresh([pid])
    perf_data = tmp_path / "perf.data"
    _sh("perf", "record", "-e", "cpu-clock", "-F", "99", "-g", "--no-buildid-cache", "-o", str(perf_data),
        "-p", str(pid), "--", "sleep", "2.5", env=env)
    w.wait(timeout=30)
    leaves = _perf_leaves(perf_data, pid, home)
    assert len(leaves) > 150, len(leaves)
    perf_names = {s for _, s in leaves}
    assert {"hot_exported", "static_b.constprop.0", "static_c.constprop.0"} <= perf_names, perf_names
    ours = [usyms.resolve(pid, ip).function for ip, _ in leaves]
    agree = sum(1 for (_, p), o in zip(leaves, ours) if p == o)
    assert agree / len(leaves) >= 0.95, [(hex(ip), p, o) for (ip, p), o in zip(leaves, ours) if p != o][:10]


@needs_root
def test_frames_of_a_process_that_exited_mid_interval_still_resolve(variants):
    """The profiler keeps an exited process's mappings until its last
    samples were symbolized (UserSymbolizer.forget after collect)."""
    import logging

    from collector.config import PROBE_COMMON, parse_section
    from collector.probe import ProbeContext, default_bpf_dir
    from collector.records import Profile
    from probes.cpu_profile import CpuProfileProbe
    cfg = parse_section({}, {**PROBE_COMMON, **CpuProfileProbe.config_schema}, "probes.cpu_profile")
    probe = CpuProfileProbe(cfg, ProbeContext(default_bpf_dir(), None, None, os.getpid(), time.time_ns(),
                                              logging.getLogger("test")))
    w = subprocess.Popen([str(variants["debuglink"]), "2"], stdout=subprocess.PIPE, text=True)
    pid = int(w.stdout.readline())
    try:
        probe.start()
        time.sleep(0.5)
        probe.collect()           # the process is alive: its mappings are read here
        w.wait(timeout=30)        # exits while the next interval's samples wait in the kernel
        assert w.returncode == 0
        records = probe.collect()
    finally:
        probe.stop()
    leaves = [s.frames[0].function for r in records if isinstance(r, Profile) for s in r.samples
              if s.attributes["process.pid"] == pid and s.frames for _ in range(s.count)]
    assert len(leaves) > 50, len(leaves)
    named = [n for n in leaves if n in ("hot_exported", "static_b.constprop.0", "static_c.constprop.0")]
    assert len(named) / len(leaves) >= 0.95, leaves[:20]
    assert pid not in probe._usyms.known_pids()   # then forgotten



def _kallsyms_truth(path) -> dict:
    """address -> names of the text symbols there, ordered by coreutils' sort."""
    lines = _sh("sh", "-c", "awk '$2 ~ /^[tTwW]$/ && $1 !~ /^0+$/ && $4 != \"[bpf]\" {print $1, $3}' \"$0\" "
                "| sort -s -k1,1", str(path))
    truth: dict = {}
    for line in lines.splitlines():
        addr, name = line.split()
        truth.setdefault(int(addr, 16), set()).add(name)
    return truth


def _wrong(ks, truth: dict) -> list:
    return [(hex(a), names, ks.resolve(a)) for a, names in truth.items()
            if (ks.resolve(a) or ("",))[0] not in names or ks.resolve(a)[1] != 0]


@needs_root
def test_kernel_symbols_agree_with_sorted_kallsyms(tmp_path):
    """Every kernel text symbol (BPF programs aside: they come and go) resolves
    to its own name or an alias at its address, offset 0, also when the file
    is in no order at all (its blocks reversed): the packed table sorts what
    kallsyms lists out of order (modules, BPF programs, after the core)."""
    from collector.symbolize.kernel import KernelSymbols
    copy = tmp_path / "kallsyms"
    copy.write_bytes(Path("/proc/kallsyms").read_bytes())
    truth = _kallsyms_truth(copy)
    assert len(truth) > 1000
    assert not _wrong(KernelSymbols(str(copy)), truth)
    lines = copy.read_bytes().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled"
    shuffled.write_bytes(b"".join(b"".join(lines[i:i + 1000]) for i in reversed(range(0, len(lines), 1000))))
    assert not _wrong(KernelSymbols(str(shuffled)), truth)
