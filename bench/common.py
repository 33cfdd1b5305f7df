"""What the hand-run benchmarks share beyond the tests' harness: phantom studies on disk, waiting for a
DICOM server to answer, percentiles and progress lines."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.service_process import ServiceProcess, wait_started

_T0 = time.monotonic()


def progress(message: str) -> None:
    """A timestamped progress line on stderr (the results go to stdout)."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of the values; None when there are none."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class StudyFiles:
    """A phantom study written as DICOM files, with the severities it was made with."""

    uid: str
    paths: list[Path]
    truth_left: float
    truth_right: float
    size_bytes: int


def write_study(folder: Path, spec: Any, **uid_kwargs: Any) -> StudyFiles:
    """Write the phantom of ``spec`` (a ``models.phantom.PhantomSpec``) into ``folder``."""
    from models.phantom_dicom import write_phantom

    truth = write_phantom(folder, spec, **uid_kwargs)
    paths = sorted(folder.glob("*.dcm"))
    return StudyFiles(truth["study_instance_uid"], paths, float(truth["severity_left"]),
                      float(truth["severity_right"]), sum(p.stat().st_size for p in paths))


def wait_echo(port: int, called_aet: str, process: ServiceProcess, timeout: float = 60.0) -> None:
    """Until the DICOM server on ``port`` answers a C-ECHO (accepting TCP is not enough: it may still
    be loading)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="BENCH_ECHO")
    ae.add_requested_context(Verification)

    def answers() -> bool:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    wait_started(process, answers, timeout, f"a C-ECHO answer on port {port}")
