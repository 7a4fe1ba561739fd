"""net_flows' user-space series bounding, fed directly (no kernel)."""
from __future__ import annotations

from collector.config import PROBE_COMMON, parse_section
from probes.net_flows import CONNECTIONS, NetFlowsProbe


def _probe(**cfg):
    p = NetFlowsProbe.__new__(NetFlowsProbe)
    p.config = parse_section(cfg, {**PROBE_COMMON, **NetFlowsProbe.config_schema}, "probes.net_flows")
    p._series, p._flows_seen, p._tick, p._series_overflow, p._last_tick_ns = {}, {}, 0, 0, 0
    return p


def _flow(p, peer: str):
    base, flow = p._capped({"network.transport": "tcp", "network.peer.address": peer})
    p._add(CONNECTIONS, base, flow, 1, {"otelbpf.tcp.event": "opened"})
    return base


def test_cap_sends_new_flows_to_overflow_and_counts():
    p = _probe(max_series=2)
    p._tick = 1
    for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        _flow(p, peer)
    peers = sorted(r.attributes.get("network.peer.address", "overflow") for r in p._series.values())
    assert peers == ["10.0.0.1", "10.0.0.2", "overflow"]
    assert p._series_overflow == 2
    overflow = [r for r in p._series.values() if r.attributes.get("otelbpf.overflow")]
    assert overflow[0].value == 2  # nothing lost: counted in the overflow flow


def test_idle_flows_retire_and_free_their_place():
    p = _probe(max_series=1, flow_idle=2)
    p._tick = 1
    _flow(p, "10.0.0.1")
    for t in range(2, 5):  # 10.0.0.1 goes quiet
        p._tick = t
        p._retire_idle_flows()
    assert not p._series and not p._flows_seen
    _flow(p, "10.0.0.2")
    assert [r.attributes["network.peer.address"] for r in p._series.values()] == ["10.0.0.2"]
    assert p._series_overflow == 0
