"""pynetdicom's acceptor association, woken by events instead of polling every millisecond.

Each pynetdicom association runs two threads: the DUL (reads PDUs from the socket, sends what
the service user queued) and the association (hands complete DIMSE messages to our handlers).
pynetdicom 3.0 has both check their queues in a loop that sleeps 1 ms between checks, so every
open association wakes its process about 2,000 times a second and takes the GIL each time: four
idle associations cost a listener process 38 % of a core, and under load the wake-ups compete
with the threads doing the work.

Here the DUL thread waits on its socket and on a wake-up socket pair written whenever the
service user queues a primitive or stops the DUL, and the association thread waits on an event
the DUL sets after every state-machine action and when it ends. Both still wake at least every
:data:`MAX_WAIT_SECONDS` to check pynetdicom's timers (ARTIM, network timeout), which are not
events. The loops below are pynetdicom 3.0's (``DULServiceProvider.run_reactor``,
``Association._run_reactor``, ``RequestHandler._create_association``) with the sleep replaced by
those waits; pyproject pins pynetdicom to 3.0.x, and the listener tests exercise these loops
(release, abort, timeouts, TLS, kill -9).

Two more per-instance costs go the same way: pynetdicom's logging handlers, which format every
PDU and message (and copy every data set) for log lines our logging configuration drops, are
bound only where pynetdicom logs at INFO (:func:`unbind_unlogged_handlers`, on the server as well
as the association: the server binds its own and hands them to each association it accepts);
and a PDU is read in as few ``recv`` calls as the kernel allows (:class:`WholeReadSocket`)
instead of 4 KiB at a time.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity

log = logging.getLogger(__name__)

#: The longest either thread waits without an event: the granularity of pynetdicom's timers.
MAX_WAIT_SECONDS = 0.05
_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


_STANDARD_LOGGING_HANDLERS = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                              (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                              (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                              (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


def unbind_unlogged_handlers(owner: Association | AssociationServer) -> None:
    """Unbind pynetdicom's standard logging handlers from an association or a server (which
    hands its bindings to each association it accepts) unless pynetdicom logs at INFO: they
    format every PDU and message, and copy each data set, for lines that would be dropped."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_LOGGING_HANDLERS:
        owner.unbind(event, handler)


class EventDrivenDUL(DULServiceProvider):
    """The DUL thread of one acceptor association; waits for its socket or a wake-up."""

    def __init__(self, assoc: EventDrivenAssociation) -> None:
        super().__init__(assoc)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._wake_reader, _POLL_IN)
        self._polled_fd = -1

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:  # the pair is full (a wake-up is pending anyway) or closed (the DUL ended)
            pass

    def _wait_for_work(self) -> None:
        """Until the peer sent something, the service user queued something, or the longest wait
        passed. An SSL socket may hold decrypted data the kernel no longer reports as readable."""
        connection = self.socket
        sock = connection.socket if connection is not None else None
        if sock is not None and hasattr(sock, "pending") and sock.pending():
            return
        fd = sock.fileno() if sock is not None else -1  # -1 once closed
        if fd != self._polled_fd:
            self._unregister_socket()
            if fd >= 0:
                self._poller.register(fd, _POLL_IN)
                self._polled_fd = fd
        try:
            events = self._poller.poll(MAX_WAIT_SECONDS * 1000)
        except OSError:
            time.sleep(0.001)
            return
        for fd, mask in events:
            if fd == self._wake_reader.fileno():
                try:
                    self._wake_reader.recv(4096)
                except OSError:
                    pass
            elif mask & select.POLLNVAL:  # closed under us: the loop sees that (Evt17)
                self._unregister_socket()
                time.sleep(0.001)

    def _unregister_socket(self) -> None:
        if self._polled_fd >= 0:
            try:
                self._poller.unregister(self._polled_fd)
            except (KeyError, OSError):
                pass
            self._polled_fd = -1

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop, waiting (:meth:`_wait_for_work`) instead of sleeping 1 ms,
        and waking the association thread after every state-machine action."""
        assoc = cast("EventDrivenAssociation", self.assoc)
        try:
            self._idle_timer.start()
            self.socket = cast(AssociationSocket, self.socket)
            wait = False
            while True:
                if not assoc._dul_ready.is_set():
                    assoc._dul_ready.set()
                    wait = True
                if wait:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    # either encode and send one primitive or receive and decode one PDU per loop
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    log.error("exception in the DUL thread, aborting the association",
                              extra={"error": type(exc).__name__})
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    self.socket.send(abort_pdu.encode())
                    assoc.is_aborted = True
                    assoc.is_established = False
                    assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    wait = True
                    continue
                self.state_machine.do_action(event)
                assoc.wake.set()
                wait = False
        finally:
            assoc.wake.set()
            self._unregister_socket()
            self._wake_reader.close()
            self._wake_writer.close()


class EventDrivenAssociation(Association):
    """An acceptor association whose thread waits for the DUL's events instead of polling."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        self.wake = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        # the timeouts live on the DUL's timers: set them again on this one
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def kill(self) -> None:
        self.wake.set()
        super().kill()

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers, less its logging ones where they would not log."""
        super()._bind_defaults()
        unbind_unlogged_handlers(self)

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, waiting on :attr:`wake` instead of sleeping 1 ms."""
        self._is_paused = False
        while not self._kill:
            self.wake.wait(MAX_WAIT_SECONDS)
            self.wake.clear()
            # the reactor can be paused (send_* from a handler); it must stop before messaging
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self.wake.set()  # another message may be queued already

            if self.is_established and self.acse.is_release_requested():
                # EVT_RELEASED before the A-RELEASE-RP, not after as in pynetdicom: the DUL, woken
                # at once to send it, can see the peer close and fire EVT_CONN_CLOSE before this
                # thread goes on, and the listener's release handler needs what the association
                # delivered, which its close handler discards
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("network timeout reached", extra={"peer": self.requestor.address})
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class WholeReadSocket(AssociationSocket):
    """pynetdicom's socket, reading what a PDU needs in as few calls as the kernel allows.

    pynetdicom reads at most 4 KiB per ``recv``: about 130 calls and as many appends for each
    512x512 slice. Here each call asks for the rest of the PDU, up to :data:`READ_CHUNK` (the
    peer states the length: a false one must not size an allocation)."""

    READ_CHUNK = 1 << 20

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        received = bytearray(min(nr_bytes, self.READ_CHUNK))
        view = memoryview(received)
        count = 0
        while count < nr_bytes:
            if count == len(received):  # a PDU longer than READ_CHUNK: grow as it arrives
                view.release()
                received.extend(bytes(min(nr_bytes - count, self.READ_CHUNK)))
                view = memoryview(received)
            read = sock.recv_into(view[count:])
            if not read:  # the connection was closed: what came so far, as pynetdicom returns
                break
            count += read
        view.release()
        del received[count:]
        return received


class EventDrivenRequestHandler(RequestHandler):
    """Serves each connection with an :class:`EventDrivenAssociation`."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0's ``RequestHandler._create_association`` with our association class."""
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(WholeReadSocket(assoc, client_socket=self.request))

        server = cast(Any, self.server)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote

        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
