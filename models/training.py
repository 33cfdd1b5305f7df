"""Training both networks as section 4 of the paper describes, with best-validation checkpoints.

* Lungs (4.2): BCE per pixel; Adam with default betas, lr 1e-3 dropped to 1e-4 after half of
  the 16k batches of 30 slices. Checkpoint: best validation Dice of the lung mask.
* Multitask (4.3, 4.4): segmentation BCE + 0.1 x classification BCE, each on the series drawn
  for that head (batches balanced between series with lesion masks and label-only series);
  Adam, lr 3e-4 dropped to 1e-4 after 24k of 30k batches of 5 series. Checkpoint: best
  validation ROC AUC of identification (ties: the later one, as the authors' code does).

Shorter runs (``steps``) keep the schedule's shape: the drop happens at the same fraction.

Runs fail loudly rather than train on something useless: data that cannot train a head (a
classifier pool or validation set with one class) raises :class:`TrainingDataError` before the
first step, and a non-finite loss or validation metric raises :class:`NonFiniteError` at once.
On CUDA the forward pass and the losses run under bf16 autocast (``TrainingOptions.autocast``;
True runs the same path on the CPU, which is how the tests check it against fp32).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import (
    LESION_PROBABILITY_THRESHOLD,
    CheckpointMetadata,
    metadata_for,
    save_checkpoint,
)
from models.lung_network import LUNG_PROBABILITY_THRESHOLD, LungNetConfig, LungSegmentationNet
from models.metrics import dice, roc_auc
from models.multitask import MultitaskConfig, MultitaskNet
from models.training_samples import PreparedSeries, lungs_batch, multitask_batch, multitask_pools


@dataclass(frozen=True)
class LrSchedule:
    """Piecewise-constant learning rate: ``initial`` until ``drop_at`` of the run, then ``later``."""

    initial: float
    later: float
    drop_at: float  # fraction of the steps

    def at(self, step: int, total: int) -> float:
        return self.initial if step < self.drop_at * total else self.later


@dataclass(frozen=True)
class TrainingOptions:
    steps: int
    lr: LrSchedule
    #: Lungs: slices per batch. Multitask: series per batch.
    batch_size: int
    slices_per_series: int = 32
    cls_weight: float = 0.1
    #: Validation (and checkpoint) interval in batches: the authors' "epoch" is 300 batches.
    validate_every: int = 300
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    #: bf16 autocast of the forward pass and losses. None: on CUDA only; True: on the CPU too.
    autocast: bool | None = None


class TrainingDataError(ValueError):
    """The data cannot train what was asked (found before the first step)."""


class NonFiniteError(RuntimeError):
    """A loss or validation metric that is NaN or infinite: the run stops instead of saving it."""


#: Section 4.2: 16k batches of 30 slices, lr 1e-3 -> 1e-4 after 8k.
PAPER_LUNGS = TrainingOptions(steps=16_000, lr=LrSchedule(1e-3, 1e-4, 0.5), batch_size=30)
#: Section 4.4: 30k batches of 5 series, lr 3e-4 -> 1e-4 after 24k, classification loss x 0.1.
PAPER_MULTITASK = TrainingOptions(steps=30_000, lr=LrSchedule(3e-4, 1e-4, 0.8), batch_size=5)


@dataclass
class TrainingReport:
    """Loss per step and every validation; ``best`` is the checkpointed one."""

    losses: list[float] = field(default_factory=list)
    seg_losses: list[float] = field(default_factory=list)
    cls_losses: list[float] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    checkpoint: Path | None = None
    metadata: CheckpointMetadata | None = None
    seconds: float = 0.0
    #: (id, reason) of the series that could not be read and were left out.
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointTarget:
    """Where and as what the best network is saved."""

    path: Path
    version: str
    training_data: str
    synthetic: bool = False


def split_validation(
    series: Sequence[PreparedSeries], size: int, seed: int, eligible: Callable[[PreparedSeries], bool]
) -> tuple[list[PreparedSeries], list[PreparedSeries]]:
    """Hold out ``size`` of the ``eligible`` series for validation, stratified by label (4.4).

    The multitask validation set comes from label-only series (series with lesion masks all
    train segmentation, as the paper's 79 do); the lungs one from series with lung masks.
    At most half of the eligible series are held out.
    """
    rng = np.random.default_rng(seed)
    candidates = [i for i, s in enumerate(series) if eligible(s)]
    size = min(size, len(candidates) // 2)
    if size <= 0:
        return list(series), []
    groups: dict[bool | None, list[int]] = {}
    for i in candidates:
        groups.setdefault(series[i].covid, []).append(i)
    held: set[int] = set()
    for members in groups.values():
        share = max(1, round(size * len(members) / len(candidates)))
        held.update(int(i) for i in rng.permutation(members)[:share])
    return [s for i, s in enumerate(series) if i not in held], [s for i, s in enumerate(series) if i in held]


def multitask_validation_candidate(series: PreparedSeries) -> bool:
    return series.lesions is None and series.covid is not None


def lungs_validation_candidate(series: PreparedSeries) -> bool:
    return series.lungs is not None


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32)).to(device)


@contextlib.contextmanager
def training_autocast(options: TrainingOptions, device: torch.device) -> Iterator[None]:
    """bf16 autocast where ``options.autocast`` says (None: on CUDA only), else nothing."""
    enabled = options.autocast if options.autocast is not None else device.type == "cuda"
    if enabled:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def check_device(device: torch.device) -> None:
    """A CUDA device that this process cannot use is refused before any data is touched."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError(f"device {device} requested but CUDA is not available to this process")


def class_counts(series: Sequence[PreparedSeries]) -> tuple[int, int]:
    """(positives, negatives) among the labelled series."""
    return sum(s.covid is True for s in series), sum(s.covid is False for s in series)


def check_classification_data(cls_pool: Sequence[PreparedSeries], val: Sequence[PreparedSeries]) -> None:
    """Both classes in the classifier's training pool and in the validation set, or stop: one class
    trains a constant and makes ROC AUC undefined (the run used to save a NaN-metric checkpoint)."""
    pos, neg = class_counts(cls_pool)
    if pos == 0 or neg == 0:
        raise TrainingDataError(
            f"the classification pool (labelled series without a lesion mask) has {pos} positives and {neg} "
            "negatives: the classifier needs both. Series with a lesion mask train segmentation only; add "
            "label-only series of the missing class (labels.csv covid=1/0 without a lesions/ file)")
    pos, neg = class_counts(val)
    if val and (pos == 0 or neg == 0):
        raise TrainingDataError(
            f"the validation set has {pos} positives and {neg} negatives: ROC AUC needs both; "
            "add label-only series of the missing class or change --val-size")


def _check_finite(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} is {value} at step {step + 1}: stopping (lower the learning rate, check "
                             "the data for non-HU intensities, or try without --device cuda / autocast)")


# --- lungs ------------------------------------------------------------------------------------------


@torch.no_grad()
def validate_lungs(model: LungSegmentationNet, val: Sequence[PreparedSeries], device: torch.device,
                   batch_slices: int = 32) -> dict[str, Any]:
    """Mean Dice of the thresholded lung mask over validation series."""
    model.eval()
    scores = []
    for series in val:
        assert series.lungs is not None
        image = _tensor(series.image, device)
        probs = torch.cat([torch.sigmoid(model(image[k : k + batch_slices, None]))[:, 0]
                           for k in range(0, image.shape[0], batch_slices)])
        scores.append(dice(probs.cpu().numpy() >= LUNG_PROBABILITY_THRESHOLD, series.lungs))
    model.train()
    return {"metric": "lung_dice", "value": float(np.mean(scores)) if scores else float("nan")}


def train_lungs(
    series: Sequence[PreparedSeries],
    val: Sequence[PreparedSeries],
    options: TrainingOptions,
    target: CheckpointTarget | None,
    config: LungNetConfig = LungNetConfig(),
    progress: Callable[[str], None] | None = None,
) -> tuple[LungSegmentationNet, TrainingReport]:
    """Train the lungs network; save the best validation Dice (or the last one without validation)."""
    pool = [s for s in series if s.lungs is not None]
    if not pool:
        raise TrainingDataError("no training series with a lung mask (lungs/<id>.nii.gz)")
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = torch.device(options.device)
    check_device(device)
    model = LungSegmentationNet(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr.initial)
    report = TrainingReport()
    start = time.perf_counter()
    val = [s for s in val if s.lungs is not None]
    for step in range(options.steps):
        _set_lr(optimizer, options.lr.at(step, options.steps))
        batch = lungs_batch(pool, options.batch_size, rng)
        with training_autocast(options, device):
            logits = model(batch.images.to(device))
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch.masks.to(device))
        value = loss.item()
        _check_finite("the training loss", value, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(value)
        _log_step(progress, options, step, report, start)
        if _validation_due(step, options):
            result: dict[str, Any] = (
                validate_lungs(model, val, device) if val else {"metric": "last_step", "value": float(step)}
            )
            _check_finite(f"the validation {result['metric']}", result["value"], step)
            keep_if_best(model, result, step, options, target, report, progress)
    report.seconds = time.perf_counter() - start
    return model, report


# --- multitask ----------------------------------------------------------------------------------------


@torch.no_grad()
def predict_series(model: MultitaskNet, image: np.ndarray, device: torch.device,
                   batch_slices: int = 32) -> tuple[np.ndarray, float]:
    """Lesion probabilities and identification probability of one (cropped, windowed) series."""
    was_training = model.training
    model.eval()
    x = _tensor(image, device)
    seg, shared = [], []
    for k in range(0, x.shape[0], batch_slices):
        s, f = model.slice_features(x[k : k + batch_slices, None])
        seg.append(torch.sigmoid(s)[:, 0])
        shared.append(f)
    logit = model.identify(torch.cat(shared).permute(1, 0, 2, 3))
    model.train(was_training)
    return torch.cat(seg).cpu().numpy(), float(torch.sigmoid(logit)[0])


def validate_multitask(model: MultitaskNet, val: Sequence[PreparedSeries], device: torch.device) -> dict[str, Any]:
    """ROC AUC of identification on labelled validation series (lesion Dice where masks exist).

    Without both classes ROC AUC is undefined; lesion Dice is reported instead and, where it is
    undefined too, the training loop stops (``check_classification_data`` refuses a one-class
    validation set before the first step, so this is left to direct callers).
    """
    labels, scores, dices = [], [], []
    for series in val:
        lesion, ident = predict_series(model, series.image, device)
        if series.covid is not None:
            labels.append(series.covid)
            scores.append(ident)
        if series.lesions is not None and series.covid:
            dices.append(dice(lesion >= LESION_PROBABILITY_THRESHOLD, series.lesions))
    auc = roc_auc(np.array(labels, dtype=bool), np.array(scores)) if labels else float("nan")
    mean_dice = float(np.mean(dices)) if dices else float("nan")
    if not np.isnan(auc):
        return {"metric": "roc_auc", "value": auc, "lesion_dice": mean_dice}
    return {"metric": "lesion_dice", "value": mean_dice, "roc_auc": auc}


def multitask_loss(
    model: MultitaskNet, images: torch.Tensor, lesions: torch.Tensor, labels: torch.Tensor,
    seg_weight: torch.Tensor, cls_weight: torch.Tensor, cls_factor: float,
    extents: Sequence[tuple[int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, segmentation BCE, classification BCE): each BCE averaged over the series drawn
    for its head only (and over each series' own voxels, not its padding, given ``extents``);
    total = seg + cls_factor * cls."""
    seg_logits, cls_logits = model(images, extents) if extents else model(images)
    per_voxel = F.binary_cross_entropy_with_logits(seg_logits, lesions, reduction="none")
    if extents:
        valid = torch.zeros_like(per_voxel)
        for i, (d, h, w) in enumerate(extents):
            valid[i, :d, :h, :w] = 1.0
        seg_per_series = (per_voxel * valid).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3))
    else:
        seg_per_series = per_voxel.mean(dim=(1, 2, 3))
    cls_per_series = F.binary_cross_entropy_with_logits(cls_logits, labels, reduction="none")
    seg = (seg_per_series * seg_weight).sum() / seg_weight.sum().clamp(min=1.0)
    cls = (cls_per_series * cls_weight).sum() / cls_weight.sum().clamp(min=1.0)
    return seg + cls_factor * cls, seg, cls


def train_multitask(
    series: Sequence[PreparedSeries],
    val: Sequence[PreparedSeries],
    options: TrainingOptions,
    target: CheckpointTarget | None,
    config: MultitaskConfig = MultitaskConfig(),
    progress: Callable[[str], None] | None = None,
) -> tuple[MultitaskNet, TrainingReport]:
    """Train Multitask-Spatial-1 (or the configured variant); save the best validation ROC AUC."""
    seg_pool, cls_pool = multitask_pools(series)
    check_classification_data(cls_pool, val)
    # The classifier reads at inference the number of slices it was trained on (recorded in the config).
    config = replace(config, classifier_slices=options.slices_per_series)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = torch.device(options.device)
    check_device(device)
    model = MultitaskNet(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr.initial)
    report = TrainingReport()
    start = time.perf_counter()
    for step in range(options.steps):
        _set_lr(optimizer, options.lr.at(step, options.steps))
        b = multitask_batch(seg_pool, cls_pool, options.batch_size, options.slices_per_series, rng)
        with training_autocast(options, device):
            loss, seg, cls = multitask_loss(
                model, b.images.to(device), b.lesions.to(device), b.labels.to(device),
                b.seg_weight.to(device), b.cls_weight.to(device), options.cls_weight, b.extents,
            )
        value = loss.item()
        _check_finite("the training loss", value, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(value)
        report.seg_losses.append(seg.item())
        report.cls_losses.append(cls.item())
        _log_step(progress, options, step, report, start)
        if _validation_due(step, options):
            result: dict[str, Any] = (
                validate_multitask(model, val, device) if val else {"metric": "last_step", "value": float(step)}
            )
            _check_finite(f"the validation {result['metric']}", result["value"], step)
            keep_if_best(model, result, step, options, target, report, progress)
    report.seconds = time.perf_counter() - start
    return model, report


# --- shared -------------------------------------------------------------------------------------------


def _validation_due(step: int, options: TrainingOptions) -> bool:
    return (step + 1) % options.validate_every == 0 or step + 1 == options.steps


def format_duration(seconds: float) -> str:
    """Seconds as ``1d 02h``, ``3h 05m``, ``4m 10s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total: int, seconds: float, loss: float, lr: float,
                  last_validation: dict[str, Any] | None) -> str:
    """One progress line: step, steps/s, elapsed and remaining time, loss, lr, last validation."""
    rate = (step + 1) / seconds if seconds > 0 else float("nan")
    eta = (total - step - 1) / rate if rate > 0 else float("nan")
    line = (f"step {step + 1}/{total} {rate:.2f} steps/s elapsed {format_duration(seconds)} "
            f"ETA {format_duration(eta) if math.isfinite(eta) else '?'} loss {loss:.4f} lr {lr:.1e}")
    if last_validation is not None:
        line += f" val {last_validation['metric']} {last_validation['value']:.4f} (step {last_validation['step']})"
    return line


def _log_step(progress: Callable[[str], None] | None, options: TrainingOptions, step: int,
              report: TrainingReport, start: float) -> None:
    if progress is not None and ((step + 1) % options.log_every == 0 or step in (0, 9)):
        recent = report.losses[-options.log_every:]
        progress(progress_line(step, options.steps, time.perf_counter() - start, float(np.mean(recent)),
                               options.lr.at(step, options.steps),
                               report.validations[-1] if report.validations else None))


def keep_if_best(
    model: torch.nn.Module,
    result: dict[str, Any],
    step: int,
    options: TrainingOptions,
    target: CheckpointTarget | None,
    report: TrainingReport,
    progress: Callable[[str], None] | None,
) -> None:
    """Record one validation and save the network if it is the best so far: ties go to the later
    step, and a value that could not be computed (NaN) never replaces a number."""
    result = {**result, "step": step + 1}
    report.validations.append(result)
    value = result["value"]
    best = report.best
    better = best is None or (not np.isnan(value) and (np.isnan(best["value"]) or value >= best["value"]))
    if progress is not None:
        progress(f"validation at step {step + 1}: {result['metric']} {value:.4f}" + (" (best)" if better else ""))
    if not better:
        return
    report.best = result
    if target is not None:
        metadata = metadata_for(
            model, version=target.version, training_data=target.training_data, synthetic=target.synthetic,
            training={"steps_done": step + 1, "steps_planned": options.steps, "best": result,
                      "lr": [options.lr.initial, options.lr.later, options.lr.drop_at],
                      "batch_size": options.batch_size, "slices_per_series": options.slices_per_series,
                      "cls_weight": options.cls_weight, "seed": options.seed},
        )
        was_training = model.training
        report.metadata = save_checkpoint(target.path, model.eval(), metadata)
        model.train(was_training)
        report.checkpoint = target.path
