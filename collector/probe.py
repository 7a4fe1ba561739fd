"""The plugin API: the one interface between the agent and its probes.

A probe is a class registered under the entry-point group `otelbpf.probes`
(built-in probes too), so a third party adds one by installing a package:

    [project.entry-points."otelbpf.probes"]
    my_probe = "my_package.module:MyProbe"

It declares its name, BPF object, config keys and required kernel features,
and implements start (load + attach), collect (drain maps into records) and
stop (detach everything).
"""
from __future__ import annotations

import abc
import logging
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import ClassVar, Dict, Optional, Tuple

from . import features, libbpf
from .config import Field
from .shared import SharedState

ENTRY_POINT_GROUP = "otelbpf.probes"


def default_bpf_dir() -> str:
    """Built objects live beside their sources in bpf/ (OTELBPF_BPF_DIR overrides)."""
    env = os.environ.get("OTELBPF_BPF_DIR")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")


class ProbeError(RuntimeError):
    """A probe cannot start or collect; the message is one line for the log."""


@dataclass
class ProbeContext:
    """What the agent gives every probe."""
    bpf_dir: str
    btf_path: Optional[str]
    tracefs: Optional[str]
    agent_pid: int
    start_time_ns: int
    log: logging.Logger
    shared: Optional[SharedState] = None   # what this agent's probes share (None: this probe runs alone)


class Probe(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Feature names from collector.features that must be available.
    requires: ClassVar[Tuple[str, ...]] = ("btf", "cap_bpf")
    # Probe-specific config keys (`enabled` is added by the agent).
    config_schema: ClassVar[Dict[str, Field]] = {}

    def __init__(self, config: dict, ctx: ProbeContext):
        self.config = config
        self.ctx = ctx
        self.log = ctx.log.getChild(self.name)

    @abc.abstractmethod
    def start(self) -> None:
        """Load and attach; raise ProbeError (or BpfError) on failure."""

    @abc.abstractmethod
    def collect(self) -> list:
        """Records (collector.records) with cumulative values since start."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Detach and free everything; must be safe to call twice."""


class BpfProbe(Probe):
    """A probe backed by one libbpf object, bpf/<bpf_object>."""
    bpf_object: ClassVar[str]
    # Builds of bpf_object for older kernels, best first: (object file,
    # kernel features it needs, from collector.features). The first whose
    # features the running kernel has is loaded; empty: bpf_object always.
    bpf_variants: ClassVar[Tuple[Tuple[str, Tuple[str, ...]], ...]] = ()
    # Maps this object shares with other probes' objects (declared in one
    # header both include): one kernel map, whichever probe loads first.
    shared_maps: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, config: dict, ctx: ProbeContext):
        super().__init__(config, ctx)
        self.obj: Optional[libbpf.BpfObject] = None
        self._extra_objects: list = []
        # which build was chosen and what the better ones lacked ("" for the best)
        self.variant_note = ""

    @classmethod
    def choose_variant(cls) -> Tuple[str, str]:
        """(object file, note): the best build this kernel can load, and what
        the better builds needed that it lacks."""
        lacking = []
        for obj, needs in cls.bpf_variants:
            missing = features.missing(needs, features.program_features())
            if not missing:
                return obj, ("" if not lacking else f"{os.path.basename(obj)}: this kernel lacks {lacking[0]}")
            lacking.append("; ".join(missing))
        return cls.bpf_object, ""

    def open_object(self, name: Optional[str] = None) -> libbpf.BpfObject:
        """Open bpf/<bpf_object> (the build chosen for this kernel), or another
        object of this probe: closed on stop like the main one."""
        if name is None and self.bpf_variants:
            chosen, self.variant_note = self.choose_variant()
            if self.variant_note:
                self.log.info("using %s", self.variant_note)
            path = os.path.join(self.ctx.bpf_dir, chosen)
        else:
            path = os.path.join(self.ctx.bpf_dir, name or self.bpf_object)
        obj = libbpf.BpfObject(path, btf_custom_path=self.ctx.btf_path)
        if name is None:
            self.obj = obj
        else:
            self._extra_objects.append(obj)
        return obj

    def load_object(self, obj: libbpf.BpfObject) -> None:
        """Load obj; maps named in shared_maps are shared with the agent's
        other probes whose objects declare them (collector/shared.py)."""
        shared = self.ctx.shared
        if shared is not None:
            shared.reuse_maps(obj, self.shared_maps)
        obj.load()
        if shared is not None:
            shared.publish_maps(obj, self.shared_maps)

    def _objects(self) -> list:
        return ([self.obj] if self.obj is not None else []) + self._extra_objects

    def recursion_misses(self) -> int:
        """Events the kernel did not run our programs for (see Program.recursion_misses)."""
        return sum(p.recursion_misses() for o in self._objects() for p in o.programs())

    def stop(self) -> None:
        for o in self._objects():
            o.close()
        self.obj = None
        self._extra_objects = []


@dataclass
class ProbeEntry:
    name: str
    cls: Optional[type]
    origin: str           # distribution that provides it
    error: Optional[str]  # why it could not be imported


def discover() -> Dict[str, ProbeEntry]:
    """Every probe installed under the entry-point group, built-in or not."""
    out: Dict[str, ProbeEntry] = {}
    if sys.version_info >= (3, 10):
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    else:  # pragma: no cover - python 3.9
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    for ep in eps:
        dist = getattr(ep, "dist", None)
        origin = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Probe)):
                raise TypeError(f"{ep.value} is not a collector.probe.Probe subclass")
            out[ep.name] = ProbeEntry(ep.name, cls, origin, None)
        except Exception as e:  # a broken plugin must not take the agent down
            out[ep.name] = ProbeEntry(ep.name, None, origin, f"{type(e).__name__}: {e}")
    return out
