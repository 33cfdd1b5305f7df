"""Storage lifecycle: files go after the retention period, only for scored or rejected studies."""

from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Instance, Study, StudyState, utcnow
from app.db.session import make_engine
from app.dicom import storage
from app.dicom.storage import (
    INCOMING_DIR,
    IncomingFile,
    derived_study_dir,
    instance_path,
    remove_abandoned_incoming,
    storage_name,
    write_atomic,
)
from app.errors import StorageWriteError
from app.ingest import ReceivedInstance, quarantine_bytes, store_instance
from app.lifecycle import queue_settled_studies
from app.retention import purge_expired_studies
from app.settings import Settings
from worker.jobs import study_slices


def make_study(factory: sessionmaker[Session], root: Path, uid: str, state: StudyState, age_days: float) -> Path:
    when = utcnow() - timedelta(days=age_days)
    path = instance_path(root, uid, f"{uid}.1", f"{uid}.1.1")
    write_atomic(path, b"DICM")
    with factory.begin() as session:
        session.add(Study(study_uid=uid, state=state.value, first_received_at=when, last_received_at=when,
                          scored_at=when if state is StudyState.scored else None))
    return path


def test_purges_only_finished_studies_past_retention(sqlite_settings: Settings,
                                                     sqlite_factory: sessionmaker[Session]) -> None:
    root = sqlite_settings.storage_root
    old_scored = make_study(sqlite_factory, root, "1.1", StudyState.scored, 40)
    old_rejected = make_study(sqlite_factory, root, "1.2", StudyState.rejected, 40)
    old_failed = make_study(sqlite_factory, root, "1.3", StudyState.failed, 40)
    young_scored = make_study(sqlite_factory, root, "1.4", StudyState.scored, 5)
    old_receiving = make_study(sqlite_factory, root, "1.5", StudyState.receiving, 40)

    masks = derived_study_dir(root, "1.1") / "job1" / "masks.npz"  # what the scoring of 1.1 left
    young_masks = derived_study_dir(root, "1.4") / "job2" / "masks.npz"
    for path in (masks, young_masks):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"HU volume")

    assert purge_expired_studies(sqlite_factory, root, retention_days=30) == 2
    assert not old_scored.exists() and not old_rejected.exists()
    assert not derived_study_dir(root, "1.1").exists()  # the masks hold the CT: they go too
    assert old_failed.exists() and young_scored.exists() and old_receiving.exists() and young_masks.exists()
    with sqlite_factory() as session:
        purged = session.execute(select(Study.study_uid).where(Study.files_purged_at.is_not(None))).scalars().all()
    assert sorted(purged) == ["1.1", "1.2"]
    assert purge_expired_studies(sqlite_factory, root, retention_days=30) == 0  # once


def test_abandoned_incoming_files_are_removed(tmp_path: Path) -> None:
    """A process killed mid-write leaves its incoming file; only old ones go (a live write is young)."""
    incoming = tmp_path / INCOMING_DIR
    incoming.mkdir()
    old, young = incoming / "old.tmp", incoming / "young.tmp"
    old.write_bytes(b"DICM")
    young.write_bytes(b"DICM")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_abandoned_incoming(tmp_path, older_than_seconds=3600) == 1
    assert not old.exists() and young.exists()
    assert remove_abandoned_incoming(tmp_path / "nowhere", older_than_seconds=3600) == 0


def test_incoming_file_is_kept_only_once_recorded(tmp_path: Path) -> None:
    """Bytes placed but never kept (the record's commit failed) go again with the ``with`` block,
    unless they replaced a file a committed row already points at (a re-send)."""
    path = instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.4")
    with IncomingFile(tmp_path, b"DICM first", min_free_bytes=0) as incoming:
        incoming.place(path)
        assert path.read_bytes() == b"DICM first"
    assert not path.exists()  # not kept: removed

    with IncomingFile(tmp_path, b"DICM first", min_free_bytes=0) as incoming:
        incoming.place(path)
        incoming.keep()
    with IncomingFile(tmp_path, b"DICM again", min_free_bytes=0) as incoming:
        incoming.place(path)  # a re-send whose record then fails
    assert path.read_bytes() == b"DICM again"  # the committed row still has its file
    assert not list((tmp_path / INCOMING_DIR).iterdir())

    # Two associations deliver the same new instance at once: only the first to place it owns the
    # new file, so the other's failed record cannot take away a file whose row was committed.
    other = instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.5")
    first = IncomingFile(tmp_path, b"DICM from A", min_free_bytes=0)
    second = IncomingFile(tmp_path, b"DICM from B", min_free_bytes=0)
    first.place(other)
    second.place(other)  # exists by now: a replacement, not a new file
    second.discard()  # B's record failed
    first.keep()  # A's record committed
    first.discard()
    assert other.read_bytes() == b"DICM from B"
    first = IncomingFile(tmp_path, b"DICM from A", min_free_bytes=0)
    other.unlink()
    first.place(other)
    first.discard()  # no one recorded it: the file it placed goes
    assert not other.exists()

    with IncomingFile(tmp_path, b"DICM never placed", min_free_bytes=0):
        assert len(list((tmp_path / INCOMING_DIR).iterdir())) == 1
    assert not list((tmp_path / INCOMING_DIR).iterdir())


def test_an_incoming_file_is_its_parts_in_order_whatever_each_write_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A received file is written as its header and data set, unjoined; a write the kernel cuts
    short is resumed where it stopped."""
    parts = (b"\x00" * 128 + b"DICM", bytes(range(256)) * 40, b"", b"tail")
    writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return writev(fd, [buffers[0][:100]])  # never more than 100 bytes of the first buffer

    monkeypatch.setattr(os, "writev", short_writev)
    path = tmp_path / "placed.dcm"
    with IncomingFile(tmp_path, *parts, min_free_bytes=0) as incoming:
        assert incoming.size == sum(map(len, parts))
        incoming.place(path)
        incoming.keep()
    assert path.read_bytes() == b"".join(parts)
    assert len(calls) > len(parts) and calls[0] == 3  # the empty part is never handed over


def _received(study: str, sop: str) -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=study, series_uid=f"{study}.1", sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", series_number=1, series_description=None,
        accession_number=None, study_date=None, study_description=None, patient_age=None, patient_sex=None,
        headers=[])


def test_a_record_commits_only_once_its_file_synced_on_the_syncer_is_durable(
    sqlite_settings: Settings, sqlite_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener fsyncs a received file on a syncer thread while the record's statements run;
    the commit waits for that fsync, so no committed row ever points at a file not yet durable."""
    root = sqlite_settings.storage_root
    synced = threading.Event()
    release = threading.Event()
    sync_placed = storage._sync_placed

    def slow_sync(fd: int, folder: Path) -> None:
        release.wait(10)
        sync_placed(fd, folder)
        synced.set()

    monkeypatch.setattr(storage, "_sync_placed", slow_sync)

    def rows() -> int:
        with sqlite_factory() as session:
            return session.execute(select(func.count()).select_from(Instance)).scalar_one()

    stored: list[object] = []
    with ThreadPoolExecutor(2) as syncer:
        def receive() -> None:
            with IncomingFile(root, b"DICM synced", min_free_bytes=0) as incoming:
                stored.append(store_instance(incoming, _received("1.8", "1.8.1.1"), storage_root=root,
                                             session_factory=sqlite_factory, source="test", calling_aet=None,
                                             syncer=syncer))

        receiver = threading.Thread(target=receive)
        receiver.start()
        time.sleep(0.5)  # the statements ran long since; the fsync is held back
        assert receiver.is_alive() and rows() == 0 and not stored
        release.set()
        receiver.join(10)
    assert synced.is_set() and rows() == 1 and len(stored) == 1
    assert instance_path(root, "1.8", "1.8.1", "1.8.1.1").read_bytes() == b"DICM synced"


def test_an_fsync_that_fails_on_the_syncer_fails_the_receive_and_leaves_nothing(
    sqlite_settings: Settings, sqlite_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error in the syncer's fsync is the receive's StorageWriteError (the sender retries):
    nothing is recorded and the placed file goes again."""
    root = sqlite_settings.storage_root

    def failing_sync(fd: int, folder: Path) -> None:
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage, "_sync_placed", failing_sync)
    with ThreadPoolExecutor(1) as syncer, pytest.raises(StorageWriteError, match="Input/output error"):
        with IncomingFile(root, b"DICM lost", min_free_bytes=0) as incoming:
            store_instance(incoming, _received("1.9", "1.9.1.1"), storage_root=root, session_factory=sqlite_factory,
                           source="test", calling_aet=None, syncer=syncer)
    with sqlite_factory() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
    assert not instance_path(root, "1.9", "1.9.1", "1.9.1.1").exists()
    assert not list((root / INCOMING_DIR).iterdir())


def test_storage_names_are_unique_and_stay_in_their_folder() -> None:
    """Retention deletes a study's folder: no two UIDs may share one, nor take a reserved name."""
    assert storage_name("1.2.840.113619.2.55.3") == "1.2.840.113619.2.55.3"  # well-formed: itself
    odd = ["1.2/3", "1.2_3", "1.2 3", "..", ".", "", "_derived", "_quarantine", ".incoming",
           "1." + "2" * 70, "1." + "2" * 70 + "3", "../../etc"]
    names = [storage_name(uid) for uid in odd]
    assert len(set(names)) == len(odd)
    assert not {"_derived", "_quarantine", ".incoming", "1.2_3", ".", ".."} & set(names)
    for name in names:
        assert "/" not in name and name.strip(".") and len(name) <= 64


def test_a_storage_root_that_fails_is_retried_later(tmp_path: Path) -> None:
    """A storage volume that is gone or failing answers 'out of resources' (the PACS retries), not
    'cannot understand' (it gives up): the free-space check's own errors included."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    with pytest.raises(StorageWriteError):
        IncomingFile(blocker / "storage", b"DICM", min_free_bytes=0)


def test_a_study_sent_again_after_its_files_were_purged_is_kept_and_scored_anew(
    sqlite_settings: Settings, sqlite_factory: sessionmaker[Session]
) -> None:
    """Retention removed the files (and the instance rows indexing them); a month later the PACS
    sends the study again. Before, the re-sends only counted up on rows whose files were gone:
    nothing was rescored and the new files were never purged again."""
    root = sqlite_settings.storage_root

    def send(sop: str, when: datetime) -> None:
        with IncomingFile(root, b"DICM " + sop.encode(), min_free_bytes=0) as incoming:
            store_instance(incoming, _received("1.7", sop), storage_root=root, session_factory=sqlite_factory,
                           source="test", calling_aet=None)
        with sqlite_factory.begin() as session:  # as if received then
            session.execute(update(Study).values(last_received_at=when))

    old = utcnow() - timedelta(days=40)
    send("1.7.1.1", old)
    send("1.7.1.2", old)
    with sqlite_factory.begin() as session:
        session.execute(update(Study).values(state=StudyState.scored.value, scored_at=old))
    first_file = instance_path(root, "1.7", "1.7.1", "1.7.1.1")
    assert first_file.exists()

    assert purge_expired_studies(sqlite_factory, root, retention_days=30) == 1
    assert not first_file.exists()
    with sqlite_factory() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.files_purged_at is not None and study.instance_count == 0
        assert session.execute(select(func.count()).select_from(Instance)).scalar() == 0
        version = study.version

    send("1.7.1.1", utcnow())  # sent again
    with sqlite_factory() as session:
        study = session.execute(select(Study)).scalar_one()
        assert (study.state, study.version, study.instance_count) == (StudyState.receiving.value, version + 1, 1)
        assert study.files_purged_at is None
    [job_id] = queue_settled_studies(sqlite_factory, 0.0, now=utcnow() + timedelta(seconds=5))
    with sqlite_factory() as session:
        study_id = session.execute(select(Study.id)).scalar_one()
    _slices, paths = study_slices(sqlite_factory, study_id)
    assert list(paths) == ["1.7.1.1"] and paths["1.7.1.1"].read_bytes() == b"DICM 1.7.1.1"

    with sqlite_factory.begin() as session:  # scored again, and in time purged again
        session.execute(update(Study).values(state=StudyState.scored.value, scored_at=old, last_received_at=old))
    assert purge_expired_studies(sqlite_factory, root, retention_days=30) == 1
    assert not first_file.exists()
    assert job_id > 0


def test_a_study_rescored_during_the_purge_pass_keeps_its_files(
    sqlite_settings: Settings, sqlite_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = sqlite_settings.storage_root
    path = make_study(sqlite_factory, root, "1.8", StudyState.scored, 40)
    real_begin = sqlite_factory.begin

    def rescored_first() -> object:  # between the pass's read and its claim, a rescore finishes
        with real_begin() as session:
            session.execute(update(Study).values(scored_at=utcnow()))
        return real_begin()

    monkeypatch.setattr(sqlite_factory, "begin", rescored_first)
    assert purge_expired_studies(sqlite_factory, root, retention_days=30) == 0
    assert path.exists()


def test_bytes_kept_for_an_admin_go_again_when_their_row_cannot_be_written(tmp_path: Path) -> None:
    """A quarantined file without its row is shown nowhere and removed by nothing."""
    unreachable = sessionmaker(make_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'db.sqlite'}"))
    with pytest.raises(OperationalError):
        quarantine_bytes(b"not DICOM", "not a DICOM file", storage_root=tmp_path / "storage", min_free_bytes=0,
                         session_factory=unreachable, source="test")
    assert not list((tmp_path / "storage" / "_quarantine").iterdir())
