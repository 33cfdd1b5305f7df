"""Checkpoint files: network weights plus everything needed to trust and rebuild them.

A result in the database names the model version that produced it, so a checkpoint must say
what it is (architecture and its config, preprocessing constants, what it was trained on, a
version) and prove it is the file that was trained: ``state_sha256`` is the SHA-256 of the
weights themselves (names, dtypes, shapes, bytes; independent of pickling), checked on every
load. Files are read with ``torch.load(weights_only=True)``: no code in a checkpoint runs.

Weights trained on synthetic phantoms carry ``training_data = SYNTHETIC_TRAINING_DATA`` and
``synthetic = True``; the service marks every score they produce (see :mod:`models.inference`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import CheckpointError, CheckpointIntegrityError
from models.lung_network import LUNG_PROBABILITY_THRESHOLD, LungNetConfig, LungSegmentationNet
from models.multitask import MultitaskConfig, MultitaskNet
from models.preprocessing import PAPER_INPLANE_SPACING_MM, WINDOW_HU

CHECKPOINT_FORMAT = "cttriage-checkpoint/1"
KIND_LUNGS, KIND_MULTITASK = "lungs", "multitask"
SYNTHETIC_TRAINING_DATA = "synthetic phantoms, not clinical"
#: Lesion probability above which a pixel is lesion (the authors' value).
LESION_PROBABILITY_THRESHOLD = 0.2
#: Versions end up in a 64-character database column, possibly two joined by '+'.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,30}$")


def paper_preprocessing() -> dict[str, Any]:
    """The preprocessing constants networks are trained with, stored in every checkpoint."""
    return {
        "inplane_spacing_mm": list(PAPER_INPLANE_SPACING_MM),
        "window_hu": list(WINDOW_HU),
        "lung_probability_threshold": LUNG_PROBABILITY_THRESHOLD,
        "lesion_probability_threshold": LESION_PROBABILITY_THRESHOLD,
        "multitask_input": "cropped to the bounding box of the lung mask",
    }


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint is. ``state_sha256`` is filled in by :func:`save_checkpoint`."""

    kind: str  # KIND_LUNGS or KIND_MULTITASK
    architecture: str  # e.g. "lungs-unet2d", "multitask-spatial-1"
    config: dict[str, Any]  # the architecture's config, to rebuild the module
    version: str
    training_data: str
    synthetic: bool = False
    preprocessing: dict[str, Any] = field(default_factory=paper_preprocessing)
    training: dict[str, Any] = field(default_factory=dict)  # steps, best metric, seed, ...
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    torch_version: str = field(default_factory=lambda: str(torch.__version__))
    state_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (KIND_LUNGS, KIND_MULTITASK):
            raise ValueError(f"kind must be {KIND_LUNGS!r} or {KIND_MULTITASK!r}, got {self.kind!r}")
        if not _VERSION.match(self.version):
            raise ValueError(f"version {self.version!r}: 1-31 characters of letters, digits, '.', '_', '-'")
        if self.synthetic != (self.training_data == SYNTHETIC_TRAINING_DATA):
            raise ValueError(f"synthetic weights must say training_data={SYNTHETIC_TRAINING_DATA!r}, and only they")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint: the rebuilt module (eval mode, on CPU) and its metadata."""

    module: nn.Module
    metadata: CheckpointMetadata
    path: Path


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted (name, dtype, shape, raw bytes) of every tensor of a state dict."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_module(kind: str, config: dict[str, Any]) -> nn.Module:
    """An untrained module of ``kind`` with the architecture ``config`` describes."""
    if kind == KIND_LUNGS:
        return LungSegmentationNet(LungNetConfig.from_dict(config))
    if kind == KIND_MULTITASK:
        return MultitaskNet(MultitaskConfig.from_dict(config))
    raise CheckpointError(f"unknown checkpoint kind {kind!r}")


def metadata_for(module: nn.Module, **fields: Any) -> CheckpointMetadata:
    """Metadata with kind, architecture and config taken from ``module`` itself."""
    if isinstance(module, MultitaskNet):
        kind, arch, config = KIND_MULTITASK, module.config.architecture, module.config.to_dict()
    elif isinstance(module, LungSegmentationNet):
        kind, arch, config = KIND_LUNGS, module.config.architecture, module.config.to_dict()
    else:
        raise TypeError(f"not a cttriage network: {type(module).__name__}")
    return CheckpointMetadata(kind=kind, architecture=arch, config=config, **fields)


def save_checkpoint(path: str | Path, module: nn.Module, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """Write weights and metadata atomically (temp file, fsync, rename); returns the metadata
    with ``state_sha256`` set."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    metadata = replace(metadata, state_sha256=state_sha256(state))
    # Plain JSON types only: weights_only loading accepts nothing else (no numpy scalars).
    plain = json.loads(json.dumps(metadata.to_dict(), default=_plain))
    payload = {"format": CHECKPOINT_FORMAT, "metadata": plain, "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; workers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return metadata


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_checkpoint(path: str | Path) -> tuple[CheckpointMetadata, dict[str, torch.Tensor]]:
    """Metadata and verified state dict of a checkpoint file (no module built)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read (damaged, or not a checkpoint): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    try:
        metadata = CheckpointMetadata(**payload["metadata"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid metadata: {exc}") from exc
    state = payload["state_dict"]
    actual = state_sha256(state)
    if actual != metadata.state_sha256:
        raise CheckpointIntegrityError(
            f"{path}: weights' sha256 {actual[:16]}... differs from the recorded {metadata.state_sha256[:16]}...: "
            "the file was altered or damaged after training; refusing to use it"
        )
    return metadata, state


def load_checkpoint(path: str | Path, expect_kind: str | None = None) -> LoadedCheckpoint:
    """Rebuild and verify a network from a checkpoint file, in eval mode on the CPU."""
    metadata, state = read_checkpoint(path)
    if expect_kind is not None and metadata.kind != expect_kind:
        raise CheckpointError(f"{path} holds a {metadata.kind} network, expected {expect_kind}")
    module = build_module(metadata.kind, metadata.config)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the {metadata.architecture} architecture: {exc}") from exc
    module.eval()
    return LoadedCheckpoint(module=module, metadata=metadata, path=Path(path))
