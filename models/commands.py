"""What ``cttriage train`` and ``cttriage evaluate`` do, callable without the command line.

Training writes ``OUT/<version>/lungs.pt`` or ``OUT/<version>/multitask.pt``: the layout the
service reads as ``CTTRIAGE_MODEL_DIR=OUT`` (see :mod:`models.model_store`). Weights trained on
``--phantoms`` are labelled synthetic in their metadata, whatever the caller says.
Their exit statuses are in :mod:`models.exit_codes`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import SYNTHETIC_TRAINING_DATA
from models.datasets import SeriesRecord, describe, phantom_records, scan_dataset
from models.lung_network import LungNetConfig
from models.model_store import LUNGS_FILE, MULTITASK_FILE
from models.multitask import LATENT, SPATIAL_1, MultitaskConfig, latent_config
from models.training import (
    PAPER_LUNGS,
    PAPER_MULTITASK,
    CheckpointTarget,
    TrainingDataError,
    TrainingOptions,
    TrainingReport,
    lungs_validation_candidate,
    multitask_validation_candidate,
    split_validation,
    train_lungs,
    train_multitask,
)
from models.training_samples import LungSource, PreparedSeries, prepare_series, threshold_lung_source
from models.unet import UNetConfig

Print = Callable[[str], None]

#: Unreadable series a training run skips (named) before it stops: a few broken files in a public
#: set are normal, many mean a wrong path or format.
DEFAULT_MAX_SKIPPED = 10


class TooManySkipped(TrainingDataError):
    """More unreadable series than ``max_skipped``."""


@dataclass(frozen=True)
class DataSource:
    """A dataset folder (with labels.csv) or a number of generated phantoms."""

    data: Path | None = None
    labels: Path | None = None
    phantoms: int = 0
    seed: int = 0

    def records(self, *, for_training: str | None = None) -> list[SeriesRecord]:
        if (self.data is None) == (self.phantoms <= 0):
            raise ValueError("give either a data folder or a number of phantoms")
        if self.data is not None:
            return scan_dataset(self.data, self.labels)
        if for_training == "multitask":  # like the paper: a share of positives with masks
            return phantom_records(self.phantoms, seed=self.seed, positive_mask_share=0.5,
                                   negative_lesion_masks=False)
        return phantom_records(self.phantoms, seed=self.seed)

    @property
    def synthetic(self) -> bool:
        return self.data is None

    def description(self, records: Sequence[SeriesRecord]) -> str:
        if self.synthetic:
            return SYNTHETIC_TRAINING_DATA
        counts = describe(records)
        return f"{self.data}: {counts['series']} series, cohorts {counts['cohorts']}"


def train_command(
    network: str,
    source: DataSource,
    out: Path,
    version: str,
    options: TrainingOptions,
    *,
    architecture: Any = None,
    val_size: int = 30,
    training_data: str | None = None,
    lung_source: LungSource | None = None,
    max_skipped: int = DEFAULT_MAX_SKIPPED,
    echo: Print = print,
) -> TrainingReport:
    """Prepare the data, train ``network`` ('lungs' or 'multitask'), keep the best checkpoint.

    Every multitask series of a run is cropped from one source (:func:`crop_source`): the lungs
    of ``lung_source`` when given (a trained lungs network, as the paper does and as inference
    will), else the lung masks when every series has one, else the threshold lungs for every
    series (what the service uses without a lungs network); never a mix.
    A series that cannot be read or prepared is skipped and named; more than ``max_skipped`` of
    them stop the run (:class:`TooManySkipped`) before the first step.
    """
    if network not in ("lungs", "multitask"):
        raise ValueError(f"network must be 'lungs' or 'multitask', got {network!r}")
    records = source.records(for_training=network)
    echo(f"{len(records)} series: {describe(records)}")
    if network == "lungs":
        records = [r for r in records if r.has_lungs]
    crop_name, crop_lungs, from_source = crop_source(records, lung_source)
    if network == "multitask":
        echo(f"crops: {crop_name} for every series")
    prepared, skipped = prepare_all(records, network, crop_lungs, from_source, echo)
    if len(skipped) > max_skipped:
        raise TooManySkipped(f"{len(skipped)} series could not be read (limit --max-skipped {max_skipped}): "
                             + "; ".join(f"{ident}: {why}" for ident, why in skipped[:20]))
    eligible = multitask_validation_candidate if network == "multitask" else lungs_validation_candidate
    train, val = split_validation(prepared, val_size, options.seed, eligible)
    echo(f"training on {len(train)} series, validating on {len(val)}"
         + (f"; skipped {len(skipped)} unreadable: {', '.join(i for i, _ in skipped)}" if skipped else ""))
    description = SYNTHETIC_TRAINING_DATA if source.synthetic else (training_data or source.description(records))
    if skipped and not source.synthetic:
        description += f"; skipped {len(skipped)} unreadable series: {', '.join(i for i, _ in skipped)}"
    if network == "multitask" and not source.synthetic:
        description += f"; crops from {crop_name}"
    target = CheckpointTarget(
        path=out / version / (MULTITASK_FILE if network == "multitask" else LUNGS_FILE),
        version=version, training_data=description, synthetic=source.synthetic,
    )
    if network == "multitask":
        _, report = train_multitask(train, val, options, target, architecture or MultitaskConfig(), progress=echo)
    else:
        _, report = train_lungs(train, val, options, target, architecture or LungNetConfig(), progress=echo)
    report.skipped = skipped
    echo(f"best {report.best}; checkpoint {report.checkpoint} ({report.seconds:.0f} s)")
    return report


def crop_source(records: Sequence[SeriesRecord], lung_source: LungSource | None) -> tuple[str, LungSource, bool]:
    """(what crops, the lungs source, whether it overrides the series' masks): one rule per run."""
    if lung_source is not None:
        return "the lungs network given (--lungs-model)", lung_source, True
    if records and all(r.has_lungs for r in records):
        return "the lung masks (every series has one)", threshold_lung_source, False
    return "the threshold lungs (no --lungs-model, not every series has a lung mask)", threshold_lung_source, True


def prepare_all(
    records: Sequence[SeriesRecord], network: str, lungs: LungSource, from_source: bool, echo: Print
) -> tuple[list[PreparedSeries], list[tuple[str, str]]]:
    """Prepared series, and (id, reason) of each that could not be read or prepared (named as it happens)."""
    prepared, skipped = [], []
    for record in records:
        try:
            prepared.append(prepare_series(record, crop_to_lungs=network == "multitask", lung_source=lungs,
                                           prefer_lung_source=from_source))
        except Exception as exc:  # a broken file or mask is one skipped series, named, not a crashed run
            reason = f"{type(exc).__name__}: {exc}"
            skipped.append((record.id, reason))
            echo(f"skipped {record.id}: {reason}")
    return prepared, skipped


def architecture_for(
    network: str, variant: str = SPATIAL_1, levels: int = 7, base_channels: int = 8, max_channels: int = 512
) -> LungNetConfig | MultitaskConfig:
    """The network's config with the U-Net's size given (the paper's: 7 levels, 8..512 channels)."""
    blocks = 2 if network == "lungs" else 1
    unet = UNetConfig(levels=levels, base_channels=base_channels, max_channels=max_channels, top_decoder_blocks=blocks)
    if network == "lungs":
        return LungNetConfig(unet=unet)
    base = latent_config() if variant == LATENT else MultitaskConfig(variant=variant)
    return replace(base, unet=unet)


def network_lung_source(path: Path, device: str = "cpu", batch_slices: int = 32) -> LungSource:
    """Lungs for cropping training series from a trained lungs network instead of thresholds."""
    import torch

    from models.checkpoint import KIND_LUNGS, load_checkpoint
    from models.lung_network import lung_mask_from_probabilities
    from models.preprocessing import window

    net = load_checkpoint(path, expect_kind=KIND_LUNGS).module.to(device)

    def lungs(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(window(hu)).to(device)
            probs = torch.cat([torch.sigmoid(net(x[k : k + batch_slices, None]))[:, 0]
                               for k in range(0, x.shape[0], batch_slices)])
        return lung_mask_from_probabilities(probs.cpu().numpy())

    return lungs


def paper_options(network: str, **overrides: Any) -> TrainingOptions:
    """The paper's schedule for ``network``, with the given fields replaced (None: keep)."""
    base = PAPER_MULTITASK if network == "multitask" else PAPER_LUNGS
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def evaluate_command(
    source: DataSource,
    networks: Any | None,
    *,
    include_threshold: bool = True,
    severe_percent: float = 50.0,
    inplane_spacing_mm: float = 2.0,
    json_path: Path | None = None,
    echo: Print = print,
) -> dict[str, Any]:
    """Evaluate the threshold method and/or the networks; print the table, write JSON."""
    from models.evaluation import (
        THRESHOLD_LUNG_TRUTH,
        evaluate,
        format_table,
        network_lung_truth,
        outcomes_json,
        summarize,
    )
    from models.predictor import NetworkPredictor, Predictor, ThresholdPredictor

    records = source.records()
    labelled = [r for r in records if r.covid is not None]
    echo(f"{len(records)} series, {len(labelled)} with a COVID-19 label: {describe(records)}")
    methods: dict[str, Predictor] = {}
    if include_threshold:
        methods["threshold"] = ThresholdPredictor(inplane_spacing_mm)
    if networks is not None:
        methods[f"{networks.method} {networks.version}"] = NetworkPredictor(networks, inplane_spacing_mm)
    if not methods:
        raise ValueError("nothing to evaluate: no networks configured and the threshold method excluded")
    # True lungs for lesion masks without a lung mask: the lungs network when the bundle has one (the paper's way).
    truth = (network_lung_truth(networks, inplane_spacing_mm)
             if networks is not None and getattr(networks, "lungs", None) is not None else THRESHOLD_LUNG_TRUTH)
    results: dict[str, Any] = {}
    for name, predictor in methods.items():
        echo(f"--- {name}")
        outcomes = evaluate(labelled, predictor, progress=echo, truth_lungs=truth)
        results[name] = {"metrics": summarize(outcomes, severe_percent), "studies": outcomes_json(outcomes)}
    table = format_table({name: r["metrics"] for name, r in results.items()})
    echo(table)
    report = {"data": describe(records), "synthetic_data": source.synthetic, "methods": results, "table": table,
              "lung_truth_without_masks": truth.how,
              "failed": max((r["metrics"]["failed"] for r in results.values()), default=0)}
    if networks is not None:
        report["models"] = networks.describe()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
        echo(f"wrote {json_path}")
    return report


def _finite(value: Any) -> Any:
    """JSON-ready copy: NaN (an undefined metric) becomes null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
