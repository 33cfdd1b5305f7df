"""The README's demo: push a generated phantom study to the running service, print its score."""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from pathlib import Path

from app.dicom.push import push_files
from app.settings import Settings


def _get_json(url: str, key: str) -> dict:  # type: ignore[type-arg]
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def demo_key(settings: Settings) -> str:
    """A radiologist key for this demo run, so the worklist can be opened with it."""
    from app.db.session import make_session_factory
    from app.security import Role, create_api_key

    with make_session_factory(settings).begin() as session:
        return create_api_key(session, f"demo-{int(time.time())}", Role.radiologist)


def run_demo(settings: Settings, timeout_seconds: float = 600.0) -> dict | None:  # type: ignore[type-arg]
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    base = f"http://{'127.0.0.1' if settings.api_host in ('0.0.0.0', '') else settings.api_host}:{settings.api_port}"
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "") else settings.dicom_host
    time.sleep(2.0)  # let uvicorn bind
    key = demo_key(settings)
    with tempfile.TemporaryDirectory() as tmp:
        spec = PhantomSpec(slices=80, slice_spacing=4.0, severity_left=35.0, severity_right=12.0, seed=7)
        truth = write_phantom(Path(tmp), spec)
        files = sorted(Path(tmp).glob("*.dcm"))
        print(f"[demo] pushing a phantom chest CT ({len(files)} slices, true max-lung severity "
              f"{truth['severity']:.1f} %) to {settings.ae_title}@{host}:{settings.dicom_port}", flush=True)
        statuses = push_files(files, host=host, port=settings.dicom_port, called_aet=settings.ae_title,
                              calling_aet="CTTRIAGE_DEMO")
    print(f"[demo] {sum(s == 0 for s in statuses)}/{len(statuses)} instances stored; the series is complete, so "
          f"the study is queued {settings.settle_after_release_seconds:g} s after the association's release "
          f"(an incomplete one waits {settings.settle_seconds:.0f} s without new instances)", flush=True)
    study_url = f"{base}/api/studies/{truth['study_instance_uid']}"
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        study = _get_json(study_url, key)
        if study["state"] in ("scored", "failed", "rejected"):
            row = {k: study[k] for k in ("state", "reason", "severity", "severity_left", "severity_right",
                                          "identification", "severity_band", "method", "model_version")}
            print(f"[demo] worklist: {base}/   (JSON: {base}/api/worklist); radiologist key for it: {key}",
                  flush=True)
            print(f"[demo] scored row: {json.dumps(row)}", flush=True)
            print(f"[demo] truth: severity {truth['severity']:.1f} (left {truth['severity_left']:.1f}, "
                  f"right {truth['severity_right']:.1f})", flush=True)
            return study
        time.sleep(1.0)
    print("[demo] the study was not scored in time; see the log above", flush=True)
    return None
