"""The `cttriage` console script as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from tests.conftest import free_port


def test_phantom_command_writes_series_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "phantom", str(out), "--slices", "40", "--size", "128",
         "--pixel-spacing", "2.8", "--severity-left", "20", "--severity-right", "5"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    truth = json.loads((out / "truth.json").read_text())
    assert json.loads(result.stdout)["study_instance_uid"] == truth["study_instance_uid"]
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 40 == truth["files"]
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.Rows == 128
    assert abs(float(ds.SliceThickness) - 8.0) < 1e-6  # 320 mm of chest over 40 slices
    assert abs(truth["severity_left"] - 20) < 2 and abs(truth["severity_right"] - 5) < 2


def test_help_lists_every_process() -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "api", "dicom", "worker", "migrate", "phantom", "push"):
        assert command in result.stdout


def cttriage(*args: str, data_dir: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CTTRIAGE_DATA_DIR": str(data_dir), **env}
    environment.pop("CTTRIAGE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_commands_on_a_fresh_data_folder_and_plain_refusals(tmp_path: Path) -> None:
    """`migrate` and `users` create what they need; mistakes get one line and an exit code, no traceback."""
    data = tmp_path / "not-yet" / "data"
    assert cttriage("migrate", data_dir=data).returncode == 0
    added = cttriage("users", "add", "dr-lee", "--role", "admin", data_dir=data)
    assert added.returncode == 0 and "shown once" in added.stdout
    for args, code, message in ((("users", "add"), 2, "needs a NAME"),
                                (("users", "add", "dr-lee"), 1, "dr-lee"),
                                (("users", "revoke", "nobody"), 1, "nobody"),
                                (("phantom", str(tmp_path / "p"), "--slices", "0"), 2, "at least 1"),
                                (("push", str(tmp_path / "nowhere")), 2, "no such file")):
        result = cttriage(*args, data_dir=data)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_push_finds_dicom_files_by_content_not_by_name(tmp_path: Path) -> None:
    """PACS and CD exports name files IM0001 and keep a DICOMDIR beside them."""
    from app.dicom.push import part10_files
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    write_phantom(tmp_path / "ph", PhantomSpec(slices=4, rows=32, columns=32, pixel_spacing=10.0))
    export = tmp_path / "export" / "DICOM" / "ST0"
    export.mkdir(parents=True)
    for index, path in enumerate(sorted((tmp_path / "ph").glob("*.dcm"))):
        (export / f"IM{index:04d}").write_bytes(path.read_bytes())
    (tmp_path / "export" / "DICOMDIR").write_bytes((tmp_path / "ph" / "truth.json").read_bytes().rjust(200)[:128]
                                                    + b"DICM")
    (tmp_path / "export" / "README.TXT").write_text("burned by the PACS")
    assert part10_files([tmp_path / "export"]) == [export / f"IM{i:04d}" for i in range(4)]
    assert cttriage("push", str(tmp_path / "export" / "README.TXT.missing"), data_dir=tmp_path).returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cttriage("push", str(empty), data_dir=tmp_path)
    assert result.returncode == 2 and "no DICOM files found" in result.stderr


def test_serve_that_cannot_listen_leaves_no_worker_behind(tmp_path: Path) -> None:
    """The DICOM port is taken: `serve` exits, and no Celery child of it keeps running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "CTTRIAGE_DATA_DIR": str(tmp_path / "data"),
                                        "CTTRIAGE_DICOM_HOST": "127.0.0.1", "CTTRIAGE_DICOM_PORT": str(port),
                                        "CTTRIAGE_API_PORT": str(free_port())})
        output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "Address already in use" in output, output[-2000:]
    time.sleep(1)
    children = subprocess.run(["pgrep", "-f", f"cttriage-cpu-{process.pid}@"], capture_output=True, text=True)
    assert children.stdout.strip() == "", "a worker of the failed serve is still running"


def test_serve_that_cannot_serve_http_stops_its_worker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "CTTRIAGE_DATA_DIR": str(tmp_path / "data"),
                                        "CTTRIAGE_DICOM_HOST": "127.0.0.1", "CTTRIAGE_DICOM_PORT": str(free_port()),
                                        "CTTRIAGE_API_HOST": "127.0.0.1",
                                        "CTTRIAGE_API_PORT": str(taken.getsockname()[1])})
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 3, output[-2000:]
    time.sleep(1)
    children = subprocess.run(["pgrep", "-f", f"cttriage-cpu-{process.pid}@"], capture_output=True, text=True)
    assert children.stdout.strip() == "", "a worker of the failed serve is still running"
