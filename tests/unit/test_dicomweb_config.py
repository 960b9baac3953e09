"""DICOMweb destinations: their config keys (checked at load, one line naming the key) and their secret files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cxr_node.config import load_settings
from cxr_node.errors import ConfigError, SendError
from cxr_node.send.dicomweb import Credentials, DicomwebTransport, read_secret
from cxr_node.send.scu import PeerAddress
from cxr_node.send.transport import DimseTransport, transport_for


def load(tmp_path: Path, destination: str) -> object:
    """Load a config whose only destination is the YAML flow mapping ``destination``."""
    path = tmp_path / "node.yaml"
    path.write_text(f"destinations: [{destination}]\n")
    return load_settings(path, environ={})


def test_an_existing_dimse_destination_is_unchanged(tmp_path: Path) -> None:
    """The DESIGN.md §5 destination still loads as DIMSE; its transport is an association."""
    settings = load(tmp_path, "{name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}")
    (destination,) = settings.destinations  # type: ignore[attr-defined]
    assert destination.protocol == "dimse" and destination.url is None
    transport = transport_for(destination, settings.delivery)  # type: ignore[attr-defined]
    assert isinstance(transport, DimseTransport) and str(transport) == "PACS@127.0.0.1:4242"


def test_a_dicomweb_destination_loads(tmp_path: Path) -> None:
    """A dicomweb destination needs no AE title, host or port; the URL loses its trailing slash."""
    settings = load(
        tmp_path,
        "{name: web, protocol: dicomweb, url: 'https://pacs:8443/dicom-web/', ca_file: /etc/ca.pem,"
        " auth: basic, username: node, password_file: /etc/pw, timeout_s: 5}",
    )
    (destination,) = settings.destinations  # type: ignore[attr-defined]
    assert destination.url == "https://pacs:8443/dicom-web" and destination.ae_title is None
    transport = transport_for(destination, settings.delivery)  # type: ignore[attr-defined]
    assert isinstance(transport, DicomwebTransport)
    assert (transport.host, transport.port, transport.root, transport.secure) == ("pacs", 8443, "/dicom-web", True)
    assert transport.timeout_s == 5 and transport.tls is not None and transport.tls.ca_file == Path("/etc/ca.pem")


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("{name: p, ae_title: P, host: h}", "destinations.0.port: Value error, a dimse destination needs port"),
        ("{name: p, port: 1, host: h}", "destinations.0.ae_title"),
        ("{name: p, ae_title: P, host: h, port: 1, url: 'http://h'}", "url: only for protocol: dicomweb"),
        ("{name: p, ae_title: P, host: h, port: 1, auth: basic}", "auth: only for protocol: dicomweb"),
        ("{name: w, protocol: dicomweb}", "protocol: dicomweb needs url"),
        ("{name: w, protocol: dicomweb, url: 'ftp://h/x'}", "destinations.0.url: Value error, expected"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x?limit=1'}", "destinations.0.url"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', tls: true}", "encrypted by an https url"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', ca_file: /c}", "need an https url"),
        ("{name: w, protocol: dicomweb, url: 'https://h/x', cert_file: /c}", "cert_file and key_file go together"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', auth: basic, password_file: /p}", "needs username"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', auth: bearer}", "auth: bearer needs token_file"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', token_file: /t}", "auth: none does not use token_file"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', auth: digest}", "destinations.0.auth"),
        ("{name: w, protocol: dicomweb, url: 'http://h/x', timeout_s: 0}", "destinations.0.timeout_s"),
        ("{name: w, protocol: smtp, url: 'http://h/x'}", "destinations.0.protocol"),
    ],
)
def test_bad_destinations_are_one_line_naming_the_key(tmp_path: Path, destination: str, expected: str) -> None:
    """A destination missing what its protocol needs, or holding what it does not use, stops loading in one line."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, destination)
    assert "\n" not in str(info.value) and expected in str(info.value)


def test_a_password_in_the_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """user:password@ in the URL is refused, and the message shows *** instead of the password."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "{name: w, protocol: dicomweb, url: 'https://node:hunter2@pacs/dicom-web'}")
    message = str(info.value)
    assert "hunter2" not in message and "node:***@pacs" in message and "password_file" in message


def test_a_dicomweb_destination_is_no_dimse_peer(tmp_path: Path) -> None:
    """Asking for the AE address of a dicomweb destination is an error naming it, not a crash on None."""
    settings = load(tmp_path, "{name: web, protocol: dicomweb, url: 'http://h/x'}")
    with pytest.raises(SendError, match="destination web is not a DICOM AE"):
        PeerAddress.of(settings.destinations[0])  # type: ignore[attr-defined]


def secret(tmp_path: Path, text: str, mode: int) -> Path:
    """A file holding ``text`` with ``mode``."""
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_are_the_first_line_of_a_private_file(tmp_path: Path) -> None:
    """The first line, stripped, of a 0600 or 0400 file."""
    assert read_secret(secret(tmp_path, "  s3cret \nignored\n", 0o600), "token_file") == "s3cret"
    assert read_secret(secret(tmp_path, "s3cret", 0o400), "token_file") == "s3cret"


@pytest.mark.parametrize(("text", "mode", "expected"), [
    ("s3cret\n", 0o640, "group or others may read it; chmod 600"),
    ("s3cret\n", 0o604, "group or others may read it; chmod 600"),
    ("\n", 0o600, "the file is empty"),
    ("", 0o600, "the file is empty"),
])  # fmt: skip
def test_unusable_secret_files_are_refused(tmp_path: Path, text: str, mode: int, expected: str) -> None:
    """A file group or others may read, or an empty one, is an error naming the key and the file, not the secret."""
    path = secret(tmp_path, text, mode)
    with pytest.raises(SendError, match=expected) as info:
        read_secret(path, "password_file")
    assert str(info.value).startswith(f"password_file {path}:") and "s3cret" not in str(info.value)


def test_a_missing_secret_file_says_so(tmp_path: Path) -> None:
    """A missing file is an error naming the key and the file."""
    with pytest.raises(SendError, match=r"token_file .*absent: cannot read it"):
        read_secret(tmp_path / "absent", "token_file")


def test_authorization_headers(tmp_path: Path) -> None:
    """Basic is user:password in base64, bearer the token; the credentials' repr shows neither."""
    path = secret(tmp_path, "pa:ss\n", 0o600)
    basic = Credentials("basic", "node", path)
    assert basic.header() == "Basic " + base64.b64encode(b"node:pa:ss").decode()
    assert Credentials("bearer", None, path).header() == "Bearer pa:ss"
    assert Credentials().header() is None
    assert "pa:ss" not in repr(basic) and "pa:ss" not in repr(DicomwebTransport("http://h/x", basic, 1.0).__dict__)
