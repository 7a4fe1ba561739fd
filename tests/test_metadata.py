"""Container/pod identity from cgroup paths (real runtime layouts), and
enrichment of records for a real process in a cgroup the test creates."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import needs_root

from collector.metadata.container import parse_cgroup
from collector.metadata.enrich import ProcessEnricher
from collector.metadata.process import ProcessNames
from collector.records import Counter, Instrument

CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa99887766554433221100"
UID = "8f7b2a1c-4d3e-4f5a-9b8c-1d2e3f4a5b6c"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize("text,cid,pod", [
    # docker, cgroup v2, systemd driver
    (f"0::/system.slice/docker-{CID}.scope\n", CID, None),
    # docker, cgroup v1, cgroupfs driver
    (f"12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n", CID, None),
    # containerd under kubelet, cgroup v2, systemd driver
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{CID}.scope\n", CID, UID),
    # cri-o under kubelet
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n",
     CID, UID),
    # kubelet cgroupfs driver, cgroup v1
    (f"4:pids:/kubepods/burstable/pod{UID}/{CID}\n", CID, UID),
    # podman
    (f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n", CID, None),
    # a plain host process
    ("0::/user.slice/user-1000.slice/session-2.scope\n", None, None),
])
def test_runtime_layouts(text, cid, pod):
    got = parse_cgroup(text)
    assert got.get("container.id") == cid
    assert got.get("k8s.pod.uid") == pod


@needs_root
def test_enrichment_of_a_real_process_in_a_container_like_cgroup():
    from collector.metadata.cgroup import cgroup2_root
    root = cgroup2_root()
    cg = f"{root}/docker-{CID}.scope"
    os.mkdir(cg)
    p = subprocess.Popen(["sleep", "30"])
    try:
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(p.pid))
        rec = Counter(Instrument("t", "1", ""), {"process.pid": p.pid}, 1, 0)
        ProcessEnricher().enrich([rec])
        assert rec.attributes["container.id"] == CID
        assert rec.attributes["process.executable.path"].endswith("/sleep")
        assert rec.attributes["process.owner"] == "root"
    finally:
        p.kill()
        p.wait()
        os.rmdir(cg)


def test_exited_process_gets_nothing_and_pidless_records_are_untouched():
    rec = Counter(Instrument("t", "1", ""), {"process.pid": 4_000_000}, 1, 0)
    agg = Counter(Instrument("t", "1", ""), {"process.executable.name": "x"}, 1, 0)
    ProcessEnricher().enrich([rec, agg])
    assert rec.attributes == {"process.pid": 4_000_000}
    assert agg.attributes == {"process.executable.name": "x"}


def test_command_line_only_when_asked():
    """process.command_line is off by default (arguments can hold secrets);
    on, it is the real arguments of the process, joined by spaces."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", "import sys, time; print(1, flush=True); time.sleep(30)",
                             "token=abc"], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()
        assert "process.command_line" not in ProcessEnricher().attributes(proc.pid)
        attrs = ProcessEnricher(command_line=True).attributes(proc.pid)
        assert attrs.get("process.command_line") == \
            "/usr/bin/python3 -c import sys, time; print(1, flush=True); time.sleep(30) token=abc"
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_execs_is_named_by_its_new_program():
    """A forked child is first seen as its parent (between fork and exec);
    after exec() the same pid, with the same start time, is the new program."""
    code = ("import os, sys; print(os.getpid(), flush=True); sys.stdin.readline(); "
            "os.execv('/bin/sleep', ['sleep', '30'])")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        names = ProcessNames()
        assert names.executable_name(pid).startswith("python")
        child.stdin.write("go\n")
        child.stdin.flush()
        deadline = time.monotonic() + 10
        while open(f"/proc/{pid}/comm").read().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)
        names.begin_pass()    # names are read once per collection pass
        assert names.executable_name(pid) == "sleep"
    finally:
        child.kill()
        child.wait()


def test_a_series_keeps_its_attributes_through_its_process_exit():
    """The final export after a process exits is the same series (same
    attribute set) as the ones before: a changed set is a new series to a
    backend, which would count the process's totals twice."""
    p = subprocess.Popen(["sleep", "30"])
    enricher = ProcessEnricher()
    before = Counter(Instrument("t", "1", ""), {"process.pid": p.pid}, 1, 0)
    enricher.enrich([before])
    assert before.attributes["process.executable.path"].endswith("/sleep")
    p.kill()
    p.wait()
    after = Counter(Instrument("t", "1", ""), {"process.pid": p.pid}, 2, 0)
    enricher.enrich([after])
    assert after.attributes == before.attributes
