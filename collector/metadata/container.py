"""Container and Kubernetes pod identity from a process's cgroup path.

Covers the layouts container runtimes leave in /proc/PID/cgroup, cgroup v1
and v2, systemd and cgroupfs drivers: docker, containerd (cri-containerd),
cri-o, podman (libpod), and the kubepods hierarchy's pod UID.
"""
from __future__ import annotations

import re

_ID = r"([0-9a-f]{64})"
_CONTAINER_PATTERNS = [
    re.compile(r"(?:docker|cri-containerd|crio|libpod|containerd)-" + _ID + r"\.scope"),  # systemd driver
    re.compile(r"/(?:docker|libpod|lxc|crio|containerd)/" + _ID + r"(?:/|$)"),             # cgroupfs driver
    re.compile(r"/kubepods[^\n]*/pod[0-9a-f_-]{36}/" + _ID + r"(?:/|$)"),                  # kubelet cgroupfs
]
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


def parse_cgroup(text: str) -> dict:
    """/proc/PID/cgroup content -> {container.id, k8s.pod.uid} (those found)."""
    out = {}
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if "container.id" not in out:
            for pat in _CONTAINER_PATTERNS:
                m = pat.search(path)
                if m:
                    out["container.id"] = m.group(1)
                    break
        if "k8s.pod.uid" not in out:
            m = _POD_UID.search(path)
            if m:
                out["k8s.pod.uid"] = m.group(1).replace("_", "-")
    return out


def container_of(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return parse_cgroup(f.read())
    except OSError:
        return {}

