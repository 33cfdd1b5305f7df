"""Scoring a CT volume with the trained networks, fast: the network path of the worker.

HU volume (canonical orientation) -> upload once -> 2x2 mm in-plane and HU window on the device
-> lungs network slice batches -> lung mask, split into the patient's right and left lung
-> crop to the lungs' bounding box -> Multitask network slice batches (lesion probability per
pixel, shared feature maps stacked into a 3D map) -> identification from the stacked map
-> lesion mask (probability >= 0.2) -> per-lung severity.

Speed: the networks are loaded once per worker process (:class:`TriageNetworks`, kept by
``worker.celery_app.WorkerResources``), run under ``torch.inference_mode`` in channels-last
layout (with 8-channel full-resolution maps, NCHW convolutions are ~7x slower on CPU), the
batch norm that directly follows a convolution is folded into it, and on CUDA the convolutions
run under bf16 (or fp16) autocast; ``torch.compile`` is optional. On CPU the number of torch
threads is set once, when the networks are built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from models.checkpoint import (
    KIND_LUNGS,
    KIND_MULTITASK,
    LESION_PROBABILITY_THRESHOLD,
    LoadedCheckpoint,
    load_checkpoint,
    paper_preprocessing,
)
from models.errors import CheckpointError, SegmentationError
from models.lung_network import LungSegmentationNet, lung_bounding_box, lung_labels_from_probabilities
from models.lungs_threshold import MIN_TOTAL_LUNG_ML
from models.model_store import BundlePaths
from models.multitask import MultitaskNet
from models.severity import LungSeverity, lung_severity
from models.threshold_method import threshold_lungs
from models.timing import NoTiming, StepTiming
from models.torch_preprocessing import resample_inplane_torch, window_torch
from models.unet import ResBlock2d

log = logging.getLogger(__name__)

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)

SYNTHETIC_NOTE = (
    "WEIGHTS TRAINED ON SYNTHETIC PHANTOMS, NOT ON CLINICAL DATA: identification and severity "
    "are not clinically meaningful; use only to test the service."
)


@dataclass(frozen=True)
class InferenceOptions:
    """How the networks run (not what they compute)."""

    device: str = "cpu"
    #: Slices per forward pass.
    batch_slices: int = 32
    channels_last: bool = True
    #: Fold each batch norm that directly follows a convolution into it (eval only).
    fold_batchnorm: bool = True
    #: bf16 autocast for the convolutions (fp16 on GPUs without bf16). None: on CUDA only, where
    #: it pays; True also on CPU (bf16, worth it on CPUs with AMX; how the tests check this path).
    autocast: bool | None = None
    compile: bool = False
    #: torch CPU threads; 0 means every core this process may run on.
    threads: int = 0


@dataclass(frozen=True)
class NetworkOutput:
    """What the networks found, on the grid they computed (the volume resampled in-plane): the grid's
    HU, lungs, lesions, the identification probability and severity."""

    hu: np.ndarray  # float32 HU on the grid
    lung_labels: np.ndarray  # uint8: 0, 1 right, 2 left
    lesion_mask: np.ndarray  # bool
    identification: float
    severity: LungSeverity
    spacing: tuple[float, float, float]
    crop: tuple[slice, slice, slice]  # the lungs' bounding box the multitask network saw
    lungs_method: str  # "network" or "threshold"
    details: dict[str, Any] = field(default_factory=dict)


def default_threads() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold ``bn2`` of every residual block into ``conv1`` (they are adjacent: conv -> BN),
    in place, for inference only. The pre-activation BN before ``conv1`` cannot be folded
    (a ReLU sits between it and the convolution)."""
    for block in module.modules():
        if not isinstance(block, ResBlock2d) or not isinstance(block.bn2, nn.BatchNorm2d):
            continue  # not a residual block, or folded already (bn2 is then an nn.Identity)
        conv, bn = block.conv1, block.bn2
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None, "ResBlock2d's BatchNorm tracks running statistics"
        scale = bn.weight.detach() / torch.sqrt(var + bn.eps)
        kernel_h, kernel_w = conv.kernel_size
        padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], conv.padding[1])
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, (kernel_h, kernel_w), padding=padding, bias=True)
        fused.weight.data = conv.weight.detach() * scale[:, None, None, None]
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
        assert fused.bias is not None  # built with bias=True
        fused.bias.data = (bias - mean) * scale + bn.bias.detach()
        block.conv1 = fused.to(conv.weight.device)
        block.bn2 = nn.Identity()
    return module


def _autocast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class _CompiledOrEager:
    """``torch.compile``d callable that falls back to eager for good if compiling fails (no C++
    toolchain, an unsupported op): compilation happens at the first call, not at compile()."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager = fn
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=True)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # compile errors surface here, as many types
                log.warning("torch.compile failed, running eager from now on: %s", exc)
                self.compiled = None
        return self.eager(*args)


class TriageNetworks:
    """The loaded networks of one model version, ready on their device; one per worker process."""

    def __init__(
        self,
        multitask: LoadedCheckpoint,
        lungs: LoadedCheckpoint | None,
        options: InferenceOptions = InferenceOptions(),
    ) -> None:
        multitask_net = multitask.module
        if multitask.metadata.kind != KIND_MULTITASK or not isinstance(multitask_net, MultitaskNet):
            raise CheckpointError(f"{multitask.path} is not a multitask network")
        lungs_net: LungSegmentationNet | None = None
        if lungs is not None:
            if lungs.metadata.kind != KIND_LUNGS or not isinstance(lungs.module, LungSegmentationNet):
                raise CheckpointError(f"{lungs.path} is not a lungs network")
            lungs_net = lungs.module
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"device {options.device} requested but CUDA is not available to this process")
        if self.device.type == "cpu":
            torch.set_num_threads(options.threads or default_threads())
        self.multitask_checkpoint = multitask
        self.lungs_checkpoint = lungs
        self.multitask = self._prepare(multitask_net)
        self.lungs = self._prepare(lungs_net) if lungs_net is not None else None
        self._multitask_slices: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = (
            self.multitask.slice_features
        )
        self._lung_slices: Callable[[torch.Tensor], torch.Tensor] | None = self.lungs
        if options.compile:
            self._compile()

    @classmethod
    def from_bundle(cls, paths: BundlePaths, options: InferenceOptions = InferenceOptions()) -> TriageNetworks:
        multitask = load_checkpoint(paths.multitask, expect_kind=KIND_MULTITASK)
        lungs = load_checkpoint(paths.lungs, expect_kind=KIND_LUNGS) if paths.lungs is not None else None
        return cls(multitask, lungs, options)

    def check_preprocessing(self, inplane_spacing_mm: float) -> None:
        """Raise CheckpointError where a network was trained on other input than it would get here:
        the in-plane spacing the worker is configured with, and the window and thresholds this
        code applies. A network fed another grid scores without complaint, just wrongly."""
        here = {**paper_preprocessing(), "inplane_spacing_mm": [float(inplane_spacing_mm)] * 2}
        for checkpoint in (self.multitask_checkpoint, self.lungs_checkpoint):
            if checkpoint is None:
                continue
            recorded = checkpoint.metadata.preprocessing
            differ = [f"{key} {recorded[key]} (here {here[key]})" for key in sorted(here)
                      if key in recorded and json.loads(json.dumps(recorded[key])) != json.loads(json.dumps(here[key]))]
            if differ:
                raise CheckpointError(f"the {checkpoint.metadata.kind} network of {checkpoint.metadata.version} was "
                                      f"trained with {'; '.join(differ)}: set CTTRIAGE_INPLANE_SPACING_MM to match, "
                                      "or use weights trained for this preprocessing")

    # --- identity of the results ------------------------------------------------------------

    @property
    def synthetic(self) -> bool:
        return self.multitask_checkpoint.metadata.synthetic or (
            self.lungs_checkpoint is not None and self.lungs_checkpoint.metadata.synthetic
        )

    @property
    def method(self) -> str:
        """Stored with every result: the architecture, marked when the weights are synthetic."""
        arch = self.multitask_checkpoint.metadata.architecture
        return f"{arch}-phantom" if self.synthetic else arch

    @property
    def version(self) -> str:
        """Stored with every result: the multitask version, plus the lungs one where it differs."""
        mt = self.multitask_checkpoint.metadata.version
        lungs = self.lungs_checkpoint.metadata.version if self.lungs_checkpoint is not None else None
        return mt if lungs in (None, mt) else f"{mt}+{lungs}"

    @property
    def note(self) -> str:
        lungs = "lungs network" if self.lungs_checkpoint is not None else "threshold lungs (no lungs network installed)"
        text = f"{self.multitask_checkpoint.metadata.architecture} network for lesions and identification, {lungs}."
        return f"{SYNTHETIC_NOTE} {text}" if self.synthetic else text

    def describe(self) -> dict[str, Any]:
        """Versions, hashes and training data of the loaded weights, for result details and logs."""
        def one(ckpt: LoadedCheckpoint | None) -> dict[str, Any] | None:
            if ckpt is None:
                return None
            m = ckpt.metadata
            return {"version": m.version, "architecture": m.architecture, "sha256": m.state_sha256,
                    "training_data": m.training_data, "synthetic": m.synthetic}
        return {"multitask": one(self.multitask_checkpoint), "lungs": one(self.lungs_checkpoint),
                "device": str(self.device)}

    # --- setup --------------------------------------------------------------------------------

    def _prepare(self, module: _ModuleT) -> _ModuleT:
        import copy

        module = copy.deepcopy(module).eval()
        if self.options.fold_batchnorm:
            fold_batchnorm(module)
        module = module.to(self.device)
        if self.options.channels_last:
            # torch's stubs omit Module.to(memory_format=...), which it accepts and documents.
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def _compile(self) -> None:
        self._multitask_slices = _CompiledOrEager(self.multitask.slice_features)
        if self.lungs is not None:
            self._lung_slices = _CompiledOrEager(self.lungs)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with torch.inference_mode():
            autocast = self.options.autocast if self.options.autocast is not None else self.device.type == "cuda"
            if autocast:
                with torch.autocast(self.device.type, dtype=_autocast_dtype(self.device)):
                    yield
            else:
                yield

    def _batch(self, image: torch.Tensor, start: int) -> torch.Tensor:
        x = image[start : start + self.options.batch_slices].unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    # --- stages -------------------------------------------------------------------------------

    def preprocess(
        self, hu: np.ndarray, spacing: tuple[float, float, float], inplane_spacing_mm: float = 2.0
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
        """Upload HU once; resample in-plane and window on the device -> (HU, windowed, spacing)."""
        volume = torch.from_numpy(np.ascontiguousarray(hu)).to(self.device, non_blocking=True)
        resampled, new_spacing = resample_inplane_torch(volume, spacing, (inplane_spacing_mm, inplane_spacing_mm))
        return resampled, window_torch(resampled), new_spacing

    def lung_probabilities(self, image: torch.Tensor) -> np.ndarray:
        """(D, H, W) windowed slices -> lung probability per voxel (float32, on the CPU)."""
        if self._lung_slices is None:
            raise CheckpointError("this model version has no lungs network")
        out = torch.empty(image.shape, dtype=torch.float32, device=self.device)
        with self._running():
            for start in range(0, image.shape[0], self.options.batch_slices):
                logits = self._lung_slices(self._batch(image, start))
                out[start : start + logits.shape[0]] = torch.sigmoid(logits.float())[:, 0]
        return out.cpu().numpy()

    def multitask_outputs(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        """(D, h, w) windowed crop -> lesion probability per voxel and identification probability."""
        d, h, w = image.shape
        lesion = torch.empty((d, h, w), dtype=torch.float32, device=self.device)
        shared: torch.Tensor | None = None
        with self._running():
            for start in range(0, d, self.options.batch_slices):
                seg, features = self._multitask_slices(self._batch(image, start))
                stop = start + seg.shape[0]
                lesion[start:stop] = torch.sigmoid(seg.float())[:, 0]
                if shared is None:
                    shared = torch.empty((features.shape[1], d, *features.shape[-2:]), dtype=torch.float32,
                                         device=self.device)
                shared[:, start:stop] = features.float().permute(1, 0, 2, 3)
            assert shared is not None
            with torch.autocast(self.device.type, enabled=False):
                logit = self.multitask.identify(shared)
        return lesion.cpu().numpy(), float(torch.sigmoid(logit.float())[0])

    def lung_labels(self, image: torch.Tensor, hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """Right/left lung labels of the grid (``image`` windowed, ``hu`` on the CPU): the lungs network
        where installed, else the threshold method."""
        if self._lung_slices is not None:
            labels = lung_labels_from_probabilities(self.lung_probabilities(image), spacing)
            ml = np.count_nonzero(labels) * float(np.prod(spacing)) / 1000.0
            if ml < MIN_TOTAL_LUNG_ML:
                raise SegmentationError(
                    f"lungs network found {ml / 1000:.2f} L of lung, "
                    f"expected at least {MIN_TOTAL_LUNG_ML / 1000:.1f} L "
                    "(not a chest CT, or the lungs are not in the scanned range)"
                )
            return labels
        return threshold_lungs(hu, spacing).lung_labels

    def predict(
        self,
        hu: np.ndarray,
        spacing: tuple[float, float, float],
        *,
        inplane_spacing_mm: float = 2.0,
        timer: StepTiming | None = None,
    ) -> NetworkOutput:
        """Lungs, lesions, identification and severity of a canonical HU volume, on the grid
        resampled here (returned with them: nothing needs to resample again)."""
        timer = timer or NoTiming()
        with timer.step("resample"):
            hu_t, image, grid = self.preprocess(hu, spacing, inplane_spacing_mm)
            grid_hu = hu_t.cpu().numpy()
        del hu_t
        with timer.step("lungs"):
            labels = self.lung_labels(image, grid_hu, grid)
        with timer.step("multitask"):
            box = lung_bounding_box(labels > 0)
            lesion_probability, identification = self.multitask_outputs(image[box].contiguous())
        del image
        with timer.step("postprocess"):
            lesions = np.zeros(labels.shape, dtype=bool)
            lesions[box] = lesion_probability >= LESION_PROBABILITY_THRESHOLD
            severity = lung_severity(labels, lesions, grid)
        return NetworkOutput(
            hu=grid_hu,
            lung_labels=labels,
            lesion_mask=lesions,
            identification=identification,
            severity=severity,
            spacing=grid,
            crop=box,
            lungs_method="network" if self.lungs is not None else "threshold",
            details={"crop_shape": [s.stop - s.start for s in box]},
        )
