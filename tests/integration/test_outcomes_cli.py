"""``cxr-node outcomes import`` and ``show``: a site's CSV recorded through the mapping, and listed back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cxr_node.cli import main
from cxr_node.config import Settings
from tests.integration.helpers import write_config


@pytest.fixture
def config(make_settings: Callable[..., Settings], tmp_path: Path) -> Path:
    """A config file on a temporary store."""
    return write_config(make_settings(), tmp_path / "node.yaml")


CSV = (
    "\ufeffAccession No;PCR Result;Date\n"
    "A-1;SARS-CoV-2 not detected;2024-03-01\n"
    "A-2;POSITIVE;01.03.2024\n"
    "A-3;CO-RADS 3;\n"
    "\n"
    ";positive;\n"
    "A-5;cardiomegaly;\n"
    "A-6;1;not a date\n"
)


def test_import_counts_and_show(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows are recorded through the mapping, the unmappable counted by reason, a second import recorded once,
    and ``show`` lists them."""
    path = tmp_path / "outcomes.csv"
    path.write_text(CSV, encoding="utf-8")
    assert main(["outcomes", "import", "--config", str(config), str(path)]) == 0
    out = capsys.readouterr().out
    assert "recorded 3, repeated (already recorded) 0" in out
    assert "labels: negative 1, not_assessable 1, positive 1" in out
    assert "unmappable 3: empty accession number 1, not in the mapping 1, unreadable date 1" in out
    assert main(["outcomes", "import", "--config", str(config), str(path)]) == 0
    assert "recorded 0, repeated (already recorded) 3" in capsys.readouterr().out
    assert main(["outcomes", "show", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "A-1" in shown and "negative" in shown and "words:not detected" in shown and "3 outcome(s)" in shown
    assert main(["outcomes", "show", "--config", str(config), "--accession", "A-2"]) == 0
    shown = capsys.readouterr().out
    assert "positive" in shown and "A-1" not in shown and "1 outcome(s)" in shown
    assert main(["outcomes", "show", "--config", str(config), "--since", "2030-01-01"]) == 0
    assert "0 outcome(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,colour\nx,red\n", "no column for an accession number"),
        ("accession,weight\nA,12\n", "no column for a finding"),
        ("", "empty file"),
    ],
)
def test_bad_csv_is_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    """A CSV without the needed columns, or empty, is refused in one line naming the file."""
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["outcomes", "import", "--config", str(config), str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1


def test_bad_mapping_and_missing_file_are_one_line(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad mapping file and a missing CSV are one line each, naming the file."""
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("codes:\n  - {system: snomed, code: '1', label: positive}\n")
    config = write_config(make_settings(**{"outcomes.mapping": str(mapping)}), tmp_path / "node.yaml")
    csv = tmp_path / "ok.csv"
    csv.write_text("accession,result\nA,positive\n")
    assert main(["outcomes", "import", "--config", str(config), str(csv)]) == 1
    err = capsys.readouterr().err
    assert "mapping.yaml: codes entry 1: system 'snomed' is not in the systems section" in err
    assert err.count("\n") == 1
    good = write_config(make_settings(), tmp_path / "good.yaml")
    assert main(["outcomes", "import", "--config", str(good), str(tmp_path / "absent.csv")]) == 1
    assert "absent.csv" in capsys.readouterr().err
