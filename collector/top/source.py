"""Where `otelbpf top` gets its snapshots: the agent already running on this
host (its health server's /records), or, when none runs, the probes top
loads itself in-process (collector.agent.Agent without exporters), detached
again by close()."""
from __future__ import annotations

import dataclasses
import json
import threading
import urllib.error
import urllib.request
from typing import Optional

from .snapshot import empty, snapshot

STANDALONE_INTERVAL = 1.0   # s: top's own collection period when it runs the probes


class SourceError(Exception):
    """No data source: the message says why and what to do."""


def records_url(agent: str) -> str:
    url = agent if "://" in agent else f"http://{agent}"
    return url if url.rstrip("/").endswith("/records") else url.rstrip("/") + "/records"


class AgentSource:
    """Polls a running agent's /records."""

    standalone = False

    def __init__(self, agent: str):
        self.url = records_url(agent)
        self.describe = f"agent {self.url}"

    def fetch(self) -> dict:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            raise SourceError(f"{self.url} answered {e.code}: not an otelbpf agent with /records "
                              f"(an older version?)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SourceError(f"no agent answers at {self.url} ({getattr(reason, 'strerror', None) or reason})") \
                from None
        except ValueError as e:
            raise SourceError(f"{self.url} sent something that is not JSON ({e})") from None

    def close(self) -> None:
        pass


class LocalSource:
    """Runs the configured probes in this process, without exporters, and
    collects every STANDALONE_INTERVAL in a thread."""

    standalone = True

    def __init__(self, cfg, entries: dict, lock):
        from ..agent import Agent
        self.lock = lock
        cfg = dataclasses.replace(cfg, exporters={}, health="", interval=STANDALONE_INTERVAL)
        self.interval = cfg.interval
        self.agent = Agent(cfg, entries)
        self.describe = "standalone: no agent runs here, top loads the probes itself"
        self._latest = empty(cfg.interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None

    def start(self) -> int:
        running = self.agent.start()
        self._thread = threading.Thread(target=self._loop, name="top-collect", daemon=True)
        self._thread.start()
        return running

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._latest = snapshot(self.agent.tick(), self.interval)
                self._error = None
            except Exception as e:  # keep the screen up; say what failed
                self._error = f"collection failed: {e}"

    def fetch(self) -> dict:
        if self._error:
            raise SourceError(self._error)
        return self._latest

    def close(self) -> None:
        """Detach every program (the agent's shutdown) and free the host's lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.agent.shutdown()
        finally:
            self.lock.release()


def open_source(cfg, entries: dict, agent: Optional[str]):
    """--agent URL: that agent. Otherwise the agent of this config's health
    address if it answers; else, if this config's lock file is free (no agent
    runs), the probes in-process. Raises SourceError with the way out."""
    if agent:
        src = AgentSource(agent)
        src.fetch()
        return src
    tried = ""
    if cfg.health:
        src = AgentSource(cfg.health)
        try:
            src.fetch()
            return src
        except SourceError as e:
            if "no agent answers" not in str(e):
                raise
            tried = f" and none answers at {src.url}"
    from ..instance_lock import AlreadyRunning, InstanceLock
    lock = InstanceLock(cfg.lock_file)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        raise SourceError(f"{e}{tried}; give top its health address with --agent URL (its `health:` key)") \
            from None
    except OSError as e:
        raise SourceError(f"cannot take the instance lock {cfg.lock_file}: {e.strerror} (set lock_file to a "
                          f"writable path)") from None
    return LocalSource(cfg, entries, lock)
