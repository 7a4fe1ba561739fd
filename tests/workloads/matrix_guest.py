"""Runs inside a kernel-matrix guest (tools/kernel_vm.py): `otelbpf check`,
then the agent with its default probes and a file exporter, real workloads
with known counts, and the workloads' own ground truth, all written to OUT
for tests/test_kernel_matrix.py to compare on the host.

    python tests/workloads/matrix_guest.py OUT BIN_DIR [UNWIND_CACHE]

UNWIND_CACHE: unwind tables built ahead on the host (read-only here), so
that the profiler walks whole stacks from the start: building them under
software emulation takes minutes, and it is the walk that differs by kernel.

Workloads (each its own process, so each is its own executable in the data):
- HTTP: python's http.server on 127.0.0.1:HTTP_PORT serving a directory,
  curl requests of known statuses; the server's log is the ground truth.
- HTTP/2: Node's http2 server (tests/peers/node_h2.js) over h2c, curl
  requests by prior knowledge; the server's own counts are the ground truth.
- TCP: a server that reads to EOF and a client that sends TCP_BYTES; both
  print what they moved.
- syscalls: sc_workload makes GETPPID getppid() calls and SLEEPS nanosleeps.
- CPU: cpu_work burns CPU; its own CPU time (rusage) is the ground truth.
- CPU per request: tests/peers/cpu_routes_server.py (a thread per
  connection) burns CPU in two routes, each request with a traceparent;
  the server's own CPU time per route and per trace is the ground truth.
"""
from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT, TCP_PORT = 18080, 18081
HTTP_PLAN = [("/ok.txt", 200)] * 5 + [("/missing", 404)] * 2
H2_PLAN = [("/", 200)] * 4 + [("/missing", 404)] * 2 + [("/boom", 500)]
TCP_BYTES = 3_000_000
GETPPID, SLEEPS, SLEEP_NS = 3000, 3, 20_000_000
CPU_LOOPS = 150_000_000
CPU_ROUTES = [("/heavy", 12), ("/light", 4)] * 4   # (route, units of ~1 ms on the host; ~20x that here)
INTERVAL_S = 2

TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    n += len(b)
c.close(); print(n, flush=True)
"""
TCP_CLIENT = """
import socket, sys
n = int(sys.argv[2]); s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"x" * n); s.close(); print(n, flush=True)
"""


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def wait_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited ({proc.returncode}) before {text!r}")
        time.sleep(0.5)
    raise RuntimeError(f"agent did not log {text!r} in {timeout}s")


def http_workload(out: Path) -> dict:
    site = Path("/tmp/site")
    site.mkdir(exist_ok=True)
    (site / "ok.txt").write_text("ok\n")
    log = open(out / "http_server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "127.0.0.1",
                               "--directory", str(site)], stdout=log, stderr=log)
    try:
        wait_port(HTTP_PORT)
        statuses = []
        for path, _want in HTTP_PLAN:
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{HTTP_PORT}{path}"], capture_output=True, text=True, timeout=60)
            statuses.append(int(r.stdout or 0))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        log.close()
    # http.server logs '"GET /ok.txt HTTP/1.1" 200 -' per request: the
    # server's own account (the wait_port probe connection sent no request)
    logged: dict = {}
    for line in (out / "http_server.log").read_text().splitlines():
        if '" ' in line and "HTTP/1." in line:
            status = line.rsplit('" ', 1)[1].split()[0]
            logged[status] = logged.get(status, 0) + 1
    return {"port": HTTP_PORT, "client_statuses": statuses, "server_logged": logged}


def h2_workload(out: Path) -> dict:
    """curl over h2c (one connection per request) against Node's http2
    server; the server's counts per (method, path, status)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import h2_peers
    d = out / "node"
    with h2_peers.node_h2_server(d, tls=False) as srv:
        statuses = [h2_peers.curl_h2(srv.url("h2c", path), tls=False, timeout=60) for path, _want in H2_PLAN]
        counts = srv.counts(timeout=60)
    return {"port": srv.h2c_port, "client_statuses": statuses,
            "server_counts": {str(status): n for (_m, _p, status), n in counts.items()}}


def tcp_workload() -> dict:
    server = subprocess.Popen([sys.executable, "-c", TCP_SERVER, str(TCP_PORT)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    client = subprocess.run([sys.executable, "-c", TCP_CLIENT, str(TCP_PORT), str(TCP_BYTES)],
                            capture_output=True, text=True, timeout=120)
    received = int(server.stdout.readline())
    server.wait(timeout=30)
    return {"port": TCP_PORT, "client_sent": int(client.stdout), "server_received": received}


def cpu_per_request_workload() -> dict:
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "peers" / "cpu_routes_server.py"),
                               "--background-duty", "0"], stdout=subprocess.PIPE, text=True)
    try:
        ready = server.stdout.readline().split()
        port, pid = int(ready[1]), int(ready[2])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        sent = {}
        for route, units in CPU_ROUTES:
            trace = os.urandom(16).hex()
            conn.request("GET", f"{route}?units={units}",
                         headers={"traceparent": f"00-{trace}-{os.urandom(8).hex()}-01"})
            r = conn.getresponse()
            r.read()
            sent[trace] = route
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"pid": pid, "port": port, "sent": sent, "stats": stats}


def syscall_workload(bin_dir: Path) -> dict:
    w = subprocess.Popen([str(bin_dir / "sc_workload"), str(GETPPID), str(SLEEPS), str(SLEEP_NS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(w.stdout.readline())
    w.stdin.write("go\n")
    w.stdin.flush()
    assert w.stdout.readline().strip() == "done"
    return {"pid": pid, "getppid": GETPPID, "nanosleep": SLEEPS, "sleep_ns": SLEEP_NS, "proc": w}


def cpu_workload(bin_dir: Path, loops: int = CPU_LOOPS) -> dict:
    w = subprocess.Popen([str(bin_dir / "cpu_work"), str(loops)], stdout=subprocess.PIPE, text=True)
    _pid, _status, usage = os.wait4(w.pid, 0)
    w.returncode = 0
    return {"pid": w.pid, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def whole_stacks(out: Path, cache: str, bin_dir: Path, cli: list, env: dict) -> dict:
    """`otelbpf profile` (the profiler alone) of cpu_work, an -O2 binary
    without frame pointers: only the .eh_frame walk gets from main to
    _start. Its tables, and libc's, are in the cache built ahead; small
    kernel maps (zeroing the default 36 MiB takes an emulated CPU seconds)."""
    cfg = out / "profile.yaml"
    cfg.write_text(json.dumps({"probes": {"cpu_profile": {
        "unwind_cache_dir": cache, "unwind_table_memory": "4MiB", "max_user_stacks": 1024,
        "max_stacks": 1024, "max_processes": 128}}}))
    w = subprocess.Popen([str(bin_dir / "cpu_work"), str(200 * CPU_LOOPS)], stdout=subprocess.DEVNULL)
    try:
        # its first samples, before the unwind thread has loaded the tables,
        # are walked by frame pointers: a long run keeps them a small share
        prof = subprocess.run(cli + ["profile", "--duration", "30", "--pid", str(w.pid), "--config", str(cfg),
                                     "--output", str(out / "whole.pb.gz")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        w.kill()
        w.wait()
    (out / "profile.log").write_text(prof.stdout + prof.stderr)
    return {"pid": w.pid, "exit": prof.returncode}


def main() -> int:
    out, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cache = sys.argv[3] if len(sys.argv) > 3 else "/var/cache/otelbpf/unwind"
    cfg = out / "otelbpf.yaml"
    cfg.write_text(json.dumps({"interval": f"{INTERVAL_S}s", "health": "",
                               "exporters": {"file": {"path": str(out / "telemetry.jsonl")}},
                               # frame pointers only for the agent with every probe: under
                               # software emulation its table builds and Python frames cost
                               # the guest more CPU than the other probes' tests can spare;
                               # the .eh_frame walk has its own run (whole_stacks)
                               "probes": {"cpu_profile": {"unwind": "frame-pointers"},
                                          "http": {}, "net_flows": {}, "syscall_latency": {}}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "collector.cli"]
    check = subprocess.run(cli + ["check", "--config", str(cfg)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    (out / "check.txt").write_text(check.stdout + check.stderr)
    agent_log = out / "agent.log"
    agent = subprocess.Popen(cli + ["run", "--config", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(agent_log, "w"))
    truth: dict = {"kernel": os.uname().release}
    try:
        wait_log(agent_log, "collecting every", agent, timeout=900)
        truth["http"] = http_workload(out)
        truth["http2"] = h2_workload(out)
        truth["tcp"] = tcp_workload()
        sc = syscall_workload(bin_dir)
        truth["cpu"] = cpu_workload(bin_dir)
        truth["cpu_per_request"] = cpu_per_request_workload()
        time.sleep(2 * INTERVAL_S)   # the syscall workload is read while it lives
        proc = sc.pop("proc")
        proc.stdin.close()
        proc.wait(timeout=30)
        truth["syscalls"] = sc
    except Exception as e:   # recorded for the host to report; the agent still stops
        truth["error"] = f"{type(e).__name__}: {e}"
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGINT)
        try:
            truth["agent_exit"] = agent.wait(timeout=300)
        except subprocess.TimeoutExpired:
            agent.kill()
            truth["agent_exit"] = "killed after 300 s"
    if "error" not in truth:
        truth["whole_stacks"] = whole_stacks(out, cache, bin_dir, cli, env)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
