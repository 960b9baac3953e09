"""``cxr-node index``: import a labelled library of phantoms, query a file, label a study, rebuild."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cxr_node.cli import main
from cxr_node.training.phantoms import write_phantom_set

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A config, 16 labelled reference phantoms and 4 held-out ones."""
    base = tmp_path_factory.mktemp("library")
    reference = write_phantom_set(base / "ref", n=16, seed=11, size=256)
    held_out = write_phantom_set(base / "new", n=4, seed=12, size=256)
    config = base / "node.yaml"
    config.write_text(f"storage: {{root: {base / 'state'}}}\nmodels: {{manifest: {DEMO}}}\n")
    return config, reference, held_out


def rows(output: str) -> list[list[str]]:
    """The data rows of a printed neighbour table."""
    return [line.split() for line in output.strip().splitlines()[1:]]


def test_import_query_label_rebuild(library: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Imported cases come back as labelled library neighbours; a label set later survives a rebuild, and a
    rebuild gives the same neighbours."""
    config, reference, held_out = library
    assert main(["index", "import", "--config", str(config), "--labels", str(reference), str(reference.parent)]) == 0
    assert "imported 16 reference case(s)" in capsys.readouterr().out
    query = held_out.parent / next(csv.DictReader(held_out.open()))["path"]
    assert main(["index", "query", "--config", str(config), str(query), "-k", "5"]) == 0
    before = rows(capsys.readouterr().out)
    assert len(before) == 5 and all(row[3] == "library" and row[2] in ("covid", "non-covid") for row in before)
    study = before[0][-1]
    flipped = "covid" if before[0][2] == "non-covid" else "non-covid"
    assert main(["index", "label", "--config", str(config), "--study", study, "--label", flipped]) == 0
    assert main(["index", "rebuild", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["index", "query", "--config", str(config), str(query), "-k", "5"]) == 0
    after = rows(capsys.readouterr().out)
    assert [row[-1] for row in after] == [row[-1] for row in before]
    assert after[0][2] == flipped


def test_bad_labels_are_one_line_errors(library: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A missing CSV or an unknown label is one line on stderr, never a traceback."""
    config, reference, _ = library
    bad = reference.parent / "bad.csv"
    bad.write_text("path,label\nimages/00000.dcm,pneumonia\n")
    assert main(["index", "import", "--config", str(config), "--labels", str(bad), str(reference.parent)]) == 1
    err = capsys.readouterr().err
    assert "label must be one of covid, non-covid" in err and "Traceback" not in err
    assert main(["index", "label", "--config", str(config), "--study", "1.2.3", "--label", "covid"]) == 1
    assert "not in the index" in capsys.readouterr().err
