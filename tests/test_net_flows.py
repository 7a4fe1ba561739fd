"""net_flows against the real kernel: traffic between two network
namespaces this test creates (veth pair), checked against the payload the
programs sent, tshark's capture and the sockets' own tcp_info."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, every_form_config, needs_root, wait_until
from otlp_data import check_histograms, last_point, latest_per_series, points, read_jsonl

pytestmark = needs_root

TAG = os.getpid() % 10000
NS_S, NS_C = f"otbs{TAG}", f"otbc{TAG}"
IF_S, IF_C = f"otbvs{TAG}", f"otbvc{TAG}"
NET = f"10.231.{TAG % 250}"
IP_S, IP_C = f"{NET}.1", f"{NET}.2"
PORT = 5001


def sh(*cmd, **kw):
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def veth_namespaces():
    """Two network namespaces joined by a veth pair (NS_S at IP_S, NS_C at IP_C)."""
    subprocess.run(["ip", "netns", "del", NS_S], capture_output=True)
    subprocess.run(["ip", "netns", "del", NS_C], capture_output=True)
    sh("ip", "netns", "add", NS_S)
    sh("ip", "netns", "add", NS_C)
    try:
        sh("ip", "link", "add", IF_S, "type", "veth", "peer", "name", IF_C)
        sh("ip", "link", "set", IF_S, "netns", NS_S)
        sh("ip", "link", "set", IF_C, "netns", NS_C)
        for ns, ifname, ip in ((NS_S, IF_S, IP_S), (NS_C, IF_C, IP_C)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS_S], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS_C], capture_output=True)


@pytest.fixture
def netns_pair():
    with veth_namespaces():
        yield


def drop_some_on_server_ingress() -> None:
    """Drop on the receiver's ingress: a drop at the sender's own egress is
    reported back to TCP, which resends without counting a retransmission."""
    sh(*in_ns(NS_S), "tc", "qdisc", "add", "dev", IF_S, "clsact")
    sh(*in_ns(NS_S), "tc", "filter", "add", "dev", IF_S, "ingress", "bpf", "da", "obj",
       str(ROOT / "tests" / "bpf" / "drop_some.bpf.o"), "sec", "tc")


SERVER = textwrap.dedent("""
    import socket, sys
    host, port, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(64)
    print("ready", flush=True)
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    c.sendall(b"r" * reply)
    c.close()
    print(n, flush=True)
""")

CLIENT = textwrap.dedent("""
    import socket, struct, sys
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    c = socket.create_connection((host, port))
    chunk = b"q" * (1 << 16)
    left = size
    while left:
        left -= c.send(chunk[:min(left, len(chunk))])
    c.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        got += len(d)
    info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    print(got, struct.unpack_from("I", info, 100)[0], flush=True)  # tcpi_total_retrans, as ss -ti shows
    c.close()
""")


def in_ns(ns):
    return ["ip", "netns", "exec", ns]


def transfer(request: int, reply: int) -> tuple:
    """Client in NS_C sends `request` bytes to the server in NS_S, which
    replies with `reply` bytes. Returns (bytes server got, bytes client got,
    client's total_retrans)."""
    server = subprocess.Popen(in_ns(NS_S) + [sys.executable, "-c", SERVER, IP_S, str(PORT), str(reply)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(in_ns(NS_C) + [sys.executable, "-c", CLIENT, IP_S, str(PORT), str(request)],
                             capture_output=True, text=True, timeout=120, check=True).stdout.split()
        got_server = int(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    return got_server, int(out[0]), int(out[1])


class Capture:
    """tshark on the server's veth, for the flow's port."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "cap.pcapng"
        # headers are enough (tcp.len comes from the IP length); a big buffer drops nothing
        self.proc = subprocess.Popen(in_ns(NS_S) + ["tshark", "-i", IF_S, "-s", "128", "-B", "64", "-f", f"tcp port {PORT}", "-w",
                                                     str(self.path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while "Capturing on" not in self.proc.stderr.readline():
            assert time.monotonic() < deadline and self.proc.poll() is None, "tshark did not start"
        time.sleep(1.0)  # "Capturing on" comes a moment before packets are

    def payload_by_source(self) -> dict:
        """Payload per sender as the capture shows it, each byte once: the
        union of the [seq, seq + len) ranges tshark saw, so a retransmitted
        segment is neither counted twice nor lost when its original was not
        captured."""
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        out = sh("tshark", "-r", str(self.path), "-T", "fields", "-e", "ip.src", "-e", "tcp.seq",
                 "-e", "tcp.len").stdout
        ranges: dict = {}
        for line in out.splitlines():
            src, seq, n = (line.split("\t") + ["", ""])[:3]
            if n and int(n):
                ranges.setdefault(src, []).append((int(seq), int(seq) + int(n)))
        covered = {}
        for src, rs in ranges.items():
            total, end = 0, -1
            for lo, hi in sorted(rs):
                if hi > end:
                    total += hi - max(lo, end)
                    end = hi
            covered[src] = total
        return covered


def flow_value(data, name, **match):
    pts = points(data, name, **match)
    return max((p[1] for p in pts), key=lambda dp: dp.time_unix_nano).as_int if pts else 0


@pytest.fixture
def flows_agent(agent_factory, tmp_path):
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(jsonl)}},
                           "probes": {"net_flows": {"udp": True}}})
    agent.wait_for_log("collecting every")

    def finish():
        assert agent.stop() == 0, agent.stderr()
        assert "Traceback" not in agent.stderr()
        data = read_jsonl(jsonl)
        check_histograms(data)
        return data
    return finish


def test_bytes_match_payload_and_tshark(netns_pair, flows_agent, tmp_path):
    request, reply = 3_000_000, 700_000
    cap = Capture(tmp_path)
    got_server, got_client, _ = transfer(request, reply)
    assert (got_server, got_client) == (request, reply)
    wire = cap.payload_by_source()
    data = flows_agent()

    client = {"otelbpf__tcp__role": "client", "network__peer__address": IP_S, "network__peer__port": PORT}
    server = {"otelbpf__tcp__role": "server", "network__peer__address": IP_C, "network__local__port": PORT}
    sent_c = flow_value(data, "otelbpf.network.io", network__io__direction="transmit", **client)
    recv_c = flow_value(data, "otelbpf.network.io", network__io__direction="receive", **client)
    sent_s = flow_value(data, "otelbpf.network.io", network__io__direction="transmit", **server)
    recv_s = flow_value(data, "otelbpf.network.io", network__io__direction="receive", **server)
    # exactly the payload, both ends
    assert (sent_c, recv_c, sent_s, recv_s) == (request, reply, reply, request)
    # and what crossed the wire, as tshark counted it
    assert abs(wire[IP_C] - sent_c) <= 0.01 * sent_c, (wire, sent_c)
    assert abs(wire[IP_S] - sent_s) <= 0.01 * sent_s, (wire, sent_s)
    for match in (client, server):
        assert flow_value(data, "otelbpf.tcp.connections", otelbpf__tcp__event="opened", **match) == 1
        assert flow_value(data, "otelbpf.tcp.connections", otelbpf__tcp__event="closed", **match) == 1
    # the owners were captured at open: the client in its own process, the server through its listener
    _m, _dp, attrs = last_point(data, "otelbpf.network.io", **client)
    assert attrs["process.executable.name"].startswith("python")
    _m, _dp, attrs = last_point(data, "otelbpf.network.io", **server)
    assert attrs["process.executable.name"].startswith("python")
    assert attrs["network.type"] == "ipv4" and attrs["network.transport"] == "tcp"
    _m, rtt, _a = last_point(data, "otelbpf.tcp.rtt", **client)
    assert rtt.count >= 1


def test_retransmits_agree_with_tcp_info(netns_pair, flows_agent):
    drop_some_on_server_ingress()
    _got_server, _got_client, retrans = transfer(8_000_000, 1000)
    data = flows_agent()
    assert retrans > 10, "the drop program provoked too few retransmissions to compare"
    ours = flow_value(data, "otelbpf.tcp.retransmits", otelbpf__tcp__role="client", network__peer__port=PORT)
    assert abs(ours - retrans) <= 0.1 * retrans, (ours, retrans)


def test_failed_connect_counted_with_error(netns_pair, flows_agent):
    probe = subprocess.run(in_ns(NS_C) + [sys.executable, "-c",
                                          f"import socket\ntry: socket.create_connection(('{IP_S}', 5999), 5)\n"
                                          "except ConnectionRefusedError: print('refused')"],
                           capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "refused"
    data = flows_agent()
    assert flow_value(data, "otelbpf.tcp.connections", otelbpf__tcp__event="failed", error__type="ECONNREFUSED",
                      network__peer__address=IP_S, network__peer__port=5999) == 1


SHORT_LIVED = textwrap.dedent("""
    import socket, sys, threading
    n = int(sys.argv[1])
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4096)
    port = srv.getsockname()[1]
    def serve():
        for _ in range(n):
            c, _ = srv.accept(); c.close()
    t = threading.Thread(target=serve); t.start()
    for _ in range(n):
        socket.create_connection(("127.0.0.1", port)).close()
    t.join()
    print(port, flush=True)
""")


def open_sockets(port: int) -> list:
    """TCP sockets on this port (either end) not yet closed: TIME-WAIT
    excluded, as those passed through TCP_CLOSE already."""
    out = sh("ss", "-Htan", "exclude", "time-wait", "exclude", "listening", f"( sport = :{port} or dport = :{port} )").stdout
    return out.splitlines()


def test_short_lived_connections_all_counted(flows_agent):
    n = 10_000
    out = subprocess.run([sys.executable, "-c", SHORT_LIVED, str(n)], capture_output=True, text=True,
                         timeout=300, check=True)
    port = int(out.stdout)
    # The process is gone, but its orphaned sockets may still be closing
    # (a FIN retransmitted on a loaded machine): the kernel counts each close
    # when it happens, so wait for them. TIME-WAIT sockets are closed already.
    assert wait_until(lambda: not open_sockets(port), timeout=120), open_sockets(port)[:5]
    time.sleep(2.5)  # two iterator passes: an event no program saw is counted by then
    data = flows_agent()
    client = {"otelbpf__tcp__role": "client", "network__peer__port": port}
    server = {"otelbpf__tcp__role": "server", "network__local__port": port}
    # Every connection counted. Under load the kernel skips a few runs of the
    # state programs without counting a recursion miss: the iterator's passes (or a reused socket address) find such opens and
    # closes, counted all the same (otelbpf.tcp.events_unseen says how many).
    unseen = flow_value(data, "otelbpf.tcp.events_unseen", otelbpf__probe="net_flows")
    for match in (client, server):
        for event in ("opened", "closed"):
            counted = flow_value(data, "otelbpf.tcp.connections", otelbpf__tcp__event=event, **match)
            assert counted == n, (match, event, counted, unseen)
    assert flow_value(data, "otelbpf.dropped", otelbpf__probe="net_flows", reason="conn_table_full") == 0
    assert flow_value(data, "otelbpf.overflow", otelbpf__probe="net_flows", reason="kernel_flow_table_full") == 0


DUAL_STACK = textwrap.dedent("""
    import socket, threading
    srv = socket.socket(socket.AF_INET6); srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", 0)); srv.listen(8); port = srv.getsockname()[1]
    def serve():
        for _ in range(2):
            c, _ = srv.accept(); c.sendall(b"x" * 1000); c.close()
    t = threading.Thread(target=serve); t.start()
    for host in ("::1", "::ffff:127.0.0.1"):
        c = socket.socket(socket.AF_INET6); c.connect((host, port))
        while c.recv(4096): pass
        c.close()
    t.join()
    print(port, flush=True)
""")


def test_ipv6_and_v4_mapped(flows_agent):
    port = int(subprocess.run([sys.executable, "-c", DUAL_STACK], capture_output=True, text=True, timeout=60,
                              check=True).stdout)
    time.sleep(1.5)
    data = flows_agent()
    v6 = points(data, "otelbpf.network.io", otelbpf__tcp__role="client", network__peer__port=port,
                network__io__direction="receive", network__type="ipv6")
    v4 = points(data, "otelbpf.network.io", otelbpf__tcp__role="client", network__peer__port=port,
                network__io__direction="receive", network__type="ipv4")
    assert v6 and v6[-1][2]["network.peer.address"] == "::1"
    assert v4 and v4[-1][2]["network.peer.address"] == "127.0.0.1"  # v4-mapped is IPv4 on the wire
    assert max(p[1].as_int for p in v6) == 1000 and max(p[1].as_int for p in v4) == 1000


UDP_SERVER = textwrap.dedent("""
    import socket, sys
    host, port, n, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
    print("ready", flush=True)
    for _ in range(n):
        data, peer = s.recvfrom(65536)
        s.sendto(b"r" * reply, peer)
""")

UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)
    for _ in range(n):
        c.sendto(b"q" * size, (host, port))  # unconnected: the address travels with each datagram
        c.recvfrom(65536)
""")


def test_udp_bytes_and_packets_per_endpoint(netns_pair, flows_agent):
    """net_flows' UDP half (probes/net_udp.py, bpf/net_udp.bpf.c), enabled by udp: true."""
    n, size, reply, port = 50, 1200, 300, 6000
    server = subprocess.Popen(in_ns(NS_S) + [sys.executable, "-c", UDP_SERVER, IP_S, str(port), str(n), str(reply)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    subprocess.run(in_ns(NS_C) + [sys.executable, "-c", UDP_CLIENT, IP_S, str(port), str(n), str(size)],
                   check=True, timeout=60)
    server.wait(timeout=30)
    time.sleep(1.5)
    data = flows_agent()
    client = {"network__transport": "udp", "network__peer__address": IP_S, "network__peer__port": port}
    srv = {"network__transport": "udp", "network__peer__address": IP_C, "network__local__port": port}
    for match, sent, got in ((client, size, reply), (srv, reply, size)):
        assert flow_value(data, "otelbpf.network.io", network__io__direction="transmit", **match) == n * sent
        assert flow_value(data, "otelbpf.network.io", network__io__direction="receive", **match) == n * got
        assert flow_value(data, "otelbpf.network.packets", network__io__direction="transmit", **match) == n
        assert flow_value(data, "otelbpf.network.packets", network__io__direction="receive", **match) == n
    _m, _dp, attrs = last_point(data, "otelbpf.network.io", **client)
    assert attrs["process.executable.name"].startswith("python") and attrs["network.type"] == "ipv4"


DNS_SERVER = textwrap.dedent("""
    import socket, struct, sys
    host, n = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, 53))
    print("ready", flush=True)
    for _ in range(n):
        q, peer = s.recvfrom(512)
        qid, = struct.unpack_from("!H", q)
        qtype, = struct.unpack_from("!H", q, len(q) - 4)
        rcode = 3 if qtype == 1 else 0      # A: NXDOMAIN, AAAA: NOERROR (no answers)
        s.sendto(struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, 0, 0, 0) + q[12:], peer)
""")

DNS_CLIENT = textwrap.dedent("""
    import socket, struct, sys
    host = sys.argv[1]
    name = b"".join(bytes([len(p)]) + p for p in b"otelbpf.example.test".split(b".")) + b"\\0"
    for i, qtype in enumerate([1, 1, 1, 28, 28]):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)  # a socket per query
        c.sendto(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1), (host, 53))
        c.recvfrom(512)
        c.close()
""")


def test_dns_queries_and_answers_by_type_and_rcode(netns_pair, flows_agent):
    """DNS counting in net_udp.bpf.c's cgroup_skb programs."""
    server = subprocess.Popen(in_ns(NS_S) + [sys.executable, "-c", DNS_SERVER, IP_S, "5"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    subprocess.run(in_ns(NS_C) + [sys.executable, "-c", DNS_CLIENT, IP_S], check=True, timeout=60)
    server.wait(timeout=30)
    time.sleep(1.5)
    data = flows_agent()

    def dns(**match):   # one series per executable: sum the latest point of each
        return _series_total(data, "otelbpf.dns.messages", **match)
    # the client's side: queries out, answers in
    assert dns(otelbpf__dns__kind="query", dns__question__type="A", network__io__direction="transmit") == 3
    assert dns(otelbpf__dns__kind="query", dns__question__type="AAAA", network__io__direction="transmit") == 2
    assert dns(otelbpf__dns__kind="response", dns__question__type="A", dns__response_code="NXDOMAIN",
               network__io__direction="receive") == 3
    assert dns(otelbpf__dns__kind="response", dns__question__type="AAAA", dns__response_code="NOERROR",
               network__io__direction="receive") == 2
    # and the server's: queries in
    assert dns(otelbpf__dns__kind="query", network__io__direction="receive") == 5


RESET = textwrap.dedent("""
    import socket, struct, threading
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1); port = srv.getsockname()[1]
    def serve():
        c, _ = srv.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()                       # linger 0: an RST instead of a FIN
    t = threading.Thread(target=serve); t.start()
    c = socket.create_connection(("127.0.0.1", port)); t.join()
    try:
        c.recv(10)
    except ConnectionResetError:
        print(port, flush=True)
""")


def test_received_reset_counted(flows_agent):
    port = int(subprocess.run([sys.executable, "-c", RESET], capture_output=True, text=True, timeout=60,
                              check=True).stdout)
    time.sleep(1.5)
    data = flows_agent()
    assert flow_value(data, "otelbpf.tcp.connections", otelbpf__tcp__event="reset", otelbpf__tcp__role="client",
                      network__peer__port=port) == 1


def test_series_cap_overflows_and_counts(agent_factory, tmp_path):
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(jsonl)}},
                           "probes": {"net_flows": {"max_series": 2, "udp": False}}})
    agent.wait_for_log("collecting every")
    script = textwrap.dedent("""
        import socket, threading
        ports = []
        for _ in range(5):
            srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1); ports.append(srv.getsockname()[1])
            threading.Thread(target=lambda s=srv: s.accept()[0].close()).start()
            socket.create_connection(("127.0.0.1", ports[-1])).close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    time.sleep(1.5)
    assert agent.stop() == 0
    data = read_jsonl(jsonl)
    check_histograms(data)
    assert flow_value(data, "otelbpf.overflow", otelbpf__probe="net_flows", reason="max_series") > 0
    assert flow_value(data, "otelbpf.tcp.connections", otelbpf__overflow=True, otelbpf__tcp__event="opened") > 0
    flows = {tuple(sorted((k, v) for k, v in a.items() if k != "otelbpf.tcp.event"))
             for _m, _dp, a in points(data, "otelbpf.tcp.connections")}
    assert len(flows) <= 3, flows  # two flows and the overflow flow


UDP_SPRAY = textwrap.dedent("""
    import socket, sys
    n = int(sys.argv[1])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):  # a distinct loopback peer per datagram: 127.1.0.0 upwards
        s.sendto(b"x" * 32, (f"127.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 9))
""")


def _series_total(data, name, **match) -> int:
    """Sum over series of each one's latest cumulative value."""
    return sum(dp.as_int for _m, dp, _a in latest_per_series(points(data, name, **match)))


@needs_root
def test_udp_flood_of_distinct_peers_is_bounded_and_every_datagram_accounted(agent_factory, tmp_path):
    """40,000 datagrams to 40,000 distinct peers in well under an interval:
    more than the kernel table holds. Every datagram is either counted in a
    series (at most max_series of them, the rest in the overflow series) or
    counted as dropped for a full table; the agent's memory stays bounded."""
    n, max_series = 40_000, 100
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "2s", "exporters": {"file": {"path": str(jsonl)}},
                           "probes": {"net_flows": {"udp": True, "max_series": max_series}}})
    agent.wait_for_log("collecting every")
    subprocess.run([sys.executable, "-c", UDP_SPRAY, str(n)], check=True, timeout=120)
    time.sleep(4.5)
    assert agent.stop() == 0, agent.stderr()
    data = read_jsonl(jsonl)
    check_histograms(data)
    counted = _series_total(data, "otelbpf.network.packets", network__transport="udp",
                            network__io__direction="transmit")  # the overflow series included
    overflowed = _series_total(data, "otelbpf.network.packets", network__transport="udp",
                               otelbpf__overflow=True, network__io__direction="transmit")
    dropped = flow_value(data, "otelbpf.dropped", otelbpf__probe="net_flows", reason="udp_table_full")
    assert dropped > 0 and overflowed >= counted - max_series
    # the host's other UDP (if any) may add a little to either side, never take away
    assert n <= counted + dropped <= n + 200, (counted, dropped)
    series = {tuple(sorted(a.items())) for _m, _dp, a in points(data, "otelbpf.network.packets")}
    assert len(series) <= 2 * (max_series + 1)  # both directions, the overflow series included
    rss = max(dp.as_int or dp.as_double for _m, dp, _a in points(data, "otelbpf.agent.memory.rss"))
    assert rss < 400 << 20, f"agent RSS {rss >> 20} MiB after the flood"


def in_process_probe():
    """A net_flows probe in this process, on the real kernel, driven by
    calling collect() (the agent would call it each interval)."""
    import logging

    from collector.config import PROBE_COMMON, parse_section
    from collector.probe import ProbeContext, default_bpf_dir
    from probes.net_flows import NetFlowsProbe
    cfg = parse_section({"udp": False}, {**PROBE_COMMON, **NetFlowsProbe.config_schema}, "probes.net_flows")
    return NetFlowsProbe(cfg, ProbeContext(default_bpf_dir(), None, None, os.getpid(), time.time_ns(),
                                           logging.getLogger("test")))


LATE_CLOSER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print("connected", flush=True)
    sys.stdin.readline()
    c.close()
    print("closed", flush=True)
    sys.stdin.readline()
""")


def test_close_counted_between_the_read_and_the_reap_is_kept(monkeypatch):
    """A process's last close can land after the agent read its flows and
    before it freed them (an orphaned socket finishing in softirq after its
    process exited). That close must still be counted. The probe runs in this
    process on the real kernel; only alive() is steered, to call the client
    gone while the test still controls when its socket closes."""
    import socket

    import probes.net_flows as net_flows
    probe = in_process_probe()
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    probe.start()
    client = subprocess.Popen([sys.executable, "-c", LATE_CLOSER, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        conn, _ = srv.accept()
        assert client.stdout.readline().strip() == "connected"
        probe.collect()  # reads the client's flow: opened, not closed

        def closed_in_kernel() -> int:
            return sum(net_flows._VAL.unpack(vb)[1] for kb, vb in probe._flows.items()
                       if net_flows._KEY.unpack(kb)[0] == client.pid)

        real_reap = probe._reap

        def reap_after_a_late_close():
            # between the read and the reap: the server hangs up, the client
            # closes, and the kernel counts the close
            conn.close()
            client.stdin.write("\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "closed"
            assert wait_until(lambda: closed_in_kernel() == 1, timeout=10)
            monkeypatch.setattr(net_flows, "alive", lambda pid: pid != client.pid)
            real_reap()
        monkeypatch.setattr(probe, "_reap", reap_after_a_late_close)
        records = probe.collect()
        assert closed_in_kernel() == 0, "the exited process's flows were not freed"
    finally:
        client.stdin.close()
        client.wait(timeout=10)
        srv.close()
        probe.stop()
    closed = [r.value for r in records if r.instrument.name == "otelbpf.tcp.connections"
              and r.attributes.get("otelbpf.tcp.event") == "closed"
              and r.attributes.get("otelbpf.tcp.role") == "client" and r.attributes.get("network.peer.port") == port]
    assert closed == [1], closed


def test_a_close_no_program_saw_is_counted_once_its_socket_is_gone():
    """The kernel may run no program for a socket's close (under load it skips
    a few runs, uncounted). The iterator's passes find the entry
    whose socket is gone and count its close; a live connection's entries
    are kept. The lost close is staged by writing an entry for a socket
    address that holds no socket, as a skipped close leaves it."""
    import socket
    import struct

    import probes.net_flows as net_flows
    probe = in_process_probe()
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    probe.start()
    try:
        live = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conns = probe.obj.map("flow_conns")

        def live_entries() -> int:  # both ends of the live connection
            return sum(net_flows._KEY.unpack(vb[:net_flows._KEY.size])[3] == port for _kb, vb in conns.items())
        probe.collect()
        assert live_entries() == 2
        netns = os.stat("/proc/self/ns/net").st_ino
        key = net_flows._KEY.pack(os.getpid(), 1, 2, 9, b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 9]), 0,
                                  b"ghost")
        ghost = struct.pack("=Q", 0xffff_8880_dead_0000)  # no socket lives at this address
        conns.update(ghost, net_flows._CONN.pack(key, 0, 0, 0, 0, 0, 0, 0, netns, probe._gen, 1))
        first = probe.collect()
        assert conns.lookup(ghost) is not None, "swept after one pass: a socket being created could be lost"
        second = probe.collect()
        assert conns.lookup(ghost) is None
        third = probe.collect()
        assert live_entries() == 2, "a live connection's entry was swept"
        live.close()
        conn.close()
    finally:
        srv.close()
        probe.stop()

    def closed_for_port_9(recs):
        return sum(r.value for r in recs if r.instrument.name == "otelbpf.tcp.connections"
                   and r.attributes.get("network.peer.port") == 9 and r.attributes.get("otelbpf.tcp.event") == "closed")

    def unseen(recs):
        return [r.value for r in recs if r.instrument.name == "otelbpf.tcp.events_unseen"]
    assert (closed_for_port_9(first), closed_for_port_9(second), closed_for_port_9(third)) == (0, 1, 1)
    # (another socket's skipped event could add to it in the same passes)
    assert unseen(second)[0] >= unseen(first)[0] + 1, (unseen(first), unseen(second))


PINGPONG = textwrap.dedent("""
    import socket, sys
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    for _ in range(50):                        # RTT samples for both ends
        cli.sendall(b"p" * 100); acc.recv(100)
        acc.sendall(b"q" * 100); cli.recv(100)
    print(srv.getsockname()[1], cli.getsockname()[1], flush=True)
    sys.stdin.readline()                       # then idle: the smoothed RTTs stay put
    cli.close(); acc.close()
""")


def ss_rtt_us(local_port: int) -> int:
    """The smoothed RTT `ss -ti` shows for the loopback socket bound to
    local_port, in us (ss prints tcpi_rtt, srtt_us >> 3, in ms)."""
    import re
    out = sh("ss", "-tinH", "state", "established", f"( sport = :{local_port} )").stdout
    found = re.findall(r"(?<![a-z_])rtt:([0-9.]+)/", out)
    assert len(found) == 1, out
    return round(float(found[0]) * 1000)


def _rtt_delta(reqs, t_from: int, t_to: int, **match):
    """The observations an RTT series gained between its last point at or
    before t_from and its last at or before t_to: (metric, count, sum,
    {bucket range: count})."""
    from otlp_data import populated_ranges
    pts = sorted(((m, dp) for m, dp, _a in points(reqs, "otelbpf.tcp.rtt", **match)),
                 key=lambda p: p[1].time_unix_nano)
    a = [p for p in pts if p[1].time_unix_nano <= t_from]
    b = [p for p in pts if p[1].time_unix_nano <= t_to]
    assert a and b, f"no otelbpf.tcp.rtt points for {match} around the idle window"
    (ma, a), (mb, b) = a[-1], b[-1]
    before = {(lo, hi): c for lo, hi, c in populated_ranges(ma, a)}
    after = {(lo, hi): c for lo, hi, c in populated_ranges(mb, b)}
    moved = {r: c - before.get(r, 0) for r, c in after.items() if c != before.get(r, 0)}
    return mb, b.count - a.count, b.sum - a.sum, moved


@pytest.mark.parametrize("otlp_form,file_form", [("exponential", "explicit"), ("explicit", "exponential")])
def test_rtt_buckets_hold_what_ss_shows(agent_factory, grpc_receiver, tmp_path, otlp_form, file_form):
    """A loopback connection exchanges messages, then idles: its smoothed
    RTT stays where `ss -ti` shows it, and every RTT the agent sampled in
    the idle window, client side and server side, sits in the bucket that
    holds that value, in every exported form and in the console."""
    from otlp_data import console_rows, parse_console_duration
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory(every_form_config(tmp_path, grpc_receiver.endpoint, otlp_form, file_form,
                                            {"net_flows": {}}))
    agent.wait_for_log("collecting every")
    p = subprocess.Popen([sys.executable, "-c", PINGPONG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server_port, client_port = map(int, p.stdout.readline().split())
        quiet_from = time.time_ns() + 200_000_000   # the last ACKs are in by then
        time.sleep(1.3)
        t1, rtt1 = time.time_ns(), {"client": ss_rtt_us(client_port), "server": ss_rtt_us(server_port)}
        time.sleep(3.2)
        t2, rtt2 = time.time_ns(), {"client": ss_rtt_us(client_port), "server": ss_rtt_us(server_port)}
        assert rtt1 == rtt2, "the idle connection's smoothed RTT moved"
        assert agent.stop() == 0, agent.stderr()
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    sides = {"client": {"otelbpf__tcp__role": "client", "network__peer__port": server_port},
             "server": {"otelbpf__tcp__role": "server", "network__local__port": server_port}}
    over_wire, from_file = list(grpc_receiver.rx.metrics), read_jsonl(jsonl)
    for reqs in (over_wire, from_file):
        assert check_histograms(reqs) > 0
        for side, match in sides.items():
            t_from = max(pt[1].time_unix_nano for pt in points(reqs, "otelbpf.tcp.rtt", **match)
                         if pt[1].time_unix_nano <= t1)
            assert t_from >= quiet_from, "no export between the last exchange and the first ss reading"
            m, n, total, moved = _rtt_delta(reqs, t1, t2, **match)
            us = rtt1[side]
            v = us * (1e-6 if m.unit == "s" else 1.0)
            assert m.unit == ("us" if m.WhichOneof("data") == "exponential_histogram" else "s")
            assert n >= 2, f"{side}: {n} RTT samples in 3 idle intervals"
            # a whole number of us: exactly one bucket (2^(i-1), 2^i] us holds it
            assert list(moved) == [r for r in moved if r[0] < v <= r[1]] and sum(moved.values()) == n, \
                f"{side}: ss shows srtt {us} us; the idle window's samples went to {moved} ({m.unit})"
            assert abs(total - n * v) <= 1e-9 * n * max(v, 1), f"{side}: sum {total} for {n} x {v}"
    # the console: after the idle window most samples are the idle value, so
    # p50 is the upper edge of its bucket
    rows = console_rows(agent.stdout(), "otelbpf.tcp.rtt")
    for side, match in sides.items():
        label = f"network.local.port={server_port}" if side == "server" else f"network.peer.port={server_port}"
        mine = [r for r in rows if label in r[3].split() and f"otelbpf.tcp.role={side}" in r[3].split()]
        assert mine, f"no console row for the {side} side:\n{agent.stdout()[-3000:]}"
        v, tol = parse_console_duration(mine[-1][1])
        edge = 2 ** max(0, math.ceil(math.log2(rtt1[side])))   # us
        assert abs(v * 1e6 - edge) <= tol * 1e6, f"{side}: console p50 {mine[-1][1]}, srtt {rtt1[side]} us"


PACED_CLIENT = textwrap.dedent("""
    import socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = socket.create_connection((host, port))
    end = time.monotonic() + seconds
    while time.monotonic() < end:              # 1 KB every 20 ms
        c.sendall(b"q" * 1024)
        time.sleep(0.02)
    c.shutdown(socket.SHUT_WR)
    while c.recv(1 << 16):
        pass
    c.close()
""")


def test_busy_connection_reports_every_live_report_second(netns_pair, flows_agent):
    """live_report is seconds, compared with the kernel's ns: a connection
    in another network namespace (no iterator there) sending every 20 ms for
    2.5 s reports at its first send and about every second after, each
    report one RTT sample, plus one at close: 3 to 5 samples per side (4
    expected), not one per send (a ms mix-up: ~125) nor only the first and
    the close (a factor 1000 the other way: 2)."""
    server = subprocess.Popen(in_ns(NS_S) + [sys.executable, "-c", SERVER, IP_S, str(PORT), "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        sh(*in_ns(NS_C), sys.executable, "-c", PACED_CLIENT, IP_S, str(PORT), "2.5", timeout=60)
        assert int(server.stdout.readline()) > 100 * 1024
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    data = flows_agent()
    for match in ({"otelbpf__tcp__role": "client", "network__peer__port": PORT},
                  {"otelbpf__tcp__role": "server", "network__local__port": PORT}):
        _m, rtt, _a = last_point(data, "otelbpf.tcp.rtt", **match)
        assert 3 <= rtt.count <= 5, f"{match}: {rtt.count} RTT samples over 2.5 s with live_report 1s"
