"""What ``cttriage train`` and ``cttriage evaluate`` do, callable without the command line.

Training writes ``OUT/<version>/lungs.pt`` or ``OUT/<version>/multitask.pt``: the layout the
service reads as ``CTTRIAGE_MODEL_DIR=OUT`` (see :mod:`models.model_store`). Weights trained on
``--phantoms`` are labelled synthetic in their metadata, whatever the caller says.
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
    TrainingOptions,
    TrainingReport,
    lungs_validation_candidate,
    multitask_validation_candidate,
    split_validation,
    train_lungs,
    train_multitask,
)
from models.training_samples import LungSource, prepare_series, threshold_lung_source
from models.unet import UNetConfig

Print = Callable[[str], None]


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
    echo: Print = print,
) -> TrainingReport:
    """Prepare the data, train ``network`` ('lungs' or 'multitask'), keep the best checkpoint.

    Multitask series are cropped to the lungs of ``lung_source`` when given (a trained lungs
    network, as the paper does), else to their lung mask, else to the threshold lungs.
    """
    if network not in ("lungs", "multitask"):
        raise ValueError(f"network must be 'lungs' or 'multitask', got {network!r}")
    records = source.records(for_training=network)
    echo(f"{len(records)} series: {describe(records)}")
    if network == "lungs":
        records = [r for r in records if r.has_lungs]
    prepared = [
        prepare_series(r, crop_to_lungs=network == "multitask", lung_source=lung_source or threshold_lung_source,
                       prefer_lung_source=lung_source is not None)
        for r in records
    ]
    eligible = multitask_validation_candidate if network == "multitask" else lungs_validation_candidate
    train, val = split_validation(prepared, val_size, options.seed, eligible)
    echo(f"training on {len(train)} series, validating on {len(val)}")
    description = SYNTHETIC_TRAINING_DATA if source.synthetic else (training_data or source.description(records))
    target = CheckpointTarget(
        path=out / version / (MULTITASK_FILE if network == "multitask" else LUNGS_FILE),
        version=version, training_data=description, synthetic=source.synthetic,
    )
    if network == "multitask":
        _, report = train_multitask(train, val, options, target, architecture or MultitaskConfig(), progress=echo)
    else:
        _, report = train_lungs(train, val, options, target, architecture or LungNetConfig(), progress=echo)
    echo(f"best {report.best}; checkpoint {report.checkpoint} ({report.seconds:.0f} s)")
    return report


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
    from models.evaluation import evaluate, format_table, outcomes_json, summarize
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
    results: dict[str, Any] = {}
    for name, predictor in methods.items():
        echo(f"--- {name}")
        outcomes = evaluate(labelled, predictor, progress=echo)
        results[name] = {"metrics": summarize(outcomes, severe_percent), "studies": outcomes_json(outcomes)}
    table = format_table({name: r["metrics"] for name, r in results.items()})
    echo(table)
    report = {"data": describe(records), "synthetic_data": source.synthetic, "methods": results, "table": table}
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
