"""Checkpoints: bit-exact round trip, integrity check, metadata rules, and where weights are found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    SYNTHETIC_TRAINING_DATA,
    load_checkpoint,
    metadata_for,
    read_checkpoint,
    save_checkpoint,
    state_sha256,
)
from models.errors import CheckpointError, CheckpointIntegrityError
from models.inference import SYNTHETIC_NOTE, TriageNetworks
from models.lung_network import LungNetConfig, LungSegmentationNet
from models.model_store import available_versions, resolve_bundle
from models.multitask import MultitaskConfig, MultitaskNet
from models.unet import UNetConfig

TINY = UNetConfig(levels=3, base_channels=4, max_channels=8, top_decoder_blocks=1)


def tiny_multitask(seed: int = 0) -> MultitaskNet:
    torch.manual_seed(seed)
    net = MultitaskNet(MultitaskConfig(unet=TINY, hidden_features=8, pyramid_levels=2))
    for m in net.modules():  # running statistics must survive the round trip too
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.num_batches_tracked is not None
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def tiny_lungs() -> LungSegmentationNet:
    torch.manual_seed(1)
    return LungSegmentationNet(LungNetConfig(unet=UNetConfig(levels=3, base_channels=4, max_channels=8))).eval()


def save(path: Path, net: torch.nn.Module, version: str = "v1", synthetic: bool = True) -> None:
    data = SYNTHETIC_TRAINING_DATA if synthetic else "Mosmed-1110 + MedSeg-29 (test stand-in)"
    save_checkpoint(path, net, metadata_for(net, version=version, training_data=data, synthetic=synthetic))


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    net = tiny_multitask()
    path = tmp_path / "multitask.pt"
    meta = metadata_for(net, version="mt-0.1", training_data=SYNTHETIC_TRAINING_DATA, synthetic=True,
                        training={"steps_done": 3, "best": {"metric": "roc_auc", "value": 0.75}})
    saved = save_checkpoint(path, net, meta)
    loaded = load_checkpoint(path)
    assert loaded.metadata == saved
    assert saved.state_sha256 == state_sha256(net.state_dict())
    assert loaded.metadata.architecture == "multitask-spatial-1"
    assert loaded.metadata.preprocessing["window_hu"] == [-1000.0, 300.0]
    original, restored = net.state_dict(), loaded.module.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert original[name].dtype == restored[name].dtype, name
        assert torch.equal(original[name], restored[name]), name
    x = torch.rand(1, 4, 24, 20)
    with torch.no_grad():
        a, b = net(x), loaded.module(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_altered_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "multitask.pt"
    save(path, tiny_multitask())
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["cls_head.fc2.bias"] += 1e-3  # a quiet edit, metadata untouched
    torch.save(payload, path)
    with pytest.raises(CheckpointIntegrityError, match="sha256"):
        load_checkpoint(path)


def test_damaged_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "multitask.pt"
    save(path, tiny_multitask())
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_metadata_rules() -> None:
    net = tiny_lungs()
    with pytest.raises(ValueError, match="synthetic"):
        metadata_for(net, version="v1", training_data="phantoms", synthetic=True)
    with pytest.raises(ValueError, match="synthetic"):
        metadata_for(net, version="v1", training_data=SYNTHETIC_TRAINING_DATA, synthetic=False)
    with pytest.raises(ValueError, match="version"):
        metadata_for(net, version="../etc", training_data="x")
    assert metadata_for(net, version="v1", training_data="x").kind == "lungs"


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "lungs.pt", tiny_lungs())
    with pytest.raises(CheckpointError, match="expected multitask"):
        load_checkpoint(tmp_path / "lungs.pt", expect_kind="multitask")
    assert read_checkpoint(tmp_path / "lungs.pt")[0].kind == "lungs"


def test_bundles_are_resolved_from_path_or_named_versions(tmp_path: Path) -> None:
    assert resolve_bundle(None, None, None) is None  # nothing configured: threshold method
    root = tmp_path / "models"
    for version in ("a-1", "b-2"):
        save(root / version / "multitask.pt", tiny_multitask(), version=version)
    save(root / "b-2" / "lungs.pt", tiny_lungs(), version="b-2")
    assert available_versions(root) == ["a-1", "b-2"]
    with pytest.raises(CheckpointError, match="several versions"):
        resolve_bundle(None, root, None)
    with pytest.raises(CheckpointError, match="available: a-1, b-2"):
        resolve_bundle(None, root, "c-3")
    b = resolve_bundle(None, root, "b-2")
    assert b is not None and b.lungs == root / "b-2" / "lungs.pt"
    a = resolve_bundle(root / "a-1", root, "b-2")  # an explicit bundle path wins
    assert a is not None and a.multitask == root / "a-1" / "multitask.pt" and a.lungs is None
    with pytest.raises(CheckpointError, match="MODEL_DIR is not"):
        resolve_bundle(None, None, "a-1")
    with pytest.raises(CheckpointError, match="no multitask.pt"):
        resolve_bundle(tmp_path, None, None)


def test_results_name_their_weights(tmp_path: Path) -> None:
    save(tmp_path / "multitask.pt", tiny_multitask(), version="mt-2", synthetic=False)
    save(tmp_path / "lungs.pt", tiny_lungs(), version="lungs-1", synthetic=False)
    clinical = TriageNetworks(load_checkpoint(tmp_path / "multitask.pt"), load_checkpoint(tmp_path / "lungs.pt"))
    assert clinical.method == "multitask-spatial-1"
    assert clinical.version == "mt-2+lungs-1"
    assert not clinical.synthetic and SYNTHETIC_NOTE not in clinical.note
    save(tmp_path / "lungs.pt", tiny_lungs(), version="mt-2", synthetic=True)
    mixed = TriageNetworks(load_checkpoint(tmp_path / "multitask.pt"), load_checkpoint(tmp_path / "lungs.pt"))
    assert mixed.version == "mt-2"
    assert mixed.method == "multitask-spatial-1-phantom"  # any synthetic part marks the result
    assert mixed.note.startswith(SYNTHETIC_NOTE)
    no_lungs = TriageNetworks(load_checkpoint(tmp_path / "multitask.pt"), None)
    assert "threshold lungs" in no_lungs.note
    assert no_lungs.describe()["lungs"] is None
