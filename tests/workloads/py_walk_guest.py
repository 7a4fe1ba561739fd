"""Run inside a kernel-matrix guest (tools/kernel_vm.py): load
tests/bpf/py_walk_test.bpf.o, sample Debian's python3.11 running py_burn.py,
and write what the walker read to /tmp/vm/py_walk.json."""
import collections
import json
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from collector import libbpf, perf  # noqa: E402
from collector.unwind import python as upy  # noqa: E402

SAMPLE = struct.Struct(f"=IIHHI{128 + 2 * 48}Q")

burn = subprocess.Popen(["/usr/bin/python3.11", os.path.join(ROOT, "tests", "workloads", "py_burn.py"), "30"],
                        stdout=subprocess.PIPE, text=True)
burn.stdout.readline()
found, why = upy.detect(burn.pid)
out = {"kernel": os.uname().release, "detected": why or "ok", "samples": 0, "named": 0, "leaves": {}}
if found is not None:
    obj = libbpf.BpfObject(os.path.join(ROOT, "tests", "bpf", "py_walk_test.bpf.o"))
    obj.set_global("target_tgid", struct.pack("=I", burn.pid))
    obj.load()
    obj.map("py_procs").update(struct.pack("=I", burn.pid), found.pack())
    raw = []
    rb = obj.ring_buffer("samples", raw.append)
    links = [obj.program("py_walk_sample").attach_perf_event(perf.open_cpu_clock(cpu, 199))
             for cpu in range(os.cpu_count())]
    end = time.monotonic() + 4
    while time.monotonic() < end:
        rb.poll(100)
    rb.consume()
    sym = upy.PythonSymbolizer()
    sym.track(found)
    leaves = collections.Counter()
    for r in raw:
        _tid, _pad, n_native, n_py, flags, *slots = SAMPLE.unpack(r)
        pairs = upy.pairs_of(slots, n_native, n_py)
        if pairs:
            leaves[sym.resolve(burn.pid, *pairs[0]).function] += 1
    out.update(samples=len(raw), named=sum(n for name, n in leaves.items() if name), leaves=dict(leaves))
burn.kill()
with open("/tmp/vm/py_walk.json", "w") as f:
    json.dump(out, f)
