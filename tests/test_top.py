"""`otelbpf top` driven in a real terminal: tmux runs it in a detached
session of a known size, the test sends keys and reads the screen with
`tmux capture-pane -p`. The numbers on screen are checked against what the
workloads themselves did: an HTTP server's own request log (known counts,
statuses and durations), sc_workload's known syscalls, two_hot's known hot
functions. One agent (every probe, collecting each second) runs for the
module; the standalone test runs without it.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (ROOT, SYSCALL_LATENCY_PROGS, AgentProcess, bpftool_objects, build_c, curl, loaded_ids,
                      needs_root, run_cli, wait_until)

pytestmark = [needs_root, pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux (make setup installs it)")]

WIDTH, HEIGHT = 160, 45
_SESSIONS = itertools.count()   # one tmux server per screen: a name reused while the last one exits fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Screen:
    """`otelbpf top ARGS` in its own tmux server, WIDTH x HEIGHT."""

    def __init__(self, *args):
        self.sock = f"otelbpf-test-{os.getpid()}-{next(_SESSIONS)}"
        cmd = " ".join([sys.executable, "-m", "collector.cli", "top", *args])
        # The pane stays after top exits, showing its exit status.
        shell = f"cd {ROOT} && {cmd}; echo EXIT=$?; sleep 120"
        env = {**os.environ, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
        subprocess.run(self._tmux("new-session", "-d", "-s", "top", "-x", str(WIDTH), "-y", str(HEIGHT), shell),
                       check=True, env=env)

    def _tmux(self, *args) -> list:
        return ["tmux", "-L", self.sock, "-f", "/dev/null", *args]

    def text(self) -> str:
        return subprocess.run(self._tmux("capture-pane", "-p", "-t", "top"), capture_output=True, text=True).stdout

    def wait_for(self, pred, timeout: float = 30.0, what: str = "") -> str:
        """The first screen pred accepts (a str: that text appears)."""
        test = (lambda s: pred in s) if isinstance(pred, str) else pred
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if test(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what or pred!r} in {timeout}s; last screen:\n{screen}")
            time.sleep(0.2)

    def keys(self, *keys) -> None:
        subprocess.run(self._tmux("send-keys", "-t", "top", *keys), check=True)

    def resize(self, width: int, height: int) -> None:
        subprocess.run(self._tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height)), check=True)

    def exit_code(self, timeout: float = 30.0) -> int:
        screen = self.wait_for(lambda s: re.search(r"^EXIT=\d+", s, re.M), timeout, "EXIT=")
        return int(re.search(r"^EXIT=(\d+)", screen, re.M).group(1))

    def close(self) -> None:
        subprocess.run(self._tmux("kill-server"), capture_output=True)


@pytest.fixture
def screens():
    opened = []

    def open_screen(*args) -> Screen:
        s = Screen(*args)
        opened.append(s)
        return s

    yield open_screen
    for s in opened:
        s.close()


def rows(screen: str, first: str) -> list:
    """Table rows whose first cell is `first`, split into cells."""
    return [line.split() for line in screen.splitlines() if line.split()[:1] == [first]]


def row(screen: str, first: str, **where) -> list | None:
    """The row starting with `first` that has the given cell values at the given indexes (c2="/ok")."""
    for cells in rows(screen, first):
        if all(len(cells) > int(k[1:]) and cells[int(k[1:])] == v for k, v in where.items()):
            return cells
    return None


def table_rows(screen: str, header: str) -> list:
    """The cells of every row under the header line holding `header`."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line)
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.split())
    return out


def get(*urls) -> list:
    """HTTP status of each URL, fetched by one curl (its -o /dev/null covers the first URL only)."""
    args = [urls[0]] + [a for u in urls[1:] for a in ("-o", "/dev/null", u)]
    return curl(*args).split()


def window(screen: str) -> float | None:
    m = re.search(r"window (\d+\.\d)s", screen)
    return float(m.group(1)) if m else None


def programs_of(marker: str) -> set:
    """Ids of the BPF programs a process whose command line holds marker
    holds (its link and program fds' fdinfo names them): other tests may be
    loading the same probes meanwhile."""
    ids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                continue
            for info in (proc / "fdinfo").iterdir():
                ids |= {int(m) for m in re.findall(r"^prog_id:\s*(\d+)", info.read_text(), re.M)}
        except OSError:
            continue
    return ids


# ------------------------------------------------------------------ fixtures
SERVER = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    STATUS = {"/ok": 200, "/boom": 500, "/missing": 404, "/slow": 200}
    log = open(sys.argv[2], "a", buffering=1)

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            t0 = time.monotonic()
            if self.path == "/slow":
                time.sleep(0.3)
            code = STATUS.get(self.path, 404)
            body = b"x" * 100
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            log.write(f"{self.path} {code} {time.monotonic() - t0:.6f}\\n")

        def log_message(self, *a):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


class TopServer:
    """A Python HTTP server run as `topsrv` (its comm, so its rows are its
    own), logging path, status and seconds of every request it answered."""

    def __init__(self, d: Path):
        self.port = free_port()
        self.log = d / "requests.log"
        (d / "server.py").write_text(SERVER)
        exe = d / "topsrv"
        exe.symlink_to(sys.executable)
        self.proc = subprocess.Popen([str(exe), str(d / "server.py"), str(self.port), str(self.log)])
        ok = wait_until(lambda: _connects(self.port), timeout=10)
        assert ok, "topsrv did not start"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logged(self, path: str) -> list:
        if not self.log.exists():
            return []
        return [(int(c), float(s)) for p, c, s in (line.split() for line in self.log.read_text().splitlines())
                if p == path]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    health = f"127.0.0.1:{free_port()}"
    a = AgentProcess(d, {"interval": "1s", "health": health, "lock_file": str(d / "agent.lock"),
                         "exporters": {}})
    a.health = health
    try:
        a.wait_for_log("collecting every", timeout=60)
        yield a
    finally:
        a.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = TopServer(tmp_path_factory.mktemp("topsrv"))
    yield s
    s.stop()


# ------------------------------------------------------------------ tests
def test_http_view_shows_counts_rates_and_errors_of_each_route(agent, server, screens):
    top = screens("--config", str(agent.config_path))     # finds the agent through the config's health address
    top.wait_for(f"agent http://{agent.health}/records", what="the agent named in the footer")
    top.wait_for(lambda s: window(s), what="a window between two collections")
    statuses = get(*[server.url("/ok")] * 30, *[server.url("/boom")] * 7, *[server.url("/missing")] * 5)
    assert statuses == ["200"] * 30 + ["500"] * 7 + ["404"] * 5
    truth = {p: len(server.logged(p)) for p in ("/ok", "/boom", "/missing")}
    assert truth == {"/ok": 30, "/boom": 7, "/missing": 5}

    # Every screen until the totals are there: each redraw's rate must be what
    # the total gained over the window the title shows.
    seen, last_total = [], 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        screen = top.text()
        ok = row(screen, "topsrv", c1="server", c2="/ok")
        if ok and int(ok[5]) != last_total:
            seen.append((int(ok[5]) - last_total, float(ok[3]), window(screen)))
            last_total = int(ok[5])
        if last_total == 30 and row(screen, "topsrv", c2="/boom", c5="7") and row(screen, "topsrv", c2="/missing",
                                                                                    c5="5"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"totals never reached the server's counts {truth}; last screen:\n{screen}")
    assert seen and all(win for _, _, win in seen), seen
    for gained, rate, win in seen:
        assert abs(rate * win - gained) <= 0.05 * win + 0.5, (gained, rate, win, seen)
    # Columns: SERVICE SIDE ROUTE REQ/S ERR/S REQS ERRORS P50 P99. Errors are 5xx on a server.
    assert row(screen, "topsrv", c2="/boom")[5:7] == ["7", "7"]
    assert row(screen, "topsrv", c2="/missing")[5:7] == ["5", "0"]
    assert row(screen, "topsrv", c2="/ok")[5:7] == ["30", "0"]
    top.keys("q")
    assert top.exit_code() == 0


def test_http_percentiles_agree_with_the_exported_histogram(agent, server, screens):
    """Requests that each sleep 0.3 s on the server: every one is in the log2
    bucket (0.25, 0.5] s, so p50 and p99 are both 500ms on screen, and the
    agent's /records holds every one of them in that same bucket."""
    top = screens("--agent", f"http://{agent.health}")
    top.wait_for("2:Syscalls")
    stop = threading.Event()

    def load():
        while not stop.is_set():
            curl(server.url("/slow"))
    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        screen = top.wait_for(lambda s: (r := row(s, "topsrv", c2="/slow")) and r[7:9] == ["500ms", "500ms"],
                              what="/slow with p50 and p99 500ms")
    finally:
        stop.set()
        t.join(timeout=5)
    assert screen
    times = [s for _, s in server.logged("/slow")]

    def slow_series():
        with urllib.request.urlopen(f"http://{agent.health}/records", timeout=5) as r:
            snap = json.load(r)
        found = [m for m in snap["metrics"] if m["name"] == "http.server.request.duration"
                 and m["attributes"].get("http.route") == "/slow"]
        assert len(found) == 1, found
        return found[0] if found[0]["count"] == len(times) else None
    m = wait_until(slow_series, timeout=10)
    assert m, f"/records never counted the server's {len(times)} /slow requests"
    edges = {2.0 ** (i + m["exp_offset"]): c for i, c in enumerate(m["buckets"]) if c}
    # Against the server's own timing (the kernel's starts earlier and ends
    # later): none in a bucket under (0.25, 0.5] s, and every request that
    # took the server under 0.45 s (a margin for a loaded machine) in it.
    assert min(edges) == 0.5, edges
    assert edges[0.5] >= sum(1 for t in times if t < 0.45), (edges, times)


def test_views_keys_filter_and_sort_show_the_known_workloads(agent, server, screens):
    top = screens("--agent", f"http://{agent.health}")
    top.wait_for("2:Syscalls")

    # Syscalls: sc_workload makes exactly 3000 getppid calls.
    sc = subprocess.Popen([str(build_c("sc_workload")), "3000", "0", "0"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    try:
        sc.stdout.readline()
        sc.stdin.write("go\n")
        sc.stdin.flush()
        assert sc.stdout.readline().strip() == "done"
        top.keys("2")
        # Columns: PROCESS PID SYSCALL CALLS/S ERR/S CALLS ERRORS P50 P99 MAX
        screen = top.wait_for(lambda s: any(r[2:3] == ["getppid"] and r[5] == "3000" for r in rows(s, "sc_workload")),
                              what="sc_workload's 3000 getppid")
        assert "CALLS/S↓" in screen
        top.keys("s")   # sort by the next column
        top.wait_for("ERR/S↓", what="the sort marker on ERR/S")
        # Filter: only sc_workload's rows remain.
        top.keys("/")
        top.wait_for("Enter applies")
        top.keys("sc_workload", "Enter")
        screen = top.wait_for("filter: sc_workload")
        screen = top.wait_for(lambda s: {r[0] for r in table_rows(s, "SYSCALL")} == {"sc_workload"},
                              what="only sc_workload's rows")
        assert any(r[2] == "getppid" for r in table_rows(screen, "SYSCALL"))
        top.keys("Escape")
        top.wait_for(lambda s: "filter:" not in s and len({r[0] for r in table_rows(s, "SYSCALL")}) > 1,
                     what="the filter cleared")
    finally:
        sc.stdin.write("exit\n")
        sc.stdin.close()
        sc.wait(timeout=10)

    # Flows: topsrv's server port, with the bytes it received.
    assert get(*[server.url("/ok")] * 5) == ["200"] * 5
    top.keys("3")
    # Columns: PROCESS PEER PORT ROLE PROTO RX/S TX/S RX TX RETRANS
    top.wait_for(lambda s: any(r[2] == str(server.port) and r[3] == "server" for r in rows(s, "topsrv")),
                 what=f"topsrv's flow on port {server.port}")

    # On-CPU: two_hot spends its time in hot_a and hot_b; the filter keeps only it.
    w = subprocess.Popen([str(build_c("two_hot", opt="-O0")), "6"], stdout=subprocess.PIPE, text=True)
    try:
        top.keys("4")
        top.wait_for("SELF%↓")
        # Columns: SELF% TOTAL% SAMPLES PROCESS FUNCTION
        top.keys("/")
        top.wait_for("Enter applies")
        top.keys("two_hot", "Enter")
        def enough(s):
            """Both functions shown, from enough samples that their order
            means something (a window just after start may hold one each)."""
            if "filter: two_hot" not in s or "SELF%" not in s:
                return False
            hot = {cells[4]: int(cells[2]) for cells in table_rows(s, "SELF%")
                   if len(cells) == 5 and cells[4] in ("hot_a", "hot_b") and cells[2].isdigit()}
            return len(hot) == 2 and sum(hot.values()) >= 30
        screen = top.wait_for(enough, what="two_hot's hot_a and hot_b, 30 samples between them")
        table = table_rows(screen, "SELF%")
        assert table and all(cells[3] == "two_hot" for cells in table), screen
        first = table[0]
        assert first[4] == "hot_a", f"hot_a (3x hot_b's work) is not the top self row:\n{screen}"
    finally:
        w.kill()
        w.wait()
    top.keys("q")
    assert top.exit_code() == 0


def test_a_tiny_terminal_gets_a_message_and_resizing_back_restores_the_view(agent, screens):
    top = screens("--agent", f"http://{agent.health}")
    top.wait_for("SERVICE")
    top.resize(30, 6)
    screen = top.wait_for("terminal too small", what="the too-small message")
    assert "Traceback" not in screen
    top.resize(WIDTH, HEIGHT)
    top.wait_for(lambda s: "SERVICE" in s and "terminal too small" not in s, what="the table again")
    top.resize(12, 3)
    top.wait_for(lambda s: "small" in s or "termi" in s, what="a message even at 12x3")
    top.keys("q")
    assert top.exit_code() == 0


def test_without_an_agent_top_loads_the_probes_and_detaches_them_on_quit(tmp_path, screens):
    cfg = tmp_path / "top.yaml"
    cfg.write_text(f"health: 127.0.0.1:{free_port()}\nlock_file: {tmp_path / 'lock'}\nexporters: {{}}\n"
                   "probes:\n  syscall_latency: {enabled: true}\n  cpu_profile: {enabled: false}\n"
                   "  http: {enabled: false}\n  net_flows: {enabled: false}\n")
    top = screens("--config", str(cfg))
    top.wait_for("standalone", timeout=60, what="the standalone mode in the footer")
    ours = programs_of(str(cfg))
    assert len(ours) == 2 and ours <= loaded_ids("prog", SYSCALL_LATENCY_PROGS), \
        f"top does not hold syscall_latency's two programs: {ours}"
    sc = subprocess.Popen([str(build_c("sc_workload")), "1234", "0", "0"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    sc.stdout.readline()
    sc.stdin.write("go\n")
    sc.stdin.flush()
    assert sc.stdout.readline().strip() == "done"
    top.keys("2")
    top.wait_for(lambda s: any(r[2:3] == ["getppid"] and r[5] == "1234" for r in rows(s, "sc_workload")),
                 what="sc_workload's 1234 getppid")
    sc.stdin.write("exit\n")
    sc.stdin.close()
    sc.wait(timeout=10)
    top.keys("q")
    assert top.exit_code() == 0
    # the kernel frees a program shortly after its last fd closes, not at once
    left = wait_until(lambda: not ours & {p["id"] for p in bpftool_objects("prog")}, timeout=5)
    assert left, f"programs {ours & {p['id'] for p in bpftool_objects('prog')}} still loaded after q"
    assert "Traceback" not in top.text()


def test_a_named_agent_that_does_not_answer_is_one_clear_line(screens):
    top = screens("--agent", f"http://127.0.0.1:{free_port()}")
    assert top.exit_code() == 1
    screen = top.text()
    assert "no agent answers at http://127.0.0.1:" in screen and "Traceback" not in screen


def test_top_without_a_terminal_says_what_to_use_instead():
    r = run_cli("top")
    assert r.returncode == 1
    assert "top needs a terminal" in r.stderr and "Traceback" not in r.stderr


def test_records_are_bounded_and_say_what_they_left_out(monkeypatch):
    """/records never grows without bound: beyond its limits it keeps the
    heaviest profile samples, cuts deep stacks, and counts what it left out."""
    from collector.records import Batch, Counter, Frame, Instrument, Profile, ProfileSample
    from collector.top import snapshot as snap
    monkeypatch.setattr(snap, "MAX_METRICS", 10)
    monkeypatch.setattr(snap, "MAX_SAMPLES", 3)
    inst = Instrument("c", "1", "")
    frames = [Frame(f"f{i}", i) for i in range(snap.MAX_FRAMES + 10)]
    batch = Batch(time_ns=1, metrics={"s": [Counter(inst, {"i": i}, i, 0) for i in range(25)]},
                  profiles={"p": [Profile([ProfileSample({"n": n}, frames, n) for n in (5, 1, 9, 2, 7)], 0, 1, 1)]})
    out = json.loads(json.dumps(snap.snapshot(batch, 1.0)))
    assert len(out["metrics"]) == 10 and out["truncated"] == {"metrics": 15, "samples": 2}
    assert [s["count"] for s in out["samples"]] == [9, 7, 5]
    assert all(len(s["frames"]) == snap.MAX_FRAMES for s in out["samples"])
    # samples of one route apart only by their request's ids are one, and
    # so outweigh a heavier single stack outside requests
    route = {"http.route": "/r"}
    linked = [ProfileSample(route, frames[:2], 2, link=(t, t)) for t in (1, 2, 3)]
    batch = Batch(time_ns=1, profiles={"p": [Profile(linked + [ProfileSample({}, frames[:2], 5)], 0, 1, 1)]})
    monkeypatch.setattr(snap, "MAX_SAMPLES", 1)
    out = snap.snapshot(batch, 1.0)
    assert [(s["count"], s["attributes"]) for s in out["samples"]] == [(6, route)]
    assert out["truncated"]["samples"] == 1
