"""Shared by the benchmarks: paths, and building their C workloads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build(name: str) -> str:
    """Compile bench/<name>.c into bench/bin/<name> (-O2) and return its path."""
    out = ROOT / "bench" / "bin" / name
    out.parent.mkdir(exist_ok=True)
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / f"{name}.c")], check=True)
    return str(out)
