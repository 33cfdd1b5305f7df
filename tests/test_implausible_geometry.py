"""Implausible geometry is rejected from the headers, before any pixel is loaded, with its own
reason code, at once and with little memory; never an out-of-memory retry (issue 12, item 4)."""

from __future__ import annotations

import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Study, StudyState, utcnow
from app.lifecycle import queue_settled_studies
from app.series_selection import SeriesCriteria, select_series
from app.settings import Settings
from models.errors import (
    ImplausibleMatrixError,
    ImplausiblePixelSpacingError,
    ImplausibleSliceSpacingError,
    NoUsableSeriesError,
    VolumeTooLargeError,
)
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from models.volume import CtVolume
from tests.conftest import store_study_files
from tests.test_series_selection import decision, series
from worker.jobs import run_job
from worker.pipeline import check_scoring_grid

#: Generous bounds: the 25 mm study once took 6.2 GB and 116 s.
MAX_SECONDS = 1.0
MAX_TRACED_BYTES = 64 * 2**20


@pytest.mark.parametrize("spacing", ["25", "1e6", "0", "-1"])
def test_small_study_with_implausible_pixel_spacing_is_rejected_at_once(
    spacing: str, tmp_path: Path, sqlite_settings: Settings, sqlite_factory: sessionmaker[Session]
) -> None:
    folder = tmp_path / "study"
    truth = write_phantom(folder, PhantomSpec(slices=40, rows=64, columns=64, pixel_spacing=6.0, slice_spacing=5.0))
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [spacing, spacing]
        ds.save_as(path)
    store_study_files(sqlite_settings, sqlite_factory, folder)
    [job_id] = queue_settled_studies(sqlite_factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))

    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = run_job(job_id, sqlite_factory, sqlite_settings, worker="w")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert outcome.status == "rejected", outcome
    with sqlite_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == truth["study_instance_uid"])).one()
    assert (study.state, study.reason_code) == (StudyState.rejected.value, "ImplausiblePixelSpacingError")
    assert study.reason is not None and "PixelSpacing" in study.reason and "outside 0.1-12 mm" in study.reason
    assert elapsed < MAX_SECONDS, elapsed
    assert peak < MAX_TRACED_BYTES, peak


def test_a_good_series_is_still_chosen_beside_an_implausible_one() -> None:
    sel = select_series(series(2, pixel_spacing=(25.0, 25.0)) + series(3, 60, 5.0))
    assert sel.chosen == "1.2.840.3"
    assert decision(sel, 2).reason == "PixelSpacing 25\\25 mm, outside 0.1-12 mm"


@pytest.mark.parametrize(
    ("headers", "error", "reason"),
    [
        (series(2, rows=4096), ImplausibleMatrixError, "4096x512 pixels (Rows x Columns), outside 16-2048"),
        (series(2, columns=8), ImplausibleMatrixError, "512x8 pixels (Rows x Columns), outside 16-2048"),
        (series(2, pixel_spacing=(0.7, float("nan"))), ImplausiblePixelSpacingError,
         "PixelSpacing 0.7\\nan mm, outside 0.1-12 mm"),
        (series(2, n=40, spacing=0.05), ImplausibleSliceSpacingError,
         "slices 0.05 mm apart, less than the 0.1 mm of any CT"),
    ],
)
def test_each_implausible_fact_has_its_own_reason_code(headers, error, reason) -> None:  # type: ignore[no-untyped-def]
    sel = select_series(headers + series(3, modality="SR"))  # another series rejected for another reason
    assert decision(sel, 2).reason == reason
    with pytest.raises(error) as raised:
        sel.require()
    assert reason in str(raised.value) and "modality SR is not CT" in str(raised.value)


def test_voxel_limits_are_configurable_and_name_their_setting() -> None:
    headers = series(2, 200, 1.5)  # 200 x 512 x 512 at 0.7 mm: 52 M stored, 200 x 180 x 180 scoring
    assert select_series(headers).chosen == "1.2.840.2"
    sel = select_series(headers, SeriesCriteria(max_scoring_voxels=1_000_000))
    with pytest.raises(VolumeTooLargeError, match="6,480,000 voxels on the 2 mm scoring grid .*CTTRIAGE_MAX_SCORING"):
        sel.require()
    sel = select_series(headers, SeriesCriteria(max_volume_voxels=50_000_000))
    with pytest.raises(VolumeTooLargeError, match="200 x 512 x 512 = 52,428,800 voxels, more than the 50,000,000"):
        sel.require()
    with pytest.raises(NoUsableSeriesError):  # nothing implausible: the plain reason code
        select_series(series(2, 20, 1.5)).require()


def test_a_loaded_volume_is_checked_before_resampling() -> None:
    volume = CtVolume(np.zeros((4, 16, 16), dtype=np.float32), (5.0, 1e6, 1e6), (0.0, 0.0, 0.0),
                      ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)))
    with pytest.raises(ImplausiblePixelSpacingError, match="in-plane spacing 1e\\+06 x 1e\\+06 mm"):
        check_scoring_grid(volume, SeriesCriteria())
    with pytest.raises(VolumeTooLargeError):
        check_scoring_grid(volume, SeriesCriteria(max_pixel_spacing_mm=1e7))
