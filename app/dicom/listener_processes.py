"""Several listener processes on one DICOM port, so ingest uses every core.

Receiving an instance is CPU-bound Python (PDU assembly, header decoding, the record's
statements), so one process serves about one core however many associations are open; a PACS
sends over several associations at once, and that is where throughput comes from.

The parent binds and listens (a port in use fails before any child starts), makes the socket
non-blocking and hands it to N children (``cttriage dicom --listen-fd``, inherited through
``pass_fds``). The kernel gives each connection to whichever child accepts it first, from one
backlog: an idle child takes the next association, and a child that dies (kill -9) loses only
the associations it had open. Their senders retry what was not acknowledged, since every child
keeps the guarantees of :mod:`app.dicom.listener` (durable file, committed record, then success);
the supervisor starts the child again. Each child has its own heartbeat row and association limits.
"""

from __future__ import annotations

import logging
import socket
import sys

from app.settings import Settings
from app.supervision import SupervisedProcess, child_environment, stop_all

log = logging.getLogger(__name__)


def bind_dicom_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` for listener children to share."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old ones sit in TIME_WAIT
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)  # the children's accept loops must not block on a lost race
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def listener_command(fd: int) -> list[str]:
    """The command line of one listener child serving the inherited socket ``fd``."""
    return [sys.executable, "-m", "app.cli", "dicom", "--listen-fd", str(fd)]


class ListenerProcesses:
    """``count`` supervised listener children sharing one socket bound here; :meth:`shutdown`
    stops them and closes it."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.socket = bind_dicom_socket(settings.dicom_host, settings.dicom_port)
        fd = self.socket.fileno()
        env = child_environment(settings)
        self.children = [SupervisedProcess(listener_command(fd), env, name=f"listener {i + 1}", pass_fds=(fd,))
                         for i in range(count)]

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def start(self) -> None:
        for child in self.children:
            child.start()
        log.info("DICOM listener processes starting", extra={"processes": len(self.children), "port": self.port})

    def shutdown(self) -> None:
        stop_all(self.children)
        self.socket.close()
