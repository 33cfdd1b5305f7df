"""The DICOM listener against real associations: pynetdicom and dcmtk SCUs, on 127.0.0.1.

Each test starts its own listener on a free port with a temporary storage folder and SQLite
database. Instances are small synthetic CT slices (64x64) written to files first, so what was
sent is exactly a file's dataset bytes and can be compared with what was stored.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_sent_handler
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time: no stub sees them
    CTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from app import receive
from app.db.models import Base, Instance, QuarantinedFile, Series, Study
from app.db.session import make_session_factory
from app.db.write_gate import SqliteWriteGate
from app.dicom import listener, storage
from app.dicom.event_driven import EventDrivenAssociation, EventDrivenDUL, WholeReadSocket
from app.dicom.listener import start_listener
from app.errors import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from app.settings import Settings
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import enhanced_dataset

pytestmark = pytest.mark.timeout(60)

AE_TITLE = "CTTRIAGE"
CALLING_AET = "PACS"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
BIRTH_DATE = "19580317"
ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
#: What Association.get_handlers returns for an intervention event, and for a notification event.
InterventionHandler = tuple[Callable[..., Any], list[Any] | None]
NotificationHandlers = list[InterventionHandler]


# --- instances -----------------------------------------------------------------------------


def ct_slice(
    study_uid: str, series_uid: str, index: int, *, sop_class: str = CTImageStorage, modality: str = "CT"
) -> Dataset:
    """One 64x64 axial slice with the attributes a CT header reader looks at."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = "066Y"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "Lung 1.0"
    ds.Modality = modality
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-160.0, -160.0, -2.5 * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = -2.5 * index
    ds.PixelSpacing = [5.0, 5.0]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    yy, xx = np.mgrid[:64, :64]
    pixels = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 26**2, 1000, 0) + 10 * index
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_series(
    out_dir: Path, count: int = 3, *, transfer_syntax: str = ExplicitVRLittleEndian, **kwargs: Any
) -> list[Path]:
    study_uid, series_uid = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds = ct_slice(study_uid, series_uid, index, **kwargs)
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        path = out_dir / f"{index:03d}.dcm"
        write_file(ds, path)
        paths.append(path)
    return paths


def write_file(ds: Dataset, path: Path) -> None:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    ds.save_as(path, enforce_file_format=True)


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta group (what a C-STORE carries)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR: tag 4, VR 2, length 2, then the group length itself.
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


# --- listener ------------------------------------------------------------------------------


class Listener:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], port: int) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.port = port

    def associate(self, ae_title: str = CALLING_AET, called: str = AE_TITLE) -> Any:
        ae = AE(ae_title=ae_title)
        for sop_class in (Verification, CTImageStorage, MRImageStorage):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        return ae.associate("127.0.0.1", self.port, ae_title=called)

    def store(self, paths: list[Path], ae_title: str = CALLING_AET) -> list[int]:
        """Send files over one association; the C-STORE status of each."""
        assoc = self.associate(ae_title)
        assert assoc.is_established
        try:
            return [assoc.send_c_store(path).Status for path in paths]
        finally:
            assoc.release()

    def rows(self, model: type[Base]) -> list[Any]:
        with self.session_factory() as session:
            return list(session.scalars(select(model)))

    def count(self, model: type[Base]) -> int:
        with self.session_factory() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture(autouse=True)
def _send_files_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom streams a file's dataset bytes unchanged instead of decoding and re-encoding."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    servers: list[Any] = []
    engines: list[Any] = []

    def _start(**overrides: Any) -> Listener:
        values: dict[str, Any] = {
            "data_dir": tmp_path,
            "storage_dir": tmp_path / "storage",
            "database_url": f"sqlite:///{tmp_path / 'cttriage.sqlite'}",
            "ae_title": AE_TITLE,
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,  # the OS picks a free port
            "network_timeout": 10,
            "min_free_bytes": 0,
        }
        settings = Settings(**(values | overrides))
        session_factory = make_session_factory(settings)
        engines.append(session_factory.kw["bind"])
        Base.metadata.create_all(session_factory.kw["bind"])
        server = start_listener(settings, session_factory)
        servers.append(server)
        return Listener(settings, session_factory, server.server_address[1])

    yield _start
    for server in servers:
        server.shutdown()
    for engine in engines:
        engine.dispose()


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_series(tmp_path / "sent")


def storescu(listener: Listener, propose: str, paths: list[Path]) -> None:
    """Send with dcmtk, proposing only the given transfer syntax (and the uncompressed ones)."""
    done = subprocess.run(
        [STORESCU, "-R", propose, "-aet", "DCMTK", "-aec", AE_TITLE, "127.0.0.1", str(listener.port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def assert_stored(listener: Listener, paths: list[Path], transfer_syntax: str, calling_aet: str) -> None:
    """Each file is on disk with the sent dataset bytes, and recorded with its headers."""
    instances = {row.sop_instance_uid: row for row in listener.rows(Instance)}
    assert len(instances) == len(paths)
    for path in paths:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        row = instances[sent.SOPInstanceUID]
        stored_path = Path(row.path)
        assert stored_path.is_relative_to(listener.settings.storage_root)
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == transfer_syntax
        assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert dataset_bytes(stored_path) == dataset_bytes(path)
        assert row.transfer_syntax_uid == transfer_syntax
        assert row.size_bytes == stored_path.stat().st_size
        assert (row.source, row.calling_aet, row.receive_count) == ("dicom", calling_aet, 1)
        [header] = row.headers
        assert header["sop_instance_uid"] == sent.SOPInstanceUID and header["transfer_syntax_uid"] == transfer_syntax
        assert (header["rows"], header["position"]) == (64, list(map(float, sent.ImagePositionPatient)))
    [study] = listener.rows(Study)
    [series] = listener.rows(Series)
    assert study.study_uid == sent.StudyInstanceUID and study.instance_count == len(paths)
    assert (study.accession_number, study.study_date, study.patient_sex) == ("ACC1", "20240102", "F")
    assert series.series_uid == sent.SeriesInstanceUID and series.instance_count == len(paths)
    assert (series.modality, series.series_number) == ("CT", 3)


@pytest.mark.parametrize(("level", "bound"), [(logging.WARNING, False), (logging.INFO, True)])
def test_pynetdicom_logging_handlers_are_bound_only_where_they_log(level: int, bound: bool) -> None:
    """pynetdicom's standard handlers format every PDU and DIMSE message (and copy each data set)
    for its INFO and DEBUG lines: an acceptor association binds them only where those are logged,
    and its own handlers always."""
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)
    try:
        assoc = EventDrivenAssociation(AE(), MODE_ACCEPTOR)
    finally:
        logger.setLevel(before)
    try:
        for event, standard in ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                                (evt.EVT_PDU_SENT, standard_pdu_sent_handler)):
            handlers = cast(NotificationHandlers, assoc.get_handlers(event))
            assert (standard in [handler for handler, _ in handlers]) is bound
        assert assoc.get_handlers(evt.EVT_C_STORE) == (evt.get_default_handler(evt.EVT_C_STORE), None)
    finally:
        dul = cast(EventDrivenDUL, assoc.dul)  # EventDrivenAssociation makes its own DUL
        dul._wake_reader.close()
        dul._wake_writer.close()


@pytest.mark.parametrize(("level", "bound"), [(logging.WARNING, False), (logging.INFO, True)])
def test_associations_the_listener_accepts_bind_the_logging_handlers_only_where_they_log(
    level: int, bound: bool, start: Callable[..., Listener]
) -> None:
    """The server binds pynetdicom's standard handlers itself and hands its bindings to every
    association it accepts: unbinding them on the association alone would not keep them off."""
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)
    try:
        listener = start()
    finally:
        logger.setLevel(before)
    assoc = listener.associate()
    assert assoc.is_established
    try:
        [acceptor] = [t for t in threading.enumerate() if isinstance(t, EventDrivenAssociation)]
        for event, standard in ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                                (evt.EVT_PDU_SENT, standard_pdu_sent_handler)):
            handlers = cast(NotificationHandlers, acceptor.get_handlers(event))
            assert (standard in [handler for handler, _ in handlers]) is bound
        assert cast(InterventionHandler, acceptor.get_handlers(evt.EVT_C_STORE))[0].__name__ == "handle_store"
    finally:
        assoc.release()


def test_received_files_are_fsynced_on_the_listeners_syncer_threads(
    start: Callable[..., Listener], series: list[Path]
) -> None:
    """The listener hands each placed file's fsyncs to its syncer (``IncomingFile.place_if_new``)
    and records the instance meanwhile; the file is whole and recorded when success is answered."""
    listener = start()
    assert listener.store(series[:3]) == [0, 0, 0]
    assert any(t.name.startswith("dicom-fsync") for t in threading.enumerate())
    assert listener.count(Instance) == 3
    for row in listener.rows(Instance):
        assert Path(row.path).stat().st_size == row.size_bytes


@pytest.mark.parametrize("read_chunk", [WholeReadSocket.READ_CHUNK, 1000])
def test_a_pdu_is_read_whole_or_up_to_where_its_connection_closed(
    read_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PDU's body is read in as few calls as have data (growing past READ_CHUNK as it arrives,
    never sized by the length the peer states); a connection closed mid-PDU gives what came."""
    monkeypatch.setattr(WholeReadSocket, "READ_CHUNK", read_chunk)
    ours, peer = socket.socketpair()
    with ours, peer:
        events: queue.Queue[str] = queue.Queue()  # where pynetdicom's socket reports it is open
        sock = WholeReadSocket(SimpleNamespace(dul=SimpleNamespace(event_queue=events)),  # type: ignore[arg-type]
                               client_socket=ours)
        body = bytes(range(256)) * 40

        def send_in_pieces() -> None:
            for i in range(0, len(body), 999):
                peer.sendall(body[i:i + 999])

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        assert sock.recv(len(body)) == body
        sender.join()
        peer.sendall(body[:3000])
        peer.shutdown(socket.SHUT_WR)
        assert sock.recv(2**31) == body[:3000]  # a false length: what arrived, no 2 GiB buffer


# --- verification --------------------------------------------------------------------------


def test_echo_pynetdicom(start: Callable[..., Listener]) -> None:
    assoc = start().associate()
    assert assoc.is_established
    assert assoc.send_c_echo().Status == STATUS_SUCCESS
    assoc.release()


def test_echo_dcmtk(start: Callable[..., Listener]) -> None:
    listener_ = start()
    done = subprocess.run(
        [ECHOSCU, "-aet", CALLING_AET, "-aec", AE_TITLE, "127.0.0.1", str(listener_.port)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr


# --- storing -------------------------------------------------------------------------------


def test_store_series_pynetdicom(start: Callable[..., Listener], series: list[Path]) -> None:
    listener_ = start()
    assert listener_.store(series) == [STATUS_SUCCESS] * len(series)
    assert_stored(listener_, series, ExplicitVRLittleEndian, CALLING_AET)


@pytest.mark.parametrize(
    ("transfer_syntax", "propose"),
    [(ExplicitVRLittleEndian, "-xe"), (RLELossless, "-xr"), (JPEG2000Lossless, "-xv")],
    ids=["explicit-le", "rle", "j2k-lossless"],
)
def test_store_series_dcmtk(
    start: Callable[..., Listener], tmp_path: Path, transfer_syntax: str, propose: str
) -> None:
    listener_ = start()
    paths = write_series(tmp_path / "sent", transfer_syntax=transfer_syntax)
    storescu(listener_, propose, paths)
    assert_stored(listener_, paths, transfer_syntax, "DCMTK")


def test_deflated_dataset_is_kept_deflated(start: Callable[..., Listener], series: list[Path]) -> None:
    """dcmtk deflates on the fly; the stored file keeps the deflated bytes and reads back equal."""
    listener_ = start()
    storescu(listener_, "-xd", series[:1])
    [row] = listener_.rows(Instance)
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    stored, sent = pydicom.dcmread(row.path), pydicom.dcmread(series[0])
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.PixelData == sent.PixelData and stored.SOPInstanceUID == sent.SOPInstanceUID


def test_enhanced_ct_frames_are_described_from_a_partly_read_header(
    start: Callable[..., Listener], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A received header is read without its long elements (pixel data); an Enhanced CT's per-frame
    functional groups are such an element, read from the received buffer when described: every
    frame is recorded with its position."""
    spec = PhantomSpec(rows=16, columns=16, pixel_spacing=20.0, slices=60, slice_spacing=5.0)
    path = tmp_path / "enhanced.dcm"
    enhanced_dataset(phantom_volume(spec), spec).save_as(path, enforce_file_format=True)
    deferred: list[int] = []
    read_deferred = pydicom.filereader.read_deferred_data_element

    def reading_deferred(*args: Any) -> Any:
        deferred.append(args[-1].tag)
        return read_deferred(*args)

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", reading_deferred)
    listener_ = start()
    storescu(listener_, "-xe", [path])
    assert deferred == [0x52009230]  # PerFrameFunctionalGroupsSequence, when asked for; never the pixels
    [row] = listener_.rows(Instance)
    assert [h["frame"] for h in row.headers] == list(range(60))
    assert len({h["position"][2] for h in row.headers}) == 60
    assert dataset_bytes(Path(row.path)) == dataset_bytes(path)


def test_resend_is_idempotent(start: Callable[..., Listener], series: list[Path]) -> None:
    listener_ = start()
    assert listener_.store(series[:1]) == [STATUS_SUCCESS]
    assert listener_.store(series[:1]) == [STATUS_SUCCESS]
    [row] = listener_.rows(Instance)
    assert row.receive_count == 2
    [study] = listener_.rows(Study)
    assert study.instance_count == 1
    assert dataset_bytes(Path(row.path)) == dataset_bytes(series[0])


def test_non_ct_instance_is_stored(start: Callable[..., Listener], tmp_path: Path) -> None:
    listener_ = start()
    paths = write_series(tmp_path / "mr", 1, sop_class=MRImageStorage, modality="MR")
    assert listener_.store(paths) == [STATUS_SUCCESS]
    [row] = listener_.rows(Instance)
    assert row.sop_class_uid == MRImageStorage
    assert dataset_bytes(Path(row.path)) == dataset_bytes(paths[0])


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID"])
def test_missing_uid_cannot_be_understood(
    start: Callable[..., Listener], tmp_path: Path, series: list[Path], missing: str
) -> None:
    listener_ = start()
    ds = pydicom.dcmread(series[0])
    del ds[missing]
    bad = tmp_path / "bad.dcm"
    write_file(ds, bad)
    assert listener_.store([bad]) == [STATUS_CANNOT_UNDERSTAND]
    assert listener_.count(Instance) == 0
    [kept] = listener_.rows(QuarantinedFile)
    assert missing in kept.reason and kept.calling_aet == CALLING_AET
    assert Path(kept.path).read_bytes().endswith(dataset_bytes(bad))
    # the listener keeps serving the next association
    assert listener_.store(series) == [STATUS_SUCCESS] * len(series)


@pytest.mark.parametrize(("keyword", "value", "reason"), [
    # Over 64 characters is no UID: before, PostgreSQL's 64-character column made it 'retry later', forever.
    ("StudyInstanceUID", "1.2." + "9" * 70, "StudyInstanceUID longer than 64 characters"),
    # A header is stored per frame: 100,000 headers (or, at 10^8, all the listener's memory).
    ("NumberOfFrames", 100_000, "NumberOfFrames 100000 is more than the 10000 accepted"),
], ids=["overlong-uid", "countless-frames"])
def test_an_impossible_header_cannot_be_understood(
    start: Callable[..., Listener], tmp_path: Path, series: list[Path], keyword: str, value: object, reason: str
) -> None:
    """Refused for good and kept (0xC000, quarantine), never 'retry later' and never recorded."""
    listener_ = start()
    ds = pydicom.dcmread(series[0])
    setattr(ds, keyword, value)
    bad = tmp_path / "bad.dcm"
    write_file(ds, bad)
    assert listener_.store([bad]) == [STATUS_CANNOT_UNDERSTAND]
    assert listener_.count(Instance) == 0
    [kept] = listener_.rows(QuarantinedFile)
    assert reason in kept.reason
    # placed under its UID path before it was described, it went again: only the quarantine keeps it
    assert not list(listener_.settings.storage_root.rglob("*.dcm"))


def test_malformed_uids_never_share_a_file(start: Callable[..., Listener], tmp_path: Path, series: list[Path]) -> None:
    """Two instances whose UIDs differ only where a file name cannot follow ('/' and '_' both
    became '_') are two files; before, the second overwrote the first and both were answered success."""
    listener_ = start()
    sent = []
    for index, tail in enumerate(("4/5", "4_5")):
        ds = pydicom.dcmread(series[index])
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.{tail}"
        path = tmp_path / f"odd{index}.dcm"
        write_file(ds, path)
        sent.append(path)
    assert listener_.store(sent) == [STATUS_SUCCESS] * 2
    rows = {row.sop_instance_uid: row for row in listener_.rows(Instance)}
    assert len(rows) == 2 and len({row.path for row in rows.values()}) == 2
    for path in sent:
        stored = Path(rows[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID].path)
        assert stored.parent.parent.parent == listener_.settings.storage_root  # '/' made no folder
        assert dataset_bytes(stored) == dataset_bytes(path)


def test_undecodable_dataset_is_quarantined(start: Callable[..., Listener], tmp_path: Path) -> None:
    listener_ = start()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    good = tmp_path / "good.dcm"
    write_file(ds, good)
    # SOP Class UID with a VR that does not exist: pydicom cannot decode the element.
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes().replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00ZZ"))
    assert bad.read_bytes() != good.read_bytes()
    assert listener_.store([bad]) == [STATUS_CANNOT_UNDERSTAND]
    assert listener_.count(Instance) == 0
    [kept] = listener_.rows(QuarantinedFile)
    assert "decoded" in kept.reason
    assert Path(kept.path).read_bytes().endswith(dataset_bytes(bad))


def test_disk_full_is_out_of_resources(start: Callable[..., Listener], series: list[Path]) -> None:
    listener_ = start(min_free_bytes=2**62)
    assert listener_.store(series[:1]) == [STATUS_OUT_OF_RESOURCES]
    assert listener_.count(Instance) == listener_.count(Study) == 0
    assert not list(listener_.settings.storage_root.rglob("*.dcm"))


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failed_write_records_nothing(
    start: Callable[..., Listener], series: list[Path], monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A write refused at once (disk full) or a flush that fails after the record's statements ran
    (I/O error) answers out of resources, records nothing and leaves no file."""
    listener_ = start()

    def disk_full(*_args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def io_error(*_args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        if failing == "write":
            patch.setattr(storage, "_write_all", disk_full)
        else:
            patch.setattr(storage.os, "fsync", io_error)
        assert listener_.store(series[:1]) == [STATUS_OUT_OF_RESOURCES]
    assert listener_.count(Instance) == listener_.count(Study) == 0
    root = listener_.settings.storage_root
    assert not list(root.rglob("*.dcm")) and not list((root / storage.INCOMING_DIR).iterdir())
    assert listener_.store(series) == [STATUS_SUCCESS] * len(series)  # the retry succeeds
    assert listener_.count(Instance) == len(series)
    assert not list((root / storage.INCOMING_DIR).iterdir())  # every incoming file was placed


def test_database_unavailable_is_out_of_resources(start: Callable[..., Listener], series: list[Path]) -> None:
    listener_ = start()
    with listener_.session_factory.begin() as session:
        session.execute(text("DROP TABLE instances"))
    assert listener_.store(series[:1]) == [STATUS_OUT_OF_RESOURCES]
    assert listener_.count(Study) == 0  # the whole record was rolled back
    # the file, made durable under its name before the record's transaction, went with it
    root = listener_.settings.storage_root
    assert not list(root.rglob("*.dcm")) and not list((root / storage.INCOMING_DIR).iterdir())
    # the database comes back; the sender's retry is recorded
    Base.metadata.create_all(listener_.session_factory.kw["bind"])
    assert listener_.store(series) == [STATUS_SUCCESS] * len(series)
    assert listener_.count(Instance) == len(series)


def test_records_on_sqlite_wait_their_turn_at_the_write_gate(start: Callable[..., Listener],
                                                             series: list[Path]) -> None:
    """With SQLite, a record transaction queues on the gate beside the database (what another
    listener process would hold), not in SQLite's busy sleeps, and is answered once it is free."""
    listener_ = start()
    other_process = SqliteWriteGate(Path(listener_.session_factory.kw["bind"].url.database))
    statuses: list[int] = []
    with other_process.held():
        sender = threading.Thread(target=lambda: statuses.extend(listener_.store(series[:1])))
        sender.start()
        time.sleep(1.0)
        assert not statuses and listener_.count(Instance) == 0
    sender.join(10)
    other_process.close()
    assert statuses == [STATUS_SUCCESS] and listener_.count(Instance) == 1


def test_database_unreachable_is_out_of_resources(
    start: Callable[..., Listener], tmp_path: Path, series: list[Path]
) -> None:
    listener_ = start()
    listener_.session_factory.configure(
        bind=make_session_factory(Settings(database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite")).kw["bind"]
    )
    assert listener_.store(series[:1]) == [STATUS_OUT_OF_RESOURCES]


def test_unexpected_error_fails_and_keeps_serving(
    start: Callable[..., Listener],
    series: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener_ = start()

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError(f"boom {PATIENT_NAME}")

    with monkeypatch.context() as patch:
        patch.setattr(receive, "store_instance", broken)
        with caplog.at_level(logging.ERROR, logger=listener.__name__):
            assert listener_.store(series[:1]) == [STATUS_CANNOT_UNDERSTAND]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.error == "RuntimeError" and "broken" in record.stack  # type: ignore[attr-defined]
    assert PATIENT_NAME not in repr(record.__dict__)
    assert listener_.store(series) == [STATUS_SUCCESS] * len(series)


# --- association negotiation ---------------------------------------------------------------


def test_calling_aet_allow_list(start: Callable[..., Listener], series: list[Path]) -> None:
    listener_ = start(allowed_calling_aets=[CALLING_AET])
    assert listener_.associate(ae_title="INTRUDER").is_rejected
    assert listener_.store(series[:1], ae_title=CALLING_AET) == [STATUS_SUCCESS]


def test_wrong_called_aet_is_rejected(start: Callable[..., Listener]) -> None:
    assert start().associate(called="SOMEONE").is_rejected


# --- logging -------------------------------------------------------------------------------


def test_logs_carry_no_patient_data(
    start: Callable[..., Listener], tmp_path: Path, series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    listener_ = start()
    ds = pydicom.dcmread(series[0])
    del ds.StudyInstanceUID
    bad = tmp_path / "bad.dcm"
    write_file(ds, bad)
    with caplog.at_level(logging.DEBUG, logger=listener.__name__):
        assert listener_.store([*series, bad]) == [STATUS_SUCCESS] * len(series) + [STATUS_CANNOT_UNDERSTAND]
        # the per-association count is logged at info when the connection closes
        deadline = time.monotonic() + 5
        while not any(getattr(r, "stored", None) == len(series) for r in caplog.records):
            assert time.monotonic() < deadline, "no association summary logged"
            time.sleep(0.02)
    summary: Any = next(r for r in caplog.records if getattr(r, "stored", None) is not None)  # has the log's extras
    assert (summary.levelno, summary.failed, summary.calling_aet) == (logging.INFO, 1, CALLING_AET)
    for record in caplog.records:
        logged = repr(record.__dict__)
        for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE):
            assert secret not in logged

