"""The DICOM listener: a pynetdicom Storage + Verification SCP, modelled on ``apps/storescp``.

One handler per DIMSE service (C-ECHO, C-STORE) plus one that reports what an association
delivered when its connection closes. ``handle_store`` hands the dataset exactly as the peer
encoded it (never decoded and re-encoded) to :func:`app.receive.receive_instance`, the receive
sequence the upload shares, and answers success once it is durable and recorded. Every failure
is turned into a C-STORE status in one place (:func:`handle_store`, by ``app.errors.dicom_status``):
typed errors answer their own status, anything else answers 0xC000 and the listener keeps serving.

Logs are structured (``extra``) and carry no patient data: calling AE titles, statuses and
counts at info, study/series UIDs at debug only.

Bounded under abuse (issue 12): at most ``dicom_max_associations`` connections at once and
``dicom_max_associations_per_peer`` from one IP, checked when the TCP connection is accepted
(:class:`ConnectionGate`, so a bare connection that never speaks DICOM holds a slot only until the
ACSE timeout drops it); idle associations are aborted after ``network_timeout``. A data set that
grows past ``max_instance_bytes`` while it arrives is discarded from then on (:func:`guard_size`)
and answered 0xA700. Refusals are logged without patient data and counted (``app.counters``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time: no stub sees it
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from app.assembly import mark_released
from app.counters import ASSOCIATIONS_REFUSED, INSTANCES_TOO_LARGE, EventCounters
from app.db.write_gate import SqliteWriteGate, write_gate_for
from app.dicom.event_driven import EventDrivenRequestHandler, unbind_unlogged_handlers
from app.errors import STATUS_SUCCESS, TYPED_ERRORS, InstanceTooLargeError, dicom_status
from app.liveness import ListenerHeartbeat, listener_name
from app.receive import Origin, receive_instance
from app.series_selection import SeriesCriteria
from app.settings import Settings

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class (and Verification), preferred first.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50
    JPEGExtended12Bit,  # 4.51
    JPEGLossless,  # 4.57
    JPEGLosslessSV1,  # 4.70
    JPEGLSLossless,  # 4.80
    JPEGLSNearLossless,  # 4.81
    JPEG2000Lossless,  # 4.90
    JPEG2000,  # 4.91
    RLELossless,  # 1.2.840.10008.1.2.5
)

SOURCE = "dicom"

#: Elements longer than this are not read when a received header is described (:func:`_decoded`).
DEFER_ELEMENTS_BYTES = 4096


class _Tally:
    """What each open association has delivered so far: outcome counts, reported at info when it
    closes, and the series stored (study UID -> series UIDs), judged when it is released."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, Counter[str]] = {}
        self._series: dict[int, dict[str, set[str]]] = {}

    def add(self, assoc: Any, outcome: str, study_uid: str | None = None, series_uid: str | None = None) -> None:
        with self._lock:
            self._counts.setdefault(id(assoc), Counter())[outcome] += 1
            if study_uid is not None and series_uid is not None:
                self._series.setdefault(id(assoc), {}).setdefault(study_uid, set()).add(series_uid)

    def pop_series(self, assoc: Any) -> dict[str, set[str]]:
        with self._lock:
            return self._series.pop(id(assoc), {})

    def pop(self, assoc: Any) -> Counter[str]:
        with self._lock:
            self._series.pop(id(assoc), None)
            return self._counts.pop(id(assoc), Counter())


class ConnectionGate:
    """Open connections by peer address, so a connection is refused before any thread or DICOM
    work when the listener or its peer IP already holds its share.

    Counted from TCP accept to EVT_CONN_CLOSE; an entry whose connection ended without that event
    (a handler thread that failed) is pruned once no live association has its address.
    """

    #: Seconds an entry may exist before its association thread must be visible.
    STARTUP_GRACE = 5.0

    def __init__(self, ae: AE, max_total: int, max_per_peer: int) -> None:
        self.ae = ae
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], float] = {}

    def admit(self, address: tuple[str, int]) -> str | None:
        """Take a slot for this connection, or say why not (the reason refused)."""
        with self._lock:
            if len(self._open) >= self.max_total:
                self._prune()
            if len(self._open) >= self.max_total:
                return "max_associations"
            if sum(ip == address[0] for ip, _ in self._open) >= self.max_per_peer:
                self._prune()
                if sum(ip == address[0] for ip, _ in self._open) >= self.max_per_peer:
                    return "max_associations_per_peer"
            self._open[(address[0], int(address[1]))] = time.monotonic()
            return None

    def release(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._open.pop((address[0], int(address[1])), None)

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def _prune(self) -> None:
        live = {(a.requestor.address, a.requestor.port) for a in self.ae.active_associations if a.is_acceptor}
        cutoff = time.monotonic() - self.STARTUP_GRACE
        for key, since in list(self._open.items()):
            if since < cutoff and key not in live:
                del self._open[key]


class _Oversize(BytesIO):
    """Stands in for a data set that passed the size limit: counts the rest of it, keeps none."""

    def __init__(self, received: int) -> None:
        super().__init__()
        self.received = received

    def write(self, data: Any) -> int:
        self.received += len(data)
        return len(data)


@dataclass(frozen=True)
class ListenerContext:
    """What the C-STORE handler needs, bound once when the server starts."""

    settings: Settings
    session_factory: sessionmaker[Session]
    tally: _Tally = field(default_factory=_Tally, compare=False)
    counters: EventCounters | None = field(default=None, compare=False)
    gate: ConnectionGate | None = field(default=None, compare=False)
    #: where this process's record transactions queue on a SQLite database (``app.db.write_gate``)
    write_gate: SqliteWriteGate | None = field(default=None, compare=False)
    #: the threads that fsync received files while their records are written (``IncomingFile``)
    syncer: Executor | None = field(default=None, compare=False)

    def count(self, name: str, label: str) -> None:
        if self.counters is not None:
            self.counters.add(name, label)


#: Before accepting on a shared socket, a listener process waits this long per connection it holds
#: (at most MAX_ACCEPT_PAUSE): new associations go to the least busy process.
ACCEPT_PAUSE_PER_CONNECTION = 0.005
MAX_ACCEPT_PAUSE = 0.05


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with event-driven associations (``app.dicom.event_driven``),
    stopped by :meth:`shutdown` without pynetdicom's AE bookkeeping (which only
    ``AE.start_server`` fills)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", EventDrivenRequestHandler)
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers, less its logging ones where they would not log (each
        accepted association is given the server's bindings)."""
        super()._bind_defaults()
        unbind_unlogged_handlers(self)

    def shutdown(self) -> None:
        """Stop accepting and close the listening descriptor."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class SharedSocketServer(ListenerServer):
    """pynetdicom's threaded server on a socket bound and listening already, shared by several
    listener processes (``app.dicom.listener_processes``): each accepts the connections it takes
    from the one backlog. The socket is non-blocking, so a process that loses the race for a
    connection goes back to waiting instead of blocking in ``accept``.

    Every process wakes for a new connection and the first to accept takes it, so one process
    could take a whole burst while another idles: a process already holding connections
    (``held``) waits a moment before it accepts, and an idle one takes the connection first."""

    def __init__(self, *args: Any, listening_socket: socket.socket, held: Callable[[], int],
                 **kwargs: Any) -> None:
        self._listening_socket = listening_socket
        self._held = held
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        held = self._held()
        if held:
            time.sleep(min(ACCEPT_PAUSE_PER_CONNECTION * held, MAX_ACCEPT_PAUSE))
        return super().get_request()  # BlockingIOError when another process took it: no request

    def server_bind(self) -> None:
        # the one socketserver made (pynetdicom types it optional): this server uses the shared one
        cast(socket.socket, self.socket).close()
        self.socket = self._listening_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listening already (the parent called ``listen``)."""

    def server_close(self) -> None:
        """Close this process's descriptor only. pynetdicom's ``shutdown(SHUT_RDWR)`` would act on
        the socket every listener process shares: the others' ``accept`` would fail at once,
        forever, and their accept loops would spin."""
        cast(socket.socket, self.socket).close()  # set by server_bind


# --- the application entity ------------------------------------------------------------------


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and every storage SOP class in :data:`TRANSFER_SYNTAXES`."""
    ae = AE(ae_title=settings.ae_title)
    for context in AllStoragePresentationContexts:  # each built with its abstract syntax (typed optional)
        ae.add_supported_context(cast(UID, context.abstract_syntax), list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES))
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aets)  # empty: any
    ae.maximum_pdu_size = settings.max_pdu
    # Acceptor side: acse_timeout is also the ARTIM timer, which drops a connection that sends no
    # A-ASSOCIATE-RQ; network_timeout aborts an association with no PDU for that long.
    # (connection_timeout only applies when this AE connects out.)
    ae.maximum_associations = settings.dicom_max_associations
    ae.acse_timeout = settings.dicom_acse_timeout
    ae.dimse_timeout = settings.dicom_dimse_timeout
    ae.network_timeout = settings.network_timeout
    return ae


def _handlers(context: ListenerContext) -> list[Any]:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_RELEASED, handle_released, [context]),
        (evt.EVT_CONN_CLOSE, handle_close, [context]),
        (evt.EVT_PDU_RECV, guard_size, [context]),
        (evt.EVT_REJECTED, handle_rejected, [context]),
    ]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS for DICOM (PS3.15 B.1) when a certificate is configured; with a CA, peers
    must present a certificate signed by it (mutual TLS, how PACS nodes usually authenticate)."""
    if not settings.dicom_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
    if settings.dicom_tls_ca:
        context.load_verify_locations(settings.dicom_tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def address_allowed(address: str, allowed: list[str]) -> bool:
    """Empty allow-list: anyone; else the peer's IP must fall in one of the networks (CIDR)."""
    if not allowed:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(network, strict=False) for network in allowed)


def start_listener(settings: Settings, session_factory: sessionmaker[Session],
                   listening_socket: socket.socket | None = None) -> ListenerServer:
    """Serve in background threads; the caller stops it with ``.shutdown()``. With
    ``listening_socket`` (one of several listener processes) it accepts on that socket instead
    of binding ``dicom_host:dicom_port`` itself."""
    ae = build_ae(settings)
    counters = EventCounters(session_factory)
    gate = ConnectionGate(ae, settings.dicom_max_associations, settings.dicom_max_associations_per_peer)
    write_gate = write_gate_for(session_factory.kw["bind"])
    # one fsync at a time per association at most: threads are only made while none is idle
    syncer = ThreadPoolExecutor(max_workers=settings.dicom_max_associations, thread_name_prefix="dicom-fsync")
    context = ListenerContext(settings, session_factory, counters=counters, gate=gate, write_gate=write_gate,
                              syncer=syncer)
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    log.info(
        "DICOM listener starting",
        extra={"ae_title": settings.ae_title, "host": settings.dicom_host, "port": settings.dicom_port,
               "tls": bool(settings.dicom_tls_cert), "ip_allow_list": len(settings.allowed_calling_ips),
               "max_associations": settings.dicom_max_associations,
               "max_associations_per_peer": settings.dicom_max_associations_per_peer},
    )
    server: ListenerServer
    if listening_socket is None:
        server = cast(ListenerServer, ae.make_server(
            (settings.dicom_host, settings.dicom_port), evt_handlers=_handlers(context),
            ssl_context=tls_context(settings), server_class=ListenerServer,
        ))
    else:
        server = cast(SharedSocketServer, ae.make_server(
            listening_socket.getsockname()[:2], evt_handlers=_handlers(context), ssl_context=tls_context(settings),
            server_class=SharedSocketServer, listening_socket=listening_socket, held=gate.open_count,
        ))
    threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
    allowed = list(settings.allowed_calling_ips)

    def verify_request(request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int]) -> bool:
        if not address_allowed(client_address[0], allowed):
            log.warning("connection refused: address not in the allow-list", extra={"peer": client_address[0]})
            counters.add(ASSOCIATIONS_REFUSED, "address_not_allowed")
            return False
        refused = gate.admit(client_address)
        if refused:
            log.warning("connection refused: association limit reached",
                        extra={"peer": client_address[0], "reason": refused, "open": gate.open_count()})
            counters.add(ASSOCIATIONS_REFUSED, refused)
            return False
        return True

    stop_server = server.shutdown

    def shutdown() -> None:
        stop_server()
        syncer.shutdown()
        counters.stop()
        heartbeat.stop()
        if write_gate is not None:
            write_gate.close()

    server.verify_request = verify_request  # type: ignore[method-assign]  # socketserver's hook
    heartbeat = ListenerHeartbeat(session_factory, listener_name(settings.ae_title, settings.dicom_port),
                                  settings.listener_heartbeat_interval_seconds,
                                  settings.listener_heartbeat_timeout_seconds)
    heartbeat.start()  # settling counts silence only while this beats (app.liveness)
    server.shutdown = shutdown  # type: ignore[method-assign]  # and record the last counts
    counters.start()
    return server


def serve_listener(settings: Settings, session_factory: sessionmaker[Session],
                   listening_socket: socket.socket | None = None) -> None:
    """Serve until interrupted (one listener process of ``cttriage dicom``)."""
    server = start_listener(settings, session_factory, listening_socket)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()


# --- handlers ----------------------------------------------------------------------------------


def _calling_aet(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def handle_echo(event: Event) -> int:
    log.debug("C-ECHO", extra={"calling_aet": _calling_aet(event)})
    return STATUS_SUCCESS


def handle_rejected(event: Event, context: ListenerContext) -> None:
    """A-ASSOCIATE-RJ sent (called or calling AE title, pynetdicom's own association limit)."""
    log.warning("association rejected", extra={"calling_aet": _calling_aet(event)})
    context.count(ASSOCIATIONS_REFUSED, "association_rejected")


def guard_size(event: Event, context: ListenerContext) -> None:
    """Before a P-DATA PDU is added to the DIMSE message being received: once the message's data
    set would pass ``max_instance_bytes``, swap its buffer for one that keeps nothing, so the
    listener's memory stays bounded and the C-STORE can still be answered (0xA700)."""
    pdu = event.pdu  # type: ignore[attr-defined]
    message = event.assoc.dimse.message
    if not isinstance(pdu, P_DATA_TF) or message is None:
        return
    data_set = message.data_set
    if isinstance(data_set, _Oversize) or not isinstance(data_set, BytesIO):
        return
    incoming = sum(len(item.presentation_data_value or b"") - 1 for item in pdu.presentation_data_value_items
                   if item.presentation_data_value and not item.presentation_data_value[0] & 1)
    if data_set.tell() + incoming > context.settings.max_instance_bytes:
        message.data_set = _Oversize(data_set.tell())


def handle_close(event: Event, context: ListenerContext) -> None:
    if context.gate is not None:
        requestor = event.assoc.requestor
        context.gate.release((requestor.address, requestor.port))
    counts = context.tally.pop(event.assoc)
    if counts:
        log.info(
            "association closed",
            extra={
                "calling_aet": _calling_aet(event),
                "stored": counts["stored"],
                "duplicates": counts["duplicate"],
                "failed": counts["failed"],
            },
        )


def handle_released(event: Event, context: ListenerContext) -> None:
    """The peer released the association (a PACS does once a study is sent; an abort is no such
    sign): a study it delivered a complete series of settles after a short quiet period
    (``app.assembly.mark_released``). A failure here only leaves the full settle time."""
    delivered = context.tally.pop_series(event.assoc)
    if not delivered:
        return
    settings = context.settings
    try:
        mark_released(context.session_factory, delivered, SeriesCriteria.from_settings(settings),
                      settings.settle_after_release_seconds)
    except Exception as exc:
        log.warning("release not recorded; studies settle by silence", extra={"error": type(exc).__name__})


def handle_store(event: Event, context: ListenerContext) -> int:
    """Store one instance durably and record it; the one place errors become C-STORE statuses."""
    calling_aet = _calling_aet(event)
    try:
        _check_size(event, context)
        file_meta = event.file_meta
        origin = Origin(SOURCE, calling_aet, str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "") or None)
        stored = receive_instance(_part10_parts(event, file_meta), lambda: _decoded(event, file_meta), origin,
                                  context.settings, context.session_factory, unreadable="dataset cannot be decoded",
                                  write_gate=context.write_gate, syncer=context.syncer)
    except Exception as exc:
        if not isinstance(exc, TYPED_ERRORS):  # its message may quote element values: log the stack only
            log.error("unexpected error while storing an instance", extra={
                "calling_aet": calling_aet, "error": type(exc).__name__,
                "stack": "".join(traceback.format_tb(exc.__traceback__))})
        reason = str(exc) if isinstance(exc, TYPED_ERRORS) else None
        return _failed(context, event, dicom_status(exc), type(exc).__name__, reason, calling_aet)
    context.tally.add(event.assoc, "duplicate" if stored.duplicate else "stored", stored.study_uid,
                      stored.series_uid)
    log.debug("stored instance", extra={"calling_aet": calling_aet, "study_uid": stored.study_uid,
                                        "series_uid": stored.series_uid, "duplicate": stored.duplicate})
    return STATUS_SUCCESS


def _check_size(event: Event, context: ListenerContext) -> None:
    data_set = cast(C_STORE, event.request).DataSet
    if isinstance(data_set, _Oversize):
        context.count(INSTANCES_TOO_LARGE, SOURCE)
        raise InstanceTooLargeError(
            f"data set of {data_set.received} bytes or more, above the limit of {context.settings.max_instance_bytes}")


def _part10_parts(event: Event, file_meta: FileMetaDataset) -> tuple[bytes, bytes]:
    """The dataset as the peer encoded it, behind a preamble and file meta: a DICOM file in two
    parts, written one after the other (what ``event.encoded_dataset()`` returns, without joining
    half a megabyte per slice into one more copy)."""
    header = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(file_meta)))
    return header, cast(BytesIO, cast(C_STORE, event.request).DataSet).getvalue()


def _decoded(event: Event, file_meta: FileMetaDataset) -> tuple[Dataset, str]:
    """The received dataset with its file meta (as storescp does: header readers look for the
    transfer syntax there), and the transfer syntax it was sent in.

    Elements over :data:`DEFER_ELEMENTS_BYTES` (pixel data, mostly) are left unread until asked
    for, from the received buffer: describing an instance needs their presence only."""
    transfer_syntax = event.context.transfer_syntax
    stream = cast(BytesIO, cast(C_STORE, event.request).DataSet)
    if transfer_syntax.is_deflated:
        stream = BytesIO(zlib.decompress(stream.getvalue(), -zlib.MAX_WBITS))
    stream.seek(0)
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    dataset = read_dataset(stream, implicit, little, defer_size=DEFER_ELEMENTS_BYTES)
    return FileDataset(stream, dataset, file_meta=file_meta, is_implicit_VR=implicit,
                       is_little_endian=little), transfer_syntax


def _failed(
    context: ListenerContext, event: Event, status: int, error: str, reason: str | None, calling_aet: str
) -> int:
    context.tally.add(event.assoc, "failed")
    log.warning(
        "C-STORE failed",
        extra={"calling_aet": calling_aet, "status": f"0x{status:04X}", "error": error, "reason": reason},
    )
    return status
