"""`cttriage push` says why instances failed, not only how many."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # created at import time

from app.cli import main
from app.dicom.push import failure_summary, status_reason
from tests.conftest import free_port


@contextmanager
def refusing_node(statuses: list[int], require_called_aet: bool = False) -> Iterator[int]:
    """A C-STORE SCP answering each store with the next of ``statuses`` (cycling)."""
    answered = iter(statuses * 100)
    ae = AE(ae_title="PACS")
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda _event: next(answered))])
    assert server is not None  # block=False returns the running server
    try:
        yield port
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    out = tmp_path_factory.mktemp("ph")
    write_phantom(out, PhantomSpec(slices=5, rows=32, columns=32, pixel_spacing=10.0))
    return out


def test_failures_are_grouped_by_status_in_words(phantom: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with refusing_node([0xA700, 0xA700, 0xC000, 0x0000, 0xA700]) as port:
        code = main(["push", str(phantom), "--port", str(port), "--aet", "PACS"])
    out = capsys.readouterr().out
    assert code == 1
    assert "sent 5 instances, 4 failed: 0xA700 out of resources (3), 0xC000 cannot understand (1)" in out, out


def test_a_rejected_association_says_why(phantom: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with refusing_node([0x0000], require_called_aet=True) as port:
        code = main(["push", str(phantom), "--port", str(port), "--aet", "NOT_PACS"])
    err = capsys.readouterr().err
    assert code == 1
    assert "rejected: called AE title not recognised" in err, err


def test_status_words() -> None:
    assert status_reason(0xA701) == "0xA701 out of resources"
    assert status_reason(0x0122) == "0x0122 SOP class not supported"
    assert status_reason(-1).startswith("no answer")
    assert failure_summary([0, 0]) == ""
