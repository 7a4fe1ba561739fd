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


class DropWarner:
    """A warning when a drop counter grows, at most once per `every` seconds
    per (component, reason): drops must not be silent, nor flood the log."""

    def __init__(self, log, every: float = 60.0):
        self.log = log
        self.every = every
        self._state: dict = {}  # (component, reason) -> (value last warned about, when)

    def check(self, records, now: float = None) -> None:
        now = time.monotonic() if now is None else now
        for r in records:
            if not isinstance(r, Counter) or r.instrument is not DROPPED:
                continue
            key = (r.attributes.get("otelbpf.probe", "?"), r.attributes.get("reason", "?"))
            warned, when = self._state.get(key, (0, None))
            if r.value > warned and (when is None or now - when >= self.every):
                self.log.warning("%s: %d events dropped (%s) since the last warning; total %d",
                                 key[0], r.value - warned, key[1], r.value)
                self._state[key] = (r.value, now)
