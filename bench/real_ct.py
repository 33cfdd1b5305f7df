"""Every real scan in ../shared/data scored by the code a worker runs, plus implants of known volume.

A hand-run benchmark, not a test::

    python bench/real_ct.py                     # table on stdout, montages in bench/out/real_ct
    python bench/real_ct.py --out /tmp/real_ct --no-implants

Every case is scored with the threshold method (``models.predictor.ThresholdPredictor``) through
``worker.pipeline.score_study`` for DICOM folders, as a worker scores a study, or
``score_volume`` for volumes made here:

* A0001 kernel-L and kernel-B (Lung-PET-CT-Dx, 64 x 5 mm): the whole series, as a study;
* each COVID-19-NY-SBU axial slice stacked 40 times along z at 5 mm (chest and abdomen: the
  abdomen must be rejected, no lungs); the coronal slice alone as a study (rejected);
* the 20-slice JPEG 2000 abdominal series (rejected) and the NIfTI chest crop;
* A0001 kernel-L with ground glass implanted (``app.implant_io.implant_series``) in 10, 20 and
  35 % of the left and of the right lung: the severity rise of that lung against the score of
  the un-implanted series, next to the truth.

Per scored case a PNG montage (axial overlays across the lungs, as on the study page, and the
frontal projection) is written to the out folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.errors import TYPED_ERRORS, CtTriageError  # noqa: E402
from app.implant_io import implant_series, read_series  # noqa: E402
from app.series_selection import SeriesCriteria  # noqa: E402
from app.settings import get_settings  # noqa: E402
from models.predictor import Predictor, ThresholdPredictor  # noqa: E402
from models.rendering import axial_overlay, projection_overlay  # noqa: E402
from models.volume import hu_volume  # noqa: E402
from worker.batch_scoring import dicom_items, nifti_volume  # noqa: E402
from worker.pipeline import StudyScore, score_study, score_volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
REAL = DATA / "real-dicom"
A0001 = REAL / "lung-pet-ct-dx-A0001"
SBU = REAL / "covid19-ny-sbu"
STACKED = ("A056642_axial_19010107-111", "A072894_axial_19010103-40", "A098752_axial_19001231-32",
           "A098752_axial_19010127-128", "A027284_axial_19000925-116", "A067967_axial_19001231-270")
SINGLE = ("A072894_19010103-Chest-058",)
IMPLANT_FRACTIONS = (0.10, 0.20, 0.35)
MONTAGE_SLICES = 6


@dataclass
class Case:
    name: str
    score: StudyScore | None = None
    reason: str | None = None
    seconds: float = 0.0
    truth_rise: float | None = None  # implants: percentage points the implanted lung should rise
    observed_rise: float | None = None


def run_case(name: str, scorer: Callable[[], StudyScore]) -> Case:
    start = time.perf_counter()
    try:
        score = scorer()
    except TYPED_ERRORS as exc:
        return Case(name, reason=f"rejected: {exc}", seconds=time.perf_counter() - start)
    return Case(name, score=score, seconds=time.perf_counter() - start)


def study_scorer(folder: Path, criteria: SeriesCriteria, predictor: Predictor) -> Callable[[], StudyScore]:
    """Score the one study in ``folder`` as a worker does (series selection included)."""
    def score() -> StudyScore:
        items = list(dicom_items(folder))
        if len(items) != 1:
            raise CtTriageError(f"{len(items)} studies found in {folder.name} (instances need a StudyInstanceUID)")
        assert items[0].slices is not None and items[0].paths is not None
        return score_study(items[0].slices, items[0].paths, predictor, criteria=criteria)
    return score


def stacked_scorer(path: Path, predictor: Predictor) -> Callable[[], StudyScore]:
    """One axial slice repeated 40 times, 5 mm apart: real HU, noise and anatomy in 3D."""
    def score() -> StudyScore:
        ds = pydicom.dcmread(path)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        series = generate_uid()
        stack = []
        for k in range(40):
            copy_ = copy.deepcopy(ds)
            copy_.ImagePositionPatient = [x, y, 5.0 * k]
            copy_.SOPInstanceUID, copy_.SeriesInstanceUID = generate_uid(), series
            stack.append(copy_)
        return score_volume(path.stem, hu_volume(stack), predictor)
    return score


def single_file_scorer(path: Path, criteria: SeriesCriteria, predictor: Predictor) -> Callable[[], StudyScore]:
    def score() -> StudyScore:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / path.name).write_bytes(path.read_bytes())
            return study_scorer(Path(tmp), criteria, predictor)()
    return score


def implant_cases(base: Case, predictor: Predictor) -> list[Case]:
    datasets = read_series(A0001 / "kernel-L")
    cases = []
    for lung in ("left", "right"):
        for fraction in IMPLANT_FRACTIONS:
            name = f"A0001-L + GGO {fraction:.0%} {lung}"
            start = time.perf_counter()
            result = implant_series(datasets, lung=lung, fraction=fraction, seed=0)
            case = run_case(name, lambda r=result, n=name: score_volume(n, hu_volume(r.datasets), predictor))
            case.seconds = time.perf_counter() - start
            case.truth_rise = result.implant.truth.severity_rise
            if case.score is not None and base.score is not None:
                key = f"severity_{lung}"
                case.observed_rise = getattr(case.score.severity, key) - getattr(base.score.severity, key)
            cases.append(case)
    return cases


def montage(score: StudyScore, slices: int = MONTAGE_SLICES) -> np.ndarray:
    """Axial overlays at ``slices`` levels spread over the lungs' z range, then the projection."""
    masks = score.masks
    assert masks is not None
    with_lung = np.flatnonzero((masks.lung_labels > 0).any(axis=(1, 2)))
    if with_lung.size == 0:
        with_lung = np.arange(masks.hu.shape[0])
    levels = np.unique(np.linspace(with_lung[0], with_lung[-1], slices + 2)[1:-1].round().astype(int))[::-1]
    distinct = [int(k) for i, k in enumerate(levels)  # a stacked slice shows once
                if i == 0 or not np.array_equal(masks.hu[k], masks.hu[levels[i - 1]])]
    tiles = [axial_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing, index=k)
             for k in distinct]  # superior first, as a reader scrolls
    tiles.append(projection_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing))
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
    return np.concatenate(padded, axis=1)


def file_name(case: str) -> str:
    words = case.replace("%", "pct").replace("+", " ").split()
    return "_".join("".join(c for c in w if c.isalnum() or c in "-_") for w in words) + ".png"


def flags_of(score: StudyScore) -> str:
    return ",".join(f.code for f in score.flags) or "-"


def table(cases: list[Case]) -> str:
    def num(value: float | None, fmt: str = "6.1f") -> str:
        return f"{value:{fmt}}" if value is not None else "-".rjust(len(format(0.0, fmt)))

    head = (f"{'case':<38} {'right%':>6} {'left%':>6} {'R mL':>6} {'L mL':>6} {'truth+':>6} {'rise':>6} "
            f"{'flags':<34} {'s':>5}")
    lines = [head, "-" * len(head)]
    for c in cases:
        if c.score is None:
            lines.append(f"{c.name:<38} {c.reason}  ({c.seconds:.1f} s)")
            continue
        s = c.score.severity
        lines.append(f"{c.name:<38} {num(s.severity_right)} {num(s.severity_left)} "
                     f"{num(s.lung_volume_right_ml, '6.0f')} {num(s.lung_volume_left_ml, '6.0f')} "
                     f"{num(c.truth_rise)} {num(c.observed_rise)} {flags_of(c.score):<34} {c.seconds:5.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "real_ct"), help="where the PNG montages go")
    parser.add_argument("--no-implants", action="store_true", help="only the real scans as they are")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"no real data at {DATA}", file=sys.stderr)
        return 2
    settings = get_settings()
    criteria, predictor = SeriesCriteria.from_settings(settings), ThresholdPredictor(settings.inplane_spacing_mm)
    plan: list[tuple[str, Callable[[], StudyScore]]] = [
        (f"A0001 {kernel}", study_scorer(A0001 / kernel, criteria, predictor)) for kernel in ("kernel-L", "kernel-B")
    ]
    plan += [(f"SBU {name} x40", stacked_scorer(SBU / f"{name}.dcm", predictor)) for name in STACKED]
    plan += [(f"SBU {name} alone", single_file_scorer(SBU / f"{name}.dcm", criteria, predictor)) for name in SINGLE]
    plan.append(("TotalSeg JPEG2000 abdomen", study_scorer(REAL / "totalsegmentator-example-ct", criteria, predictor)))
    nifti = DATA / "real-nifti" / "totalsegmentator-chest-crop-ct.nii.gz"
    plan.append(("TotalSeg NIfTI chest crop",
                 lambda: score_volume(nifti.name, nifti_volume(nifti), predictor)))
    cases = []
    for name, scorer in plan:
        print(f"scoring {name} ...", file=sys.stderr, flush=True)
        cases.append(run_case(name, scorer))
    if not args.no_implants:
        print("implanting and scoring A0001 kernel-L ...", file=sys.stderr, flush=True)
        cases += implant_cases(cases[0], predictor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if case.score is not None and case.score.masks is not None:
            Image.fromarray(montage(case.score)).save(out / file_name(case.name))
    print(table(cases))
    print(f"\ntruth+: implanted share of that lung (percentage points); rise: that lung's severity minus "
          f"A0001 kernel-L's. Montages in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
