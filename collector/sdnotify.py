"""systemd's notify protocol (Type=notify): READY, STOPPING, WATCHDOG, STATUS
datagrams to $NOTIFY_SOCKET. A no-op when not started by systemd."""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env=os.environ):
        addr = env.get("NOTIFY_SOCKET", "")
        self.addr = ("\0" + addr[1:]) if addr.startswith("@") else addr  # abstract namespace
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None

    def send(self, *fields: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto("\n".join(fields).encode(), self.addr)
            except OSError:
                pass  # systemd went away: nothing to tell

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: detaching programs, flushing exporters")

    def watchdog(self) -> None:
        if self.watchdog_s:
            self.send("WATCHDOG=1")
