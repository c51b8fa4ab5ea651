"""systemd's notify protocol, for `Type=notify` units: READY when serving, STOPPING when
stopping, STATUS lines, and WATCHDOG pings while the loop turns.

The protocol is one datagram per message to the socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract socket when it starts with ``@``); without that variable every
call does nothing, so the daemon runs the same under any other service manager.
``$WATCHDOG_USEC`` asks for a ping at least that often; pings go out at half of it.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ=os.environ, clock=time.monotonic):
        self.address = environ.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        usec = environ.get("WATCHDOG_USEC", "")
        self.interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        self.clock = clock
        self._next_ping = 0.0

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            pass  # the service manager went away: nothing to tell

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def alive(self) -> None:
        """A watchdog ping, when one is asked for and due."""
        if self.interval is None:
            return
        now = self.clock()
        if now >= self._next_ping:
            self._next_ping = now + self.interval
            self.send("WATCHDOG=1")
