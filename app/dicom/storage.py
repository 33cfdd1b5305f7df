"""Durable storage of received instances: atomic writes under paths keyed by sanitized UIDs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path

from app.errors import StorageFullError, StorageWriteError

_UID_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def sanitize_uid(uid: str) -> str:
    """UIDs come from the network: keep them from escaping the storage root or naming '..'."""
    cleaned = _UID_SAFE.sub("_", uid.strip())[:64].strip(".")
    return cleaned or "_"


def instance_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    return root / sanitize_uid(study_uid) / sanitize_uid(series_uid) / f"{sanitize_uid(sop_instance_uid)}.dcm"


def quarantine_path(root: Path) -> Path:
    """Somewhere unique for bytes that cannot be attached to a study."""
    return root / "_quarantine" / f"{uuid.uuid4().hex}.bin"


def ensure_free_space(root: Path, needed_bytes: int, min_free_bytes: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free - needed_bytes < min_free_bytes:
        raise StorageFullError(f"storage has {free // 2**20} MiB free, below the {min_free_bytes // 2**20} MiB floor")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync it, rename over the target and fsync the folder.

    After this returns the bytes survive a crash or power loss, so only then may a C-STORE
    be answered with success.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        _make_dirs_durable(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise StorageFullError(f"storage full while writing an instance: {exc.strerror}") from exc
        raise StorageWriteError(f"could not write an instance: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _make_dirs_durable(directory: Path) -> None:
    """``mkdir -p`` that also fsyncs the parent of each folder it finds missing.

    The rename is only durable once every folder above it is: a new study or series folder
    whose entry was still in the page cache would lose the file with it after a crash.
    """
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another association made it; its entry may not be synced yet
            pass
        _fsync_dir(folder.parent)
