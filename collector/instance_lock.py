"""One agent per host: an exclusive flock on a lock file. The kernel drops
the lock when the process dies, however it dies, so a SIGKILLed agent never
blocks the next start."""
from __future__ import annotations

import fcntl
import os


class AlreadyRunning(RuntimeError):
    pass


class InstanceLock:
    def __init__(self, path: str):
        self.path = path
        self._fd = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"another otelbpf agent (pid {holder}) is running on this host (lock "
                                 f"{self.path}); stop it first, or set lock_file to run a second one")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
