"""cgroup id (the cgroup v2 directory's inode) -> cgroup path."""
from __future__ import annotations

import os
from typing import Optional

from ..mounts import find_mount


def cgroup2_root() -> Optional[str]:
    return find_mount("cgroup2")


class CgroupPaths:
    """Resolves ids by walking the cgroup2 tree; rewalks at most once per
    collection for ids it has not seen."""

    def __init__(self, max_entries: int = 16384):
        self.root = cgroup2_root()
        self._paths: dict = {}
        self._max = max_entries

    def refresh(self) -> None:
        if not self.root:
            return
        paths = {}
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                rel = os.path.relpath(dirpath, self.root)
                paths[os.stat(dirpath).st_ino] = "/" if rel == "." else "/" + rel
            except OSError:
                continue
            if len(paths) >= self._max:
                break
        self._paths = paths

    def path(self, cgroup_id: int) -> Optional[str]:
        return self._paths.get(cgroup_id)

    def resolve_all(self, ids) -> dict:
        if any(i not in self._paths for i in ids):
            self.refresh()
        return {i: self._paths.get(i) for i in ids}
