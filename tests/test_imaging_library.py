"""``models/`` as a pure imaging library: no import of the service, its errors mapped by the service
in one table, and one scoring interface with two methods behind it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import models.errors
import models.inference
import models.predictor
from app.errors import FAILED, IMAGING_ERRORS, REJECTED, imaging_mapping, study_state
from models.checkpoint import SYNTHETIC_TRAINING_DATA, metadata_for, save_checkpoint
from models.errors import ImagingError, UnusableImageError
from models.inference import TriageNetworks
from models.model_store import bundle_paths
from models.multitask import MultitaskConfig, MultitaskNet
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import phantom_datasets
from models.predictor import NetworkPredictor, Predictor, ThresholdPredictor, predictor_for
from models.severity import lung_severity
from models.torch_preprocessing import resample_inplane_torch
from models.unet import UNetConfig
from models.volume import hu_volume
from worker.pipeline import score_volume

MODELS = Path(__file__).resolve().parents[1] / "models"
SERVICE_PACKAGES = {"app", "worker"}
SPEC = PhantomSpec(rows=96, columns=96, pixel_spacing=3.6, slices=36, slice_spacing=9.0, severity_right=20.0, seed=6)


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_imports_nothing_of_the_service() -> None:
    offenders = {path.name: sorted(imported_packages(path) & SERVICE_PACKAGES) for path in sorted(MODELS.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_imaging_error_has_its_row_and_rejections_are_the_unusable_images() -> None:
    classes = [cls for _, cls in inspect.getmembers(models.errors, inspect.isclass)
               if issubclass(cls, ImagingError) and cls.__module__ == "models.errors"]
    assert set(classes) == set(IMAGING_ERRORS)
    for cls in classes:
        expected = REJECTED if issubclass(cls, UnusableImageError) else FAILED
        assert study_state(cls("x")) == imaging_mapping(cls("x")).state == expected, cls.__name__
    assert study_state(ValueError("a bug")) == FAILED


def multitask_only_networks(tmp_path: Path) -> TriageNetworks:
    """Tiny random multitask network, no lungs network (threshold lungs): fast, and lungs are found."""
    torch.manual_seed(0)
    net = MultitaskNet(MultitaskConfig(unet=UNetConfig(levels=3, base_channels=4, max_channels=8,
                                                       top_decoder_blocks=1), hidden_features=8, pyramid_levels=2))
    save_checkpoint(tmp_path / "multitask.pt", net.eval(),
                    metadata_for(net, version="t-1", training_data=SYNTHETIC_TRAINING_DATA, synthetic=True))
    return TriageNetworks.from_bundle(bundle_paths(tmp_path))


def test_the_choice_of_method_is_made_in_one_place_and_both_satisfy_the_protocol(tmp_path: Path) -> None:
    networks = multitask_only_networks(tmp_path)
    threshold, network = predictor_for(None, 2.0), predictor_for(networks, 2.0)
    assert isinstance(threshold, ThresholdPredictor) and isinstance(network, NetworkPredictor)
    for predictor in (threshold, network):
        assert isinstance(predictor, Predictor)
        assert predictor.inplane_spacing_mm == 2.0
    assert (network.method, network.model_version) == (networks.method, networks.version)


def test_threshold_prediction_is_on_its_grid() -> None:
    phantom = phantom_volume(SPEC)
    p = ThresholdPredictor(2.0).predict(phantom.hu, phantom.spacing)
    grid = (SPEC.slices, round(SPEC.rows * SPEC.pixel_spacing / 2.0), round(SPEC.columns * SPEC.pixel_spacing / 2.0))
    assert p.hu.shape == p.lung_labels.shape == p.lesions.shape == grid
    assert (p.hu.dtype, p.lung_labels.dtype, p.lesions.dtype) == (
        np.dtype(np.int16), np.dtype(np.uint8), np.dtype(np.bool_))
    assert p.spacing[1] == pytest.approx(2.0, abs=0.01) and p.spacing[0] == SPEC.slice_spacing
    assert p.identification is None and p.method == "threshold"
    assert p.severity == lung_severity(p.lung_labels, p.lesions, p.spacing)
    assert list(p.timings) == ["resample", "lungs", "lesions", "severity", "findings"]


def test_network_masks_come_on_the_grid_the_networks_computed_resampled_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    networks = multitask_only_networks(tmp_path)
    resamplings: list[tuple[int, ...]] = []
    on_device = resample_inplane_torch

    def counted(hu: torch.Tensor, *args: object) -> object:
        resamplings.append(tuple(hu.shape))
        return on_device(hu, *args)  # type: ignore[arg-type]

    def refused(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("the volume was resampled a second time")

    monkeypatch.setattr(models.inference, "resample_inplane_torch", counted)
    monkeypatch.setattr(models.predictor, "resample_inplane", refused)
    volume = hu_volume(phantom_datasets(phantom_volume(SPEC), SPEC))
    score = score_volume("1.2.3", volume, NetworkPredictor(networks, 2.0))

    assert resamplings == [volume.hu.shape]
    assert score.masks is not None  # never dropped
    grid = (SPEC.slices, round(SPEC.rows * SPEC.pixel_spacing / 2.0), round(SPEC.columns * SPEC.pixel_spacing / 2.0))
    assert score.masks.hu.shape == score.masks.lung_labels.shape == score.masks.lesions.shape == grid
    assert score.masks.spacing[1] == pytest.approx(2.0, abs=0.01)
    assert score.identification is not None and 0.0 <= score.identification <= 1.0
    assert score.method == networks.method and score.details["lungs_method"] == "threshold"
    assert score.descriptors is not None and "findings" in score.timings
