"""Durable storage of received instances: atomic writes under paths keyed by sanitized UIDs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

from app.errors import StorageFullError, StorageWriteError

_UID_SAFE = re.compile(r"[^0-9A-Za-z.\-]")
#: A UID as PS3.5 9.1 writes it: digits in dot-separated components, at most 64 characters.
_UID_FORM = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64


def storage_name(uid: str) -> str:
    """The file or folder name that stands for ``uid`` under the storage root.

    A well-formed UID is its own name. Anything else comes from the network unchecked, so it is
    made safe (no '/', never '..') and given a hash of the original: two UIDs then never share a
    name (retention deletes whole study folders, and a shared file would be overwritten), and none
    can take the name of ``.incoming``, ``_derived`` or ``_quarantine``.
    """
    if len(uid) <= MAX_UID_LENGTH and _UID_FORM.fullmatch(uid):
        return uid
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{_UID_SAFE.sub('_', uid)[:40].strip('.')}~{digest}"


def instance_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    return root / storage_name(study_uid) / storage_name(series_uid) / f"{storage_name(sop_instance_uid)}.dcm"


#: Masks and pictures a scoring leaves, per study: ``<root>/_derived/<study>/job<id>/``.
DERIVED_DIR = "_derived"


def derived_study_dir(root: Path, study_uid: str) -> Path:
    return root / DERIVED_DIR / storage_name(study_uid)


def quarantine_path(root: Path) -> Path:
    """Somewhere unique for bytes that cannot be attached to a study."""
    return root / "_quarantine" / f"{uuid.uuid4().hex}.bin"


def ensure_free_space(root: Path, needed_bytes: int, min_free_bytes: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free - needed_bytes < min_free_bytes:
        raise StorageFullError(f"storage has {free // 2**20} MiB free, below the {min_free_bytes // 2**20} MiB floor")


#: Where received bytes are written before they get their UID path (same file system, so the
#: move is a rename).
INCOMING_DIR = ".incoming"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync it, rename over the target and fsync the folder.

    After this returns the bytes survive a crash or power loss, so only then may a C-STORE
    be answered with success.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        _make_dirs_durable(path.parent)
        _write_synced(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _storage_error(exc) from exc


class IncomingFile:
    """Received bytes on their way into storage, flushed to disk while the caller does other work.

    The bytes go into a temp file under ``<root>/.incoming`` at once, and the kernel is told to
    start writing them out without waiting (``posix_fadvise(DONTNEED)`` starts the writeback of
    dirty pages on Linux; PostgreSQL flushes its files the same way where ``sync_file_range`` is
    missing). The caller then reads the header while the disk works. :meth:`place_if_new` gives
    the bytes their UID path and fsyncs them and that folder, on a ``syncer`` thread if given
    (the fsync is mostly the journal's commit, a wait no earlier writeback shortens) while the
    caller records the instance, which :meth:`wait_durable` ends before the commit; a re-send
    goes through :meth:`replace_existing` instead. :meth:`keep` marks the bytes as committed. When
    the ``with`` block ends, bytes not kept are removed again, so a failed record leaves no file
    without a row.

    The write itself stays on the caller's thread: one handed the write would wait for the GIL
    while the caller decodes headers. A syncer thread needs the GIL only to start its fsyncs,
    which release it at once; the caller hands it over right after placing
    (``app.receive._place_early``), or its database statements do.
    Raises StorageFullError or StorageWriteError.
    """

    def __init__(self, root: Path, *parts: bytes, min_free_bytes: int) -> None:
        """Write ``parts`` one after another (a file's header and its data set need no joining)."""
        self.size = sum(len(part) for part in parts)
        self._tmp = root / INCOMING_DIR / f"{uuid.uuid4().hex}.tmp"
        self._fd: int | None = None  # open until placed (or handed to a syncer) or discarded
        self._placed: tuple[Path, int] | None = None  # path and inode of a file placed where none was
        self._syncing: Future[None] | None = None  # the placed file's fsyncs, running on a syncer
        self._kept = False
        try:
            # Inside the try: a storage volume that is gone or failing (EIO, a stale NFS handle) is a
            # reason to retry later (out of resources), not a dataset we cannot understand.
            ensure_free_space(root, self.size, min_free_bytes)
            _make_dirs_durable(self._tmp.parent)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            _write_all(self._fd, parts)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            self.discard()
            raise _storage_error(exc) from exc

    def place(self, path: Path) -> None:
        """Make the bytes durable under ``path``, a new name or a re-send's replacement."""
        if not self.place_if_new(path):
            self.replace_existing(path)

    def place_if_new(self, path: Path, syncer: Executor | None = None) -> bool:
        """Make the bytes durable under ``path`` if nothing has that name yet (True); False leaves
        them for :meth:`replace_existing` (a re-send). Raises StorageFullError or StorageWriteError.

        A new name first, then one fsync: on a journalling file system it commits the link with
        the data, and the folder's fsync after it finds little left to do. Nothing points at the
        new name before the record commits (a crash before leaves only an unrecorded file that a
        re-send replaces), so it can be placed before the record is written; a record that fails
        removes it (:meth:`discard`).

        With ``syncer`` the two fsyncs run there and this returns once the name is given: the
        caller writes its record meanwhile (the disk's wait, about a millisecond per instance, no
        longer adds to the CPU's) and calls :meth:`wait_durable` before it commits."""
        if self._fd is None:
            raise RuntimeError("the incoming file was already placed or discarded")
        try:
            _make_dirs_durable(path.parent)
            inode = os.fstat(self._fd).st_ino
            if not _link_if_absent(self._tmp, path):
                return False
            self._placed = (path, inode)
            if syncer is None:
                fd, self._fd = self._fd, None
                _sync_placed(fd, path.parent)
            else:  # the syncer closes the file: once it has it, this no longer does
                self._syncing = syncer.submit(_sync_placed, self._fd, path.parent)
                self._fd = None
        except OSError as exc:
            raise _storage_error(exc) from exc
        return True

    @property
    def placed_at(self) -> Path | None:
        """Where :meth:`place_if_new` gave the bytes a new name, if it did."""
        return None if self._placed is None else self._placed[0]

    def wait_durable(self) -> None:
        """Until the placed bytes and their name are on disk (at once unless a syncer has them).
        Raises StorageWriteError (or StorageFullError) as the fsyncs did."""
        syncing, self._syncing = self._syncing, None
        if syncing is None:
            return
        try:
            syncing.result()
        except OSError as exc:
            raise _storage_error(exc) from exc

    def replace_existing(self, path: Path) -> None:
        """Put the bytes in place of the file at ``path`` (a re-send: a committed row may point
        there, so they must be durable before they replace the ones it points at). Raises
        StorageFullError or StorageWriteError."""
        if self._fd is None:
            raise RuntimeError("the incoming file was already placed or discarded")
        try:
            fd, self._fd = self._fd, None
            _fsync_and_close(fd)
            os.replace(self._tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def keep(self) -> None:
        """The record is committed: leave the placed file when the ``with`` block ends."""
        self._kept = True

    def discard(self) -> None:
        """Remove the bytes unless kept: the temp file, or the file placed where none was before.

        The inode check spares a concurrent re-send of the same instance placed over ours since.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._kept:
            return
        with contextlib.suppress(Exception):  # the fsyncs' outcome no longer matters: it goes
            self.wait_durable()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)
        if self._placed is not None:
            path, inode = self._placed
            with contextlib.suppress(OSError):
                if path.stat().st_ino == inode:
                    path.unlink()

    def __enter__(self) -> IncomingFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.discard()


def remove_abandoned_incoming(root: Path, older_than_seconds: float, now: float | None = None) -> int:
    """Delete incoming files left by a process that died mid-write; none was ever answered with
    success or recorded. Returns how many went."""
    cutoff = (time.time() if now is None else now) - older_than_seconds
    removed = 0
    for path in (root / INCOMING_DIR).glob("*.tmp"):
        with contextlib.suppress(OSError):  # placed or removed meanwhile
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


def _link_if_absent(tmp: Path, path: Path) -> bool:
    """Give ``tmp`` the name ``path`` only if nothing has it yet, atomically (a hard link, then the
    temp name goes): of two associations placing the same new instance at once, exactly one is
    told it placed a new file, so a failed record of the other never removes it. False: ``path``
    exists, or the file system has no hard links (then ``path`` is taken as existing)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            return False
        raise
    os.unlink(tmp)
    return True


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, (data,))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write every part, in order, in as few calls as the kernel allows."""
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _storage_error(exc: OSError) -> StorageFullError | StorageWriteError:
    if exc.errno == errno.ENOSPC:
        return StorageFullError(f"storage full while writing an instance: {exc.strerror}")
    return StorageWriteError(f"could not write an instance: {exc.strerror}")


def _sync_placed(fd: int, folder: Path) -> None:
    """fsync a placed file (closing it), then the folder holding its name."""
    _fsync_and_close(fd)
    _fsync_dir(folder)


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
