"""Start, stop, reload: the agent leaves nothing of its own in the kernel
after --duration, SIGTERM or SIGINT, and SIGHUP reloads the config."""
from __future__ import annotations

import collections
import contextlib
import functools
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import (ROOT, SYSCALL_LATENCY_MAPS, SYSCALL_LATENCY_PROGS, bpftool_objects, curl, loaded_ids,
                      needs_root, wait_until)
from otlp_data import points, read_jsonl

pytestmark = needs_root


def _our_ids():
    return loaded_ids("prog", SYSCALL_LATENCY_PROGS), loaded_ids("map", SYSCALL_LATENCY_MAPS)


def _assert_gone(progs: set, maps: set, timeout: float = 10.0) -> None:
    """The kernel frees programs and maps after an RCU grace period, so they
    may be listed for a moment after the last reference is gone."""
    assert progs and maps, "nothing of ours was loaded while the agent ran"
    deadline = time.monotonic() + timeout
    while True:
        still_progs = progs & {p["id"] for p in bpftool_objects("prog")}
        still_maps = maps & {m["id"] for m in bpftool_objects("map")}
        if not (still_progs or still_maps) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not still_progs, f"programs left in the kernel: {still_progs}"
    assert not still_maps, f"maps left in the kernel: {still_maps}"


def test_duration_exits_zero_and_detaches(agent_factory, tmp_path):
    before = _our_ids()
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
                           "probes": {"syscall_latency": {}}}, args=("--duration", "3"))
    agent.wait_for_log("collecting every")
    progs, maps = _our_ids()
    progs, maps = progs - before[0], maps - before[1]
    assert len(progs) == 2 and len(maps) == 5, (progs, maps)
    assert agent.wait(timeout=30) == 0, agent.stderr()
    _assert_gone(progs, maps)
    # flushed on exit: the last line was written after the final collection
    assert read_jsonl(tmp_path / "t.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_detaches(agent_factory, tmp_path, sig):
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
                           "probes": {"syscall_latency": {}}})
    agent.wait_for_log("collecting every")
    progs, maps = _our_ids()
    assert agent.stop(sig) == 0, agent.stderr()
    _assert_gone(progs, maps)
    assert "Traceback" not in agent.stderr()


def test_sighup_reloads_and_bad_reload_keeps_running(agent_factory, tmp_path):
    jsonl = tmp_path / "t.jsonl"
    cfg = {"interval": "1s", "exporters": {"file": {"path": str(jsonl)}}, "probes": {"syscall_latency": {}}}
    agent = agent_factory(cfg)
    agent.wait_for_log("collecting every")
    old_progs, old_maps = _our_ids()

    # A changed probe config restarts that probe with the new settings.
    import yaml
    cfg["probes"]["syscall_latency"] = {"syscalls": ["getppid"]}
    agent.config_path.write_text(yaml.safe_dump(cfg))
    agent.send(signal.SIGHUP)
    agent.wait_for_log("reloaded")
    _assert_gone(old_progs, old_maps)
    new_progs, _ = _our_ids()
    assert len(new_progs) == 2
    reload_mark = time.time_ns()
    subprocess.run(["python3", "-c", "import os, time\nfor _ in range(100): os.getppid()\ntime.sleep(2.5)"],
                   check=True, timeout=30)

    # A broken config on reload is reported and the running one is kept.
    agent.config_path.write_text("interval: [nonsense\n")
    agent.send(signal.SIGHUP)
    agent.wait_for_log("keeping the running configuration")
    assert agent.proc.poll() is None
    assert _our_ids()[0] == new_progs
    assert agent.stop() == 0, agent.stderr()

    data = read_jsonl(jsonl)
    after = [a["syscall.name"] for _m, dp, a in points(data, "otelbpf.syscall.duration")
             if dp.time_unix_nano > reload_mark]
    assert after and set(after) <= {"getppid"}, set(after)


def test_no_probe_can_start_is_one_clear_error(agent_factory, tmp_path):
    """A BTF file that is not BTF: libbpf refuses it, the agent says so and exits 1."""
    bogus = tmp_path / "not-btf"
    bogus.write_bytes(b"\0" * 64)
    agent = agent_factory({"kernel": {"btf": str(bogus)}, "exporters": {"console": {}},
                           "probes": {"syscall_latency": {}}})
    assert agent.wait(timeout=30) == 1
    err = agent.stderr()
    assert "probe syscall_latency: failed to start" in err
    assert "no probe could start" in err
    assert "Traceback" not in err


def test_backend_down_keeps_collecting_and_counts_failures(agent_factory, tmp_path):
    """An OTLP endpoint nobody listens on: the agent keeps collecting (the file
    exporter still gets data), counts the failed exports, and stops on time."""
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "export_queue": 2,
                           "exporters": {"otlp": {"endpoint": "http://127.0.0.1:1", "timeout": "1s"},
                                         "file": {"path": str(jsonl)}},
                           "probes": {"syscall_latency": {}}}, args=("--duration", "5"))
    start = time.monotonic()
    assert agent.wait(timeout=60) == 0, agent.stderr()
    assert time.monotonic() - start < 20
    data = read_jsonl(jsonl)
    assert len(data) >= 4
    lost = [dp.as_int for _m, dp, _a in points(data, "otelbpf.dropped", otelbpf__probe="exporter.otlp")]
    assert lost and max(lost) >= 1, "failed exports were not counted"
    assert points(data, "otelbpf.syscall.duration")
    assert "Traceback" not in agent.stderr()


def test_agent_mounts_tracefs(agent_factory, tmp_path):
    from collector.features import tracefs_mount_point
    mp = tracefs_mount_point()
    if mp and subprocess.run(["umount", mp]).returncode != 0:
        pytest.skip(f"tracefs at {mp} is busy and cannot be unmounted for this test")
    assert tracefs_mount_point() is None
    agent = agent_factory({"exporters": {"console": {}}, "probes": {"syscall_latency": {}}},
                          args=("--duration", "1"))
    assert agent.wait(timeout=30) == 0, agent.stderr()
    assert tracefs_mount_point() == "/sys/kernel/tracing"


def test_second_instance_exits_with_a_clear_message(agent_factory, tmp_path):
    cfg = {"interval": "1s", "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
           "probes": {"syscall_latency": {}}, "lock_file": str(tmp_path / "otelbpf.lock")}
    first = agent_factory(cfg)
    first.wait_for_log("collecting every")
    second = subprocess.run([sys.executable, "-m", "collector.cli", "run", "--config", str(first.config_path),
                             "--duration", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another otelbpf agent (pid {first.pid}) is running" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.stop() == 0


def test_twenty_start_stop_cycles_leave_nothing_behind(agent_factory, tmp_path):
    """SIGTERM, SIGINT, --duration and SIGKILL (then a fresh start), 20 times."""
    cfg = {"interval": "1s", "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
           "probes": {"syscall_latency": {}}, "lock_file": str(tmp_path / "otelbpf.lock")}
    seen_progs, seen_maps = set(), set()
    ways = [signal.SIGTERM, signal.SIGINT, "duration", signal.SIGKILL]
    for i in range(20):
        way = ways[i % len(ways)]
        agent = agent_factory(cfg, args=("--duration", "1") if way == "duration" else ())
        agent.wait_for_log("collecting every")
        progs, maps = _our_ids()
        seen_progs |= progs
        seen_maps |= maps
        if way == "duration":
            assert agent.wait(timeout=30) == 0, agent.stderr()
        else:
            code = agent.stop(way)
            assert code == (-signal.SIGKILL if way == signal.SIGKILL else 0), agent.stderr()
    _assert_gone(seen_progs, seen_maps)
    assert len(seen_progs) >= 40  # each cycle really loaded its own programs


def test_backend_that_comes_back_gets_the_data_without_resets(agent_factory, tmp_path):
    """The collector is down when the agent starts and comes up 4 s later:
    collection goes on, exports are retried, and the cumulative series that
    reach it keep the start time and totals they had from the beginning."""

    from otlp_data import last_point
    from otlp_receiver import GrpcReceiver
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    started = time.time_ns()
    agent = agent_factory({"interval": "1s", "exporters": {"otlp": {"endpoint": f"http://127.0.0.1:{port}",
                                                                     "timeout": "1s"}},
                           "probes": {"syscall_latency": {"syscalls": ["getppid"]}}})
    agent.wait_for_log("collecting every")
    # alive across a collection, so it gets a series of its own
    before = subprocess.Popen(["python3", "-c", "import os, time\nfor _ in range(300): os.getppid()\n"
                               "print(os.getpid(), flush=True)\ntime.sleep(2.5)"], stdout=subprocess.PIPE, text=True)
    pid = int(before.stdout.readline())
    before.wait(timeout=30)
    time.sleep(1.5)
    receiver = GrpcReceiver(port)
    try:
        deadline = time.monotonic() + 60
        while not receiver.rx.metrics and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        assert agent.stop() == 0, agent.stderr()
    finally:
        receiver.stop()
    got = receiver.rx.metrics
    assert got, "nothing delivered after the backend came back"
    # the calls made while the backend was down are in the totals, from a start time before the outage
    _m, dp, _a = last_point(got, "otelbpf.syscall.duration", syscall__name="getppid",
                            process__pid=pid)
    assert dp.count >= 300 and dp.start_time_unix_nano < started + 4_000_000_000
    assert "Traceback" not in agent.stderr()


def test_backend_errors_and_stalls_lose_no_cumulative_data(agent_factory, tmp_path):
    """The backend answers 503, 429 with Retry-After, 400, then stalls past
    the export timeout, then recovers: the agent keeps collecting, retries,
    and what arrives afterwards carries every call from the start, with the
    start time it had before the faults."""
    from otlp_data import last_point
    from otlp_receiver import HttpReceiver
    receiver = HttpReceiver()
    receiver.script.extend([(503, {}, 0), (429, {"Retry-After": "1"}, 0), (400, {}, 0), (200, {}, 3.0)])
    try:
        started = time.time_ns()
        agent = agent_factory({"interval": "1s", "exporters": {"otlp": {
            "endpoint": receiver.endpoint, "protocol": "http/protobuf", "timeout": "2s"}},
            "probes": {"syscall_latency": {"syscalls": ["getppid"]}}})
        agent.wait_for_log("collecting every")
        calls = subprocess.run(["python3", "-c", "import os\nfor _ in range(500): os.getppid()\nprint(os.getpid())"],
                               capture_output=True, text=True, check=True)
        pid = int(calls.stdout)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pts = [p for p in _getppid_points(receiver.rx.metrics, pid)]
            if receiver.script == collections.deque() and pts and max(dp.count for dp in pts) >= 500:
                break
            time.sleep(0.5)
        assert agent.proc.poll() is None, agent.stderr()
        assert [s for _p, s in receiver.faults_served] == [503, 429, 400, 200]
        _m, dp, _a = last_point(receiver.rx.metrics, "otelbpf.syscall.duration", syscall__name="getppid")
        assert max(d.count for d in _getppid_points(receiver.rx.metrics, pid)) >= 500
        assert dp.start_time_unix_nano < started + 10_000_000_000
        assert agent.stop() == 0
        assert "Traceback" not in agent.stderr()
    finally:
        receiver.stop()


def _getppid_points(requests, pid):
    from otlp_data import points
    return [dp for _m, dp, a in points(requests, "otelbpf.syscall.duration", syscall__name="getppid")
            if a.get("process.pid") in (pid, None)]


@contextlib.contextmanager
def web_server(directory):
    """python's http.server on a free loopback port; yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        server.kill()
        server.wait()


def curl_status(port: int, path: str) -> str:
    return curl(f"http://127.0.0.1:{port}{path}", check=False).strip()


def _span_paths(req) -> set:
    return {a.value.string_value for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
            for a in s.attributes if a.key == "url.path"}


@needs_root
def test_a_batch_refused_for_good_is_dropped_and_counted_and_the_rest_flows(agent_factory, tmp_path):
    """A backend answers 400 to any trace request holding the span of
    /poison. That batch is retried for export_retry_max, then dropped and
    counted; the spans after it arrive, and metrics never wait for spans."""
    from otlp_receiver import HttpReceiver
    receiver = HttpReceiver()
    refused_ids = set()  # every span in a refused request (retries resend the same ones)

    def reject(kind, req):
        if kind == "traces" and "/poison" in _span_paths(req):
            refused_ids.update(s.span_id for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return 400
        return None
    receiver.reject = reject

    def delivered():
        return set().union(set(), *map(_span_paths, list(receiver.rx.traces)))

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: receiver.stop())
        port = cleanup.enter_context(web_server(tmp_path))
        get = functools.partial(curl_status, port)  # curl's side is excluded: one SERVER span each
        agent = agent_factory({"interval": "1s", "export_retry_max": "2s",
                               "exporters": {"otlp": {"endpoint": receiver.endpoint, "protocol": "http/protobuf",
                                                      "timeout": "2s"}},
                               "probes": {"http": {"tls": False, "exclude": ["curl"]}}})
        agent.wait_for_log("collecting every")
        assert wait_until(lambda: get("/") == "200", timeout=10)
        assert wait_until(lambda: "/" in delivered(), 60)  # the path to the backend works
        get("/poison")
        assert wait_until(lambda: receiver.faults_served, 60), "the poison span never reached the backend"
        get("/after")  # its span queues behind the refused batch

        def dropped():
            return [dp.as_int for _m, dp, _a in points(list(receiver.rx.metrics), "otelbpf.dropped",
                                                       otelbpf__probe="exporter.otlp", reason="retry_expired.spans")]
        assert wait_until(lambda: "/after" in delivered() and dropped(), 60)
        assert "/poison" not in delivered()
        # what the backend refused is what the agent says it lost (the batch may hold the
        # receiver's own request spans: this test's process serves HTTP too)
        assert max(dropped()) == len(refused_ids) >= 1
        # the refused span's request was still counted: metrics do not wait behind spans
        assert any(a.get("http.response.status_code") == 404
                   for _m, _dp, a in points(list(receiver.rx.metrics), "http.server.request.duration"))
        assert {status for _p, status in receiver.faults_served} == {400} and len(receiver.faults_served) >= 2
        assert agent.stop() == 0
        assert "Traceback" not in agent.stderr()


@needs_root
def test_a_sixty_second_outage_mid_run_loses_nothing(agent_factory, tmp_path):
    """The backend goes away for 60 s in the middle of a run and comes back
    on the same port. Requests served during the outage arrive afterwards as
    spans, each once; the request counts carry on from the same start time,
    with nothing dropped from the buffers."""
    from otlp_receiver import GrpcReceiver
    receiver = GrpcReceiver()
    port = receiver.port

    def served(rx):
        """status -> (start time, count) of the port's series, latest point each."""
        out = {}
        for _m, dp, a in points(list(rx.metrics), "http.server.request.duration", server__port=web):
            st = a["http.response.status_code"]
            if st not in out or dp.count >= out[st][1]:
                out[st] = (dp.start_time_unix_nano, dp.count)
        return out

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: receiver.stop())  # the one serving at the time
        web = cleanup.enter_context(web_server(tmp_path))
        get = functools.partial(curl_status, web)
        agent = agent_factory({"interval": "1s", "exporters": {"otlp": {"endpoint": receiver.endpoint,
                                                                         "timeout": "2s"}},
                               "probes": {"http": {"tls": False, "exclude": ["curl"]}}})
        agent.wait_for_log("collecting every")
        assert wait_until(lambda: get("/") == "200", 10)
        assert wait_until(lambda: served(receiver.rx).get(200), 20)
        start_before, _ = served(receiver.rx)[200]
        receiver.stop()
        during = [f"/during/{i}" for i in range(12)]
        for path in during:  # 60 s without a backend
            get(path)
            time.sleep(5)
        receiver = GrpcReceiver(port)  # back, same address
        got = lambda: [s.name for s in _all_spans(receiver.rx) if _path_of(s) in during]  # noqa: E731
        assert wait_until(lambda: len(got()) >= len(during), 90), f"{len(got())} of {len(during)} spans arrived"
        assert sorted(_path_of(s) for s in _all_spans(receiver.rx) if _path_of(s) in during) == sorted(during)
        assert wait_until(lambda: served(receiver.rx).get(404, (0, 0))[1] >= len(during), 30)
        after = served(receiver.rx)
        assert after[200] == (start_before, 1)  # the series from before the outage, not reset
        assert after[404][1] == len(during)     # every request made while the backend was away
        lost = [dp.as_int for _m, dp, a in points(list(receiver.rx.metrics), "otelbpf.dropped",
                                                  otelbpf__probe="exporter.otlp")
                if a["reason"].startswith(("queue_full", "retry_expired"))]
        assert not any(lost), lost
        assert agent.stop() == 0
        assert "Traceback" not in agent.stderr()


def _all_spans(rx):
    return [s for req in list(rx.traces) for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _path_of(span):
    return next((a.value.string_value for a in span.attributes if a.key == "url.path"), None)
