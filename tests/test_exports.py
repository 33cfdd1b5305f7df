"""Results back to the PACS: the SR, SEG and secondary-capture writers on phantoms (SEG frames
line up with sources stored mirrored, flipped or in reverse order), and the embedded service
sending them to a real DICOM node (dcmtk's storescp), retrying while the node is down."""

from __future__ import annotations

import copy
import dataclasses
import io
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session

from app.db.models import Export, ExportKind, ExportState, Result, Study, utcnow
from app.dicom.push import push_files
from app.lifecycle import queue_settled_studies
from models.findings import LUNG_MASK_IMPLAUSIBLE, ScoreFlag, describe_lesions
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.phantom import PhantomSpec, PhantomVolume, phantom_volume
from models.phantom_dicom import phantom_datasets
from models.predictor import ThresholdPredictor
from models.rendering import projection_overlay
from models.severity import lung_severity
from models.volume import hu_volume
from tests.conftest import free_port, store_study_files, write_phantom_study
from tests.service_process import API, ServiceProcess, embedded_service, wait_for_state, wait_until
from worker.export_common import (
    BILATERAL_LESIONS,
    CONSOLIDATION_SHARE,
    COVID_PROBABILITY,
    GROUND_GLASS_SHARE,
    LESION_FOCI,
    PERCENT_AFFECTED,
    PERIPHERAL_SHARE,
    QUALITY_FLAG,
    QUALITY_FLAG_REASON,
    SEVERITY_LOWER_BOUND,
    ExportScores,
    NewInstance,
)
from worker.export_sc import projection_capture
from worker.export_seg import SEGMENT_LEFT_LUNG, SEGMENT_LESIONS, SEGMENT_RIGHT_LUNG, lung_segmentation
from worker.export_sr import measurement_report
from worker.exports import TYPE2_COPIED, read_headers, run_export
from worker.jobs import run_job
from worker.pipeline import StudyMasks, grid_masks, score_volume

DCIODVFY = Path("/usr/bin/dciodvfy")
STORESCP = Path("/usr/bin/storescp")  # dcmtk's; another storescp may shadow it on PATH
PACS_AET = "TESTPACS"
#: 2 mm pixels: the scoring grid is the source grid, so SEG frames can be compared exactly.
EXACT = {"slices": 24, "rows": 112, "columns": 112, "pixel_spacing": 2.0, "slice_spacing": 8.0}
SMALL = {"slices": 40, "rows": 160, "columns": 160, "pixel_spacing": 2.25, "slice_spacing": 7.0}


# --- writers on phantoms ------------------------------------------------------------------------


def headers_only(datasets: Sequence[Dataset]) -> list[Dataset]:
    """What the export reads from storage: the files' headers, no pixel data."""
    out: list[Dataset] = []
    for ds in datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        buffer.seek(0)
        out.append(pydicom.dcmread(buffer, stop_before_pixels=True))
    return out


def reversed_and_upside_down(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The same series stored the other way: last slice first, rows bottom to top (the column
    direction points anterior)."""
    out = []
    for number, original in enumerate(reversed(datasets), start=1):
        ds = copy.deepcopy(original)
        stored = ds.pixel_array[::-1]
        ds.PixelData = np.ascontiguousarray(stored).astype("<i2").tobytes()
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (ds.Rows - 1) * float(ds.PixelSpacing[0]), z]
        ds.ImageOrientationPatient = [*ds.ImageOrientationPatient[:3], 0.0, -1.0, 0.0]
        ds.InstanceNumber = number
        out.append(ds)
    return out


def truth_masks(phantom: PhantomVolume, datasets: Sequence[Dataset]) -> StudyMasks:
    """The phantom's true lungs and lesions as scoring-grid masks of the series' volume."""
    volume = hu_volume(datasets)
    assert volume.spacing[1:] == (2.0, 2.0)  # no in-plane resampling: grid == source
    return grid_masks(volume, volume.hu, volume.spacing, phantom.lungs, phantom.lesions > 0)


def scores_of(masks: StudyMasks, series_uid: str) -> ExportScores:
    """What the threshold method would report for ``masks``."""
    return ExportScores(series_uid, "threshold", "threshold-1.0", None,
                        lung_severity(masks.lung_labels, masks.lesions, masks.spacing))


def segment_frames(seg: Dataset, sources: Sequence[Dataset]) -> np.ndarray:
    """(instances, rows, columns, 3 segments) of ``seg`` in the order of ``sources``."""
    parsed = hd.seg.Segmentation.from_dataset(seg)
    return parsed.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[SEGMENT_RIGHT_LUNG, SEGMENT_LEFT_LUNG, SEGMENT_LESIONS],
        assert_missing_frames_are_empty=True,
    ).astype(bool)


Transform = Callable[[list[Dataset]], list[Dataset]]
StoredSlice = Callable[[np.ndarray, int], np.ndarray]
STORAGE_LAYOUTS: dict[str, tuple[bool, Transform, StoredSlice]] = {
    # name: (flip_lr, transform of the written series, truth slice -> stored layout for instance i)
    "canonical": (False, list, lambda truth, i: truth[i]),
    "mirrored": (True, list, lambda truth, i: truth[i][:, ::-1]),
    "reversed_upside_down": (False, reversed_and_upside_down, lambda truth, i: truth[len(truth) - 1 - i][::-1, :]),
}


@pytest.mark.parametrize("layout", sorted(STORAGE_LAYOUTS))
def test_seg_frames_line_up_with_the_source(layout: str) -> None:
    flip_lr, transform, stored = STORAGE_LAYOUTS[layout]
    spec = PhantomSpec(severity_left=30.0, severity_right=8.0, seed=5, flip_lr=flip_lr,
                       **EXACT)  # type: ignore[arg-type]
    phantom = phantom_volume(spec)
    datasets = transform(phantom_datasets(phantom, spec))
    masks = truth_masks(phantom, datasets)
    sources = headers_only(datasets)
    seg = lung_segmentation(sources, masks, scores_of(masks, str(sources[0].SeriesInstanceUID)),
                            NewInstance(ExportKind.seg, str(generate_uid())))
    frames = segment_frames(seg, sources)

    lesions = phantom.lesions > 0
    for i in range(len(sources)):
        assert np.array_equal(frames[i, ..., 0], stored(phantom.lungs == RIGHT_LUNG, i)), (layout, i)
        assert np.array_equal(frames[i, ..., 1], stored(phantom.lungs == LEFT_LUNG, i)), (layout, i)
        assert np.array_equal(frames[i, ..., 2], stored(lesions, i)), (layout, i)

    # One lesion voxel of the truth, followed by hand to its instance, row and column.
    k, y, x = (int(v[len(v) // 2]) for v in np.nonzero(lesions))
    instance = len(sources) - 1 - k if layout == "reversed_upside_down" else k
    row = spec.rows - 1 - y if layout == "reversed_upside_down" else y
    col = spec.columns - 1 - x if flip_lr else x
    assert frames[instance, row, col, 2]
    # The left lung segment is the patient's left: +x in LPS, whatever the image layout.
    left = frames[..., 1]
    cols = np.nonzero(left.any(axis=(0, 1)))[0]
    source_x = [float(sources[0].ImagePositionPatient[0]) + c * float(sources[0].ImageOrientationPatient[0]) * 2.0
                for c in (cols.min(), cols.max())]
    assert min(source_x) > 0, (layout, source_x)
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == {ds.SOPInstanceUID for ds in sources}


def test_seg_from_the_pipeline_masks_is_upsampled_to_the_mirrored_source() -> None:
    """Threshold masks on the 2 mm grid, source at 1.15 mm and stored mirrored: nearest-neighbour
    upsampling puts the lungs and lesions on the source pixels, sides right."""
    spec = PhantomSpec(slices=28, rows=320, columns=320, pixel_spacing=1.15, slice_spacing=8.0, severity_left=35.0,
                       severity_right=4.0, seed=6, flip_lr=True)
    phantom = phantom_volume(spec)
    datasets = phantom_datasets(phantom, spec)
    volume = hu_volume(datasets)
    masks = score_volume("scored", volume, ThresholdPredictor(2.0)).masks
    assert masks is not None
    assert masks.lung_labels.shape[1] < spec.rows  # resampled in-plane
    sources = headers_only(datasets)
    seg = lung_segmentation(sources, masks, scores_of(masks, str(sources[0].SeriesInstanceUID)),
                            NewInstance(ExportKind.seg, str(generate_uid())))
    frames = segment_frames(seg, sources)
    mirrored = {"right": phantom.lungs[..., ::-1] == RIGHT_LUNG, "left": phantom.lungs[..., ::-1] == LEFT_LUNG,
                "lesions": phantom.lesions[..., ::-1] > 0}

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * np.count_nonzero(a & b) / max(1, int(np.count_nonzero(a) + np.count_nonzero(b))))

    assert dice(frames[..., 0], mirrored["right"]) > 0.9
    assert dice(frames[..., 1], mirrored["left"]) > 0.9
    assert dice(frames[..., 1], mirrored["right"]) < 0.01  # not swapped
    assert dice(frames[..., 2], mirrored["lesions"]) > 0.7


@dataclass
class Written:
    phantom: PhantomVolume
    sources: list[Dataset]
    masks: StudyMasks
    scores: ExportScores
    seg: NewInstance


@pytest.fixture(scope="module")
def written() -> Written:
    spec = PhantomSpec(severity_left=30.0, severity_right=8.0, seed=7, flip_lr=True, **EXACT)  # type: ignore[arg-type]
    phantom = phantom_volume(spec)
    datasets = phantom_datasets(phantom, spec)
    masks = truth_masks(phantom, datasets)
    sources = headers_only(datasets)
    return Written(phantom, sources, masks, scores_of(masks, str(sources[0].SeriesInstanceUID)),
                   NewInstance(ExportKind.seg, str(generate_uid())))


def parse_sr(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)  # type: ignore[return-value]


def report_content(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The report's content tree: srread builds a MeasurementReport for a TID 1500 document, but
    ``content`` is annotated as the base ContentSequence."""
    return cast(hd.sr.MeasurementReport, sr.content)


def sr_measurements(sr: hd.sr.Comprehensive3DSR) -> dict[tuple[str, str], float]:
    """(tracking identifier, concept code value) -> value for every measurement of the report."""
    content = report_content(sr)
    groups = [*content.get_image_measurement_groups(), *content.get_volumetric_roi_measurement_groups()]
    return {(str(g.tracking_identifier), m.name.value): float(m.value) for g in groups for m in g.get_measurements()}


def sr_texts(sr: Dataset, concept: Any) -> set[str]:
    return {str(item.TextValue) for item in hd.sr.utils.find_content_items(sr, name=concept, recursive=True)}


def sr_codes(sr: Dataset, concept: Any) -> set[str]:
    return {item.ConceptCodeSequence[0].CodeValue
            for item in hd.sr.utils.find_content_items(sr, name=concept, recursive=True)}


def test_sr_of_a_threshold_result(written: Written) -> None:
    scores, lungs = written.scores, written.scores.lungs
    sr = parse_sr(measurement_report(written.sources, scores, NewInstance(ExportKind.sr, str(generate_uid())),
                                     written.seg))
    assert sr.StudyInstanceUID == written.sources[0].StudyInstanceUID
    assert sr.PatientID == written.sources[0].PatientID and sr.PatientName == written.sources[0].PatientName
    assert sr.SeriesDescription == "cttriage scores" and sr.Manufacturer == "cttriage"
    assert "threshold-1.0" in sr.SoftwareVersions
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert {ds.SOPInstanceUID for ds in written.sources} | {written.seg.sop_instance_uid} == evidence

    values = sr_measurements(sr)
    volume = codes.SCT.Volume.value
    assert values[("right lung", volume)] == pytest.approx(lungs.lung_volume_right_ml, abs=1e-3)
    assert values[("left lung", volume)] == pytest.approx(lungs.lung_volume_left_ml, abs=1e-3)
    assert values[("left lung", PERCENT_AFFECTED.value)] == pytest.approx(lungs.severity_left, abs=1e-3)
    assert values[("right lung", PERCENT_AFFECTED.value)] == pytest.approx(lungs.severity_right, abs=1e-3)
    assert values[("left lung lesions", volume)] == pytest.approx(lungs.lesion_volume_left_ml, abs=1e-3)
    assert values[("study", PERCENT_AFFECTED.value)] == pytest.approx(lungs.severity, abs=1e-3)
    assert lungs.severity_left > lungs.severity_right  # the truth's diseased side survives the mirror
    assert not any(code == COVID_PROBABILITY.value for _, code in values)  # threshold: not estimated
    # The method is said: algorithm name and family; the lung groups point at their SEG segments.
    assert sr_texts(sr, codes.DCM.AlgorithmName) == {"cttriage threshold"}
    assert sr_texts(sr, codes.DCM.AlgorithmVersion) == {"threshold-1.0"}
    assert sr_codes(sr, codes.SCT.MeasurementMethod) == {codes.DCM.MorphologicalOperations.value}
    references = []
    for g in report_content(sr).get_volumetric_roi_measurement_groups():
        segment = g.referenced_segment
        assert segment is not None
        references.append((g.tracking_identifier, segment[0].ReferencedSOPSequence[0]))
    assert {(name, ref.ReferencedSOPInstanceUID, int(ref.ReferencedSegmentNumber)) for name, ref in references} == {
        ("right lung", written.seg.sop_instance_uid, SEGMENT_RIGHT_LUNG),
        ("left lung", written.seg.sop_instance_uid, SEGMENT_LEFT_LUNG)}
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CTTRIAGE"


#: A flag the pipeline raises, and one with a code the SR has never seen (any code is written).
FLAGS = (ScoreFlag(LUNG_MASK_IMPLAUSIBLE, "the left lung mask holds 400 mL against 1500 mL", lower_bound=True),
         ScoreFlag("SomeFutureCheck", "a reason the writer does not know yet"))


def flagged(written: Written) -> ExportScores:
    """The written scores with flags and the truth masks' descriptors, as a result's details give them."""
    masks = written.masks
    descriptors = describe_lesions(masks.hu, masks.lung_labels, masks.lesions, masks.spacing)
    details = {"flags": [f.to_dict() for f in FLAGS], "severity_lower_bound": True,
               "descriptors": descriptors.to_dict()}
    row = SimpleNamespace(**dataclasses.asdict(written.scores.lungs), series_uid=written.scores.series_uid,
                          method="threshold", model_version="threshold-1.0", identification=None, details=details)
    return ExportScores.of(row)


def coded_values(sr: Dataset, concept: Any) -> list[str]:
    """Every coded value of ``concept`` in the report (CodeValue, or LongCodeValue over 16 characters)."""
    found = hd.sr.utils.find_content_items(sr, name=concept, recursive=True)
    return [str(item.ConceptCodeSequence[0].get("CodeValue") or item.ConceptCodeSequence[0].LongCodeValue)
            for item in found]


def test_sr_carries_flags_lower_bound_and_descriptors(written: Written) -> None:
    scores = flagged(written)
    assert scores.flags == FLAGS and scores.severity_lower_bound and scores.descriptors is not None
    sr = parse_sr(measurement_report(written.sources, scores, NewInstance(ExportKind.sr, str(generate_uid())),
                                     written.seg))
    assert coded_values(sr, SEVERITY_LOWER_BOUND) == [codes.SCT.Yes.value]
    assert coded_values(sr, QUALITY_FLAG) == [LUNG_MASK_IMPLAUSIBLE, "SomeFutureCheck"]
    [flag] = [item for item in hd.sr.utils.find_content_items(sr, name=QUALITY_FLAG, recursive=True)
              if item.ConceptCodeSequence[0].get("LongCodeValue") == LUNG_MASK_IMPLAUSIBLE]
    assert flag.ConceptCodeSequence[0].CodeMeaning == "Lung mask implausible"
    assert [(c.RelationshipType, c.TextValue) for c in flag.ContentSequence] == [("HAS PROPERTIES", FLAGS[0].message)]
    assert sr_texts(sr, QUALITY_FLAG_REASON) == {f.message for f in FLAGS}

    values = sr_measurements(sr)
    for side in ("right", "left"):
        lung = getattr(scores.descriptors, side)
        group = f"{side} lung lesions"
        assert values[(group, LESION_FOCI.value)] == lung.foci > 0
        assert values[(group, PERIPHERAL_SHARE.value)] == pytest.approx(100 * lung.peripheral_share, abs=1e-3)
        assert values[(group, GROUND_GLASS_SHARE.value)] == pytest.approx(100 * lung.ground_glass_share, abs=1e-3)
        assert values[(group, CONSOLIDATION_SHARE.value)] == pytest.approx(100 * lung.consolidation_share, abs=1e-3)
    assert coded_values(sr, BILATERAL_LESIONS) == [(codes.SCT.Yes if scores.descriptors.bilateral
                                                    else codes.SCT.No).value]
    assert scores.descriptors.bilateral  # 30 % and 8 %: both lungs

    # Unflagged and without descriptors (an older result): "not a lower bound", nothing else.
    plain = parse_sr(measurement_report(written.sources, written.scores,
                                        NewInstance(ExportKind.sr, str(generate_uid()))))
    assert coded_values(plain, SEVERITY_LOWER_BOUND) == [codes.SCT.No.value]
    assert coded_values(plain, QUALITY_FLAG) == [] and coded_values(plain, BILATERAL_LESIONS) == []
    assert not any(code == LESION_FOCI.value for _, code in sr_measurements(plain))


def test_sr_of_a_network_result_carries_the_probability(written: Written) -> None:
    scores = dataclasses.replace(written.scores, method="multitask-unet", model_version="mt-2.1",
                                 identification=0.8312)
    sr = parse_sr(measurement_report(written.sources, scores, NewInstance(ExportKind.sr, str(generate_uid()))))
    values = sr_measurements(sr)
    assert values[("study", COVID_PROBABILITY.value)] == pytest.approx(0.8312)
    assert sr_texts(sr, codes.DCM.AlgorithmName) == {"cttriage multitask-unet"}
    assert sr_codes(sr, codes.SCT.MeasurementMethod) == {codes.DCM.ArtificialIntelligence.value}
    assert not report_content(sr).get_volumetric_roi_measurement_groups()  # no SEG given: plain groups


def test_secondary_capture_of_the_projection(written: Written) -> None:
    masks = written.masks
    picture = projection_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing)
    sc = projection_capture(written.sources[0], picture, written.scores,
                            NewInstance(ExportKind.sc, str(generate_uid())), masks.spacing[2])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == written.sources[0].StudyInstanceUID
    assert (sc.PatientID, sc.PatientBirthDate) == (written.sources[0].PatientID, written.sources[0].PatientBirthDate)
    assert sc.SeriesDescription == "cttriage projection" and list(sc.PatientOrientation) == ["L", "F"]
    assert np.array_equal(sc.pixel_array, picture)


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors (warnings are listed but pass: our private coding scheme is one)."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    print(f"dciodvfy {path.name}:", *lines, sep="\n  ")
    return [line for line in lines if line.startswith("Error")]


def test_written_objects_pass_dciodvfy(written: Written, tmp_path: Path) -> None:
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; scripts/install.sh installs it")
    masks = written.masks
    picture = projection_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing)
    objects = {
        "seg": lung_segmentation(written.sources, masks, written.scores, written.seg),
        "sr": measurement_report(written.sources, written.scores, NewInstance(ExportKind.sr, str(generate_uid())),
                                 written.seg),
        "sr_flagged": measurement_report(written.sources, flagged(written),
                                         NewInstance(ExportKind.sr, str(generate_uid())), written.seg),
        "sc": projection_capture(written.sources[0], picture, written.scores,
                                 NewInstance(ExportKind.sc, str(generate_uid()))),
    }
    for name, ds in objects.items():
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name


def test_export_settings() -> None:
    from app.settings import Settings
    from worker.exports import backoff_seconds

    with pytest.raises(ValueError, match="CTTRIAGE_EXPORT_HOST"):
        Settings(export_enabled=True)
    settings = Settings(export_enabled=True, export_host="pacs", export_backoff_seconds=30,
                        export_backoff_max_seconds=200)
    assert settings.export_calling_aet == settings.ae_title
    assert [backoff_seconds(n, settings) for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 200, 200]


def test_sources_without_type2_attributes_still_give_an_sr_and_a_seg(written: Written, tmp_path: Path) -> None:
    """Anonymised or unscheduled studies leave Type 2 attributes out altogether (no accession, no
    study ID, no slice thickness): highdicom refused to build the SR and SEG from them."""
    paths = []
    for index, source in enumerate(written.sources):
        ds = copy.deepcopy(source)
        for keyword in (*TYPE2_COPIED, "SliceThickness"):
            if keyword in ds:
                del ds[keyword]
        paths.append(tmp_path / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    sources = read_headers(paths)
    sr = measurement_report(sources, written.scores, NewInstance(ExportKind.sr, str(generate_uid())), written.seg)
    seg = lung_segmentation(sources, written.masks, written.scores, NewInstance(ExportKind.seg, str(generate_uid())))
    for ds in (sr, seg):
        assert ds.AccessionNumber == "" and ds.StudyID == "" and ds.PatientID == ""
    thickness = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    assert thickness == pytest.approx(float(written.sources[0].SliceThickness))


def test_exports_carry_only_the_scored_studys_patient_and_are_written_with_the_result(
    sqlite_settings: Any, sqlite_factory: Any, tmp_path: Path
) -> None:
    """A converter reused one series UID for two patients' studies: the objects of the second
    study's result must name its patient only (before, the first study's instances were the
    sources, and the SR went out under the other patient). And its export rows are written with
    the result, so a worker lost before the hand-off to the broker loses no export."""
    settings = sqlite_settings.model_copy(update={"export_enabled": True, "export_host": "127.0.0.1"})
    spec = {"slices": 36, "rows": 96, "columns": 96, "pixel_spacing": 3.6, "slice_spacing": 9.0}
    first = write_phantom_study(tmp_path / "x", severity_left=10.0, severity_right=5.0, seed=81, **spec)
    write_phantom_study(tmp_path / "y", severity_left=30.0, severity_right=5.0, seed=82, **spec)
    second_study = str(generate_uid())
    for path in sorted((tmp_path / "y").glob("*.dcm")):  # the same series UID, another study and patient
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = first["series_instance_uid"], second_study
        ds.PatientID, ds.PatientName = "PAT-Y", "Y^Patient"
        ds.save_as(path, enforce_file_format=True)
    store_study_files(settings, sqlite_factory, tmp_path / "x")
    store_study_files(settings, sqlite_factory, tmp_path / "y")
    jobs = queue_settled_studies(sqlite_factory, 0.0, now=utcnow() + timedelta(seconds=5))
    for job_id in jobs:  # no hand-off to the broker at all: as if the worker died right after scoring
        outcome = run_job(job_id, sqlite_factory, settings, worker="test", export=None)
        assert outcome.status == "scored", outcome.reason
    with sqlite_factory() as session:
        study_id = session.execute(select(Study.id).where(Study.study_uid == second_study)).scalar_one()
        result_id = session.execute(select(Result.id).where(Result.study_id == study_id)).scalar_one()
        pending = session.execute(select(Export.kind).where(Export.result_id == result_id,
                                                            Export.state == ExportState.pending.value)).scalars()
        assert set(pending) == {"sr", "seg", "sc"}

    sent: list[Dataset] = []

    def pacs(datasets: Sequence[Dataset], **_kwargs: Any) -> list[int]:
        sent.extend(datasets)
        return [0] * len(datasets)

    run = run_export(result_id, sqlite_factory, settings, send=pacs)
    assert run.sent == 3, run
    assert {(ds.PatientID, ds.StudyInstanceUID) for ds in sent} == {("PAT-Y", second_study)}


def test_a_node_that_takes_no_seg_and_only_implicit_vr_still_gets_the_sr_and_the_capture(
    sqlite_settings: Any, sqlite_factory: Any, tmp_path: Path
) -> None:
    """Before, one object the node would not take (a PACS without SEG support) failed all three on
    every retry, and a node taking Implicit VR only got nothing. Now each object stands alone, the
    SEG fails at once with the reason, and the SR does not point at a SEG the node never stored."""
    received: list[Dataset] = []

    def store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        pacs.add_supported_context(sop_class, [ImplicitVRLittleEndian])
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert server is not None  # block=False: the server runs in its own thread and is returned
    try:
        settings = sqlite_settings.model_copy(update={
            "export_enabled": True, "export_host": "127.0.0.1", "export_port": server.server_address[1],
            "export_ae_title": "PACS", "export_timeout_seconds": 10})
        write_phantom_study(tmp_path / "s", severity_left=25.0, severity_right=5.0, seed=83, slices=36, rows=96,
                            columns=96, pixel_spacing=3.6, slice_spacing=9.0)
        store_study_files(settings, sqlite_factory, tmp_path / "s")
        [job_id] = queue_settled_studies(sqlite_factory, 0.0, now=utcnow() + timedelta(seconds=5))
        assert run_job(job_id, sqlite_factory, settings, worker="test", export=None).status == "scored"
        with sqlite_factory() as session:
            result_id = session.execute(select(Result.id)).scalar_one()
        run = run_export(result_id, sqlite_factory, settings)
    finally:
        server.shutdown()
    assert (run.sent, run.failed, run.pending) == (2, 1, 0), run
    with sqlite_factory() as session:
        exports = {e.kind: e for e in session.execute(select(Export)).scalars()}
    seg = exports["seg"]
    assert (seg.state, seg.attempts) == (ExportState.failed.value, 1)  # no retry can change it
    assert "accepted no presentation context for Segmentation Storage" in (seg.last_error or "")
    assert {str(ds.SOPClassUID) for ds in received} == {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {ImplicitVRLittleEndian}
    [sr] = [ds for ds in received if ds.SOPClassUID == Comprehensive3DSRStorage]
    assert seg.sop_instance_uid not in str(sr)  # no reference to a SEG the node never stored


# --- amended results: a study scored again ------------------------------------------------------


class InProcessPacs:
    """A pynetdicom node taking the three kinds; what it stores is kept, and written to ``folder``
    as received (for dciodvfy)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.received: list[Dataset] = []
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        for sop_class in (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False: the server runs in its own thread and is returned
        self.server = server
        self.port = self.server.server_address[1]

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{len(self.received):03d}.dcm", enforce_file_format=True)
        self.received.append(ds)
        return 0x0000

    def series(self) -> dict[str, list[Dataset]]:
        """SOP class -> its instances in the order received."""
        out: dict[str, list[Dataset]] = {}
        for ds in self.received:
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
        return out


def score_twice(settings: Any, factory: Any, folder: Path, between: Any = None) -> tuple[str, list[int]]:
    """A study scored, ``between()`` run, then rescored (a study reopened by its second part, or
    an admin's rescore: each a new scoring with its own result). Returns the study UID and the
    result ids, oldest first."""
    from app.lifecycle import request_rescore

    truth = write_phantom_study(folder, severity_left=25.0, severity_right=6.0, seed=84, slices=36, rows=96,
                                columns=96, pixel_spacing=3.6, slice_spacing=9.0)
    store_study_files(settings, factory, folder)
    job_id: int | None  # the first scoring's job, then the rescore's (None if none was queued)
    [job_id] = queue_settled_studies(factory, 0.0, now=utcnow() + timedelta(seconds=5))
    assert run_job(job_id, factory, settings, worker="test", export=None).status == "scored"
    if between is not None:
        between()
    job_id = request_rescore(factory, truth["study_instance_uid"])
    assert job_id is not None
    assert run_job(job_id, factory, settings, worker="test", export=None).status == "scored"
    with factory() as session:
        results = session.execute(select(Result.id).order_by(Result.id)).scalars().all()
    assert len(results) == 2
    return truth["study_instance_uid"], list(results)


def latest_result(factory: Any) -> int:
    with factory() as session:
        return int(session.execute(select(func.max(Result.id))).scalar_one())


def exporting(settings: Any, pacs: InProcessPacs, **more: Any) -> Any:
    return settings.model_copy(update={"export_enabled": True, "export_host": "127.0.0.1", "export_port": pacs.port,
                                       "export_ae_title": "PACS", "export_timeout_seconds": 10, **more})


def test_a_rescored_study_amends_its_report_in_the_same_series(
    sqlite_settings: Any, sqlite_factory: Any, tmp_path: Path
) -> None:
    """Before, each scoring went out as three new series, and the PACS showed the first part's
    report (lungs too small) beside the full study's, with nothing saying which counts. Now the
    second scoring's objects go into the same three series with higher instance numbers, and its
    SR names the first in its Predecessor Documents Sequence."""
    pacs = InProcessPacs(tmp_path / "pacs")
    try:
        settings = exporting(sqlite_settings, pacs)
        first_run: list[Any] = []
        study_uid, (first, second) = score_twice(
            settings, sqlite_factory, tmp_path / "s",
            between=lambda: first_run.append(run_export(latest_result(sqlite_factory), sqlite_factory, settings)))
        assert first_run[0].sent == 3 and first_run[0].result_id == first, first_run
        run = run_export(second, sqlite_factory, settings)
    finally:
        pacs.server.shutdown()
    assert (run.sent, run.failed, run.pending) == (3, 0, 0), run
    by_class = pacs.series()
    assert {k: len(v) for k, v in by_class.items()} == {
        Comprehensive3DSRStorage: 2, SegmentationStorage: 2, SecondaryCaptureImageStorage: 2}
    for sop_class, (old, new) in by_class.items():  # one series each, the newer instance after the older
        assert old.StudyInstanceUID == new.StudyInstanceUID == study_uid
        assert old.SeriesInstanceUID == new.SeriesInstanceUID, sop_class
        assert old.SeriesNumber == new.SeriesNumber and old.SOPInstanceUID != new.SOPInstanceUID
        assert (int(old.InstanceNumber), int(new.InstanceNumber)) == (1, 2), sop_class
    assert len({str(ds.SeriesInstanceUID) for ds in pacs.received}) == 3
    old_sr, new_sr = by_class[Comprehensive3DSRStorage]
    assert "PredecessorDocumentsSequence" not in old_sr
    [study] = new_sr.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [item] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, item.ReferencedSOPClassUID,
            item.ReferencedSOPInstanceUID) == (study_uid, old_sr.SeriesInstanceUID, Comprehensive3DSRStorage,
                                               old_sr.SOPInstanceUID)
    # The new SR still points at its own SEG, in the SEG series.
    new_seg = by_class[SegmentationStorage][1]
    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                for st in new_sr.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence
                for i in s.ReferencedSOPSequence}
    assert (new_seg.SeriesInstanceUID, new_seg.SOPInstanceUID) in evidence
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    for path in sorted(pacs.folder.iterdir()):
        assert dciodvfy_errors(path) == [], path.name


def test_a_rescore_within_the_hold_sends_only_the_newest_result(
    sqlite_settings: Any, sqlite_factory: Any, tmp_path: Path
) -> None:
    """With export_hold_seconds, a study reopened and rescored inside the hold sends its newest
    scoring only; the older result's objects are superseded, never sent, and an admin's retry
    does not send them either."""
    from app.lifecycle import reset_export

    pacs = InProcessPacs(tmp_path / "pacs")
    try:
        settings = exporting(sqlite_settings, pacs, export_hold_seconds=600.0)
        held: list[Any] = []
        _study_uid, (first, second) = score_twice(
            settings, sqlite_factory, tmp_path / "s",
            between=lambda: held.append(run_export(latest_result(sqlite_factory), sqlite_factory, settings)))
        assert (held[0].sent, held[0].pending) == (0, 3) and 590 < held[0].retry_in <= 600, held
        assert pacs.received == []
        with sqlite_factory() as session:
            rows = session.execute(select(Export).order_by(Export.id)).scalars().all()
        old = [r for r in rows if r.result_id == first]
        assert {r.state for r in old} == {ExportState.superseded.value} and len(old) == 3
        assert all("superseded by result" in (r.last_error or "") for r in old)
        assert run_export(first, sqlite_factory, settings).sent == 0
        reset = reset_export(sqlite_factory, old[0].id)
        assert reset is not None
        assert reset.state == ExportState.superseded.value
        still = run_export(second, sqlite_factory, settings)  # the newest one is held too
        assert (still.sent, still.pending) == (0, 3) and pacs.received == []
        with sqlite_factory.begin() as session:  # the hold is over
            session.execute(update(Export).where(Export.result_id == second).values(
                next_attempt_at=utcnow() - timedelta(seconds=1)))
        run = run_export(second, sqlite_factory, settings)
        assert run_export(first, sqlite_factory, settings).sent == 0
    finally:
        pacs.server.shutdown()
    assert (run.sent, run.pending, run.retry_in) == (3, 0, None), run
    with sqlite_factory() as session:
        sent = set(session.execute(select(Export.sop_instance_uid).where(
            Export.state == ExportState.sent.value)).scalars())
    assert {str(ds.SOPInstanceUID) for ds in pacs.received} == sent and len(sent) == 3
    assert all(int(ds.InstanceNumber) == 1 for ds in pacs.received)  # the superseded ones are not counted
    [sr] = pacs.series()[Comprehensive3DSRStorage]
    assert "PredecessorDocumentsSequence" not in sr  # nothing earlier reached the PACS


# --- the service sends them to a DICOM node -----------------------------------------------------


class Storescp:
    """dcmtk's storescp as the PACS: every object it receives lands in ``folder``."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port, self.folder = port, folder
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(STORESCP), "-aet", PACS_AET, "-od", str(self.folder), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 15, "storescp to listen")
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def __exit__(self, *_exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    def received(self) -> list[Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]


@dataclass
class Service:
    api: str
    dicom_port: int
    pacs_port: int
    process: ServiceProcess
    data_dir: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not STORESCP.exists():
        pytest.fail("dcmtk's /usr/bin/storescp is required (scripts/install.sh installs dcmtk)")
    pacs_port = free_port()
    with embedded_service(
        tmp_path_factory.mktemp("exporting"),
        CTTRIAGE_SETTLE_SECONDS="1",
        CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS="0.3",
        CTTRIAGE_EXPORT_ENABLED="true",
        CTTRIAGE_EXPORT_HOST="127.0.0.1",
        CTTRIAGE_EXPORT_PORT=str(pacs_port),
        CTTRIAGE_EXPORT_AE_TITLE=PACS_AET,
        CTTRIAGE_EXPORT_MAX_ATTEMPTS="3",
        CTTRIAGE_EXPORT_BACKOFF_SECONDS="0.5",
        CTTRIAGE_EXPORT_TIMEOUT_SECONDS="10",
    ) as running:
        yield Service(running.api, running.dicom_port, pacs_port, running.process, running.data_dir)


def push_phantom(service: Service, folder: Path, **spec: Any) -> dict[str, Any]:
    truth = write_phantom_study(folder, **SMALL, **spec)
    assert set(push_files(sorted(folder.glob("*.dcm")), host="127.0.0.1", port=service.dicom_port)) == {0}
    study = wait_for_state(service.api, truth["study_instance_uid"], timeout=120, logs=service.process.log)
    assert study["state"] == "scored", study
    return truth


def wait_for_exports(service: Service, study_uid: str, state: str) -> list[dict[str, Any]]:
    def settled() -> list[dict[str, Any]] | None:
        exports = API.get(f"{service.api}/api/studies/{study_uid}").json()["exports"]
        return exports if len(exports) == 3 and all(e["state"] == state for e in exports) else None

    return wait_until(settled, 90, f"three exports {state}", logs=service.process.log)  # type: ignore[no-any-return]


def check_received(received: list[Dataset], truth: dict[str, Any], exports: list[dict[str, Any]],
                   folder: Path) -> None:
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    assert len(received) == 3 and set(by_class) == {
        SegmentationStorage, SecondaryCaptureImageStorage, Comprehensive3DSRStorage}, sorted(by_class)
    assert {str(ds.SOPInstanceUID) for ds in received} == {e["sop_instance_uid"] for e in exports}
    for ds in received:
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
        assert (ds.PatientID, str(ds.PatientName)) == ("PH0001", "PHANTOM^CHEST")
        assert ds.Manufacturer == "cttriage" and ds.SeriesInstanceUID != truth["series_instance_uid"]
    seg = hd.seg.Segmentation.from_dataset(by_class[SegmentationStorage])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == truth["series_instance_uid"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung", "Lesions"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(by_class[Comprehensive3DSRStorage])
    values = sr_measurements(sr)
    assert abs(values[("left lung", PERCENT_AFFECTED.value)] - truth["severity_left"]) <= 3.0
    assert abs(values[("right lung", PERCENT_AFFECTED.value)] - truth["severity_right"]) <= 3.0
    assert sr_texts(sr, codes.DCM.AlgorithmName) == {"cttriage threshold"}
    if DCIODVFY.exists():
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            assert dciodvfy_errors(path) == [], path.name
    else:
        print("dciodvfy not installed (Debian dicom3tools): received objects not validated by it")


def test_results_reach_the_pacs(service: Service, tmp_path: Path) -> None:
    with Storescp(service.pacs_port, tmp_path / "pacs") as pacs:
        truth = push_phantom(service, tmp_path / "study", severity_left=30.0, severity_right=6.0, seed=31)
        exports = wait_for_exports(service, truth["study_instance_uid"], "sent")
    assert sorted(e["kind"] for e in exports) == ["sc", "seg", "sr"]
    assert all(e["attempts"] == 1 and e["sent_at"] and e["last_error"] is None for e in exports)
    check_received(pacs.received(), truth, exports, pacs.folder)


def test_node_down_then_an_admin_retry(service: Service, tmp_path: Path) -> None:
    truth = push_phantom(service, tmp_path / "study", severity_left=5.0, severity_right=40.0, seed=32)
    uid = truth["study_instance_uid"]
    failed = wait_for_exports(service, uid, "failed")
    for export in failed:  # retried with backoff, then given up, with the reason for the admin
        assert export["attempts"] == 3 and export["sent_at"] is None
        assert "not established" in export["last_error"], export
    listed = API.get(f"{service.api}/api/admin/exports", params={"state": "failed"}).json()
    assert {e["id"] for e in failed} <= {e["id"] for e in listed if e["study_uid"] == uid}
    assert API.post(f"{service.api}/api/admin/exports/999999/retry").status_code == 404

    with Storescp(service.pacs_port, tmp_path / "pacs") as pacs:
        for export in failed:
            response = API.post(f"{service.api}/api/admin/exports/{export['id']}/retry")
            assert response.status_code == 202, response.text
            assert response.json()["enqueued"] is True and response.json()["export"]["state"] == "pending"
        sent = wait_for_exports(service, uid, "sent")
    assert all(e["attempts"] == 1 and e["last_error"] is None for e in sent)  # a fresh round of attempts
    check_received(pacs.received(), truth, sent, pacs.folder)



def test_an_export_whose_task_was_lost_is_sent_by_the_relay(service: Service, tmp_path: Path) -> None:
    """Pending exports with no task anywhere (the broker was down after the scoring, or a Redis
    restart lost the retry) are overdue; the assembler's relay hands them to the broker again, and
    they reach the PACS without an admin's retry."""
    with Storescp(service.pacs_port, tmp_path / "pacs") as pacs:
        truth = push_phantom(service, tmp_path / "study", severity_left=12.0, severity_right=20.0, seed=33)
        uid = truth["study_instance_uid"]
        first = wait_for_exports(service, uid, "sent")
        engine = create_engine(f"sqlite:///{service.data_dir / 'cttriage.sqlite'}")
        with Session(engine) as session, session.begin():  # as if the sends had never happened
            session.execute(update(Export).where(Export.id.in_([e["id"] for e in first])).values(
                state=ExportState.pending.value, attempts=0, sent_at=None,
                next_attempt_at=utcnow() - timedelta(days=2)))
        engine.dispose()
        again = wait_for_exports(service, uid, "sent")
    assert all(e["attempts"] == 1 for e in again)
    assert {e["sop_instance_uid"] for e in again} == {e["sop_instance_uid"] for e in first}  # the same objects
    assert {str(ds.SOPInstanceUID) for ds in pacs.received()} >= {e["sop_instance_uid"] for e in again}
