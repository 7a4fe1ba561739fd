"""What the probes of one agent share without importing each other.

- BPF maps declared in a header that several objects include (today
  bpf/thread_request.h: the request each thread serves, written by the http
  probe, read by the CPU profiler). The first probe to load such a map
  creates it; the others reuse it (one kernel map), whatever the order.
- Lookups one probe offers the others by name, such as the http probe
  naming a route by the key its kernel programs use.

Either side may be absent: a probe that finds nothing here works alone.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional

# The lookup the http probe offers: (route key, method code) -> attributes
# of the request ({"http.route": ..., "http.request.method": ...}).
HTTP_REQUEST_ATTRIBUTES = "http.request_attributes"


class SharedState:
    def __init__(self):
        self._lock = threading.Lock()
        self._maps: dict = {}       # map name -> our own fd of it (a dup: outlives the probe that made it)
        self._lookups: dict = {}

    # ------------------------------------------------------------- maps
    def reuse_maps(self, obj, names) -> None:
        """Before obj loads: its maps of these names become the shared ones
        already created, if any."""
        with self._lock:
            for name in names:
                fd = self._maps.get(name)
                if fd is not None:
                    obj.map(name).reuse_fd(fd)

    def publish_maps(self, obj, names) -> None:
        """After obj loaded: the maps it created are the shared ones from now on."""
        with self._lock:
            for name in names:
                if name not in self._maps:
                    self._maps[name] = os.dup(obj.map(name).fd)

    # ------------------------------------------------------------- lookups
    def offer(self, name: str, fn: Callable) -> None:
        with self._lock:
            self._lookups[name] = fn

    def withdraw(self, name: str, fn: Callable) -> None:
        with self._lock:
            if self._lookups.get(name) == fn:
                del self._lookups[name]

    def lookup(self, name: str) -> Optional[Callable]:
        with self._lock:
            return self._lookups.get(name)

    def close(self) -> None:
        with self._lock:
            for fd in self._maps.values():
                os.close(fd)
            self._maps.clear()
            self._lookups.clear()
