"""Unwind tables (collector/unwind) on Debian's own binaries, checked
against binutils' readelf (the CFI as it interprets it), objdump and gdb,
and a live walk of stopped processes with the reference step."""
from __future__ import annotations

import collections
import ctypes
import io
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from collector.symbolize.elf import load_segments
from collector.symbolize.user import UserSymbolizer
from collector.unwind import cachefile
from collector.unwind import rows as R
from collector.unwind import table as T
from collector.unwind.builder import TableBuilder
from collector.unwind.lookup import (UNW_F_COMPLETE, UNW_F_FP_USED, Mapping, Regs, bias_of, find_row, step,
                                     walk)
from collector.unwind.table import build_rows, transient
from collector.unwind.vdso import vdso_image

ROOT = Path(__file__).resolve().parent.parent
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = "/usr/bin/python3.11"
NGINX = "/usr/sbin/nginx"
POSTGRES = "/usr/lib/postgresql/15/bin/postgres"
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
BINARIES = [PYTHON, LIBC, NGINX, POSTGRES, LIBSSL]
HAVE_GDB = shutil.which("gdb") is not None
S16 = range(-0x8000, 0x8000)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


# --- readelf's view: the ground truth --------------------------------------

def _cells(line: str) -> list:
    """Columns of a frames-interp row; "r3 (rbx)" is one cell."""
    out = []
    for tok in line.split():
        if tok.startswith("(") and out:
            out[-1] += " " + tok
        else:
            out.append(tok)
    return out


def readelf_fdes(path: str) -> list:
    """[(section, start, end, cie augmentation, [(pc, cfa, {column: rule})])]
    from `readelf --debug-dump=frames-interp`; an FDE readelf prints no rows
    for (no instructions) has its CIE's initial row."""
    cies, fdes = {}, []
    section, cur, cols = None, None, []
    for line in run("readelf", "-wN", "--debug-dump=frames-interp", path).splitlines():
        m = re.match(r"Contents of the (\S+) section", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r'([0-9a-f]{8}) [0-9a-f]+ [0-9a-f]+ CIE "(\S*)"', line)
        if m:
            cur = cies[(section, int(m.group(1), 16))] = {"aug": m.group(2), "rows": []}
            continue
        m = re.match(r"[0-9a-f]{8} [0-9a-f]+ [0-9a-f]+ FDE cie=([0-9a-f]{8}) pc=([0-9a-f]+)\.\.([0-9a-f]+)", line)
        if m:
            cur = {"cie": cies[(section, int(m.group(1), 16))], "start": int(m.group(2), 16),
                   "end": int(m.group(3), 16), "rows": [], "section": section}
            fdes.append(cur)
            continue
        if line.strip().startswith("LOC"):
            cols = line.split()[2:]
            continue
        m = re.match(r"([0-9a-f]{16}) ", line)
        if m and cur is not None:
            cells = _cells(line)
            cur["rows"].append((int(cells[0], 16), cells[1], dict(zip(cols, cells[2:]))))
    out = []
    for f in fdes:
        rows = f["rows"] or [(f["start"], c, r) for _, c, r in f["cie"]["rows"][-1:]]
        out.append((f["section"], f["start"], f["end"], f["cie"]["aug"], rows))
    return out


def expected_rule(aug: str, cfa: str, regs: dict):
    """(cfa_type, cfa_off or None, rbp_off8 or None) the walker should get;
    None where the type alone is the whole answer."""
    if "S" in aug:
        return R.UNW_CFA_SIGNAL, None, None
    ra = regs.get("ra")
    if ra == "u":
        return R.UNW_CFA_END, None, None
    if ra != "c-8":
        return R.UNW_CFA_UNSUPPORTED, None, None
    rbp = regs.get("rbp", "u")
    if rbp in ("u", "s"):
        rbp8 = 0
    else:
        m = re.fullmatch(r"c([+-]\d+)", rbp)
        off = int(m.group(1)) if m else None
        rbp8 = off // 8 if off and off % 8 == 0 and -127 <= off // 8 <= 127 else R.UNW_RBP_LOST
    if cfa == "exp":
        return "exp", None, rbp8           # PLT (checked apart) or unsupported
    m = re.fullmatch(r"(rsp|rbp)([+-]\d+)", cfa)
    if not m or int(m.group(2)) not in S16:
        return R.UNW_CFA_UNSUPPORTED, None, None
    return (R.UNW_CFA_RSP if m.group(1) == "rsp" else R.UNW_CFA_RBP), int(m.group(2)), rbp8


def rule_at(rows: bytes, pc: int):
    row = find_row(rows, pc)
    return (row[2], row[1], row[3]) if row else (R.UNW_CFA_UNKNOWN, 0, 0)


def compare_with_readelf(path: str, rows: bytes, n_random: int = 3000, seed: int = 12):
    """Every readelf row start, plus random pcs inside FDEs and between
    them, agree with our rows. Returns (pcs compared, rows per type seen)."""
    fdes = readelf_fdes(path)
    rng = random.Random(seed)
    checks = []      # (pc, expected)
    for _sec, start, end, aug, frows in fdes:
        bounds = [r[0] for r in frows[1:]] + [end]
        for (pc, cfa, regs), nxt in zip(frows, bounds):
            exp = expected_rule(aug, cfa, regs)
            if "S" in aug:
                pc, nxt = start, end           # one SIGNAL row for the whole FDE
            checks.append((pc, exp))
            if rng.random() < n_random / 60000 and nxt > pc + 1:
                checks.append((rng.randrange(pc, nxt), exp))
    ranges = sorted((s, e) for _, s, e, _, _ in fdes)
    for (_, e0), (s1, _) in zip(ranges, ranges[1:]):
        if s1 > e0 and rng.random() < 0.2:
            checks.append((rng.randrange(e0, s1), (R.UNW_CFA_UNKNOWN, 0, 0)))
    bad, seen = [], {}
    for pc, (kind, off, rbp8) in checks:
        got = rule_at(rows, pc)
        seen[got[0]] = seen.get(got[0], 0) + 1
        if kind == "exp":
            ok = got[0] in (R.UNW_CFA_PLT, R.UNW_CFA_UNSUPPORTED) and (got[0] != R.UNW_CFA_PLT or got[2] == rbp8)
        elif off is None:
            ok = got[0] == kind
        else:
            ok = got == (kind, off, rbp8)
        if not ok:
            bad.append((hex(pc), (kind, off, rbp8), got))
    assert not bad, f"{len(bad)} of {len(checks)} pcs disagree with readelf, e.g. {bad[:5]}"
    return len(checks), seen


# --- tables, built once through the child builder ---------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("unwind-cache"))


@pytest.fixture(scope="module")
def tables(cache_dir):
    """Tables of the Debian binaries and the vdso, each built by a child."""
    builder = TableBuilder(cache_dir=cache_dir)
    out = {}
    for path in BINARIES:
        t0 = time.monotonic()
        out[path] = builder.get(path)
        t = out[path]
        print(f"\n{path}: {t.n_rows} rows, build {t.stats.get('build_ms')} ms in the child "
              f"({time.monotonic() - t0:.2f} s with its start), vm peak {t.stats.get('vm_peak_kb', 0) // 1024} MB, "
              f"{t.stats.get('fdes')} FDEs, unsupported {t.stats.get('unsupported', 0)}, "
              f"plt {t.stats.get('plt', 0)}, end {t.stats.get('end', 0)}, signal {t.stats.get('signal', 0)}")
    out["vdso"] = builder.get_vdso()
    assert builder.stats["children"] == len(BINARIES) + 1
    return out


def test_constants_match_unwind_h():
    """rows.py mirrors bpf/unwind.h: the enum's order, UNW_RBP_LOST, the row size."""
    text = (ROOT / "bpf" / "unwind.h").read_text()
    enum = re.search(r"enum unwind_cfa \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"(UNW_CFA_\w+)", enum)
    assert [getattr(R, n) for n in names] == list(range(len(names)))
    assert R.UNW_RBP_LOST == int(re.search(r"#define UNW_RBP_LOST \((-?\d+)\)", text).group(1))
    fields = re.search(r"struct unwind_row \{(.*?)\};", text, re.S).group(1)
    assert re.findall(r"__([us]\d+)", fields) == ["u32", "s16", "u8", "s8"] and R.ROW_SIZE == 8


@pytest.mark.parametrize("path", BINARIES)
def test_rows_agree_with_readelf(tables, path):
    table = tables[path]
    assert table.reason is None and table.n_rows > 5000
    n, seen = compare_with_readelf(path, table.rows)
    print(f"\n{path}: {n} pcs agree with readelf; rows met per type: "
          f"{ {R.CFA_NAMES[k]: v for k, v in sorted(seen.items())} }")
    # rows sorted by pc, no two neighbours alike
    parsed = list(R.iter_rows(table.rows))
    assert all(a[0] < b[0] for a, b in zip(parsed, parsed[1:]))
    assert all(a[1:] != b[1:] for a, b in zip(parsed, parsed[1:]))


def test_child_table_is_the_in_process_one(tables):
    """What the child wrote and the cache gave back is build_rows' own output."""
    direct = build_rows(LIBC)
    assert direct.rows == tables[LIBC].rows
    assert {k: v for k, v in direct.stats.items()} == {
        k: v for k, v in tables[LIBC].stats.items() if k not in ("build_ms", "max_rss_kb", "vm_peak_kb")}


@pytest.mark.parametrize("path", [PYTHON, NGINX, LIBC])
def test_plt_rows(tables, path):
    """The .plt FDE's expression decodes as PLT with readelf's threshold,
    which is where each 16-byte entry's push ends (objdump)."""
    raw = run("readelf", "-wN", "--debug-dump=frames", path)
    m = re.search(r"DW_CFA_def_cfa_expression \(DW_OP_breg7 \(rsp\): 8; DW_OP_breg16 \(rip\): 0; "
                  r"DW_OP_lit15; DW_OP_and; DW_OP_lit(\d+); DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus\)", raw)
    assert m, "no PLT expression in readelf's dump"
    threshold = int(m.group(1))
    sec = re.search(r"\] \.plt\s+PROGBITS\s+([0-9a-f]+) [0-9a-f]+ ([0-9a-f]+)", run("readelf", "-SW", path))
    plt, size = int(sec.group(1), 16), int(sec.group(2), 16)
    # PLT0 (push GOT+8; jmp *GOT+16) has plain rows; the entries follow
    for pc in range(plt + 16, plt + size, 7):
        assert rule_at(tables[path].rows, pc)[:2] == (R.UNW_CFA_PLT, threshold), hex(pc)
    dis = run("objdump", "-d", "--no-show-raw-insn", f"--start-address={plt + 16:#x}",
              f"--stop-address={plt + 32:#x}", path)
    insns = [(int(a, 16) - plt - 16, op) for a, op in re.findall(r"^\s+([0-9a-f]+):\s+(\S+)", dis, re.M)]
    push = [i for i, (_, op) in enumerate(insns) if op.startswith("push")][0]
    assert insns[push + 1][0] == threshold
    # the reference step: before the push the return address is at rsp, after it at rsp+8
    rows = tables[path].rows
    mem = {0x1000: 0x1111, 0x1008: 0x2222}
    for off, ra in ((0, 0x1111), (threshold, 0x2222)):
        nxt, how = step(Regs(plt + 16 + off, 0x1000, 7), lambda pc: Mapping(0, rows), mem.get)
        assert how == "plt" and nxt.pc == ra and nxt.sp == (0x1008 if ra == 0x1111 else 0x1010)


def test_signal_and_end_rows(tables):
    """libc's signal-frame FDE (CIE augmentation "zRS") covers __restore_rt,
    i.e. mov $15,%rax (rt_sigreturn); syscall: it is SIGNAL. _start of
    python3.11 (its ELF entry) and clone3's child path in libc are END."""
    libc = tables[LIBC].rows
    sig = [(s, e) for _, s, e, aug, _ in readelf_fdes(LIBC) if "S" in aug]
    assert len(sig) == 1
    start, end = sig[0]
    # the FDE starts one byte before the trampoline: unwinders look up pc - 1
    dis = run("objdump", "-d", f"--start-address={start + 1:#x}", f"--stop-address={end:#x}", LIBC)
    assert re.search(r"mov\s+\$0xf,%rax\s*\n.*syscall", dis)
    for pc in range(start, end):
        assert rule_at(libc, pc)[0] == R.UNW_CFA_SIGNAL
    if HAVE_GDB:
        assert "__restore_rt" in run("gdb", "-batch", "-ex", f"info symbol {start + 1:#x}", LIBC)
    entry = int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", run("readelf", "-h", PYTHON)).group(1), 16)
    assert rule_at(tables[PYTHON].rows, entry)[0] == R.UNW_CFA_END
    undefined = [s for _, s, _, _, frows in readelf_fdes(LIBC) if any(r[2].get("ra") == "u" for r in frows)]
    assert undefined and all(any(rule_at(libc, pc)[0] == R.UNW_CFA_END for pc in range(s, s + 64))
                             for s in undefined)
    assert tables[LIBC].stats["end"] >= len(undefined) and tables[LIBC].stats["signal"] == 1


def test_vdso(tables, tmp_path):
    """The vdso read from our own memory is an ELF image linked at 0 whose
    rows agree with readelf's reading of the same bytes."""
    image = vdso_image()
    assert image[:4] == b"\x7fELF"
    table = tables["vdso"]
    assert table.n_rows > 0 and table.build_id and table.rows == build_rows(io.BytesIO(image)).rows
    path = tmp_path / "vdso.so"
    path.write_bytes(image)
    assert load_segments(str(path))[0][2] == 0
    compare_with_readelf(str(path), table.rows)


def test_debug_frame_adds_missing_functions(tmp_path):
    """A binary built without .eh_frame for its own code (-fno-asynchronous-
    unwind-tables -g) has them in .debug_frame; crt's _start keeps .eh_frame.
    Both end up in the rows, as readelf reads them."""
    exe = tmp_path / "dbgframe"
    subprocess.run(["gcc", "-O2", "-g", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                    "-o", str(exe), str(ROOT / "tests" / "workloads" / "unwind_nested.c")], check=True)
    fdes = readelf_fdes(str(exe))
    assert {f[0] for f in fdes} == {".eh_frame", ".debug_frame"}
    table = build_rows(str(exe))
    assert table.stats["fdes_debug_frame"] > 0 and table.stats["fdes"] > 0
    compare_with_readelf(str(exe), table.rows)


def test_row_assembly_rules():
    """How FDEs become rows: a gap after an FDE is an UNKNOWN row, equal
    neighbours merge, an FDE inside another (or a .debug_frame one that
    .eh_frame covers) is dropped, pcs past u32 are dropped; all counted."""
    rsp8, rsp16 = (R.UNW_CFA_RSP, 8, 0), (R.UNW_CFA_RSP, 16, -2)
    stats = collections.Counter()
    eh = T._without_overlaps([(0x200, 0x210, [(0x200, rsp8)]), (0x100, 0x120, [(0x100, rsp8), (0x101, rsp16)]),
                              (0x110, 0x118, [(0x110, rsp8)]), (0x120, 0x130, [(0x120, rsp8)])], stats, "overlap")
    dbg = T._outside([(0x118, 0x11c, [(0x118, rsp8)]), (0x300, 0x310, [(0x300, rsp16)])], eh, stats)
    fdes = sorted(eh + dbg + [(0xFFFFFFF0, 0x100000010, [(0xFFFFFFF0, rsp8)])])
    rows = list(R.iter_rows(T._pack(fdes, stats)))
    assert [(pc, t, off) for pc, off, t, _ in rows] == [
        (0x100, 1, 8), (0x101, 1, 16), (0x120, 1, 8), (0x130, 0, 0), (0x200, 1, 8), (0x210, 0, 0),
        (0x300, 1, 16), (0x310, 0, 0), (0xFFFFFFF0, 1, 8)]
    assert stats["overlap"] == 1 and stats["debug_frame_covered"] == 1 and stats["dropped_pc"] == 1


# --- bad input ---------------------------------------------------------------

def test_truncated_and_foreign_files(tmp_path):
    data = Path(LIBC).read_bytes()
    cases = {"empty": b"", "ident": data[:16], "header": data[:64], "head": data[:100_000],
             "text": b"#!/bin/sh\necho hi\n", "half": data[:len(data) // 2]}
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        t = build_rows(str(p))
        assert not t.rows and t.reason, name
        assert t.stats.get("errors", 0) + t.stats.get("no_cfi", 0) == 1, (name, t.reason)
    t = build_rows(str(tmp_path / "missing"))     # not the file's fault: transient, never cached
    assert not t.rows and "cannot read" in t.reason and t.stats["io_errors"] == 1 and transient(t)
    builder = TableBuilder(cache_dir=str(tmp_path / "cache"))
    assert "cannot read" in builder._run(str(tmp_path / "missing"), "k", str(tmp_path / "cache" / "k")).reason
    assert builder.stats["child_errors"] == 1 and not (tmp_path / "cache" / "k").exists()


def test_no_cfi(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run(["objcopy", "--remove-section=.eh_frame", "--remove-section=.eh_frame_hdr", PYTHON, str(bare)],
                   check=True)
    t = build_rows(str(bare))
    assert not t.rows and t.reason == "no CFI" and t.stats["no_cfi"] == 1
    obj = tmp_path / "leaf.o"           # relocatable: CFI addresses not final
    subprocess.run(["gcc", "-O2", "-c", "-o", str(obj), str(ROOT / "tests" / "workloads" / "unwind_nested.c")],
                   check=True)
    t = build_rows(str(obj))
    assert not t.rows and "ET_REL" in t.reason and t.stats["unsupported_file"] == 1


def _section(path: str, name: str):
    m = re.search(r"\] " + re.escape(name) + r"\s+PROGBITS\s+[0-9a-f]+ ([0-9a-f]+) ([0-9a-f]+)",
                  run("readelf", "-SW", path))
    return int(m.group(1), 16), int(m.group(2), 16)


def test_garbage_eh_frame(tmp_path):
    """python3.11 with random bytes over its .eh_frame (or over one part
    of it): never an exception; whatever cannot be read is counted."""
    off, size = _section(PYTHON, ".eh_frame")
    data = bytearray(Path(PYTHON).read_bytes())
    for seed in range(6):
        rng = random.Random(seed)
        blob = bytearray(data)
        if seed % 2:
            blob[off:off + size] = rng.randbytes(size)
        else:
            at = off + rng.randrange(size - 512)
            blob[at:at + 512] = rng.randbytes(512)
        p = tmp_path / f"py{seed}"
        p.write_bytes(blob)
        t0 = time.monotonic()
        t = build_rows(str(p))
        assert t.reason or t.stats.get("decode_errors") or t.stats.get("unsupported"), seed
        if not t.rows:
            assert "corrupt .eh_frame" in t.reason and t.stats["errors"] == 1
        print(f"\nseed {seed}: {t.n_rows} rows, {t.reason}, {time.monotonic() - t0:.2f} s")


def test_cache_file_rejects_damage(tables, cache_dir):
    good = cachefile.dump(tables[NGINX])
    assert cachefile.parse(good).rows == tables[NGINX].rows
    for bad in (good[:10], good[:-1], b"X" + good[1:], good[:28] + b"{" + good[29:]):
        assert cachefile.parse(bad) is None


# --- the child builder --------------------------------------------------------

def test_cache_serves_without_a_child(tables, cache_dir):
    """A second builder on the same cache directory, whose python cannot
    even start, returns the same rows: no child was needed."""
    nochild = TableBuilder(cache_dir=cache_dir, python="/nonexistent/python")
    for path in BINARIES:
        assert nochild.get(path).rows == tables[path].rows
    assert nochild.get_vdso().rows == tables["vdso"].rows
    assert nochild.stats["cache_hits"] == len(BINARIES) + 1 and nochild.stats["children"] == 0


def test_timeout(tmp_path):
    builder = TableBuilder(cache_dir=str(tmp_path), timeout=0.05)
    t = builder.get(POSTGRES)
    assert not t.rows and "timed out" in t.reason and builder.stats["timeouts"] == 1
    assert os.listdir(tmp_path) == []          # nothing half-written stays
    # a wall-clock timeout says the host was busy, not that the binary is
    # bad: not remembered, the next ask builds again
    assert transient(t)
    assert builder.get(POSTGRES).reason == t.reason and builder.stats["children"] == 2


def test_cpu_limit(tmp_path):
    """A build that needs more CPU than allowed fails for good (remembered)."""
    builder = TableBuilder(cache_dir=str(tmp_path), cpu_limit=1)
    t = builder.get(POSTGRES)
    assert not t.rows and "CPU" in t.reason and not transient(t), t.reason
    assert builder.get(POSTGRES).reason == t.reason and builder.stats["children"] == 1


def test_address_space_limit(tables, tmp_path):
    """Under a limit between what the vdso's build and postgres' build need,
    the small one builds and the big one fails cleanly, uncached."""
    small, big = tables["vdso"].stats["vm_peak_kb"], tables[POSTGRES].stats["vm_peak_kb"]
    assert big > small * 2
    limit = (small + big) // 2 * 1024
    builder = TableBuilder(cache_dir=str(tmp_path), as_limit=limit)
    assert builder.get_vdso().rows == tables["vdso"].rows
    t = builder.get(POSTGRES)
    assert not t.rows and "out of memory" in t.reason and builder.stats["child_errors"] == 1, t.reason
    print(f"\nlimit {limit >> 20} MB: postgres' build: {t.reason}")
    assert len(os.listdir(tmp_path)) == 1      # the vdso's table only


def test_corrupt_file_through_child(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    builder = TableBuilder(cache_dir=str(tmp_path / "cache"))
    t = builder.get(str(junk))
    assert not t.rows and "unreadable ELF" in t.reason and builder.stats["built"] == 1
    assert builder.get(str(junk)).reason == t.reason and builder.stats["cache_hits"] == 1


# --- live walks -----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
PTRACE_GETREGS, PTRACE_ATTACH, PTRACE_DETACH = 12, 16, 17
RBP, RIP, RSP = 4, 16, 19        # in struct user_regs_struct


def stopped_regs(pid: int) -> Regs:
    """Stop the process, read its registers with ptrace and leave it stopped."""
    os.kill(pid, signal.SIGSTOP)
    assert _libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0, ctypes.get_errno()
    os.waitpid(pid, os.WUNTRACED)
    regs = (ctypes.c_ulonglong * 27)()
    assert _libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(regs)) == 0, ctypes.get_errno()
    assert _libc.ptrace(PTRACE_DETACH, pid, None, ctypes.c_void_p(signal.SIGSTOP)) == 0
    return Regs(regs[RIP], regs[RSP], regs[RBP])


def process_tables(pid: int, builder: TableBuilder):
    """mapping_for and read_u64 of a live process: each executable mapping
    with its binary's table (through the builder) and bias."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if "x" not in parts[1]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        name = parts[5].strip() if len(parts) > 5 else ""
        if name == "[vdso]":
            maps.append((lo, hi, Mapping(lo, builder.get_vdso().rows)))
        elif name.startswith("/"):
            via = f"/proc/{pid}/map_files/{lo:x}-{hi:x}"
            bias = bias_of(lo, int(parts[2], 16), load_segments(via))
            maps.append((lo, hi, Mapping(bias, builder.get(via).rows)))
    mem = open(f"/proc/{pid}/mem", "rb", buffering=0)

    def mapping_for(pc):
        return next((m for lo, hi, m in maps if lo <= pc < hi), None)

    def read_u64(addr):
        try:
            mem.seek(addr)
            data = mem.read(8)
        except (OSError, ValueError, OverflowError):
            return None
        return int.from_bytes(data, "little") if len(data) == 8 else None
    return mapping_for, read_u64, mem


def gdb_pcs(pid: int) -> list:
    out = run("timeout", "60", "gdb", "-batch", "-p", str(pid), "-ex", "set backtrace past-main on",
              "-ex", "frame apply all -q p/x $pc")
    return [int(x, 16) for x in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]


def walk_live(cmd, cache_dir, settle=0.6):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        regs = stopped_regs(proc.pid)
        mapping_for, read_u64, mem = process_tables(proc.pid, TableBuilder(cache_dir=cache_dir))
        with mem:
            pcs, flags, hows = walk(regs, mapping_for, read_u64)
        syms = UserSymbolizer()
        syms.refresh([proc.pid])
        # a return address is named by its call (pc - 1): a call can end a
        # function; not the signal trampoline (the handler "returns" to its
        # first byte) nor a pc the signal interrupted
        names = [syms.resolve(proc.pid, pc if i == 0 or "signal" in hows[i - 1:i + 1] else pc - 1).function
                 for i, pc in enumerate(pcs)]
        gdb = gdb_pcs(proc.pid) if HAVE_GDB else None
        return pcs, flags, hows, names, gdb
    finally:
        proc.kill()
        proc.wait()


def test_live_walk_nested_c(tmp_path, cache_dir):
    """main -> level_a -> level_b (rbp-based CFA) -> level_c, interrupted by
    SIGALRM -> on_alarm -> handler_leaf: the walk crosses the signal frame,
    ends at _start (END) and matches gdb's backtrace pc for pc."""
    exe = tmp_path / "unwind_nested"
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-o", str(exe),
                    str(ROOT / "tests" / "workloads" / "unwind_nested.c")], check=True)
    pcs, flags, hows, names, gdb = walk_live([str(exe)], cache_dir)
    print("\n" + "\n".join(f"{pc:#x} {n} ({h})" for pc, n, h in zip(pcs, names, hows)))
    assert names[:7] == ["handler_leaf", "on_alarm", "__restore_rt", "level_c", "level_b", "level_a", "main"]
    assert names[-1] == "_start" and hows[-1] == "end"
    assert flags & UNW_F_COMPLETE and not flags & UNW_F_FP_USED
    assert {"rsp", "rbp", "signal"} <= set(hows)
    if gdb is not None:
        assert pcs == gdb


def test_live_walk_python(cache_dir):
    """Debian's python3.11 (no frame pointers) in a CPU loop: the walk
    reaches _start through libc and matches gdb's backtrace pc for pc."""
    pcs, flags, hows, names, gdb = walk_live([PYTHON, "-c", "while True: pass"], cache_dir)
    print("\n" + "\n".join(f"{pc:#x} {n} ({h})" for pc, n, h in zip(pcs, names, hows)))
    assert names[0] == "_PyEval_EvalFrameDefault" and "Py_BytesMain" in names
    assert names[-1] == "_start" and hows[-1] == "end"
    assert flags & UNW_F_COMPLETE and not flags & UNW_F_FP_USED
    if gdb is not None:
        assert pcs == gdb



@pytest.mark.skipif(os.geteuid() != 0, reason="loads the profiler's BPF object")
def test_cached_tables_reach_the_kernel_when_a_process_is_first_seen(tmp_path):
    """Tables already in the cache are loaded as soon as a process that
    maps them is seen, not queued behind builds of other binaries: here the
    builder cannot even start a child, yet python3.11's and libc's mappings
    get their rows in the kernel's entry for the process, and nothing waits."""
    import struct
    from collector import libbpf
    from collector.unwind import build
    from collector.unwind.builder import cache_key
    from collector.unwind.manager import UnwindManager
    from collector.unwind.procs import unpack_proc
    from collector.symbolize.elf import build_id
    binaries = [PYTHON, os.path.realpath(LIBC)]
    for path in binaries:
        cachefile.write(str(tmp_path / cache_key(path, build_id(path))), build.build(path))
    obj = libbpf.BpfObject(ROOT / "bpf" / "cpu_profile.bpf.o")
    obj.load()
    mgr = UnwindManager(obj, TableBuilder(cache_dir=str(tmp_path), python="/nonexistent/python"), 16)
    proc = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)
        mgr._refresh(proc.pid, forced=True)   # what the thread does when the kernel asks about a process
        entries = unpack_proc(obj.map("unwind_procs").lookup(struct.pack("=I", proc.pid)))
        rows = {start: n_rows for start, _bias, _size, _first, n_rows, _flags in entries}
        starts = [int(line.split("-")[0], 16) for line in open(f"/proc/{proc.pid}/maps")
                  if line.split()[1][2] == "x" and line.split()[-1] in binaries]
        assert len(starts) == 2 and all(rows[s] > 0 for s in starts), (starts, rows)
        assert mgr.stats["tables_from_cache"] == 2
        assert mgr._builder.stats["children"] == 0
        assert not any(entry[2].path in binaries for entry in mgr._queue.values())
    finally:
        proc.kill()
        proc.wait()
        mgr.pool.close()
        obj.close()


def test_build_child_dies_with_the_agent(tmp_path):
    """An agent killed while a table builds leaves no build behind (it would
    go on for minutes at nice 10, writing into a cache nobody reads)."""
    import sys
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from collector.unwind.builder import TableBuilder\n"
              f"TableBuilder(cache_dir={str(tmp_path)!r}).get({POSTGRES!r})\n")
    agent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        child = None
        while child is None and time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
            child = int(out[0]) if out else None
            time.sleep(0.02)
        assert child is not None, "no build child started"
        assert "collector.unwind.build" in Path(f"/proc/{child}/cmdline").read_text()
    finally:
        agent.kill()
        agent.wait()

    def gone():
        try:
            return Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z"
        except OSError:
            return True
    deadline = time.monotonic() + 1.0     # postgres' build alone takes 3 s of CPU
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), f"build child {child} outlived its agent"


@pytest.mark.skipif(os.geteuid() != 0, reason="loads the profiler's BPF object")
def test_a_long_build_does_not_hold_up_a_new_process(tmp_path):
    """While a big binary's table builds (postgres: seconds of CPU at nice
    10, minutes on a busy host), a process first seen meanwhile gets the
    rows its cache holds in the kernel at once. The kernel's requests are
    written into its own map (unwind_wanted), as the sampling program would."""
    import struct
    from collector import libbpf
    from collector.unwind import build
    from collector.unwind.builder import cache_key
    from collector.unwind.manager import MIN_SAMPLES_TO_BUILD, WANT_PROCESS, UnwindManager
    from collector.unwind.procs import unpack_proc
    from collector.symbolize.elf import build_id
    cache = tmp_path / "cache"
    cache.mkdir()
    for path in (PYTHON, os.path.realpath(LIBC)):
        cachefile.write(str(cache / cache_key(path, build_id(path))), build.build(path))
    mapper = ("import mmap, sys, time\n"
              "f = open(sys.argv[1], 'rb')\n"
              "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)\n"
              "print(1, flush=True)\n"
              "time.sleep(60)\n")
    obj = libbpf.BpfObject(ROOT / "bpf" / "cpu_profile.bpf.o")
    obj.load()
    mgr = UnwindManager(obj, TableBuilder(cache_dir=str(cache)), 16)
    procs = []

    def ask(pid):
        # as many samples as make a binary worth a build child
        obj.map("unwind_wanted").update(struct.pack("=IIQ", pid, WANT_PROCESS, 0),
                                        struct.pack("=I", MIN_SAMPLES_TO_BUILD))

    def python_rows(pid) -> int:
        raw = obj.map("unwind_procs").lookup(struct.pack("=I", pid))
        if raw is None:
            return 0
        starts = [int(line.split("-")[0], 16) for line in open(f"/proc/{pid}/maps")
                  if line.split()[1][2] == "x" and line.split()[-1] == PYTHON]
        return sum(n for start, _b, _s, _f, n, _fl in unpack_proc(raw) if start in starts)

    try:
        mgr.start()
        procs.append(subprocess.Popen([PYTHON, "-c", mapper, POSTGRES], stdout=subprocess.PIPE))
        procs[0].stdout.readline()
        ask(procs[0].pid)
        deadline = time.monotonic() + 60
        while not _building(POSTGRES, procs[0].pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _building(POSTGRES, procs[0].pid), "postgres' table is not being built"
        procs.append(subprocess.Popen([PYTHON, "-c", "import time; print(1, flush=True); time.sleep(60)"],
                                      stdout=subprocess.PIPE))
        procs[1].stdout.readline()
        ask(procs[1].pid)
        t0 = time.monotonic()
        while not python_rows(procs[1].pid) and time.monotonic() - t0 < 2:
            time.sleep(0.05)
        waited = time.monotonic() - t0
        still = _building(POSTGRES, procs[0].pid)
        print(f"\nrows after {waited:.2f}s; postgres still building: {still}")
        assert python_rows(procs[1].pid) > 0 and still, (waited, still)
        # another process mapping postgres meanwhile: the table being built is not queued a second time
        procs.append(subprocess.Popen([PYTHON, "-c", mapper, POSTGRES], stdout=subprocess.PIPE))
        procs[2].stdout.readline()
        ask(procs[2].pid)
        t0 = time.monotonic()
        while procs[2].pid not in mgr._procs and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert procs[2].pid in mgr._procs and _building(POSTGRES, procs[0].pid)
        assert not any(entry[2].path == POSTGRES for entry in mgr._queue.values())
    finally:
        for p in procs:
            p.kill()
            p.wait()
        mgr.stop()
        obj.close()


def _building(path: str, pid: int) -> bool:
    """A build child is at work on pid's mapping of path."""
    starts = {line.split()[0] for line in open(f"/proc/{pid}/maps") if line.split()[-1] == path}
    out = subprocess.run(["pgrep", "-af", "collector.unwind.build"], capture_output=True, text=True).stdout
    return any(f"/proc/{pid}/map_files/{s}" in line for line in out.splitlines() for s in starts)
