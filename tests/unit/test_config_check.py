"""``cxr-node config check`` checks every file the configuration names, one line per problem naming the key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cxr_node.cli import main
from cxr_node.cli.checks import check, named_files
from cxr_node.config import Settings
from tests.integration.helpers import write_config
from tests.unit.test_golive import write_calibration


def test_a_good_configuration_names_what_it_checked(make_settings: Callable[..., Settings]) -> None:
    """The test model loads; the shipped mapping file reads; nothing is a problem."""
    checked, problems = check(make_settings())
    assert problems == []
    assert checked[0].startswith("models.manifest: tiny-test 0.0.1")
    assert any(line.startswith("outcomes.mapping: ") for line in checked)


def test_every_bad_file_is_one_line_naming_its_key(
    make_settings: Callable[..., Settings], tiny_manifest: Path, tmp_path: Path
) -> None:
    """A missing CA file, a secret others may read, a calibration of another version, a missing candidate and a
    missing mapping file with the HL7 listener on: five lines, each naming its key."""
    token = tmp_path / "archive.token"
    token.write_text("secret-token-123456\n")
    token.chmod(0o644)
    wrong = write_calibration(tiny_manifest, tmp_path / "calibration.yaml", version="0.0.9")
    destination = {"name": "archive", "protocol": "dicomweb", "url": "https://pacs.example/dicom-web",
                   "auth": "bearer", "token_file": str(token), "ca_file": str(tmp_path / "missing-ca.pem")}  # fmt: skip
    found = make_settings(**{
        "destinations": [destination], "models.calibration": str(wrong),
        "models.candidates": [{"manifest": str(tmp_path / "v2" / "manifest.yaml")}],
        "hl7_in.enabled": True, "outcomes.mapping": str(tmp_path / "mapping.yaml"),
    })  # fmt: skip
    assert {key for key, _ in named_files(found)} >= {
        "destinations[archive].token_file",
        "destinations[archive].ca_file",
    }
    _, problems = check(found)
    assert len(problems) == 5, problems
    for key in ("destinations[archive].ca_file", "destinations[archive].token_file", "models.calibration",
                "models.candidates[0].manifest", "outcomes.mapping"):  # fmt: skip
        assert sum(line.startswith(key) or f" {key}" in line for line in problems) == 1, (key, problems)
    assert all("\n" not in line for line in problems)


def test_the_command_exits_2_with_the_problems_on_stderr(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI prints each problem on stderr as one line and exits 2; nothing on stdout."""
    config = write_config(make_settings(**{"models.manifest": str(tmp_path / "nope.yaml")}), tmp_path / "node.yaml")
    assert main(["config", "check", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "models.manifest" in err
