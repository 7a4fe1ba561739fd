"""syscall_latency end to end: the real agent loads the probe into the real
kernel, a child makes a known number of getppid() and nanosleep() calls, and
what a real OTLP receiver (gRPC, HTTP) and the file exporter got must show
them, in the right buckets."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import build_c, every_form_config, needs_root, run_sleepers
from otlp_data import (assert_values_in_buckets, check_histograms, console_rows, exp_buckets, last_point,
                       parse_console_duration, points, populated_ranges, read_jsonl)

pytestmark = needs_root

N_GETPPID = 20000
N_SLEEP = 10
SLEEP_NS = 20_000_000          # 20 ms: in (2^24, 2^25] ns, kernel bucket 25, OTLP index 24
SLEEP_OTLP_INDEX = 24
INTERVAL = 1.0


def drive_workload(n_getppid=N_GETPPID, n_sleep=N_SLEEP, sleep_ns=SLEEP_NS, linger=2.5 * INTERVAL) -> int:
    """Run the workload; keep it alive `linger` seconds after its calls so the
    agent reads its counts while the pid exists. Returns its pid."""
    w = subprocess.Popen([str(build_c("sc_workload")), str(n_getppid), str(n_sleep), str(sleep_ns)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(w.stdout.readline())
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline().strip() == "done"
        time.sleep(linger)
        w.stdin.write("exit\n")
        w.stdin.close()
        assert w.wait(timeout=10) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    return pid


def check_workload_exponential(requests, pid: int) -> None:
    assert check_histograms(requests) > 0
    m, dp, attrs = last_point(requests, "otelbpf.syscall.duration", process__pid=pid, syscall__name="getppid")
    assert m.unit == "ns"
    assert m.WhichOneof("data") == "exponential_histogram"
    assert m.exponential_histogram.aggregation_temporality == 2  # CUMULATIVE
    assert attrs["process.executable.name"] == "sc_workload"
    assert dp.scale == 0
    assert N_GETPPID <= dp.count <= N_GETPPID + 5, dp.count
    assert sum(dp.positive.bucket_counts) + dp.zero_count == dp.count
    # getppid is sub-microsecond to a few microseconds here; nothing near a second
    assert max(exp_buckets(dp)) < 30

    _m, dp, _a = last_point(requests, "otelbpf.syscall.duration", process__pid=pid, syscall__name="nanosleep")
    buckets = exp_buckets(dp)
    assert dp.count == N_SLEEP
    assert not any(i < SLEEP_OTLP_INDEX for i in buckets), f"a 20 ms sleep measured shorter: {buckets}"
    assert buckets.get(SLEEP_OTLP_INDEX, 0) >= N_SLEEP - 1, buckets
    assert dp.sum >= N_SLEEP * SLEEP_NS

    # Cumulative with a stable start time: every export of the series has the same one.
    starts = {p[1].start_time_unix_nano for p in points(requests, "otelbpf.syscall.duration",
                                                         process__pid=pid, syscall__name="getppid")}
    assert len(starts) == 1


def test_grpc_and_file_exporters_see_known_syscalls(agent_factory, grpc_receiver, tmp_path):
    jsonl = tmp_path / "telemetry.jsonl"
    agent = agent_factory({
        "interval": "1s",
        "resource": {"deployment.environment.name": "ci"},
        "exporters": {"otlp": {"endpoint": grpc_receiver.endpoint, "protocol": "grpc", "insecure": True},
                      "file": {"path": str(jsonl)}},
        "probes": {"syscall_latency": {"enabled": True}},
    })
    agent.wait_for_log("collecting every")
    pid = drive_workload()
    assert agent.stop() == 0, agent.stderr()

    received = grpc_receiver.rx.metrics
    assert received, "the receiver got nothing"
    check_workload_exponential(received, pid)
    res = {kv.key: kv.value.string_value for kv in received[-1].resource_metrics[0].resource.attributes}
    assert res["service.name"] == "otelbpf"
    assert res["host.name"] and res["os.type"] == "linux"
    assert res["deployment.environment.name"] == "ci"
    # self-telemetry is there from the first version
    assert points(received, "otelbpf.dropped", otelbpf__probe="syscall_latency", reason="slot_collision")
    assert points(received, "otelbpf.probe.up", otelbpf__probe="syscall_latency")

    from_file = read_jsonl(jsonl)
    assert len(from_file) >= 3
    check_workload_exponential(from_file, pid)
    assert "Traceback" not in agent.stderr()


def test_http_exporter_explicit_histogram_and_otel_env(agent_factory, http_receiver):
    """OTLP/HTTP configured only through the standard OTEL_* variables, with
    the explicit-bucket form for backends without exponential histograms."""
    agent = agent_factory(
        {"interval": "1s", "exporters": {"otlp": {"histogram": "explicit"}},
         "probes": {"syscall_latency": {}}},
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint,
             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
             "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=test-cluster"})
    agent.wait_for_log("collecting every")
    pid = drive_workload()
    assert agent.stop() == 0, agent.stderr()

    received = http_receiver.rx.metrics
    assert received
    assert check_histograms(received) > 0
    m, dp, _ = last_point(received, "otelbpf.syscall.duration", process__pid=pid, syscall__name="nanosleep")
    assert m.WhichOneof("data") == "histogram" and m.unit == "s"
    assert dp.count == N_SLEEP
    bounds = list(dp.explicit_bounds)
    assert bounds[:3] == [1e-9, 2e-9, 4e-9]
    # bucket i covers (bounds[i-1], bounds[i]]: 20 ms falls in (2^24, 2^25] ns
    assert bounds[24] < SLEEP_NS / 1e9 <= bounds[25]
    assert dp.bucket_counts[25] >= N_SLEEP - 1
    assert sum(dp.bucket_counts[:25]) == 0
    assert abs(dp.sum - N_SLEEP * SLEEP_NS / 1e9) < N_SLEEP * 0.005  # within 5 ms per sleep
    _m, dp, _ = last_point(received, "otelbpf.syscall.duration", process__pid=pid, syscall__name="getppid")
    assert N_GETPPID <= dp.count <= N_GETPPID + 5
    res = {kv.key: kv.value.string_value for kv in received[-1].resource_metrics[0].resource.attributes}
    assert res["k8s.cluster.name"] == "test-cluster"


def test_errors_counted(agent_factory, tmp_path):
    """close(-1) fails with EBADF every time: each call is an error."""
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(jsonl)}},
                           "probes": {"syscall_latency": {"syscalls": ["close"]}}})
    agent.wait_for_log("collecting every")
    script = "import os,sys,time\nfor _ in range(500):\n    try: os.close(-1)\n    except OSError: pass\n" \
             "print(os.getpid(), flush=True); time.sleep(2.5)"
    p = subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=30)
    pid = int(p.stdout.split()[0])
    assert agent.stop() == 0
    data = read_jsonl(jsonl)
    assert check_histograms(data) > 0
    _m, dp, _ = last_point(data, "otelbpf.syscall.errors", process__pid=pid, syscall__name="close")
    assert dp.as_int >= 500
    # the filter keeps every other syscall out
    names = {a["syscall.name"] for _m, _d, a in points(data, "otelbpf.syscall.duration")}
    assert names == {"close"}, names


def test_kernel_map_overflow_is_kept_and_counted(agent_factory, tmp_path):
    """With a tiny key map, events that do not fit land in the per-syscall
    overflow histogram (counted), not on the floor."""
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(jsonl)}},
                           "probes": {"syscall_latency": {"max_keys": 64}}})
    agent.wait_for_log("collecting every")
    for _ in range(20):  # each short process brings ~20 new (pid, syscall) keys
        subprocess.run(["true"], check=True)
    pid = drive_workload(n_getppid=5000, n_sleep=0)
    assert agent.stop() == 0
    data = read_jsonl(jsonl)
    assert check_histograms(data) > 0
    _m, ovf, _ = last_point(data, "otelbpf.overflow", otelbpf__probe="syscall_latency", reason="kernel_map_full")
    assert ovf.as_int > 0
    assert points(data, "otelbpf.syscall.duration", otelbpf__overflow=True)
    # the workload's getppid calls are all somewhere: its own series, or overflow
    total = 0
    for match in ({"process__pid": pid}, {"otelbpf__overflow": True}):
        pts = points(data, "otelbpf.syscall.duration", syscall__name="getppid", **match)
        if pts:
            total += max(pts, key=lambda p: p[1].time_unix_nano)[1].count
    assert total >= 5000


def test_key_by_cgroup(agent_factory, tmp_path):
    """Per-cgroup keys: a workload moved into a cgroup of the test's own shows
    up under that cgroup's path."""
    from collector.metadata.cgroup import cgroup2_root
    root = cgroup2_root()
    assert root, "no cgroup2 mount"
    cg = f"{root}/otelbpf-test-{os.getpid()}"
    os.mkdir(cg)
    cg_id = os.stat(cg).st_ino  # what bpf_get_current_cgroup_id() returns for it
    try:
        jsonl = tmp_path / "t.jsonl"
        agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(jsonl)}},
                               "probes": {"syscall_latency": {"key_by": "cgroup", "syscalls": ["getppid"]}}})
        agent.wait_for_log("collecting every")
        w = subprocess.Popen([str(build_c("sc_workload")), str(N_GETPPID), "0", "0"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        pid = int(w.stdout.readline())
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(pid))
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline().strip() == "done"
        time.sleep(2.5 * INTERVAL)
        w.stdin.write("exit\n")
        w.stdin.close()
        w.wait(timeout=10)
        assert agent.stop() == 0, agent.stderr()
    finally:
        os.rmdir(cg)
    data = read_jsonl(jsonl)
    assert check_histograms(data) > 0
    path = "/" + os.path.basename(cg)
    _m, dp, attrs = last_point(data, "otelbpf.syscall.duration", otelbpf__cgroup__path=path)
    assert attrs["syscall.name"] == "getppid"
    assert attrs["otelbpf.cgroup.id"] == cg_id
    assert N_GETPPID <= dp.count <= N_GETPPID + 5
    assert "process.pid" not in attrs


# sleep (ns) -> calls: each inside one (2^(i-1), 2^i] ns bucket by a margin,
# from 90 us to beyond a second
SLEEPS = {90_000: 3, 1_500_000: 3, 12_000_000: 3, 90_000_000: 3, 400_000_000: 2, 1_250_000_000: 1}


@pytest.mark.parametrize("otlp_form,file_form", [("exponential", "explicit"), ("explicit", "exponential")])
def test_known_sleeps_land_in_their_buckets(agent_factory, grpc_receiver, tmp_path, otlp_form, file_form):
    """nanosleep()s of known length, 90 us to 1.25 s: each in the bucket
    holding its true duration over OTLP and in the file, exponential and
    explicit, and in the console's p50/p99."""
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory(every_form_config(tmp_path, grpc_receiver.endpoint, otlp_form, file_form,
                                            {"syscall_latency": {"syscalls": ["nanosleep"], "top_processes": 1000}}))
    agent.wait_for_log("collecting every")
    truth = run_sleepers(SLEEPS)
    assert agent.stop() == 0, agent.stderr()
    over_wire, from_file = list(grpc_receiver.rx.metrics), read_jsonl(jsonl)
    for reqs, form in ((over_wire, otlp_form), (from_file, file_form)):
        assert check_histograms(reqs) > 0
        for pid, n, lo, hi in truth.values():
            m, dp, _a = last_point(reqs, "otelbpf.syscall.duration", process__pid=pid, syscall__name="nanosleep")
            assert m.WhichOneof("data") == ("histogram" if form == "explicit" else "exponential_histogram")
            assert m.unit == ("s" if form == "explicit" else "ns")
            assert_values_in_buckets(m, dp, lo / 1e9, hi / 1e9, n)
    rows = console_rows(agent.stdout(), "otelbpf.syscall.duration")
    exp = from_file if file_form == "exponential" else over_wire
    for pid, n, lo, hi in truth.values():
        mine = [r for r in rows if f"pid={pid}" in r[3].split()]
        assert mine, f"no console row for pid {pid}"
        m, dp, _a = last_point(exp, "otelbpf.syscall.duration", process__pid=pid, syscall__name="nanosleep")
        edges = [b_hi for _lo, b_hi, _c in populated_ranges(m, dp)]
        for total, p50, p99, label in mine:
            assert 1 <= total <= n, label
            for q in (p50, p99):
                v, tol = (x * 1e9 for x in parse_console_duration(q))
                # the upper edge of a populated bucket, as printed (rounded) ...
                edge = next((e for e in edges if abs(v - e) <= tol), None)
                assert edge, f"{label}: console {q}, buckets' upper edges {edges} ns"
                # ... of a bucket that can hold the truth
                assert edge / 2 < hi and edge >= lo, f"{label}: console {q}, true [{lo}, {hi}] ns"


def test_entries_of_exited_processes_are_taken_again(tmp_path):
    """The kernel keeps histograms in an array of max_keys entries; those of
    exited processes are freed at collection and taken by new keys. 3 x 30
    short processes (one getppid key each, 90 in all) fit in 64 entries only
    through that: none goes to the overflow, and every call is counted."""
    import logging
    import shutil

    from collector.config import PROBE_COMMON, parse_section
    from collector.probe import ProbeContext, default_bpf_dir
    from probes.syscall_latency import SyscallLatencyProbe

    # a name of its own, so no other process's getppid calls share its series
    exe = f"screuse{os.getpid()}"[:15]
    binary = tmp_path / exe
    shutil.copy(build_c("sc_workload"), binary)

    def start(n: int) -> subprocess.Popen:
        w = subprocess.Popen([str(binary), str(n), "0", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        w.pid_seen = int(w.stdout.readline())
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline().strip() == "done"
        return w

    def finish(w: subprocess.Popen) -> None:
        w.stdin.write("exit\n")
        w.stdin.close()
        assert w.wait(timeout=10) == 0

    schema = dict(PROBE_COMMON)
    schema.update(SyscallLatencyProbe.config_schema)
    cfg = parse_section({"syscalls": ["getppid"], "max_keys": 64}, schema, "probes.syscall_latency")
    probe = SyscallLatencyProbe(cfg, ProbeContext(default_bpf_dir(), None, None, os.getpid(), time.time_ns(),
                                                  logging.getLogger("test")))
    probe.start()
    try:
        for _ in range(3):
            for _ in range(30):
                finish(start(10))
            probe.collect()  # reads the exited processes' counts, then frees their entries
        w = start(5000)
        records = probe.collect()  # still alive: a series of its own
        finish(w)
    finally:
        probe.stop()
    assert not [r for r in records if r.attributes.get("otelbpf.overflow")], "keys went to the overflow"
    assert [r.value for r in records if r.attributes.get("reason") == "kernel_map_full"] == [0]
    mine = [r for r in records if r.instrument.name == "otelbpf.syscall.duration"
            and r.attributes.get("process.executable.name") == exe]
    assert sum(sum(r.buckets) for r in mine if r.attributes.get("process.pid") == w.pid_seen) == 5000
    assert sum(sum(r.buckets) for r in mine if "process.pid" not in r.attributes) == 90 * 10
