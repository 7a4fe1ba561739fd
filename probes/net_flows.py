"""Network flows. TCP: connections opened/closed/failed/reset, bytes and
segments per direction, retransmits and RTT, per (process, role, peer
address, port), aggregated in the kernel by bpf/net_flows.bpf.c. UDP
datagrams and DNS messages: bpf/net_udp.bpf.c, read by probes/net_udp.py.

Series are bounded: by default per executable (not per pid: forking servers),
the client side keyed by the server's port and the server side by its
listening port (the ephemeral port never becomes an attribute), and at most
max_series flows per interval, the rest in one overflow series, counted.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import struct
import time
from typing import Optional

from collector import libbpf
from collector.config import Field
from collector.metadata.process import ProcessNames, alive
from collector.probe import BpfProbe, ProbeError
from collector.records import Counter, Instrument, Log2Histogram
from collector.selftelemetry import dropped, overflow

from .net_udp import UdpCounters

_KEY = struct.Struct("=IBBH16si16s")      # struct flow_key
RTT_BUCKETS = 32   # RTT_BUCKETS in the .bpf.c: log2 buckets of the smoothed RTT in us (tcp_sock.srtt_us >> 3:
                   # the kernel keeps 8x the smoothed RTT in us, 3 fraction bits; ss -ti's rtt is the same >> 3)
NS_PER_S = 1_000_000_000   # report_ns is compared with bpf_ktime_get_ns() ns; live_report is in s
_VAL = struct.Struct(f"=10Q{RTT_BUCKETS}Q")  # struct flow_val
_VAL_FIELDS = ("opened", "closed", "failed", "resets", "retransmits", "bytes_sent", "bytes_recv",
               "segs_sent", "segs_recv", "rtt_sum_us")
OVERFLOW_TGID = 0xFFFFFFFF
AF_INET = 2
ROLES = {0: "unknown", 1: "client", 2: "server"}
STATS = ("overflow", "conn_table_full", "close_untracked", "closed_at_destroy", "close_unseen", "open_unseen")  # enum flow_stat
_CONN = struct.Struct(f"={_KEY.size}s4x7QIIB7x")  # struct conn_info: key, ..., netns, seen_gen, established
_CONN_TAIL = struct.Struct("=II")                 # its netns and seen_gen, read alone for the sweep
_CONN_TAIL_AT = _CONN.size - 16
UNSEEN_PASSES = 2  # iterator passes an entry's socket must be missing from before its close is counted


def _value_delta(new: bytes, old: Optional[bytes]) -> tuple:
    """What a kernel flow counted since it last read `old` (all of it if new)."""
    vals = _VAL.unpack(new)
    return vals if old is None else tuple(a - b for a, b in zip(vals, _VAL.unpack(old)))


IO = Instrument("otelbpf.network.io", "By", "TCP payload bytes, by network.io.direction (each byte once, "
                "however often it was retransmitted)")
SEGMENTS = Instrument("otelbpf.tcp.segments", "{segment}", "TCP segments, by network.io.direction")
CONNECTIONS = Instrument("otelbpf.tcp.connections", "{connection}",
                         "TCP connection events, by otelbpf.tcp.event (opened, closed, failed, reset)")
EVENTS_UNSEEN = Instrument("otelbpf.tcp.events_unseen", "{event}",
                           "connection opens and ends counted without their own state change, which the kernel ran "
                           "no program for (under load the kernel skips a few runs, uncounted); each is "
                           "also in otelbpf.tcp.connections")
RETRANSMITS = Instrument("otelbpf.tcp.retransmits", "{segment}",
                         "TCP segments retransmitted (the socket's total_retrans, as ss -ti shows it)")
RTT = Instrument("otelbpf.tcp.rtt", "us", "Smoothed RTT of connections, sampled each interval and at close")


class NetFlowsProbe(BpfProbe):
    name = "net_flows"
    description = "TCP connections, bytes, segments, retransmits and RTT per process and peer"
    bpf_object = "net_flows.bpf.o"
    requires = ("btf", "cap_bpf", "raw_tracepoint")
    config_schema = {
        "per_pid": Field("bool", False, "add process.pid to flow series (forking servers multiply them)"),
        "max_series": Field("int", 2000, "flows exported at most; the rest go to an overflow series, counted",
                            minimum=1),
        "max_flows": Field("int", 16384, "kernel flow table size; beyond it events land in an overflow "
                           "flow, counted", minimum=64),
        "max_connections": Field("int", 65536, "connections tracked at once in the kernel", minimum=256),
        "live_report": Field("duration", 1.0, "how often a busy connection adds its counters to its flow"),
        "flow_idle": Field("int", 30, "intervals without traffic after which a flow's series are no longer "
                           "exported (they restart from zero if it comes back)", minimum=1),
        "udp": Field("bool", False, "count UDP datagrams and DNS messages too (cgroup_skb on the cgroup v2 root: "
                     "every packet of the host passes a program, ~3% of loopback TCP bulk throughput)"),
    }

    def start(self) -> None:
        obj = self.open_object()
        obj.set_global("overflow_tgid", struct.pack("=I", OVERFLOW_TGID))
        obj.set_global("report_ns", struct.pack("=Q", int(self.config["live_report"] * NS_PER_S)))
        # sock:sock_{send,recv}_length are 6.x: without them live counters come
        # from the iterator alone (the agent's network namespace only)
        self.live_hooks = libbpf.kernel_has_type("btf_trace_sock_send_length", libbpf.BTF_KIND_TYPEDEF)
        if not self.live_hooks:
            obj.program("flow_send").set_autoload(False)
            obj.program("flow_recv").set_autoload(False)
            self.log.warning("no sock:sock_send_length tracepoint: live byte counts only for the agent's "
                             "network namespace; other namespaces report at close")
        # iter/tcp is 5.9+: without it, connections report while sending and at close
        self.has_iter = libbpf.kernel_has_type("bpf_iter__tcp", libbpf.BTF_KIND_STRUCT)
        if not self.has_iter:
            obj.program("flow_iter").set_autoload(False)
            self.log.warning("no TCP iterator (kernel < 5.9): connections older than the agent are not adopted")
        obj.map("flow_stats").set_max_entries(self.config["max_flows"])
        obj.map("flow_conns").set_max_entries(self.config["max_connections"])
        obj.load()
        self._flows = obj.map("flow_stats")
        self._conns = obj.map("flow_conns")
        if self._conns.value_size != _CONN.size:
            raise ProbeError(f"net_flows.bpf.o: struct conn_info is {self._conns.value_size} bytes, "
                             f"expected {_CONN.size}: rebuild (make bpf)")
        self._counters = obj.map("flow_counters")
        self._gen = 0
        self._unseen_swept = 0
        self._netns = os.stat("/proc/self/ns/net").st_ino
        # the overflow flow exists before anything can need it
        self._flows.update(_KEY.pack(OVERFLOW_TGID, 0, 0, 0, b"", 0, b""), b"\0" * _VAL.size)
        self._iter = None
        self._seed_listeners(obj.map("flow_listeners"))
        for prog in obj.programs():
            if not self.live_hooks and prog.name in ("flow_send", "flow_recv"):
                continue
            if not self.has_iter and prog.name == "flow_iter":
                continue
            link = prog.attach()
            if prog.section.startswith("iter/"):
                self._iter = link
        if self._iter is not None:
            self._iter.run_iter()  # adopt connections that predate us, counting from now
        self._udp = None
        if self.config["udp"]:
            try:
                udp_obj = self.open_object("net_udp.bpf.o")
                if not self.live_hooks:
                    # the owner programs hook the same 6.3+ tracepoints
                    for name in UdpCounters.OWNER_PROGRAMS:
                        udp_obj.program(name).set_autoload(False)
                    self.log.warning("UDP/DNS counted without their processes (executable 'unknown'): "
                                     "owners need the sock:sock_send_length tracepoint (kernel 6.3+)")
                udp_obj.load()
                self._udp = UdpCounters(udp_obj, self.log, owners=self.live_hooks)
            except (libbpf.BpfError, OSError) as e:
                self.log.warning("UDP/DNS counting disabled, TCP goes on: %s", str(e).splitlines()[0])
        self.start_ns = self._last_tick_ns = time.time_ns()
        self._prev: dict = {}
        self._series: dict = {}   # (instrument name, flow, extra attr tuple) -> record
        self._flows_seen: dict = {}   # flow attrs -> [last active tick, series keys, the flow attrs]
        self._tick = 0
        self._series_overflow = 0
        self._procs = ProcessNames()

    @staticmethod
    def _seed_listeners(listeners) -> None:
        """Owners of ports already listening when the agent starts, from
        /proc/net/tcp{,6} (socket inodes) and /proc/PID/fd."""
        inodes = {}
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(path) as f:
                    next(f)
                    for line in f:
                        parts = line.split()
                        if len(parts) > 9 and parts[3] == "0A":  # TCP_LISTEN
                            inodes[parts[9]] = int(parts[1].rsplit(":", 1)[1], 16)
            except OSError:
                continue
        if not inodes:
            return
        netns = os.stat("/proc/self/ns/net").st_ino  # /proc/net/tcp shows our namespace only
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    port = inodes.pop(target[8:-1])
                    try:
                        with open(f"/proc/{pid}/comm", "rb") as f:
                            comm = f.read().strip()[:15]
                    except OSError:
                        comm = b""
                    listeners.update(struct.pack("=IHH", netns, port, 0), struct.pack("=I16s", int(pid), comm))
            if not inodes:
                return

    # ------------------------------------------------------------- collect
    def collect(self) -> list:
        self._procs.begin_pass()
        self._tick += 1
        self._retire_idle_flows()
        if self._iter is not None:
            self._gen += 1
            self.obj.write_global("iter_gen", struct.pack("=I", self._gen))
            self._iter.run_iter()  # live connections add what they counted since the last pass
            self._sweep_unseen()
        now = time.time_ns()
        items = self._flows.items()
        for kb, vb in items:
            old = self._prev.get(kb)
            if old == vb:
                continue  # most flows are idle: compare bytes, unpack only what moved
            self._prev[kb] = vb
            delta = _value_delta(vb, old)
            if any(delta):
                self._route(_KEY.unpack(kb), delta)
        self._reap()
        if self._udp is not None:
            self._udp.collect(lambda inst, base, v, extra: self._add(inst, *self._capped(base), v, extra),
                              lambda tgid, thread: self._procs.executable_name(tgid, fallback=thread) or thread,
                              IO)
        self._last_tick_ns = now
        return list(self._series.values()) + self._stat_records()

    def _flow_attrs(self, key) -> dict:
        tgid, role, family, port, addr, err, comm = key
        if tgid == OVERFLOW_TGID:
            return {"otelbpf.overflow": True, "network.transport": "tcp"}
        ip = ipaddress.IPv6Address(addr)
        peer = str(ip.ipv4_mapped) if family == AF_INET and ip.ipv4_mapped else str(ip)
        attrs = {"network.transport": "tcp", "network.type": "ipv4" if family == AF_INET else "ipv6",
                 "network.peer.address": peer, "otelbpf.tcp.role": ROLES.get(role, "unknown")}
        if role == 2:
            attrs["network.local.port"] = port
        else:
            attrs["network.peer.port"] = port
        thread = comm.split(b"\0", 1)[0].decode(errors="replace")
        if tgid:
            attrs["process.executable.name"] = self._procs.executable_name(tgid, fallback=thread) or thread
            if self.config["per_pid"]:
                attrs["process.pid"] = tgid
        else:
            attrs["process.executable.name"] = "unknown"  # connection older than the agent
        return attrs

    def _route(self, key, delta) -> None:
        d = dict(zip(_VAL_FIELDS, delta[:len(_VAL_FIELDS)]))
        rtt = delta[len(_VAL_FIELDS):]
        base, flow = self._capped(self._flow_attrs(key))
        err = key[5]
        self._add(IO, base, flow, d["bytes_sent"], {"network.io.direction": "transmit"})
        self._add(IO, base, flow, d["bytes_recv"], {"network.io.direction": "receive"})
        self._add(SEGMENTS, base, flow, d["segs_sent"], {"network.io.direction": "transmit"})
        self._add(SEGMENTS, base, flow, d["segs_recv"], {"network.io.direction": "receive"})
        self._add(CONNECTIONS, base, flow, d["opened"], {"otelbpf.tcp.event": "opened"})
        self._add(CONNECTIONS, base, flow, d["closed"], {"otelbpf.tcp.event": "closed"})
        self._add(CONNECTIONS, base, flow, d["resets"], {"otelbpf.tcp.event": "reset"})
        if d["failed"]:
            self._add(CONNECTIONS, base, flow, d["failed"], {"otelbpf.tcp.event": "failed",
                                                       "error.type": errno.errorcode.get(err, "unknown" if err < 0 else str(err))})
        self._add(RETRANSMITS, base, flow, d["retransmits"], {})
        if any(rtt):
            k = (RTT.name, flow)
            h = self._series.get(k)
            if h is None:
                h = self._series[k] = Log2Histogram(RTT, dict(base), [0] * RTT_BUCKETS, 0.0, self._last_tick_ns)
                self._flows_seen[flow][1].append(k)
            h.buckets = [a + b for a, b in zip(h.buckets, rtt)]
            h.sum += d["rtt_sum_us"]

    def _capped(self, base: dict) -> tuple:
        """(attributes, their sorted tuple) of the flow, or of the overflow
        flow once max_series flows are active."""
        flow = tuple(sorted(base.items()))
        seen = self._flows_seen.get(flow)
        if seen is None:
            if len(self._flows_seen) >= self.config["max_series"]:
                self._series_overflow += 1
                base = {"otelbpf.overflow": True, "network.transport": base.get("network.transport", "tcp")}
                flow = tuple(sorted(base.items()))
                seen = self._flows_seen.get(flow)
            if seen is None:
                seen = self._flows_seen[flow] = [0, [], flow]
        seen[0] = self._tick
        return base, seen[2]     # the first tuple of the flow: its series keys share it

    def _retire_idle_flows(self) -> None:
        """Flows without traffic for flow_idle intervals stop being exported
        (their last values went out already), so max_series bounds the flows
        active now, not every flow ever seen."""
        limit = self.config["flow_idle"]
        for flow, (last, series, _) in list(self._flows_seen.items()):
            if self._tick - last > limit:
                for k in series:
                    self._series.pop(k, None)
                del self._flows_seen[flow]

    def _add(self, inst: Instrument, base: dict, flow: tuple, value: int, extra: dict) -> None:
        if not value:
            return
        # keyed by the flow's own tuple (one object, shared by its series and
        # _flows_seen) and the few extra attributes: at max_series flows of
        # ~8 series each, a whole sorted attribute tuple per key held ~10 MB
        k = (inst.name, flow, tuple(extra.items()))
        rec = self._series.get(k)
        if rec is None:
            rec = self._series[k] = Counter(inst, dict(base, **extra), 0, self._last_tick_ns)
            self._flows_seen[flow][1].append(k)
        rec.value += value

    def _sweep_unseen(self) -> None:
        """Count the end of connections whose sockets are gone but whose close
        ran no program: under load the kernel skips a few runs of the state
        programs without counting a recursion miss (most likely a softirq's
        TCP_CLOSE on a CPU already running one), so a socket can finish unseen. The iterator marks every live
        socket it walks; one missing from UNSEEN_PASSES passes is gone. Only
        this network namespace can be checked: the iterator walks no other
        (there, a reused socket address finishes the old entry in the kernel)."""
        tail, at, gen, own = _CONN_TAIL.unpack_from, _CONN_TAIL_AT, self._gen, self._netns
        stale = []
        for kb, vb in self._conns.items():
            netns, seen_gen = tail(vb, at)
            if netns == own and gen - seen_gen >= UNSEEN_PASSES:
                stale.append(kb)
        for kb in stale:
            last = self._conns.lookup_and_delete(kb)
            if last is None:
                continue  # its close ran after all
            key, *_counters, _netns, _seen, established = _CONN.unpack(last)
            fields = list(_KEY.unpack(key))
            delta = [0] * (len(_VAL_FIELDS) + RTT_BUCKETS)
            if established:
                delta[_VAL_FIELDS.index("closed")] = 1
            else:
                fields[5] = -1  # how it failed is unknown
                delta[_VAL_FIELDS.index("failed")] = 1
            self._route(tuple(fields), tuple(delta))
            self._unseen_swept += 1

    def _reap(self) -> None:
        """Free kernel flows of processes that exited (their counts are read)."""
        dead = set()
        for kb in self._prev:
            tgid = _KEY.unpack(kb)[0]
            if tgid and tgid != OVERFLOW_TGID and tgid not in dead and not alive(tgid):
                dead.add(tgid)
        if not dead:
            return
        for kb in [kb for kb in self._prev if _KEY.unpack(kb)[0] in dead]:
            # take the last value and the key in one step: a close that lands
            # after the read above (an orphaned socket finishing in softirq
            # after its process exited) is still counted
            last, old = self._flows.lookup_and_delete(kb), self._prev.pop(kb)
            if last is not None and last != old:
                self._route(_KEY.unpack(kb), _value_delta(last, old))

    def _stat_records(self) -> list:
        vals = dict(zip(STATS, self._counters.counters(len(STATS))))
        out = [overflow(self.name, "kernel_flow_table_full", vals["overflow"], self.start_ns),
               dropped(self.name, "conn_table_full", vals["conn_table_full"], self.start_ns),
               overflow(self.name, "max_series", self._series_overflow, self.start_ns),
               Counter(EVENTS_UNSEEN, {"otelbpf.probe": self.name},
                       vals["close_unseen"] + vals["open_unseen"] + self._unseen_swept, self.start_ns)]
        if self._udp is not None:
            udp_full, dns_full = self._udp.table_full()
            out += [dropped(self.name, "udp_table_full", udp_full, self.start_ns),
                    dropped(self.name, "dns_table_full", dns_full, self.start_ns)]
        return out
