"""The agent's own telemetry: what it dropped, where, and what it costs.

Every place that can lose data counts it here (or in a probe's kernel stats
map) from the first version, exported as `otelbpf.dropped` by probe and reason.
"""
from __future__ import annotations

import threading
import time

import psutil

from .records import Counter, Gauge, Instrument

DROPPED = Instrument("otelbpf.dropped", "{event}",
                     "Events lost by the agent, by probe (otelbpf.probe) and reason")
OVERFLOW = Instrument("otelbpf.overflow", "{event}",
                      "Events aggregated into an overflow series because a bounded map or series set was full")
AGENT_CPU = Instrument("otelbpf.agent.cpu.time", "s", "CPU time used by the agent process (user + system)")
AGENT_RSS = Instrument("otelbpf.agent.memory.rss", "By", "Resident memory of the agent process")
PROBE_UP = Instrument("otelbpf.probe.up", "1", "1 when the probe is running, 0 when it is disabled or failed")


def dropped(probe: str, reason: str, value: float, start_ns: int) -> Counter:
    return Counter(DROPPED, {"otelbpf.probe": probe, "reason": reason}, value, start_ns)


def overflow(probe: str, reason: str, value: float, start_ns: int) -> Counter:
    return Counter(OVERFLOW, {"otelbpf.probe": probe, "reason": reason}, value, start_ns)


class AgentCounters:
    """Drop counters owned by the agent itself (export queues, collect errors)."""

    def __init__(self):
        self.start_ns = time.time_ns()
        self._lock = threading.Lock()
        self._drops: dict = {}
        self._proc = psutil.Process()

    def drop(self, component: str, reason: str, n: int = 1) -> None:
        with self._lock:
            key = (component, reason)
            self._drops[key] = self._drops.get(key, 0) + n

    def get(self, component: str, reason: str) -> int:
        with self._lock:
            return self._drops.get((component, reason), 0)

    def records(self, probe_states: dict) -> list:
        with self._lock:
            out = [dropped(c, r, v, self.start_ns) for (c, r), v in sorted(self._drops.items())]
        t = self._proc.cpu_times()
        out.append(Counter(AGENT_CPU, {}, t.user + t.system, self.start_ns))
        out.append(Gauge(AGENT_RSS, {}, self._proc.memory_info().rss))
        for name, up in sorted(probe_states.items()):
            out.append(Gauge(PROBE_UP, {"otelbpf.probe": name}, 1 if up else 0))
        return out
