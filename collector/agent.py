"""Agent lifecycle: start probes, collect every interval, export, reload on
SIGHUP, and on SIGINT/SIGTERM (or --duration) collect once more, detach every
program and flush every exporter."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

from . import features, heap, libbpf
from .config import AgentConfig, ConfigError
from .export.worker import ExportWorker, QueueLimits
from .metadata.enrich import ProcessEnricher
from .metadata.host import host_resource
from .probe import BpfProbe, ProbeContext, ProbeEntry, default_bpf_dir
from .export.spans import SpanConverter
from .records import Batch, Profile, Span
from .sdnotify import Notifier
from .shared import SharedState
from .selftelemetry import AgentCounters, DropWarner, dropped

log = logging.getLogger("otelbpf")

MAX_COLLECT_FAILURES = 3   # consecutive failures before a probe is stopped
MAX_RESTARTS = 5           # then it stays disabled
RESTART_BACKOFF_S = 30.0   # doubled after each restart
FLUSH_TIMEOUT_S = 5.0


def make_exporter(name: str, cfg: dict, health=None):
    """health: the running HealthServer, where the prometheus exporter serves
    /metrics unless it has its own listen address."""
    if name == "otlp":
        from .export.otlp import OtlpExporter
        return OtlpExporter(cfg)
    if name == "file":
        from .export.file import FileExporter
        return FileExporter(cfg)
    if name == "console":
        from .export.console import ConsoleExporter
        return ConsoleExporter(cfg)
    if name == "prometheus":
        from .export.prometheus import PrometheusExporter
        return PrometheusExporter(cfg, health)
    raise ValueError(f"unknown exporter {name}")


class _RunningProbe:
    def __init__(self, name: str, probe, cfg: dict):
        self.name, self.probe, self.cfg = name, probe, cfg
        self.failures = 0
        self.started_ns = time.time_ns()


class Agent:
    def __init__(self, cfg: AgentConfig, entries: dict, reload_config: Optional[Callable[[], AgentConfig]] = None,
                 bpf_dir: Optional[str] = None):
        self.cfg = cfg
        self.entries: dict = entries  # name -> ProbeEntry
        self._reload_config = reload_config
        self.bpf_dir = bpf_dir or default_bpf_dir()
        self.counters = AgentCounters()
        self.drop_warner = DropWarner(log)
        self.notifier = Notifier()
        self.health = None
        self.enricher = ProcessEnricher(pods=self._start_pod_cache(), command_line=cfg.process["command_line"])
        self.resource = host_resource(cfg.resource)
        self.span_converter = SpanConverter()
        self.probes: dict = {}        # name -> _RunningProbe
        self.shared = SharedState()   # maps and lookups the probes share (the request each thread serves...)
        self.probe_up: dict = {}      # name -> bool, for self-telemetry
        self.workers: dict = {}       # exporter name -> ExportWorker
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._restart_at: dict = {}   # probe name -> (monotonic time, config) of a pending restart
        self._restarts: dict = {}     # probe name -> restarts so far
        self.tracefs: Optional[str] = None
        self._features: Optional[dict] = None

    # ------------------------------------------------------------- startup
    def _start_pod_cache(self):
        k = self.cfg.kubernetes
        if k["enabled"] == "off":
            return None
        from .metadata.kubernetes import PodCache
        import socket
        node = k["node"] or os.environ.get("K8S_NODE_NAME") or socket.gethostname()
        cache = PodCache(k["api"], node) if k["api"] else PodCache.in_cluster(node)
        if cache is None:
            if k["enabled"] == "on":
                log.warning("kubernetes: not in a cluster and no kubernetes.api set; pod names disabled")
            return None
        log.info("kubernetes: watching pods of node %s at %s", node, cache.api)
        return cache.start()

    def _ensure_tracefs(self) -> None:
        try:
            self.tracefs = features.ensure_tracefs(self.cfg.kernel["tracefs"])
        except features.TracefsError as e:
            self.tracefs = None
            log.warning("%s; probes that require tracefs are skipped (the built-in ones attach through raw "
                        "tracepoints, perf events and the uprobe PMU, and run without it)", e)

    def features(self) -> dict:
        if self._features is None:
            self._features = features.detect(self.bpf_dir, self.cfg.kernel["btf"])
            if self.tracefs is None:
                f = self._features.get("tracefs")
                if f and f.available and not features.tracefs_mount_point():
                    self._features["tracefs"] = features.Feature("tracefs", False, "could not be mounted")
        return self._features

    def _start_probe(self, name: str, pcfg: dict) -> bool:
        entry: ProbeEntry = self.entries.get(name)
        if entry is None or entry.cls is None:
            log.error("probe %s: not loadable (%s)", name, entry.error if entry else "not installed")
            self.probe_up[name] = False
            return False
        missing = features.missing(entry.cls.requires, self.features())
        if missing:
            log.warning("probe %s: skipped, this kernel lacks %s", name, "; ".join(missing))
            self.probe_up[name] = False
            return False
        ctx = ProbeContext(bpf_dir=self.bpf_dir, btf_path=self.cfg.kernel["btf"], tracefs=self.tracefs,
                           agent_pid=os.getpid(), start_time_ns=time.time_ns(), log=log.getChild("probe"),
                           shared=self.shared)
        probe = entry.cls(pcfg, ctx)
        try:
            probe.start()
        except Exception as e:
            detail = str(e).splitlines()
            first = detail[0] if detail else type(e).__name__
            hint = ""
            if isinstance(e, libbpf.BpfError):
                first = e.reason()   # the verifier's verdict, when it has one
                hint = f" ({features.errno_hint(e.errno, e.log)})"
            log.error("probe %s: failed to start: %s%s", name, first, hint)
            for line in detail[1:]:
                log.debug("probe %s: %s", name, line)
            _safe_stop(probe, name)
            self.probe_up[name] = False
            return False
        self.probes[name] = _RunningProbe(name, probe, pcfg)
        self.probe_up[name] = True
        log.info("probe %s: running", name)
        return True

    def _start_exporters(self, names=None) -> None:
        limits = QueueLimits(batches=self.cfg.export_queue, memory=self.cfg.export_queue_memory,
                             retry_max_s=self.cfg.export_retry_max)
        for name, ecfg in self.cfg.exporters.items():
            if names is not None and name not in names:
                continue
            try:
                self.workers[name] = ExportWorker(make_exporter(name, ecfg, self.health), limits, self.counters)
            except Exception as e:
                log.error("exporter %s: cannot start: %s", name, e)

    def _start_health(self) -> None:
        if not self.cfg.health:
            return
        from .health import HealthServer
        try:
            self.health = HealthServer(self.cfg.health, self.cfg.interval)
            log.info("health and self-metrics on http://%s/healthz and /metrics", self.health.address)
        except (OSError, ValueError) as e:
            log.warning("health endpoint %s unavailable (%s); running without it", self.cfg.health, e)

    def start(self) -> int:
        """Start exporters and enabled probes; returns how many probes run."""
        self._start_health()
        self._ensure_tracefs()
        self._start_exporters()
        for name, pcfg in self.cfg.probes.items():
            if pcfg["enabled"]:
                self._start_probe(name, pcfg)
        heap.release_freed()   # what loading the objects freed
        return len(self.probes)

    # ------------------------------------------------------------- ticks
    def _restart_due_probes(self) -> None:
        now = time.monotonic()
        for name, (when, pcfg) in list(self._restart_at.items()):
            if now < when:
                continue
            del self._restart_at[name]
            if name in self.probes or name not in self.cfg.probes:
                continue  # a reload already started it, or removed it
            self._restarts[name] = self._restarts.get(name, 0) + 1
            if self._start_probe(name, pcfg):
                log.info("probe %s: restarted", name)
            heap.release_freed()

    def tick(self) -> Batch:
        self._restart_due_probes()
        batch = Batch(time_ns=time.time_ns(), resource=self.resource)
        for name, rp in list(self.probes.items()):
            try:
                records = rp.probe.collect()
                rp.failures = 0
            except Exception as e:
                rp.failures += 1
                self.counters.drop(f"probe.{name}", "collect_failed")
                log.error("probe %s: collect failed (%d/%d): %s", name, rp.failures, MAX_COLLECT_FAILURES,
                          str(e).splitlines()[0] if str(e) else type(e).__name__)
                if rp.failures >= MAX_COLLECT_FAILURES:
                    self._stop_probe(name)
                    restarts = self._restarts.get(name, 0)
                    if restarts < MAX_RESTARTS:
                        delay = RESTART_BACKOFF_S * 2 ** restarts
                        self._restart_at[name] = (time.monotonic() + delay, rp.cfg)
                        log.error("probe %s: stopped after %d failed collections; restarting in %.0fs (%d/%d)",
                                  name, rp.failures, delay, restarts + 1, MAX_RESTARTS)
                    else:
                        log.error("probe %s: disabled after %d restarts", name, restarts)
                continue
            try:
                self.enricher.enrich(records)
            except Exception as e:  # metadata is a nicety: never lose the data over it
                log.warning("probe %s: process metadata failed: %s", name, e)
            if isinstance(rp.probe, BpfProbe):
                records.append(dropped(name, "recursion_miss", rp.probe.recursion_misses(), rp.started_ns))
            scope = f"otelbpf.probe.{name}"
            batch.metrics[scope] = [r for r in records if not isinstance(r, (Profile, Span))]
            spans = [r for r in records if isinstance(r, Span)]
            if spans:
                batch.spans.extend(self.span_converter.convert(spans, self.resource))
            profiles = [r for r in records if isinstance(r, Profile)]
            if profiles:
                batch.profiles[scope] = profiles
        batch.metrics["otelbpf.agent"] = self.counters.records(self.probe_up)
        for records in batch.metrics.values():
            self.drop_warner.check(records)
        for w in self.workers.values():
            w.submit(batch)
        self.notifier.watchdog()  # a tick happened: the main loop is alive
        if self.health is not None:
            self.health.update(batch)
        return batch

    def _stop_probe(self, name: str) -> None:
        rp = self.probes.pop(name, None)
        if rp is not None:
            _safe_stop(rp.probe, name)
        self.probe_up[name] = False

    # ------------------------------------------------------------- reload
    def reload(self) -> None:
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
        except ConfigError as e:
            log.error("reload: config error: %s; keeping the running configuration", e)
            return
        old = self.cfg
        self.cfg = new
        self.resource = host_resource(new.resource)
        self.enricher.command_line = new.process["command_line"]
        for name in list(self.probes):
            if new.probes.get(name) != self.probes[name].cfg:
                log.info("probe %s: stopping (configuration changed)", name)
                self._stop_probe(name)
        for name, pcfg in new.probes.items():
            if pcfg["enabled"] and name not in self.probes:
                self._start_probe(name, pcfg)
        heap.release_freed()
        for name in [n for n in self.probe_up if n not in new.probes]:
            self.probe_up.pop(name)  # no longer configured: no longer reported
        changed = [n for n in set(old.exporters) | set(new.exporters) if old.exporters.get(n) != new.exporters.get(n)]
        for name in changed:
            w = self.workers.pop(name, None)
            if w is not None:
                w.close(FLUSH_TIMEOUT_S)
        self._start_exporters(changed)
        log.info("reloaded %s: %d probes running, exporters: %s", new.source, len(self.probes),
                 ", ".join(self.workers) or "none")

    # ------------------------------------------------------------- main loop
    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: (self._reload.set(), self._stop.set()))

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, duration: Optional[float] = None) -> None:
        """Collect every interval until stopped (signal or duration)."""
        self._install_signals()
        end = time.monotonic() + duration if duration else None
        next_tick = time.monotonic() + self.cfg.interval
        while True:
            now = time.monotonic()
            wake = min(next_tick, end) if end else next_tick
            # SIGHUP also sets _stop to wake the wait; _reload tells them apart.
            self._stop.wait(max(0.0, wake - now))
            if self._reload.is_set():
                self._reload.clear()
                self._stop.clear()
                self.reload()
                continue
            if self._stop.is_set() or (end is not None and time.monotonic() >= end):
                return
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick += self.cfg.interval
                if next_tick < time.monotonic():  # fell behind: skip, never burst
                    next_tick = time.monotonic() + self.cfg.interval

    def shutdown(self) -> None:
        """One last collection, detach everything, flush every exporter."""
        self.notifier.stopping()
        try:
            self.tick()
        except Exception as e:
            log.error("final collection failed: %s", e)
        for name in list(self.probes):
            self._stop_probe(name)
        self.shared.close()
        for name, w in list(self.workers.items()):
            w.close(FLUSH_TIMEOUT_S)
        self.workers.clear()
        if self.health is not None:
            self.health.close()
            self.health = None


def _safe_stop(probe, name: str) -> None:
    try:
        probe.stop()
    except Exception as e:
        log.error("probe %s: stop failed: %s", name, e)
