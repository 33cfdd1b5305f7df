"""Issue 15: public data sets convert into the training layout (``cttriage data``), a MosMed-shaped
tree trains and evaluates with its corrupt series named and counted, and evaluation no longer loses
series or Spearman's rho silently."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from app.cli import main
from models.commands import DataSource, TooManySkipped, train_command
from models.dataset_converters import convert_luna16, convert_medseg, write_canonical_nifti
from models.datasets import SeriesRecord, phantom_records, read_labels, scan_dataset
from models.evaluation import evaluate, format_table, summarize, true_severity
from models.findings import LesionDescriptors, LungDescriptors
from models.phantom import PhantomSpec, phantom_volume
from models.predictor import Prediction
from models.severity import LungSeverity
from models.training import LrSchedule, TrainingOptions

#: Small chests: a 320 mm field of view in 64 pixels, 24 slices of 12 mm.
SPEC = PhantomSpec(rows=64, columns=64, pixel_spacing=5.0, slices=24, slice_spacing=12.0)


def write_phantom_nifti(path: Path, severity: float, seed: int) -> np.ndarray:
    """A phantom as a canonical NIfTI (like MosMed's files); returns its lesion mask."""
    phantom = phantom_volume(replace(SPEC, severity_left=severity, severity_right=severity / 2, seed=seed))
    write_canonical_nifti(phantom.hu.astype(np.int16), phantom.spacing, path)
    return phantom.lesions > 0


def mosmed_tree(root: Path) -> None:
    """studies/CT-0..CT-3 with label-only studies of both classes, two CT-1 lesion masks, a mask without
    a study, a study truncated after its header (reads as NIfTI, fails on its voxels) and one that is
    not NIfTI at all."""
    plan = {"CT-0": [(1, 0.0), (2, 0.0), (3, 0.0)], "CT-1": [(4, 20.0), (5, 15.0), (6, 10.0), (7, 12.0)],
            "CT-2": [(8, 35.0)], "CT-3": [(9, 60.0)]}
    for ct_class, studies in plan.items():
        (root / "studies" / ct_class).mkdir(parents=True)
        for number, severity in studies:
            path = root / "studies" / ct_class / f"study_{number:04d}.nii.gz"
            lesions = write_phantom_nifti(path, severity, number)
            if number in (4, 5):
                (root / "masks").mkdir(exist_ok=True)
                write_canonical_nifti(lesions.astype(np.uint8), (SPEC.slice_spacing, SPEC.pixel_spacing,
                                                                 SPEC.pixel_spacing),
                                      root / "masks" / f"study_{number:04d}_mask.nii.gz")
    corrupt = root / "studies" / "CT-1" / "study_0007.nii.gz"
    raw = gzip.decompress(corrupt.read_bytes())
    corrupt.write_bytes(gzip.compress(raw[:1000]))  # the header survives, the voxels do not
    (root / "studies" / "CT-0" / "study_0010.nii.gz").write_bytes(b"not a nifti file")
    write_canonical_nifti(np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0), root / "masks" / "study_0099_mask.nii.gz")


def test_mosmed_tree_converts_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mosmed_tree(tmp_path / "mosmed")
    data, models = tmp_path / "data", tmp_path / "models"
    assert main(["data", "mosmed", str(tmp_path / "mosmed"), str(data)]) == 0
    printed = capsys.readouterr().out
    assert "9 series written" in printed and "CT-0 3, CT-1 4, CT-2 1, CT-3 1" in printed
    assert "masks: 2 lesion" in printed and "skipped: 2" in printed
    assert "study_0010.nii.gz: unreadable" in printed and "study_0099_mask.nii.gz: no readable study" in printed
    labels = read_labels(data / "labels.csv")
    assert labels["study_0001"].covid is False and labels["study_0009"].covid is True
    assert sorted(p.name for p in (data / "lesions").iterdir()) == ["study_0004.nii.gz", "study_0005.nii.gz"]

    code = main(["train", "multitask", "--data", str(data), "--out", str(models), "--version", "v1",
                 "--steps", "3", "--batch-size", "2", "--slices-per-series", "8", "--validate-every", "2",
                 "--val-size", "2", "--levels", "3", "--base-channels", "4", "--max-channels", "16",
                 "--max-skipped", "1", "--log-every", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "skipped study_0007:" in printed and "skipped 1 unreadable: study_0007" in printed
    assert "crops: the threshold lungs" in printed
    assert "step 3/3" in printed and "steps/s" in printed and "ETA" in printed and "val roc_auc" in printed
    assert (models / "v1" / "multitask.pt").is_file()

    report = tmp_path / "eval.json"
    code = main(["evaluate", "--data", str(data), "--model", str(models / "v1"), "--no-threshold",
                 "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # one series failed: said by the exit status
    assert "1 series failed" in captured.err
    metrics = next(iter(json.loads(report.read_text())["methods"].values()))["metrics"]
    assert metrics["series"] == 9 and metrics["scored"] == 8 and metrics["failed"] == 1
    assert list(metrics["failed_series"]) == ["study_0007"]
    assert "8/9" in captured.out and "FAILED" in captured.out and "study_0007: unreadable" in captured.out
    assert metrics["severity_truth"] == {"derived: threshold lungs": 2}  # the masked CT-1 studies


def test_too_many_unreadable_series_stop_before_training_naming_them(tmp_path: Path) -> None:
    def broken() -> NoReturn:
        raise OSError("truncated file")

    records = [SeriesRecord("bad-1", True, "covid", None, False, False, broken)]

    class Records(DataSource):
        def records(self, *, for_training: str | None = None) -> list[SeriesRecord]:
            return records

    lines: list[str] = []
    options = TrainingOptions(steps=1, lr=LrSchedule(1e-3, 1e-3, 1.0), batch_size=1)
    with pytest.raises(TooManySkipped, match="bad-1: OSError: truncated file"):
        train_command("multitask", Records(data=tmp_path), tmp_path, "v", options, max_skipped=0, echo=lines.append)
    assert lines[-1] == "skipped bad-1: OSError: truncated file"


class FakePredictor:
    """A method that finds no lesion, instantly, with a severity from ``severity(hu)``: these
    tests are about the bookkeeping around it."""

    method, model_version, inplane_spacing_mm = "fake", "0", 2.0

    def __init__(self, severity: Callable[[np.ndarray], float] = lambda hu: 0.0) -> None:
        self.severity = severity

    def predict(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> Prediction:
        empty = np.zeros(hu.shape, dtype=np.uint8)
        share = self.severity(hu)
        none = LungDescriptors(0.0, None, None, None, 0)
        return Prediction(self.method, self.model_version, 0.5, LungSeverity(share, share, share, 0.0, 0.0, 0.0, 0.0),
                          hu.astype(np.int16), empty, empty > 0, spacing, {}, (), LesionDescriptors(none, none, False),
                          {})


def test_an_unreadable_series_is_counted_and_named_not_fatal() -> None:
    def broken() -> NoReturn:
        raise OSError("truncated file")

    good = phantom_records(2, seed=1)
    records = [*good, SeriesRecord("bad-1", True, "covid", None, True, True, broken)]
    outcomes = evaluate(records, FakePredictor(), truth_lungs=None)
    summary = summarize(outcomes)
    assert (summary["series"], summary["scored"], summary["failed"]) == (3, 2, 1)
    assert summary["failed_series"] == {"bad-1": "unreadable: OSError: truncated file"}
    table = format_table({"fake": summary})
    assert "2/3" in table and "FAILED (fake): bad-1: unreadable: OSError: truncated file" in table


def test_rho_for_lesion_masks_without_lung_masks_uses_derived_lungs() -> None:
    """Mosmed's 50: lesion masks, no lung masks. Their true severity used to be None, so rho was missing."""
    with_lungs = [r for r in phantom_records(6, seed=2) if r.covid][:3]

    def without_lungs(record: SeriesRecord) -> SeriesRecord:
        return replace(record, has_lungs=False, loader=lambda: replace(record.loader(), lungs=None))

    # Any severity that varies between the series.
    dense_share = FakePredictor(lambda hu: 100.0 * float(np.mean(hu > -500)))
    records = [without_lungs(r) for r in with_lungs]
    outcomes = evaluate(records, dense_share)
    assert [o.severity_truth for o in outcomes] == ["derived: threshold lungs"] * 3
    for outcome, record in zip(outcomes, with_lungs, strict=True):
        exact = true_severity(record, record.load())
        assert exact is not None and outcome.severity_true == pytest.approx(exact, abs=6.0)
    assert np.isfinite(summarize(outcomes)["spearman_rho"])


def test_luna16_converts_with_its_airway_left_out_of_the_lungs(tmp_path: Path) -> None:
    src = tmp_path / "luna"
    (src / "subset0").mkdir(parents=True)
    (src / "seg-lungs-LUNA16").mkdir()
    hu = np.full((6, 20, 24), -1000, dtype=np.int16)  # (z, y, x) as MetaImage stores it
    hu[1, 2, 3] = 500  # a marker: inferior, anterior, patient right
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[:, 5:15, 2:10], mask[:, 5:15, 14:22], mask[:, 2:5, 11:13] = 4, 3, 5
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "CompressedData = {c}\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -100 -120 -300\n"
              "ElementSpacing = 0.7 0.8 2.5\nDimSize = 24 20 6\nElementType = {t}\nElementDataFile = {f}\n")
    (src / "subset0" / "1.2.3.mhd").write_text(header.format(c="False", t="MET_SHORT", f="1.2.3.raw"))
    (src / "subset0" / "1.2.3.raw").write_bytes(hu.tobytes())
    (src / "seg-lungs-LUNA16" / "1.2.3.mhd").write_text(header.format(c="True", t="MET_UCHAR", f="1.2.3.zraw"))
    (src / "seg-lungs-LUNA16" / "1.2.3.zraw").write_bytes(zlib.compress(mask.tobytes()))
    summary = convert_luna16(src, tmp_path / "out")
    assert summary.series == 1 and summary.lung_masks == 1
    [record] = scan_dataset(tmp_path / "out")
    assert record.covid is None and record.has_lungs
    data = record.load()
    assert data.hu.shape == (6, 20, 24) and data.hu[1, 2, 3] == 500
    assert data.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert data.lungs is not None and set(np.unique(data.lungs)) == {0, 1}
    assert not data.lungs[:, 2:5, 11:13].any() and data.lungs[:, 5:15, 2:10].all()


def test_a_raw_luna16_mask_in_lungs_drops_the_airway(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "lungs").mkdir()
    write_canonical_nifti(np.zeros((4, 8, 8), np.int16), (2.0, 1.0, 1.0), tmp_path / "images" / "a.nii.gz")
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[:, 1:4, 1:4], mask[:, 1:4, 5:8], mask[:, 6:8, 4] = 3, 4, 5
    np.save(tmp_path / "lungs" / "a.npy", mask)
    data = scan_dataset(tmp_path)[0].load()
    assert data.lungs is not None and int(data.lungs.sum()) == 2 * 9 * 4 and not data.lungs[:, 6:8, 4].any()


def test_medseg_keeps_ground_glass_and_consolidation_and_skips_0_255_images(tmp_path: Path) -> None:
    src = tmp_path / "medseg"
    for folder in ("rp_im", "rp_msk", "rp_lung_msk"):
        (src / folder).mkdir(parents=True)
    hu = np.full((4, 10, 10), -800, np.int16)
    write_canonical_nifti(hu, (5.0, 1.0, 1.0), src / "rp_im" / "1.nii.gz")
    write_canonical_nifti(np.clip(hu + 900, 0, 255), (5.0, 1.0, 1.0), src / "rp_im" / "2.nii.gz")
    labels = np.zeros(hu.shape, np.uint8)
    labels[0, :2], labels[1, :2], labels[2, :2] = 1, 2, 3  # ground glass, consolidation, pleural effusion
    for n in ("1", "2"):
        write_canonical_nifti(labels, (5.0, 1.0, 1.0), src / "rp_msk" / f"{n}.nii.gz")
        write_canonical_nifti(np.ones(hu.shape, np.uint8) * 2, (5.0, 1.0, 1.0), src / "rp_lung_msk" / f"{n}.nii.gz")
    summary = convert_medseg(src, tmp_path / "out")
    assert summary.series == 1 and [Path(p).name for p, _ in summary.skipped] == ["2.nii.gz"]
    assert "0..255" in summary.skipped[0][1]
    [record] = scan_dataset(tmp_path / "out")
    data = record.load()
    assert record.id == "medseg_rp_1" and record.covid is True
    assert data.lesions is not None and data.lesions[:2].any() and not data.lesions[2:].any()
    assert data.lungs is not None and set(np.unique(data.lungs)) == {1}


def test_train_exits_3_with_the_reason_when_the_classifier_would_see_one_class(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two phantoms: validation takes one of each class, leaving the classifier nothing to learn from."""
    code = main(["train", "multitask", "--phantoms", "2", "--out", str(tmp_path), "--version", "v", "--steps", "1",
                 "--levels", "3", "--base-channels", "4", "--max-channels", "16"])
    assert code == 3
    assert "the classification pool (labelled series without a lesion mask) has 0 positives" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
