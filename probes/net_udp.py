"""UDP and DNS half of the net_flows probe: reads bpf/net_udp.bpf.c's
per-socket counters and joins them with socket owners.

A datagram's remote endpoint comes from the packet itself, so unconnected
sockets (DNS clients and servers, QUIC...) are attributed correctly. The
ephemeral side is collapsed: a server keeps its local port, a client the
remote one.
"""
from __future__ import annotations

import ipaddress
import os
import struct

from collector import libbpf
from collector.metadata.cgroup import cgroup2_root
from collector.records import Instrument

_KEY = struct.Struct("=Q16sHBBH6s4x")  # struct udp_key (40 bytes: 8-aligned)
_VAL = struct.Struct("=QQ")            # struct udp_val
_DNS_KEY = struct.Struct("=QHBBB3s")   # struct dns_key
_DNS_VAL = struct.Struct("=Q")            # a dns_key's message count
_OWNER = struct.Struct("=I16s")        # struct udp_owner
AF_INET = 2
DIRECTIONS = {1: "transmit", 2: "receive"}
IDLE_TICKS = 3  # kernel entries unchanged this long are freed (their counts are exported)

PACKETS = Instrument("otelbpf.network.packets", "{packet}", "UDP datagrams, by network.io.direction")
DNS_MESSAGES = Instrument("otelbpf.dns.messages", "{message}",
                          "DNS messages seen on UDP port 53, by otelbpf.dns.kind (query, response), "
                          "dns.question.type and, for responses, dns.response_code")

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
          65: "HTTPS", 255: "ANY"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def ephemeral_range() -> tuple:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
            return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


class UdpCounters:
    # tp_btf programs that learn a socket's process (kernel 6.3+)
    OWNER_PROGRAMS = ("udp_owner_send", "udp_owner_recv")

    def __init__(self, obj: libbpf.BpfObject, log, owners: bool = True):
        self.obj = obj
        self.log = log
        root = cgroup2_root()
        if not root:
            raise OSError("no cgroup v2 hierarchy mounted: UDP counting needs cgroup_skb programs")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in obj.programs():
                if prog.section.startswith("cgroup_skb"):
                    prog.attach_cgroup(fd, root)
                elif owners or prog.name not in self.OWNER_PROGRAMS:
                    prog.attach()
        finally:
            os.close(fd)  # the links hold the cgroup
        self._traffic = obj.map("udp_traffic")
        self._dns = obj.map("udp_dns")
        self._owners = obj.map("udp_owners")
        self._counters = obj.map("udp_counters")
        self._prev: dict = {}
        self._prev_dns: dict = {}
        self._tick = 0
        self._eph = ephemeral_range()

    def _owner(self, owners: dict, cookie: int, names) -> dict:
        o = owners.get(cookie)
        if o is None:
            return {"process.executable.name": "unknown"}
        tgid, comm = o
        thread = comm.split(b"\0", 1)[0].decode(errors="replace")
        return {"process.executable.name": names(tgid, thread)}

    def collect(self, add, names, io_instrument) -> None:
        """add(instrument, base attrs, value, extra attrs) for every delta;
        names(tgid, thread name) -> executable name."""
        self._tick += 1
        owners = {struct.unpack("=Q", k)[0]: _OWNER.unpack(v) for k, v in self._owners.items()}

        def route_traffic(kb: bytes, delta: tuple) -> None:
            cookie, addr, port, family, direction, lport, _ = _KEY.unpack(kb)
            ip = ipaddress.IPv6Address(addr)
            peer = str(ip.ipv4_mapped) if family == AF_INET and ip.ipv4_mapped else str(ip)
            base = {"network.transport": "udp", "network.type": "ipv4" if family == AF_INET else "ipv6",
                    "network.peer.address": peer, **self._owner(owners, cookie, names)}
            lo, hi = self._eph
            if lo <= port <= hi and not lo <= lport <= hi:
                base["network.local.port"] = lport   # we serve on lport: the peer's port is ephemeral
            else:
                base["network.peer.port"] = port
            extra = {"network.io.direction": DIRECTIONS.get(direction, "unknown")}
            add(io_instrument, base, delta[0], extra)
            add(PACKETS, base, delta[1], extra)

        def route_dns(kb: bytes, delta: tuple) -> None:
            cookie, qtype, rcode, is_response, direction, _ = _DNS_KEY.unpack(kb)
            extra = {"otelbpf.dns.kind": "response" if is_response else "query",
                     "dns.question.type": QTYPES.get(qtype, str(qtype)),
                     "network.io.direction": DIRECTIONS.get(direction, "unknown")}
            if is_response:
                extra["dns.response_code"] = RCODES.get(rcode, str(rcode))
            add(DNS_MESSAGES, self._owner(owners, cookie, names), delta[0], extra)

        self._collect_table(self._traffic, _VAL, self._prev, route_traffic)
        # DNS clients often use a socket per query: retiring idle keys frees those
        self._collect_table(self._dns, _DNS_VAL, self._prev_dns, route_dns)

    def _collect_table(self, table, value: struct.Struct, prev: dict, route) -> None:
        """Route what each key counted since the last pass; keys idle for
        IDLE_TICKS leave the kernel map, taken with their last value so a
        packet counted after the read is not lost."""
        idle = []
        for kb, vb in table.items():
            vals = value.unpack(vb)
            old = prev.get(kb)
            if old is not None and old[0] == vals:
                if self._tick - old[1] >= IDLE_TICKS:
                    idle.append(kb)
                continue
            prev[kb] = (vals, self._tick)
            route(kb, vals if old is None else tuple(a - b for a, b in zip(vals, old[0])))
        for kb in idle:
            last, (old, _seen) = table.lookup_and_delete(kb), prev.pop(kb)
            if last is not None and value.unpack(last) != old:
                route(kb, tuple(a - b for a, b in zip(value.unpack(last), old)))

    def table_full(self) -> tuple:
        udp_full, dns_full = self._counters.counters(2)
        return udp_full, dns_full
