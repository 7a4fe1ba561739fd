"""Start a probe for real and stop it again: what `otelbpf check` reports.

Feature lists cannot tell whether this kernel's verifier accepts a probe's
programs: only a load can. So `check` starts each enabled probe with the
current config (load, verifier, attach), records what it said while
starting, and stops it (every program detached).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import List

from . import features, libbpf
from .probe import ProbeContext, ProbeEntry


@dataclass
class TrialResult:
    runs: bool
    # one line each: "runs without X (needs Y)", from the probe's warnings
    without: List[str] = field(default_factory=list)
    variant: str = ""        # the build chosen for this kernel, if not the best one
    reason: str = ""         # why it cannot run
    notes: List[str] = field(default_factory=list)   # what the probe chose, one line each (probe.check_notes)

    def verdict(self) -> str:
        if not self.runs:
            return f"cannot run: {self.reason}"
        out = "runs" + (f" ({self.variant})" if self.variant else "")
        out += (", but: " + "; ".join(self.without)) if self.without else ""
        return out + "".join(f"\n    {n}" for n in self.notes)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])


def try_probe(entry: ProbeEntry, pcfg: dict, feats: dict, bpf_dir: str, btf_path, tracefs) -> TrialResult:
    """Start and stop one probe; never raises."""
    missing = features.missing(entry.cls.requires, feats)
    if missing:
        return TrialResult(False, reason="needs " + "; ".join(missing))
    log = logging.getLogger("otelbpf.check").getChild(entry.name)
    log.propagate = False     # its warnings become the verdict, not log lines
    collect = _Collect()
    log.addHandler(collect)
    ctx = ProbeContext(bpf_dir=bpf_dir, btf_path=btf_path, tracefs=tracefs, agent_pid=os.getpid(),
                       start_time_ns=time.time_ns(), log=log.parent)
    probe = None
    try:
        probe = entry.cls(pcfg, ctx)
        probe.start()
    except libbpf.BpfError as e:
        return TrialResult(False, reason=e.reason())
    except Exception as e:  # a probe's own error: its first line
        lines = str(e).splitlines()
        return TrialResult(False, reason=lines[0] if lines else type(e).__name__)
    finally:
        try:
            if probe is not None:
                probe.stop()
        except Exception:  # the verdict is already decided; stop() is best effort here
            pass
        log.removeHandler(collect)
    return TrialResult(True, without=collect.lines, variant=getattr(probe, "variant_note", ""),
                       notes=list(getattr(probe, "check_notes", [])))
