"""Metrics against hand-computed values, the evaluation summary, and lung sides on the network path."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import SYNTHETIC_TRAINING_DATA, metadata_for, save_checkpoint
from models.commands import DataSource, evaluate_command
from models.datasets import DatasetError, read_labels, scan_dataset
from models.evaluation import StudyOutcome, format_table, summarize
from models.inference import InferenceOptions, TriageNetworks
from models.lung_network import (
    LungNetConfig,
    LungSegmentationNet,
    lung_bounding_box,
    lung_labels_from_probabilities,
    lung_mask_from_probabilities,
)
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.metrics import (
    average_precision,
    dice,
    ideal_mean_position,
    mean_worklist_position,
    roc_auc,
    spearman_rho,
    worklist_positions,
)
from models.model_store import bundle_paths
from models.multitask import MultitaskConfig, MultitaskNet
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import phantom_datasets
from models.training_samples import resample_mask
from models.unet import UNetConfig
from models.volume import hu_volume

# --- metrics, by hand ------------------------------------------------------------------------------


def test_roc_auc_by_hand() -> None:
    # Pairs (pos, neg): (.9,.5) (.9,.1) (.4,.5) (.4,.1) -> 3 of 4 ordered right.
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == 0.75
    # A tie between a positive and a negative counts one half: (.5,.5)=.5, (.5,.2)=1, (.8,..)=1,1.
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.5, 0.8, 0.5, 0.2])) == pytest.approx(3.5 / 4)
    assert roc_auc(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3])) == 1.0
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_average_precision_by_hand() -> None:
    # Ranked: + - + -  -> precision 1/1 at recall 1/2, 2/3 at recall 2/2: AP = .5 * 1 + .5 * 2/3.
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    # Tied scores enter together: {+,-} at .5 -> precision 1/2 at recall 1.
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert average_precision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0


def test_spearman_by_hand() -> None:
    assert spearman_rho(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman_rho(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    # Ranks (1,2,3,4) vs (1,3,2,4): d^2 = 0+1+1+0 = 2 -> 1 - 6*2 / (4*15) = 0.8.
    assert spearman_rho(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert math.isnan(spearman_rho(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])))


def test_dice_and_worklist_positions_by_hand() -> None:
    a = np.array([1, 1, 1, 0], dtype=bool)
    b = np.array([0, 1, 1, 1], dtype=bool)
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(a, np.zeros(4, bool)) == 0.0
    # Priority 5 first; the two 3s share positions 2 and 3 -> 2.5 each; 1 last.
    np.testing.assert_allclose(worklist_positions(np.array([3.0, 5.0, 1.0, 3.0])), [2.5, 1.0, 4.0, 2.5])
    assert mean_worklist_position(np.array([3.0, 5.0, 1.0, 3.0]), np.array([1, 0, 1, 0], bool)) == 3.25
    assert ideal_mean_position(2) == 1.5


# --- the summary ------------------------------------------------------------------------------------


def outcome(ident: str, cohort: str, identification: float | None, severity: float,
            true: float | None = None) -> StudyOutcome:
    return StudyOutcome(id=ident, cohort=cohort, covid=cohort == "covid", identification=identification,
                        severity=severity, severity_true=true, lung_dice=0.9, lesion_dice=0.5 if true else None,
                        seconds=1.0)


def test_summary_per_cohort() -> None:
    outcomes = [
        outcome("p1", "covid", 0.9, 40.0, 45.0),
        outcome("p2", "covid", 0.6, 10.0, 12.0),
        outcome("p3", "covid", 0.8, 60.0, 55.0),
        outcome("n1", "normal", 0.1, 0.0),
        outcome("b1", "bacterial_pneumonia", 0.7, 30.0),
        outcome("k1", "nodules", 0.2, 2.0),
    ]
    s = summarize(outcomes, severe_percent=50.0)
    assert s["identification_score"] == "identification"
    assert s["roc_auc"]["normal"] == 1.0
    assert s["roc_auc"]["nodules"] == 1.0
    assert s["roc_auc"]["bacterial_pneumonia"] == pytest.approx(2 / 3)  # p2 (.6) ranks below b1 (.7)
    assert s["roc_auc"]["all"] == pytest.approx(8 / 9)
    assert s["spearman_rho"] == pytest.approx(1.0)
    assert s["severity_mae"] == pytest.approx((5 + 2 + 5) / 3)
    assert s["lesion_dice"] == 0.5
    # Worklist: band, then identification: p3 (CT-3), p1 (CT-2), b1 (CT-2), p2, k1 (CT-1), n1.
    assert s["worklist"]["mean_position_positive"] == pytest.approx((1 + 2 + 4) / 3)
    assert s["worklist"]["severe"] == 1 and s["worklist"]["mean_position_severe"] == 1.0
    table = format_table({"method": s})
    assert "0.89" in table and "Bac.Pn" in table


def test_summary_without_identification_ranks_by_severity() -> None:
    outcomes = [outcome("p1", "covid", None, 40.0, 45.0), outcome("n1", "normal", None, 50.0)]
    s = summarize(outcomes)
    assert s["identification_score"] == "severity"
    assert s["roc_auc"]["all"] == 0.0
    assert math.isnan(s["roc_auc"]["nodules"])


def test_labels_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("id,covid,cohort,severity\na,1,,12.5\nb,0,Bacterial Pneumonia,\nc,,,\n")
    labels = read_labels(path)
    assert labels["a"].cohort == "covid" and labels["a"].severity == 12.5
    assert labels["b"].cohort == "bacterial_pneumonia" and labels["b"].covid is False
    assert labels["c"].covid is None
    path.write_text("id,covid\na,maybe\n")
    with pytest.raises(DatasetError, match="covid must be"):
        read_labels(path)


def test_nifti_dataset_is_read_in_canonical_orientation(tmp_path: Path) -> None:
    """A NIfTI in RAS+ voxel order (as nibabel writes by default) comes back in our order."""
    nib = pytest.importorskip("nibabel")
    spec = PhantomSpec(rows=64, columns=64, pixel_spacing=5.0, slices=20, slice_spacing=10.0, severity_left=30.0)
    phantom = phantom_volume(spec)
    # canonical (z up, y posterior, x patient left) -> RAS+ array (x to the right, y anterior, z up)
    ras = phantom.hu.transpose(2, 1, 0)[::-1, ::-1, :]
    affine = np.diag([5.0, 5.0, 10.0, 1.0])
    (tmp_path / "images").mkdir()
    (tmp_path / "lesions").mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), affine), tmp_path / "images" / "s1.nii.gz")
    lesions_ras = (phantom.lesions > 0).transpose(2, 1, 0)[::-1, ::-1, :].astype(np.uint8)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lesions_ras), affine), tmp_path / "lesions" / "s1.nii.gz")
    (tmp_path / "labels.csv").write_text("id,covid\ns1,1\n")
    [record] = scan_dataset(tmp_path)
    data = record.load()
    assert data.spacing == (10.0, 5.0, 5.0)
    np.testing.assert_array_equal(data.hu, phantom.hu)
    np.testing.assert_array_equal(data.lesions, phantom.lesions > 0)
    (tmp_path / "labels.csv").write_text("id,covid\ns1,1\ns2,0\n")
    with pytest.raises(DatasetError, match="have no image"):
        scan_dataset(tmp_path)


# --- left and right through the network path --------------------------------------------------------


def tiny_networks(tmp_path: Path, options: InferenceOptions = InferenceOptions()) -> TriageNetworks:
    torch.manual_seed(0)
    net = MultitaskNet(MultitaskConfig(unet=UNetConfig(levels=3, base_channels=4, max_channels=8,
                                                       top_decoder_blocks=1), hidden_features=8, pyramid_levels=2))
    lungs = LungSegmentationNet(LungNetConfig(unet=UNetConfig(levels=3, base_channels=4, max_channels=8)))
    for name, module in (("multitask.pt", net), ("lungs.pt", lungs)):
        save_checkpoint(tmp_path / name, module.eval(),
                        metadata_for(module, version="t-1", training_data=SYNTHETIC_TRAINING_DATA, synthetic=True))
    return TriageNetworks.from_bundle(bundle_paths(tmp_path), options)


def test_bf16_autocast_path_matches_fp32(tmp_path: Path) -> None:
    """The mixed-precision path that GPUs run (convolutions in bf16, the classifier in fp32), run
    here on the CPU: the convolutions really run in bf16 and the outputs stay close to fp32."""
    fp32 = tiny_networks(tmp_path / "fp32", InferenceOptions(autocast=False))
    bf16 = tiny_networks(tmp_path / "bf16", InferenceOptions(autocast=True))
    conv_dtypes: set[torch.dtype] = set()
    first_conv = next(m for m in bf16.multitask.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: conv_dtypes.add(out.dtype))
    fc_dtypes: set[torch.dtype] = set()
    for fc in (m for m in bf16.multitask.modules() if isinstance(m, torch.nn.Linear)):
        fc.register_forward_hook(lambda _m, _i, out: fc_dtypes.add(out.dtype))
    image = torch.from_numpy(np.random.default_rng(3).random((20, 48, 40), dtype=np.float32))

    lesion_32, identification_32 = fp32.multitask_outputs(image)
    lesion_16, identification_16 = bf16.multitask_outputs(image)
    assert conv_dtypes == {torch.bfloat16} and fc_dtypes == {torch.float32}
    assert lesion_16.dtype == np.float32 and lesion_16.shape == lesion_32.shape
    # Untrained outputs vary little around 0.5, so "close" is judged against their own spread too.
    lungs_32, lungs_16 = fp32.lung_probabilities(image), bf16.lung_probabilities(image)
    for ours, reference in ((lesion_16, lesion_32), (lungs_16, lungs_32)):
        assert np.abs(ours - reference).max() < 0.01
        assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.99
    assert abs(identification_16 - identification_32) < 0.01


@pytest.mark.parametrize("flip_lr", [False, True], ids=["stored-as-is", "stored-mirrored"])
def test_network_path_puts_a_diseased_left_lung_on_the_left(tmp_path: Path, flip_lr: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Post-processing of the network path (mask, split, crop, severity) on a phantom whose left
    lung alone is diseased. The two network outputs are replaced by the true masks, so what is
    checked is everything around them: sides follow the patient however the image was stored."""
    spec = PhantomSpec(rows=128, columns=128, pixel_spacing=2.8, slices=40, slice_spacing=8.0,
                       severity_left=35.0, seed=21, flip_lr=flip_lr)
    phantom = phantom_volume(replace(spec, flip_lr=False))
    volume = hu_volume(phantom_datasets(phantom, spec))
    np.testing.assert_array_equal(volume.hu, phantom.hu)  # canonical whatever the storage

    networks = tiny_networks(tmp_path)
    true_lungs = resample_mask(phantom.lungs > 0, phantom.spacing).astype(np.float32)
    true_lesions = resample_mask(phantom.lesions > 0, phantom.spacing).astype(np.float32)
    box = lung_bounding_box(true_lungs > 0.5)  # the crop predict() will take from these lungs

    def lesion_outputs(image: torch.Tensor) -> tuple[np.ndarray, float]:
        assert tuple(image.shape) == true_lesions[box].shape  # the multitask network sees the crop
        return true_lesions[box], 0.5

    monkeypatch.setattr(networks, "lung_probabilities", lambda image: true_lungs)
    monkeypatch.setattr(networks, "multitask_outputs", lesion_outputs)
    p = networks.predict(volume.hu, volume.spacing)
    assert p.crop == box
    assert p.severity.severity_left == pytest.approx(phantom.truth["severity_left"], abs=2.0)
    assert p.severity.severity_right == pytest.approx(0.0, abs=0.5)
    assert p.severity.severity == p.severity.severity_left
    assert dice(p.lung_labels == LEFT_LUNG, resample_mask(phantom.lungs == LEFT_LUNG, phantom.spacing)) > 0.97
    assert dice(p.lung_labels == RIGHT_LUNG, resample_mask(phantom.lungs == RIGHT_LUNG, phantom.spacing)) > 0.97
    assert p.lungs_method == "network"


def test_lung_mask_post_processing_drops_strays_and_fills_holes() -> None:
    probs = np.zeros((6, 40, 60), dtype=np.float32)
    probs[1:5, 5:35, 5:25] = 0.9  # right lung
    probs[1:5, 5:35, 35:55] = 0.8  # left lung
    probs[2, 15:18, 10:13] = 0.1  # a vessel the network missed inside the right lung
    probs[5, 0:2, 0:2] = 0.99  # a stray blob outside
    mask = lung_mask_from_probabilities(probs)
    assert mask[2, 16, 11] and not mask[5, 0, 0]
    labels = lung_labels_from_probabilities(probs, (5.0, 2.0, 2.0))
    assert set(np.unique(labels[1:5, 20, 10])) == {RIGHT_LUNG}
    assert set(np.unique(labels[1:5, 20, 45])) == {LEFT_LUNG}


def test_evaluate_command_writes_a_table_and_json(tmp_path: Path) -> None:
    report = evaluate_command(DataSource(phantoms=6, seed=4), None, json_path=tmp_path / "eval.json",
                              echo=lambda _line: None)
    metrics = report["methods"]["threshold"]["metrics"]
    assert metrics["positives"] == 3 and metrics["negatives"]["normal"] == 1
    assert metrics["lung_dice"] > 0.9
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["synthetic_data"] is True
    assert "threshold" in written["table"]
    assert len(written["methods"]["threshold"]["studies"]) == 6
