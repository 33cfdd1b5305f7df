"""Which networks a worker process scores with, from its settings: loaded once, kept warm.

No configured weights (the default) means the threshold method, and the worker says so once
in its log; every threshold result says so too (``models.predictor.THRESHOLD_NOTE``). Weights
that are configured but unusable (missing, altered, wrong kind) raise ``CheckpointError``:
the jobs fail with that reason instead of silently falling back to another method.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.settings import Settings
from models.model_store import resolve_bundle

if TYPE_CHECKING:
    from models.inference import TriageNetworks

log = logging.getLogger(__name__)


def load_networks(settings: Settings) -> TriageNetworks | None:
    """The configured model bundle on ``settings.device``, or None (threshold method)."""
    paths = resolve_bundle(settings.model_path, settings.model_dir, settings.model_version)
    if paths is None:
        log.info("no network weights configured (CTTRIAGE_MODEL_PATH / CTTRIAGE_MODEL_DIR): "
                 "scoring with the threshold method, identification not estimated")
        return None
    from models.inference import InferenceOptions, TriageNetworks

    options = InferenceOptions(device=settings.device, batch_slices=settings.inference_batch_slices,
                               compile=settings.torch_compile, threads=settings.torch_threads)
    networks = TriageNetworks.from_bundle(paths, options)
    networks.check_preprocessing(settings.inplane_spacing_mm)
    log.info("networks loaded", extra={"model_version": networks.version, "method": networks.method,
                                       "bundle": str(paths.directory), "device": settings.device,
                                       "synthetic_weights": networks.synthetic})
    if networks.synthetic:
        log.warning("the configured weights were trained on synthetic phantoms, not clinical data; "
                    "every result is marked %r", networks.method)
    return networks
