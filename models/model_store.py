"""Where the service finds its network weights: a bundle directory, or one of named versions.

A *bundle* is a directory holding ``multitask.pt`` (required: lesions and identification) and
``lungs.pt`` (optional: without it, lungs come from the threshold method and results say so).
Operators either point ``CTTRIAGE_MODEL_PATH`` at a bundle, or keep several bundles side by
side under ``CTTRIAGE_MODEL_DIR`` (``MODEL_DIR/<version>/``) and pick one with
``CTTRIAGE_MODEL_VERSION``. Nothing is ever downloaded: no configured weights means the
threshold method. This module only resolves paths; :mod:`models.checkpoint` reads the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import CheckpointError

MULTITASK_FILE = "multitask.pt"
LUNGS_FILE = "lungs.pt"


@dataclass(frozen=True)
class BundlePaths:
    """The checkpoint files of one model version."""

    directory: Path
    multitask: Path
    lungs: Path | None


def bundle_paths(directory: str | Path) -> BundlePaths:
    """The files of the bundle in ``directory``; raises CheckpointError when it has no multitask network."""
    directory = Path(directory)
    multitask = directory / MULTITASK_FILE
    if not multitask.is_file():
        raise CheckpointError(f"model bundle {directory} has no {MULTITASK_FILE}")
    lungs = directory / LUNGS_FILE
    return BundlePaths(directory=directory, multitask=multitask, lungs=lungs if lungs.is_file() else None)


def available_versions(model_dir: str | Path) -> list[str]:
    """Names of the bundles under ``model_dir`` (subdirectories holding a multitask network)."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MULTITASK_FILE).is_file())


def resolve_bundle(
    model_path: Path | None, model_dir: Path | None, model_version: str | None
) -> BundlePaths | None:
    """The bundle the settings select, or None when none is configured (threshold method).

    ``model_path`` wins; otherwise ``model_dir`` with ``model_version``, which may be left out
    only when the directory holds exactly one version (never a guess between several).
    """
    if model_path is not None:
        return bundle_paths(model_path)
    if model_dir is None:
        if model_version:
            raise CheckpointError("CTTRIAGE_MODEL_VERSION is set but CTTRIAGE_MODEL_DIR is not")
        return None
    versions = available_versions(model_dir)
    if model_version:
        if model_version not in versions:
            listed = ", ".join(versions) or "none"
            raise CheckpointError(f"model version {model_version!r} not found in {model_dir} (available: {listed})")
        return bundle_paths(Path(model_dir) / model_version)
    if len(versions) == 1:
        return bundle_paths(Path(model_dir) / versions[0])
    if not versions:
        raise CheckpointError(f"CTTRIAGE_MODEL_DIR {model_dir} holds no model bundle (<version>/{MULTITASK_FILE})")
    raise CheckpointError(
        f"CTTRIAGE_MODEL_DIR {model_dir} holds several versions ({', '.join(versions)}): set CTTRIAGE_MODEL_VERSION"
    )
