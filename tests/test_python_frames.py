"""CPython frames (bpf/unwind_python.h, collector/unwind/python.py) against
real interpreters: Debian 12's /usr/bin/python3.11 always, and Debian 11's
3.9 and Debian 13's 3.13 where tools/other_pythons.sh unpacked them into
build/pythons. Ground truth comes from the interpreters themselves (dlsym of
_PyRuntime, co_lines()/dis.findlinestarts(), threading.get_native_id()) and
from the workload's source, never from the code under test."""
from __future__ import annotations

import collections
import json
import logging
import math
import re
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
from conftest import ROOT, needs_root

from collector import libbpf, perf
from collector.records import Frame
from collector.unwind import python as upy
from collector.unwind import python_layouts, python_lines

WORKLOAD = ROOT / "tests" / "workloads" / "py_burn.py"
PYTHONS = ROOT / "build" / "pythons"
UNW_F_PY, UNW_F_PY_TRUNC = 32, 16
SLOTS = 128 + 2 * 48      # UNWIND_MAX_SLOTS
SAMPLE = struct.Struct(f"=IIHHI{SLOTS}Q")   # struct py_sample of py_walk_test.bpf.c


def _interpreters() -> list:
    """(version label, argv) of every interpreter this machine has."""
    out = [pytest.param(["/usr/bin/python3.11"], id="3.11")]
    p39 = PYTHONS / "3.9" / "usr" / "bin" / "python3.9"
    if p39.exists():
        # its ctypes needs Debian 11's libffi7, unpacked beside it
        lib = PYTHONS / "3.9" / "usr" / "lib" / "x86_64-linux-gnu"
        out.append(pytest.param(["env", f"LD_LIBRARY_PATH={lib}", str(p39)], id="3.9"))
    p313 = PYTHONS / "3.13"
    if (p313 / "usr" / "bin" / "python3.13").exists():
        # Debian 13's interpreter needs its own glibc: run through its loader
        lib = p313 / "usr" / "lib" / "x86_64-linux-gnu"
        out.append(pytest.param([str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
                                 str(p313 / "usr" / "bin" / "python3.13")], id="3.13"))
    return out


INTERPRETERS = _interpreters()


def _spawn(argv: list, script: str, *args) -> tuple:
    """Start `argv script args`; return (process, its first stdout line as JSON)."""
    proc = subprocess.Popen(argv + [script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"{argv} {script} printed nothing")
    return proc, json.loads(line)


def _stop(proc) -> None:
    proc.kill()
    proc.wait()


# ------------------------------------------------------------- detection

SELF_REPORT = """
import ctypes, json, sys, threading, time
rt = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
print(json.dumps({"version": list(sys.version_info[:2]), "runtime": rt}), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("argv", INTERPRETERS)
def test_detects_version_and_runtime_address(argv, tmp_path):
    script = tmp_path / "report.py"
    script.write_text(SELF_REPORT)
    proc, truth = _spawn(argv, str(script))
    try:
        found, why = upy.detect(proc.pid)
        assert found is not None, why
        assert list(found.version) == truth["version"]
        assert found.runtime == truth["runtime"]     # what the interpreter's own dlsym says
        assert found.layout.version == tuple(truth["version"])
        assert len(found.pack()) == 40
        assert upy.py_proc_bytes(proc.pid)[0] == found.pack()
    finally:
        _stop(proc)


def test_not_python_and_gone_process():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        found, why = upy.detect(sleeper.pid)
        assert found is None and why.startswith("not python")
    finally:
        _stop(sleeper)
    found, why = upy.detect(sleeper.pid)   # exited: no maps
    assert found is None and why


def test_unknown_version_falls_back_with_one_log_line(tmp_path, caplog):
    """A real interpreter whose Py_Version says 3.7: no table, no py_proc,
    one log line however often it is looked at."""
    from elftools.elf.elffile import ELFFile
    exe = tmp_path / "python3.11"
    shutil.copy("/usr/bin/python3.11", exe)
    with open(exe, "rb") as f:
        elf = ELFFile(f)
        vaddr = elf.get_section_by_name(".dynsym").get_symbol_by_name("Py_Version")[0]["st_value"]
        sec = next(s for s in elf.iter_sections() if s["sh_addr"] <= vaddr < s["sh_addr"] + s["sh_size"])
        at = sec["sh_offset"] + vaddr - sec["sh_addr"]
    with open(exe, "r+b") as f:
        f.seek(at)
        assert struct.unpack("<I", f.read(4))[0] >> 16 == 0x030B
        f.seek(at)
        f.write(struct.pack("<I", 0x030700F0))
    proc = subprocess.Popen([str(exe), "-c", "import time; print(1, flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        caplog.set_level(logging.INFO, logger="otelbpf.unwind.python")
        for _ in range(3):
            found, why = upy.detect(proc.pid)
            assert found is None and why == "unsupported CPython 3.7"
            assert upy.py_proc_bytes(proc.pid) == (None, why)
        lines = [r for r in caplog.records if "3.7" in r.getMessage()]
        assert len(lines) == 1 and "native frames only" in lines[0].getMessage()
    finally:
        _stop(proc)


CORRUPT_LIB = """
import mmap, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)
print("{}", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("garbage", [b"\x7fELF" + b"\xff" * 4092, b"\x7fELF\x02\x01\x01" + b"\x00" * 57 + b"\xff" * 4032])
def test_corrupt_python_named_mapping_is_skipped(tmp_path, garbage):
    """A corrupt ELF named like libpython mapped executable beside the real
    interpreter: skipped, the interpreter is still found."""
    lib = tmp_path / "libpython3.11.so.1.0"
    lib.write_bytes(garbage)
    script = tmp_path / "maplib.py"
    script.write_text(CORRUPT_LIB)
    proc, _ = _spawn(["/usr/bin/python3.11"], str(script), lib)
    try:
        assert any(str(lib) in line for line in open(f"/proc/{proc.pid}/maps"))
        found, why = upy.detect(proc.pid)
        assert found is not None and found.binary == "/usr/bin/python3.11", why
    finally:
        _stop(proc)


def test_debug_offsets_and_line_tables_reject_bad_input():
    assert python_layouts.from_debug_offsets(b"")[0] is None
    assert python_layouts.from_debug_offsets(b"xdebugpy" + b"\xff" * 600)[0] is None
    bad = b"xdebugpy" + struct.pack("<Q", 0x030D05F0) + b"\x00" * 8 + b"\xff\xff\x01\x00\x00\x00\x00\x00" * 70
    layout, why = python_layouts.from_debug_offsets(bad)
    assert layout is None and "implausible" in why
    for table in (b"", b"\x80", b"\xf0", b"\x01\x02\x03", b"\xf0\xff\xff\xff", bytes(range(256))):
        for fmt in (python_layouts.LNOTAB, python_layouts.LINETABLE_310, python_layouts.LOCATIONS):
            line = python_lines.line_of(fmt, table, 10, 7)
            assert line is None or isinstance(line, int)


# ------------------------------------------------------------- lines and names

CODE_TRUTH = """
import dis, json, sys, threading, time
import json.decoder, email.message, argparse, collections
sys.path.insert(0, sys.argv[1])
import py_burn
def codes_of(mod):
    out = []
    def walk(co):
        out.append(co)
        for c in co.co_consts:
            if hasattr(c, "co_code"):
                walk(c)
    for v in list(vars(mod).values()):
        for f in ([v] + [m for m in vars(v).values()] if isinstance(v, type) else [v]):
            if hasattr(f, "__code__"):
                walk(f.__code__)
    return out
codes = []
for m in (py_burn, json.decoder, email.message, argparse, collections):
    codes += codes_of(m)
rows = []
for co in codes:
    n = len(co.co_code) // 2
    lines = [None] * n
    if hasattr(co, "co_lines"):
        for start, end, line in co.co_lines():
            for off in range(start, end, 2):
                if off // 2 < n:
                    lines[off // 2] = line
    else:
        starts = dict(dis.findlinestarts(co))
        cur = co.co_firstlineno
        for u in range(n):
            cur = starts.get(u * 2, cur)
            lines[u] = cur
    rows.append([id(co), getattr(co, "co_qualname", co.co_name), co.co_filename, lines])
print(json.dumps(rows), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("argv", INTERPRETERS)
def test_resolver_names_and_lines_match_the_interpreter(argv, tmp_path):
    """Every instruction of hundreds of real code objects: our decoding of the
    process's memory gives the line CPython itself gives (co_lines(), or
    dis.findlinestarts() before 3.10), and the same name and file."""
    script = tmp_path / "truth.py"
    script.write_text(CODE_TRUTH)
    proc, rows = _spawn(argv, str(script), WORKLOAD.parent)
    try:
        found, why = upy.detect(proc.pid)
        assert found is not None, why
        sym = upy.PythonSymbolizer()
        sym.track(found)
        assert len(rows) > 300
        checked = 0
        for code, name, filename, lines in rows:
            for unit, line in enumerate(lines):
                f = sym.resolve(proc.pid, code, unit)
                assert (f.function, f.file) == (name, filename)
                assert f.line == (line or 0), (name, unit)
                checked += 1
            # a frame that has not started shows the function's first line
            assert sym.resolve(proc.pid, code, upy.PY_PAIR_NO_INSTR).line > 0
        assert checked > 10000
    finally:
        _stop(proc)
    # the process is gone: cached names stay until forget(), new ones are unknown
    assert sym.resolve(proc.pid, rows[0][0], 0).function == rows[0][1]
    sym.forget(proc.pid)
    assert sym.resolve(proc.pid, rows[0][0], 0).function is None


# ------------------------------------------------------------- the walker, sampled

def _hot_lines() -> dict:
    """function -> lines marked '# hot: function' in the workload; plus the
    call lines the callers must show."""
    hot = collections.defaultdict(set)
    calls = {}
    for no, text in enumerate(WORKLOAD.read_text().splitlines(), 1):
        m = re.search(r"# hot: (\w+)", text)
        if m:
            hot[m.group(1)].add(no)
        for pattern, key in ((r"return f\(n\)", "middle"), (r"return middle\(f, n\)", "outer"),
                             (r"outer\(a, N\)", "main->a"), (r"outer\(b, N\)", "main->b"),
                             (r"via_c\(\)$", "main->via_c"), (r"sorted\(", "via_c")):
            if re.search(pattern, text.strip()):
                calls.setdefault(key, set()).add(no)
    return hot, calls


def _sample(pid: int, seconds: float, freq: int = 997) -> list:
    """(PythonProcess, [(tid, flags, pairs)] of each sample py_walk took of pid)."""
    from probes.cpu_profile import online_cpus
    obj = libbpf.BpfObject(ROOT / "tests" / "bpf" / "py_walk_test.bpf.o")
    obj.set_global("target_tgid", struct.pack("=I", pid))
    obj.load()
    try:
        found, why = upy.detect(pid)
        assert found is not None, why
        obj.map("py_procs").update(struct.pack("=I", pid), found.pack())
        raw = []
        rb = obj.ring_buffer("samples", raw.append)
        prog = obj.program("py_walk_sample")
        links = [prog.attach_perf_event(perf.open_cpu_clock(cpu, freq)) for cpu in online_cpus()]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rb.poll(100)
        for link in links:
            link.close()
        rb.consume()
    finally:
        obj.close()
    out = []
    for r in raw:
        tid, _pad, n_native, n_py, flags, *slots = SAMPLE.unpack(r)
        out.append((tid, flags, upy.pairs_of(slots, n_native, n_py)))
    return found, out


@needs_root
@pytest.mark.parametrize("argv", INTERPRETERS)
def test_sampled_python_frames(argv):
    hot, calls = _hot_lines()
    proc, tids = _spawn(argv, str(WORKLOAD), 6, "threads")
    try:
        time.sleep(0.3)
        found, samples = _sample(proc.pid, 3.0)
        sym = upy.PythonSymbolizer()
        sym.track(found)
        stacks = []
        for tid, flags, pairs in samples:
            frames = [sym.resolve(proc.pid, code, word) for code, word in pairs]
            stacks.append((tid, flags, pairs, frames))
    finally:
        _stop(proc)
    entry_every_frame = found.version < (3, 11)

    # every thread of the process is a Python thread: named frames nearly always
    named = [s for s in stacks if s[1] & UNW_F_PY and s[3] and s[3][0].function]
    assert len(stacks) > 300 and len(named) >= 0.9 * len(stacks), (len(named), len(stacks))
    assert not any(s[1] & UNW_F_PY_TRUNC for s in stacks)

    by_thread = collections.defaultdict(list)
    for tid, flags, pairs, frames in named:
        by_thread[tid].append((pairs, frames))
    # each thread shows its own work: spin() competes for the GIL, digest()
    # hashes without holding it, while the main thread runs a() and b()
    for role in ("spin", "digest"):
        mine = by_thread[tids[role]]
        assert len(mine) > 20, role
        assert all(fr[0].function == role for _p, fr in mine), role
        assert sum(fr[0].line in hot[role] for _p, fr in mine) >= 0.9 * len(mine), role
        assert all(fr[1].function == "<lambda>" for _p, fr in mine)
    main = by_thread[tids["main"]]
    assert not any(fr[0].function in ("spin", "digest") for _p, fr in main)

    # a() and b() run 3:1 under outer() -> middle(), called from known lines
    ab = [(p, fr) for p, fr in main if fr[0].function in ("a", "b")]
    n_a = sum(fr[0].function == "a" for _p, fr in ab)
    share = n_a / len(ab)
    se = math.sqrt(0.75 * 0.25 / len(ab))
    assert abs(share - 0.75) <= 4 * se, (share, len(ab))
    in_hot = 0
    for pairs, fr in ab:
        leaf = fr[0].function
        assert [f.function for f in fr] == [leaf, "middle", "outer", "main_loop", "<module>"]
        assert [f.file for f in fr[:4]] == [str(WORKLOAD)] * 4
        in_hot += fr[0].line in hot[leaf]
        assert fr[1].line in calls["middle"] and fr[2].line in calls["outer"]
        assert fr[3].line in calls["main->a" if leaf == "a" else "main->b"]
        # the four calls ran in one _PyEval_EvalFrameDefault call from 3.11 on
        entries = [bool(w & upy.PY_PAIR_ENTRY) for _c, w in pairs]
        assert entries == ([True] * 5 if entry_every_frame else [False] * 4 + [True])
    assert in_hot >= 0.9 * len(ab)

    # key() is called by sorted(), a C function: its own eval call
    keyed = [(p, fr) for p, fr in main if fr[0].function == "key"]
    assert keyed
    for pairs, fr in keyed:
        assert [f.function for f in fr] == ["key", "via_c", "main_loop", "<module>"]
        assert fr[1].line in calls["via_c"] and fr[2].line in calls["main->via_c"]
        assert pairs[0][1] & upy.PY_PAIR_ENTRY
        assert bool(pairs[1][1] & upy.PY_PAIR_ENTRY) == entry_every_frame


# ------------------------------------------------------------- merging

def _native(name, addr=0x1000):
    return Frame(name, addr, None)


def test_merge_replaces_each_eval_frame_by_its_group():
    entry, py = upy.PY_PAIR_ENTRY, {}

    def resolve(code, word):
        py[code] = word
        return Frame(f"py{code}", code, None, file="f.py", line=word & 0xFFFF, frame_type=upy.FRAME_TYPE)
    kernel = Frame("do_syscall_64", 0xffffffff81000000, None, kernel=True)
    native = [kernel, _native("sha256_block"), _native(upy.EVAL_FRAME), _native("PyObject_Call"),
              _native(upy.EVAL_FRAME + ".cold"), _native("Py_RunMain"), _native("main")]
    pairs = [(1, 10), (2, 20 | entry), (3, 30), (4, 40 | entry)]
    out = upy.merge(native, pairs, resolve)
    assert [f.function for f in out] == ["do_syscall_64", "sha256_block", "py1", "py2", "PyObject_Call",
                                         "py3", "py4", "Py_RunMain", "main"]
    assert out[2].line == 10 and out[2].file == "f.py"
    # more groups than eval frames (a cut native walk): the rest go outermost
    out = upy.merge([_native("f"), _native(upy.EVAL_FRAME)], pairs, resolve)
    assert [f.function for f in out] == ["f", "py1", "py2", "py3", "py4"]
    # fewer: the unmatched eval frame stays native; no Python frames: unchanged
    out = upy.merge(native[2:5], pairs[:2], resolve)
    assert [f.function for f in out] == ["py1", "py2", "PyObject_Call", upy.EVAL_FRAME + ".cold"]
    assert upy.merge(native, [], resolve) == native


# ------------------------------------------------------------- export

def test_python_frames_reach_pprof_and_otlp():
    from collector.export.pprof import to_pprof
    from collector.export.profiles_otlp import FRAME_TYPE_ATTR, build_request
    from collector.records import Profile, ProfileSample
    from opentelemetry.sdk.resources import Resource
    import gzip
    frames = [Frame("Worker.run", 0x7f00, None, file="/srv/app/worker.py", line=42, frame_type=upy.FRAME_TYPE),
              Frame("main", 0x401000, None)]
    prof = Profile([ProfileSample({"process.pid": 1}, frames, 3)], start_time_ns=1, duration_ns=2, period_ns=3)

    req = build_request(Resource.create({}), {"s": [prof]})
    d = req.dictionary
    strs = d.string_table
    loc = d.location_table[d.stack_table[req.resource_profiles[0].scope_profiles[0].profiles[0]
                                         .samples[0].stack_index].location_indices[0]]
    fn = d.function_table[loc.lines[0].function_index]
    assert (strs[fn.name_strindex], strs[fn.filename_strindex], loc.lines[0].line) == \
        ("Worker.run", "/srv/app/worker.py", 42)
    attrs = {strs[d.attribute_table[i].key_strindex]: d.attribute_table[i].value.string_value
             for i in loc.attribute_indices}
    assert attrs == {FRAME_TYPE_ATTR: "cpython"} and loc.address == 0

    raw = gzip.decompress(to_pprof([prof]))
    assert b"/srv/app/worker.py" in raw and b"Worker.run" in raw
    # Function{id=1, name, system_name, filename} and Line{function_id=1, line=42}
    assert bytes([0x22, 0x04, 0x08, 0x01, 0x10, 42]) in raw


# ------------------------------------------------------------- oldest kernel

@needs_root
@pytest.mark.skipif(os.environ.get("OTELBPF_KERNEL_MATRIX") == "off", reason="kernel matrix off")
def test_walker_verifies_and_walks_on_5_10(tmp_path):
    """The walker has no bpf_loop and no newer helper: Debian 11's 5.10
    loads it, and it reads python3.11's frames there too."""
    sys.path.insert(0, str(ROOT / "tools"))
    import kernel_vm
    missing = kernel_vm.missing_host_tools()
    assert not missing, f"needs {missing}: `make setup` installs them"
    guest = ROOT / "tests" / "workloads" / "py_walk_guest.py"
    res = kernel_vm.run(kernel_vm.prepare("5.10"), f"{sys.executable} {guest}\n", tmp_path / "vm", timeout=300)
    assert res.rc == 0, res.console[-3000:]
    got = json.loads((tmp_path / "vm" / "py_walk.json").read_text())
    assert got["kernel"].startswith("5.10.") and got["detected"] == "ok"
    assert got["samples"] > 50 and got["named"] >= 0.9 * got["samples"], got
    assert {"a", "b"} <= set(got["leaves"]), got
