"""select_series: every rule, the ranking, and the reasons an admin reads."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from app.series_selection import SeriesCriteria, select_series
from models.dicom_headers import SliceHeader, slice_headers
from models.errors import NoUsableSeriesError
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import PhantomStudy, enhanced_dataset, phantom_datasets, scout_dataset, thick_datasets

Orientation = tuple[float, float, float, float, float, float]

AXIAL: Orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL: Orientation = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"

BASE = SliceHeader(
    sop_instance_uid="",
    frame=None,
    study_uid="1.2.840.1",
    series_uid="",
    sop_class_uid=CTImageStorage,
    modality="CT",
    series_number=None,
    series_description="CHEST",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation=AXIAL,
    position=None,
    rows=512,
    columns=512,
    pixel_spacing=(0.7, 0.7),
    slice_thickness=None,
    has_pixel_data=True,
    transfer_syntax_uid=ExplicitVRLittleEndian,
)


def tilted(degrees: float) -> Orientation:
    """An axial-ish plane rotated about x: its normal is ``degrees`` off the head-foot axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (1.0, 0.0, 0.0, 0.0, c, s)


def series(
    number: int, n: int = 120, spacing: float = 1.5, orientation: Orientation = AXIAL, **changes
) -> list[SliceHeader]:
    """``n`` evenly spaced slices along the plane's normal, with ``changes`` applied to all.

    The default, 120 x 1.5 mm, covers 180 mm: a chest, so only the rule a test breaks rejects it.
    """
    normal = np.cross(orientation[:3], orientation[3:6])
    thickness = changes.pop("slice_thickness", spacing)
    return [
        replace(
            BASE,
            sop_instance_uid=f"1.2.840.{number}.{k}",
            series_uid=f"1.2.840.{number}",
            series_number=number,
            orientation=orientation,
            # Three coordinates: a 3-vector plus a multiple of the (3-vector) normal.
            position=cast(
                "tuple[float, float, float]",
                tuple(float(v) for v in np.array([-180.0, -180.0, -300.0]) + k * spacing * normal),
            ),
            slice_thickness=thickness,
            **changes,
        )
        for k in range(n)
    ]


def decision(selection, number: int):
    return next(d for d in selection.decisions if d.series_number == number)


def test_prefers_thinner_slices_then_more_slices() -> None:
    sel = select_series(
        series(2, 200, 1.5) + series(3, 60, 5.0) + series(4, 150, 1.5) + series(5, 200, 1.0, slice_thickness=2.0)
    )
    assert sel.chosen == "1.2.840.2" and sel.reason_if_none() is None
    assert decision(sel, 2).chosen and decision(sel, 2).reason is None
    assert decision(sel, 3).reason == "thicker slices than series 2 (5.0 mm vs 1.5 mm)"
    assert decision(sel, 4).reason == "fewer slices than series 2 (150 vs 200)"
    assert decision(sel, 5).reason == "thicker slices than series 2 (2.0 mm vs 1.5 mm)", "thickness, not spacing, ranks"
    d = decision(sel, 3)
    assert (d.slice_count, d.slice_spacing_mm, d.thickness, d.description) == (60, 5.0, 5.0, "CHEST")
    assert [d.series_number for d in sel.decisions] == [2, 3, 4, 5]
    json.dumps([d.to_dict() for d in sel.decisions])


def _gap(headers: list[SliceHeader]) -> list[SliceHeader]:
    return headers[:20] + headers[21:]


def _duplicate(headers: list[SliceHeader]) -> list[SliceHeader]:
    headers[11] = replace(headers[11], position=headers[10].position)
    return headers


def _one_smaller(headers: list[SliceHeader]) -> list[SliceHeader]:
    headers[5] = replace(headers[5], rows=256, columns=256)
    return headers


def _no_pixels(headers: list[SliceHeader]) -> list[SliceHeader]:
    headers[3] = replace(headers[3], has_pixel_data=False)
    return headers


def _moved(headers: list[SliceHeader], dy: Iterable[float] = (), dz: Iterable[float] = ()) -> list[SliceHeader]:
    """Positions shifted by ``dy[k]`` and ``dz[k]`` mm (zeros where not given)."""
    dy = list(dy) or [0.0] * len(headers)
    dz = list(dz) or [0.0] * len(headers)
    moved = []
    for h, a, b in zip(headers, dy, dz, strict=True):
        assert h.position is not None
        moved.append(replace(h, position=(h.position[0], h.position[1] + a, h.position[2] + b)))
    return moved


def _sheared(headers: list[SliceHeader]) -> list[SliceHeader]:
    return _moved(headers, dy=[0.3 * k * 1.5 for k in range(len(headers))])


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (series(7, modality="MR"), "modality MR is not CT"),
        (series(7, modality=""), "modality missing is not CT"),
        (series(7, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer/scout (ImageType LOCALIZER)"),
        (
            series(7, orientation=CORONAL),
            "not axial (slice normal 90 degrees from the head-foot axis; orientation 1,0,0,0,0,-1)",
        ),
        (series(7, orientation=tilted(20.0)), "not axial (slice normal 20 degrees"),
        ([replace(h, orientation=None) for h in series(7)], "no ImageOrientationPatient"),
        (series(7, n=12), "covers 18.0 mm along the head-foot axis, less than the 150.0 mm a chest needs: "
                          "12 slices 1.5 mm apart, 1.5 mm thick"),
        (series(7, n=30, spacing=12.0), "slices 12.0 mm apart, more than 10.0 mm"),
        (_gap(series(7)), "non-uniform slice spacing (1.50-3.00 mm): gap of 3.00 mm between slices 20 and 21 of 119"),
        (_duplicate(series(7)), "1 duplicate slice position; first: slices 11 and 12 of 120"),
        (_one_smaller(series(7)), "slices differ in size (512x512 and 256x256)"),
        (_no_pixels(series(7)), "1 instance without pixel data"),
        (_sheared(series(7)), "slice positions run 16.7 degrees off the slice normal (gantry tilt"),
    ],
    ids=["mr", "no-modality", "localizer", "coronal", "tilted-plane", "no-orientation", "too-short", "too-far-apart",
         "gap", "duplicate", "mixed-size", "no-pixels", "gantry-tilt"],
)
def test_each_rule_passes_a_series_over_with_its_reason(headers: list[SliceHeader], reason: str) -> None:
    alone = select_series(headers)
    assert alone.chosen is None
    assert decision(alone, 7).reason.startswith(reason), decision(alone, 7).reason
    assert alone.reason_if_none() == f"no usable series: series 7 ({decision(alone, 7).reason})"
    with pytest.raises(NoUsableSeriesError, match="no usable series: series 7"):
        alone.require()
    # The same series beside a good one: the good one wins, the bad one keeps its own reason.
    both = select_series(headers + series(8, 60, 3.0))
    assert both.require() == "1.2.840.8"
    assert decision(both, 7).reason.startswith(reason)


def test_slightly_oblique_axial_and_rounded_positions_are_accepted() -> None:
    headers = series(2, orientation=tilted(6.0))
    jitter = np.random.default_rng(0).uniform(-0.05, 0.05, len(headers))
    headers = _moved(headers, dz=jitter)
    assert select_series(headers).chosen == "1.2.840.2"


def test_a_whole_chest_in_30_slices_of_8_mm_is_chosen_over_a_short_thin_slab() -> None:
    """Coverage, not slice count: 30 x 8 mm (240 mm) is a chest, 20 x 3 mm (60 mm) a slab of one."""
    sel = select_series(series(2, n=30, spacing=8.0) + series(3, n=20, spacing=3.0))
    assert sel.chosen == "1.2.840.2"
    assert decision(sel, 2).slice_count == 30 and decision(sel, 2).reason is None
    assert decision(sel, 3).reason == (
        "covers 60.0 mm along the head-foot axis, less than the 150.0 mm a chest needs: 20 slices 3.0 mm apart, "
        "3.0 mm thick"
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (series(2, n=15, spacing=10.0), None),  # 150 mm at 10 mm: both limits exactly
        (series(2, n=50, spacing=3.0), None),  # 49 x 3 mm + 3 mm thick = 150 mm
        (series(2, n=50, spacing=3.0, slice_thickness=2.9), "covers 149.9 mm"),
        (series(2, n=30, spacing=5.0, slice_thickness=None), None),  # no thickness: one spacing, 150 mm
        (series(2, n=30, spacing=5.0, slice_thickness=1.0), "covers 146.0 mm"),  # thin slices, gaps between
        (series(2, n=101, spacing=1.5, slice_thickness=0.0), None),  # thickness 0 is no thickness: 151.5 mm
        (series(2, n=16, spacing=10.1), "slices 10.1 mm apart, more than 10.0 mm"),
        (series(2, n=1), "covers 1.5 mm along the head-foot axis, less than the 150.0 mm a chest needs: "
                         "1 slice, 1.5 mm thick"),
        (series(2, n=1, slice_thickness=None), "covers 0.0 mm along the head-foot axis, less than the 150.0 mm "
                                               "a chest needs: 1 slice, no SliceThickness"),
    ],
    ids=["150-mm-at-10-mm", "150-mm", "149.9-mm", "no-thickness", "gaps-between-slices", "zero-thickness",
         "10.1-mm-apart", "single-slice", "single-slice-no-thickness"],
)
def test_coverage_is_n_minus_1_steps_plus_one_thickness_and_limits_are_inclusive(
    headers: list[SliceHeader], reason: str | None
) -> None:
    got = decision(select_series(headers), 2).reason
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got


def test_limits_are_configurable_and_resent_instances_count_once() -> None:
    headers = series(2, n=20, spacing=8.0)  # 160 mm; counted twice, 5 positions would be duplicates
    assert select_series(headers + headers[:5]).chosen == "1.2.840.2"
    assert decision(select_series(headers + headers[:5]), 2).slice_count == 20
    longer = select_series(headers, SeriesCriteria(min_coverage_mm=200.0))
    assert longer.reason_if_none() == (
        "no usable series: series 2 (covers 160.0 mm along the head-foot axis, less than the 200.0 mm a chest needs: "
        "20 slices 8.0 mm apart, 8.0 mm thick)"
    )
    closer = select_series(headers, SeriesCriteria(max_slice_spacing_mm=5.0))
    assert closer.reason_if_none() == "no usable series: series 2 (slices 8.0 mm apart, more than 5.0 mm)"


def test_reason_if_none_lists_every_series() -> None:
    sel = select_series(series(3, n=12) + series(900, n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert sel.reason_if_none() == (
        "no usable series: series 3 (covers 18.0 mm along the head-foot axis, less than the 150.0 mm a chest needs: "
        "12 slices 1.5 mm apart, 1.5 mm thick); series 900 (localizer/scout (ImageType LOCALIZER))"
    )
    assert select_series([]).reason_if_none() == "no usable series: the study has no image instances"
    unnumbered = select_series([replace(h, series_number=None) for h in series(4, n=3)])
    reason = unnumbered.reason_if_none()
    assert reason is not None
    assert reason.startswith("no usable series: series (no number) (covers 4.5 mm along")


def test_phantom_study_with_scout_thin_thick_and_enhanced_series() -> None:
    spec = PhantomSpec(rows=64, columns=64, pixel_spacing=5.6, slices=64, slice_spacing=2.5)  # 160 mm
    phantom = phantom_volume(spec)
    study = PhantomStudy("1.2.840.99")
    datasets = (
        phantom_datasets(phantom, spec, study_uid=study.study_uid, series_uid="1.2.840.99.2", series_number=2)
        + thick_datasets(phantom, spec, 5.0, study=study, series_uid="1.2.840.99.3", series_number=3)
        + [scout_dataset(phantom, spec, study=study, series_number=1)]
        + [enhanced_dataset(phantom, spec, study=study, series_uid="1.2.840.99.4", series_number=4)]
    )
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.840.99"}
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    sel = select_series([h for ds in datasets for h in slice_headers(ds)])
    assert sel.chosen == "1.2.840.99.2"
    assert decision(sel, 1).reason == "localizer/scout (ImageType LOCALIZER)"
    assert decision(sel, 3).reason == "thicker slices than series 2 (5.0 mm vs 2.5 mm)"
    assert decision(sel, 4).reason == "equivalent to series 2, which was preferred"
    assert decision(sel, 3).slice_count == 32
    assert decision(sel, 4).slice_count == 64, "enhanced CT counts frames"


def test_real_data_single_slices_and_short_series_are_rejected() -> None:
    if not REAL.is_dir():
        pytest.skip(f"real test data not present at {REAL}")
    siemens = [pydicom.dcmread(f) for f in sorted((REAL / "totalsegmentator-example-ct").iterdir())]
    sel = select_series([h for ds in siemens for h in slice_headers(ds)])
    # 3 mm thick slices reconstructed 2 mm apart: 19 x 2 mm + 3 mm
    assert sel.reason_if_none() == (
        "no usable series: series (no number) (covers 41.0 mm along the head-foot axis, less than the 150.0 mm a chest "
        "needs: 20 slices 2.0 mm apart, 3.0 mm thick)"
    )
    assert select_series([h for ds in siemens for h in slice_headers(ds)], SeriesCriteria(40.0)).chosen is not None
    for path in sorted((REAL / "covid19-ny-sbu").glob("*.dcm")):
        sel = select_series(slice_headers(pydicom.dcmread(path)))
        assert sel.chosen is None
        reason = sel.reason_if_none()
        assert reason is not None
        if "Chest" in path.name:
            assert "not axial" in reason, (path.name, reason)
        else:
            assert re.fullmatch(r"no usable series: series \d+ \(covers \d+\.\d mm along the head-foot axis, less "
                                r"than the 150\.0 mm a chest needs: 1 slice, \d+\.\d mm thick\)", reason), reason
