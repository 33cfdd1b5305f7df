"""Offline scoring of DICOM folders and NIfTI files, without the service: the same pipeline a
worker runs, for a researcher scoring a whole dataset (`cttriage score PATH...`).
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from app.errors import TYPED_ERRORS
from app.series_selection import SeriesCriteria
from models.dicom_headers import SliceHeader, slice_headers
from models.predictor import Predictor
from models.volume import CtVolume
from worker.pipeline import score_study, score_volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CSV_FIELDS = ("source", "study_uid", "series_uid", "state", "reason", "identification", "severity",
              "severity_left", "severity_right", "lung_volume_left_ml", "lung_volume_right_ml", "method",
              "model_version", "seconds")


@dataclass(frozen=True)
class BatchRow:
    source: str
    study_uid: str
    series_uid: str | None
    state: str  # scored, rejected (the input says why) or failed (an error reading or scoring it)
    reason: str | None = None
    identification: float | None = None
    severity: float | None = None
    severity_left: float | None = None
    severity_right: float | None = None
    lung_volume_left_ml: float | None = None
    lung_volume_right_ml: float | None = None
    method: str | None = None
    model_version: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchItem:
    """One thing to score: a study found in a DICOM folder, or a NIfTI file."""

    source: str
    study_uid: str
    slices: list[SliceHeader] | None = None
    paths: dict[str, Path] | None = None
    nifti: Path | None = None


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def dicom_items(folder: Path) -> Iterator[BatchItem]:
    """Studies in a folder tree (any file names); unreadable files are skipped."""
    by_study: dict[str, tuple[list[SliceHeader], dict[str, Path]]] = defaultdict(lambda: ([], {}))
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not is_nifti(p)):
        try:
            ds = pydicom.dcmread(path, defer_size="1 KB")  # headers now, pixel data on demand
        except (InvalidDicomError, OSError, EOFError):
            continue
        if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        slices, paths = by_study[str(ds.StudyInstanceUID)]
        slices.extend(slice_headers(ds))
        paths[str(ds.SOPInstanceUID)] = path
    for study_uid, (slices, paths) in by_study.items():
        yield BatchItem(str(folder), study_uid, slices=slices, paths=paths)


def batch_items(paths: Iterable[Path]) -> list[BatchItem]:
    items: list[BatchItem] = []
    for path in paths:
        if path.is_dir():
            items.extend(dicom_items(path))
        elif is_nifti(path):
            items.append(BatchItem(str(path), path.name, nifti=path))
        else:
            items.extend(dicom_items(path.parent) if path.is_file() else [])
    return items


def nifti_volume(path: Path) -> CtVolume:
    from models.datasets import read_nifti  # nibabel only where NIfTI is scored

    hu, spacing = read_nifti(path)
    # Canonical axes point superior, posterior and to the patient's left (LPS z, y, x).
    return CtVolume(hu=np.asarray(hu, dtype=np.float32), spacing=spacing, origin=(0.0, 0.0, 0.0),
                    direction=((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)))


def score_item(item: BatchItem, predictor: Predictor, *, criteria: SeriesCriteria) -> BatchRow:
    start = time.perf_counter()
    try:
        if item.nifti is not None:
            score = score_volume(item.nifti.name, nifti_volume(item.nifti), predictor)
        else:
            assert item.slices is not None and item.paths is not None
            score = score_study(item.slices, item.paths, predictor, criteria=criteria)
    except TYPED_ERRORS as exc:
        return BatchRow(item.source, item.study_uid, None, "rejected", reason=str(exc),
                        seconds=round(time.perf_counter() - start, 2))
    except Exception as exc:
        return BatchRow(item.source, item.study_uid, None, "failed", reason=f"{type(exc).__name__}: {exc}",
                        seconds=round(time.perf_counter() - start, 2))
    sev = score.severity
    return BatchRow(item.source, item.study_uid, score.series_uid, "scored", None, score.identification,
                    float(sev.severity), float(sev.severity_left), float(sev.severity_right),
                    float(sev.lung_volume_left_ml), float(sev.lung_volume_right_ml), score.method,
                    score.model_version, round(time.perf_counter() - start, 2))


def score_all(items: Sequence[BatchItem], predictor: Predictor, *, criteria: SeriesCriteria,
              progress: Callable[[int, int, BatchItem], None] | None = None) -> list[BatchRow]:
    rows = []
    for i, item in enumerate(items):
        if progress is not None:
            progress(i, len(items), item)
        rows.append(score_item(item, predictor, criteria=criteria))
    if progress is not None and items:
        progress(len(items), len(items), items[-1])
    return rows


def write_csv(rows: Sequence[BatchRow], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({name: getattr(row, name) for name in CSV_FIELDS})


def format_table(rows: Sequence[BatchRow]) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{'source':<40} {'state':<9} {'sev%':>6} {'left%':>6} {'right%':>6} {'ident':>6} {'method':<12} reason"]
    for r in rows:
        lines.append(f"{r.source[-40:]:<40} {r.state:<9} {num(r.severity):>6} {num(r.severity_left):>6} "
                     f"{num(r.severity_right):>6} {num(r.identification, 2):>6} {r.method or '-':<12} {r.reason or ''}")
    return "\n".join(lines)
