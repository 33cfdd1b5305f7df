"""Issue 12 items 1 and 5: association limits and timeouts, size limits, quarantine retention/quota."""

from __future__ import annotations

import io
import socket
import threading
import time
import zipfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.counters import ASSOCIATIONS_REFUSED, INSTANCES_TOO_LARGE, read_counts
from app.db.models import Instance, QuarantinedFile, utcnow
from app.errors import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from app.ingest import quarantine_bytes
from app.retention import purge_expired_quarantine
from tests.test_admin import Setup, migrated_sqlite, setup  # noqa: F401 - the fixtures
from tests.test_dicom_listener import (  # noqa: F401 - the fixtures
    Listener,
    _send_files_as_is,
    ct_slice,
    start,
    write_file,
    write_series,
)

pytestmark = pytest.mark.timeout(120)


def _counts(listener: Listener, name: str) -> dict[str, int]:
    with listener.session_factory() as session:
        return read_counts(session).get(name, {})


def _wait_for(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_silent_and_idle_connections_are_dropped_and_others_served(
        start: Callable[..., Listener], tmp_path: Path) -> None:  # noqa: F811
    listener = start(dicom_max_associations=4, dicom_max_associations_per_peer=4, dicom_acse_timeout=1.5,
                     network_timeout=2)
    silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
    idle = [listener.associate() for _ in range(2)]
    assert all(a.is_established for a in idle)
    # Every slot is held: the well-behaved sender is served as soon as the timeouts free one.
    began = time.monotonic()
    for conn in silent:
        conn.settimeout(5)
        assert conn.recv(1) == b""  # closed by us
    assert time.monotonic() - began < 4
    assert listener.store(write_series(tmp_path / "a", 2)) == [STATUS_SUCCESS] * 2
    assert _wait_for(lambda: all(not a.is_alive() for a in idle), 6)  # aborted after network_timeout
    for conn in silent:
        conn.close()


def test_fifty_concurrent_senders_all_served(start: Callable[..., Listener],  # noqa: F811
        tmp_path: Path) -> None:
    listener = start(dicom_max_associations=64, dicom_max_associations_per_peer=64)
    statuses: list[list[int]] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        result = listener.store(write_series(tmp_path / f"s{index}", 1))
        with lock:
            statuses.append(result)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [[STATUS_SUCCESS]] * 50
    assert listener.count(Instance) == 50


def test_per_peer_limit_refuses_and_counts(start: Callable[..., Listener],  # noqa: F811
        tmp_path: Path) -> None:
    listener = start(dicom_max_associations=10, dicom_max_associations_per_peer=2)
    held = [listener.associate() for _ in range(2)]
    assert all(a.is_established for a in held)
    refused = listener.associate()
    assert not refused.is_established
    for assoc in held:
        assoc.release()
    assert _wait_for(lambda: _counts(listener, ASSOCIATIONS_REFUSED).get("max_associations_per_peer") == 1, 6)
    assert listener.store(write_series(tmp_path / "after", 1)) == [STATUS_SUCCESS]


def test_oversize_instance_answered_a700_and_not_kept(start: Callable[..., Listener],  # noqa: F811
        tmp_path: Path) -> None:
    listener = start(max_instance_bytes=1024 * 1024, max_pdu=16384)
    big = ct_slice("1.2.3.4", "1.2.3.4.5", 0)
    big.Rows = big.Columns = 1600  # 5 MB of pixels against a 1 MB limit
    big.PixelData = bytes(1600 * 1600 * 2)
    path = tmp_path / "big.dcm"
    write_file(big, path)
    small = write_series(tmp_path / "small", 1)
    assert listener.store([path, *small]) == [STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS]
    assert listener.count(Instance) == 1
    assert listener.count(QuarantinedFile) == 0
    assert _wait_for(lambda: _counts(listener, INSTANCES_TOO_LARGE).get("dicom") == 1, 6)


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_upload_size_limits_answer_413(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    setup.settings.max_instance_bytes = 1024 * 1024
    setup.settings.max_zip_unpacked_bytes = 2 * 1024 * 1024
    with setup.factory() as session:
        quarantined = len(session.scalars(select(QuarantinedFile)).all())
    bomb = _zip({f"{i}.dcm": bytes(1024 * 1024) for i in range(3)})  # tiny zip, 3 MB unpacked
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", ("bomb.zip", bomb, "application/zip"))])
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", ("big.dcm", bytes(2 * 1024 * 1024), "application/dicom"))])
    assert response.status_code == 413, response.text
    with setup.factory() as session:
        assert len(session.scalars(select(QuarantinedFile)).all()) == quarantined  # nothing of it kept
        assert read_counts(session)[INSTANCES_TOO_LARGE]["upload"] == 2


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_quarantine_quota_and_retention(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    with setup.factory() as session:
        held = sum(r.size_bytes for r in session.scalars(select(QuarantinedFile)) if r.path)
    kept = quarantine_bytes(b"x" * 1000, "bad", storage_root=setup.settings.storage_root, min_free_bytes=0,
                            session_factory=setup.factory, source="upload", max_total_bytes=held + 1500)
    dropped = quarantine_bytes(b"y" * 1000, "bad", storage_root=setup.settings.storage_root, min_free_bytes=0,
                               session_factory=setup.factory, source="upload", max_total_bytes=held + 1500)
    with setup.factory() as session:
        rows = {r.id: r for r in session.scalars(select(QuarantinedFile))}
    assert Path(rows[kept].path).is_file()
    assert rows[dropped].path == "" and "quota" in rows[dropped].reason and rows[dropped].size_bytes == 1000
    assert purge_expired_quarantine(setup.factory, 30) == 0
    assert purge_expired_quarantine(setup.factory, 30, now=utcnow() + timedelta(days=31)) >= 2
    assert not Path(rows[kept].path).exists()
    with setup.factory() as session:
        assert session.scalars(select(QuarantinedFile)).all() == []
