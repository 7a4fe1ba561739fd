"""Where a filesystem type is mounted, from /proc/mounts."""
from __future__ import annotations

from typing import Optional


def find_mount(fstype: str, mounts: str = "/proc/mounts") -> Optional[str]:
    """The first mount point of `fstype` (e.g. tracefs, cgroup2), or None."""
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == fstype:
                    return parts[1]
    except OSError:
        pass
    return None
