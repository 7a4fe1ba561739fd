"""Where the http probe puts its TLS uprobes (probes/uprobe_placement.py),
checked against objdump's reading of Debian's real libssl.so.3; a library
with no cheap place (a shim built with -fcf-protection, LD_PRELOADed into a
real client) falls back to the exported entries and still counts every
request exactly; a truncated or garbage ELF falls back with a reason."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, AgentProcess, needs_root, wait_until
from otlp_data import attrs_of, metrics

from probes.uprobe_placement import from_json, place, place_in_child

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
pytestmark = pytest.mark.skipif(not Path(LIBSSL).exists() or not shutil.which("objdump"),
                                reason="needs Debian's libssl.so.3 and objdump")


def objdump(func: str) -> list:
    """(address, mnemonic, operands) of func's instructions, per objdump."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={func}", LIBSSL],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return rows


def first_call_target(func: str) -> int:
    return next(int(ops.split()[0], 16) for _a, mn, ops in objdump(func) if mn == "call")


def first_insn_at(addr: int) -> str:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={addr}",
                          f"--stop-address={addr + 8}", LIBSSL], capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in out.splitlines() if re.match(r"\s*[0-9a-f]+:", line)][0]


def test_debian_libssl_gets_the_internal_functions_both_exported_calls_reach():
    lp = place(LIBSSL, kernel=(6, 18))
    assert not lp.reason
    for group, ex, plain in (("read", "SSL_read_ex", "SSL_read"), ("write", "SSL_write_ex", "SSL_write")):
        internal = first_call_target(ex)                   # objdump: the _ex function's direct call
        assert first_call_target(plain) == internal        # ... which the plain one calls too
        site = lp.sites[group]
        assert site.covers == (ex, plain) and site.where == f"internal {internal:#x}"
        assert site.offset == internal                     # libssl's text: file offset == address
        assert first_insn_at(internal) == "push" and site.kind == "push, emulated"
        assert ex not in lp.sites and plain not in lp.sites  # one probe pair covers both
    free = objdump("SSL_free")
    assert free[0][1] == "test" and free[1][1] == "je"     # test %rdi,%rdi (single-stepped), then je
    assert lp.sites["SSL_free"].offset == free[1][0] and lp.sites["SSL_free"].kind == "je, emulated"
    assert lp.sites["SSL_set_fd"].offset == objdump("SSL_set_fd")[0][0]
    assert "SSL_read_ex/SSL_read -> internal" in lp.summary()


def test_a_kernel_that_single_steps_push_keeps_the_exported_entries():
    lp = place(LIBSSL, kernel=(5, 4))
    for f in ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"):
        site = lp.sites[f]
        assert site.offset is None and site.covers == (f,) and site.kind.endswith("single-stepped")
        assert "starts with push, single-stepped" in site.reason
    assert "read" not in lp.sites and "write" not in lp.sites


def test_truncated_and_garbage_elf_fall_back_with_a_reason(tmp_path):
    truncated = tmp_path / "libssl.so.3"
    truncated.write_bytes(Path(LIBSSL).read_bytes()[:5000])
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    for path in (truncated, garbage, tmp_path / "missing.so"):
        lp = place(str(path))
        assert lp.reason, path
        assert all(s.offset is None and s.covers == (f,) for f, s in lp.sites.items())
        assert set(lp.sites) == {"SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_do_handshake",
                                 "SSL_set_fd", "SSL_free"}
        assert lp.summary().startswith(f"TLS {path.name}: exported entries (")


def test_the_agents_placement_child_answers_what_place_does(tmp_path):
    """The agent places its uprobes through a child (capstone stays out of
    it): same sites as in process; a file it cannot decode, a child that
    cannot start and an answer that is not one fall back with a reason."""
    assert place_in_child(LIBSSL) == place(LIBSSL)
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    assert place_in_child(str(garbage)) == place(str(garbage))
    assert place_in_child(LIBSSL, timeout=0.001).reason.startswith("placement child failed: ")
    for answer in (b"", b"[]", b'{"reason": "", "sites": {"SSL_read": {"covers": ["SSL_read"], "offset": -1, '
                   b'"kind": "", "where": "", "reason": ""}}}', b'{"reason": "", "sites": {"other": {}}}'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            from_json(LIBSSL, answer)


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shim") / "libsslshim.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-fcf-protection", "-o", str(out),
                    str(ROOT / "tests" / "workloads" / "ssl_shim.c")], check=True)
    return out


def test_cet_entries_without_a_direct_call_fall_back_to_the_exported_entries(shim):
    lp = place(str(shim))
    assert not lp.reason
    for f in ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_free"):
        assert lp.sites[f].offset is None and lp.sites[f].kind == "endbr64, single-stepped"
    assert "read" not in lp.sites


SERVER = textwrap.dedent("""
    import ssl, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
            self.wfile.write(b"ok\\n")
            print(self.path, flush=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
""")
CLIENT = ("import ssl, sys, urllib.request\nctx = ssl._create_unverified_context()\n"
          "for i in range(int(sys.argv[2])):\n"
          "    assert urllib.request.urlopen(f'{sys.argv[1]}/n{i}', context=ctx).status == 200\n")


def client_count(rx, port: int, name: str) -> int:
    latest = {}
    for _r, _s, m in metrics(list(rx.metrics), name):
        for dp in m.histogram.data_points:
            a = attrs_of(dp.attributes)
            if a.get("server.port") == port:
                key = tuple(sorted(a.items()))
                if key not in latest or dp.time_unix_nano >= latest[key][0]:
                    latest[key] = (dp.time_unix_nano, dp.count)
    return sum(c for _t, c in latest.values())


@needs_root
def test_fallback_placement_still_counts_every_request(shim, tmp_path, grpc_receiver):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "c.pem"), str(tmp_path / "k.pem")],
                              stdout=subprocess.PIPE, text=True)
    a = None
    try:
        port = int(server.stdout.readline())
        # only the shim is probed (no discovery of the real libssl the server and client map)
        a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
                                    "exporters": {"otlp": {"endpoint": grpc_receiver.endpoint, "protocol": "grpc",
                                                           "histogram": "explicit"}},
                                    "probes": {"http": {"tls_libraries": [str(shim)], "tls_discovery": 1e9}}})
        a.wait_for_log("collecting every", timeout=60)
        assert "TLS libsslshim.so: SSL_read_ex, SSL_read -> entry (endbr64, single-stepped)" in a.stderr()
        n = 7
        subprocess.run([sys.executable, "-c", CLIENT, f"https://127.0.0.1:{port}", str(n)], check=True, timeout=60,
                       env={"LD_PRELOAD": str(shim), "PATH": "/usr/bin:/bin"})
        served = [server.stdout.readline().strip() for _ in range(n)]
        assert served == [f"/n{i}" for i in range(n)]      # the server's own log: n requests answered
        rx = grpc_receiver.rx
        exact = wait_until(lambda: client_count(rx, port, "http.client.request.duration") == n)
        assert exact, f"counted {client_count(rx, port, 'http.client.request.duration')} of {n}: {a.stderr()[-3000:]}"
        assert client_count(rx, port, "http.server.request.duration") == 0   # the real libssl is not probed
        assert a.stop() == 0 and "Traceback" not in a.stderr()
    finally:
        if a is not None:
            a.kill()
        server.kill()
