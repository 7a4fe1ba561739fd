"""A probe whose collection keeps failing is stopped and restarted with
backoff, up to a limit; the other probes keep running."""
from __future__ import annotations


from conftest import needs_root

from collector import agent as agent_mod
from collector import config
from collector.probe import Probe, ProbeEntry
from collector.records import Counter, Instrument

pytestmark = needs_root
OK = Instrument("t.ok", "1", "")


class Flaky(Probe):
    name = "flaky"
    requires = ()
    instances = 0

    def start(self):
        Flaky.instances += 1
        self.calls = 0

    def collect(self):
        self.calls += 1
        if Flaky.instances == 1:  # the first instance always fails; the restarted one works
            raise RuntimeError("map read failed")
        return [Counter(OK, {}, self.calls, 0)]

    def stop(self):
        pass


class Steady(Probe):
    name = "steady"
    requires = ()

    def start(self):
        pass

    def collect(self):
        return [Counter(OK, {"p": "steady"}, 1, 0)]

    def stop(self):
        pass


def test_failing_probe_restarts_and_the_others_keep_running(monkeypatch, tmp_path):
    monkeypatch.setattr(agent_mod, "RESTART_BACKOFF_S", 0.0)
    entries = {"flaky": ProbeEntry("flaky", Flaky, "test", None), "steady": ProbeEntry("steady", Steady, "test", None)}
    cfg = config.build({"health": "", "exporters": {}, "probes": {"flaky": {}, "steady": {}}},
                       {"flaky": {}, "steady": {}}, env={})
    a = agent_mod.Agent(cfg, entries)
    assert a.start() == 2
    try:
        scopes = []
        for _ in range(5):
            scopes.append(set(a.tick().metrics))
        # three failures stop it; the next tick restarts it and it collects
        assert "otelbpf.probe.steady" in scopes[0] and all("otelbpf.probe.steady" in s for s in scopes)
        assert "otelbpf.probe.flaky" not in scopes[2]
        assert "otelbpf.probe.flaky" in scopes[3] and Flaky.instances == 2
        assert a.counters.get("probe.flaky", "collect_failed") == 3
    finally:
        a.shutdown()
