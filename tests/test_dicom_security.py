"""DICOM network security: peer IP allow-list and TLS (with optional mutual authentication)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # created at import time

from app.dicom.listener import address_allowed
from tests.test_dicom_listener import AE_TITLE, start  # noqa: F401 - the listener fixture


def echo(port: int, tls: ssl.SSLContext | None = None) -> bool:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def test_address_allow_list_rules() -> None:
    assert address_allowed("10.1.2.3", [])
    assert address_allowed("10.1.2.3", ["10.1.2.0/24"])
    assert not address_allowed("10.1.3.3", ["10.1.2.0/24", "192.168.0.1"])
    assert address_allowed("::1", ["::1/128"])


def test_ip_allow_list_refuses_other_networks(start) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    refused = start(allowed_calling_ips=["10.0.0.0/8"])
    assert not echo(refused.port)
    allowed = start(allowed_calling_ips=["127.0.0.0/8"])
    assert echo(allowed.port)


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (tmp_path / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: tmp_path / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_with_client_certificates(start, certificates: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    listener = start(dicom_tls_cert=certificates["server.pem"], dicom_tls_key=certificates["server.key"],
                     dicom_tls_ca=certificates["ca.pem"])
    assert not echo(listener.port)  # plain TCP is refused

    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates["ca.pem"]))
    assert not echo(listener.port, anonymous)  # no client certificate

    with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates["ca.pem"]))
    with_cert.load_cert_chain(certificates["client.pem"], certificates["client.key"])
    assert echo(listener.port, with_cert)
