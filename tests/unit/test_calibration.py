"""Site calibration: targets, thresholds and their intervals, the outcomes CSV, the file, and the outputs' texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cxr_node.cli import main
from cxr_node.dicom.pixels import DecodedImage
from cxr_node.errors import ModelError
from cxr_node.infer.calibration import (
    CalibratedModel,
    SiteCalibration,
    Target,
    check_applies,
    load_calibration,
    save_calibration,
    weights_checksums,
)
from cxr_node.infer.registry import load_manifest
from cxr_node.results.findings import Findings, Provenance, SiteOperatingPoint, Summary
from cxr_node.results.sc import banner
from cxr_node.results.sr import impression
from cxr_node.training.calibration import (
    bootstrap_threshold,
    calibrate,
    parse_target,
    threshold_for,
)
from cxr_node.training.metrics import confusion, sensitivity, specificity
from cxr_node.training.outcomes import Joined, read_outcomes
from cxr_node.work.loop import summary_of
from tests.unit.test_domain_gate import analysis

SITE = SiteOperatingPoint(0.31, "site calibration of 2026-12-03 for sensitivity 0.90")


def scores(n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping scores: positives around 0.65, negatives around 0.35."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2, np.int64), np.zeros(n - n // 2, np.int64)]
    s = np.clip(np.where(y == 1, 0.65, 0.35) + rng.normal(0, 0.15, n), 0, 1)
    return y, s


# ------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("text", "metric", "value"),
    [("sensitivity=0.90", "sensitivity", 0.9), ("sens=0.95", "sensitivity", 0.95),
     ("Specificity:95%", "specificity", 0.95), ("spec = 0.8", "specificity", 0.8)],
)  # fmt: skip
def test_targets_are_read_liberally(text: str, metric: str, value: float) -> None:
    """A target is a metric name (or its usual short form) and a share or a percentage."""
    found = parse_target(text)
    assert found.metric == metric
    assert found.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["0.9", "auc=0.9", "sensitivity=high", "sensitivity=1.5", "specificity=0"])
def test_a_bad_target_is_one_clear_error(text: str) -> None:
    """A target that cannot be read says what is expected."""
    with pytest.raises(ValueError, match="--target") as raised:
        parse_target(text)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------- thresholds


def best_cut(y: np.ndarray, s: np.ndarray, target: Target) -> tuple[float, float]:
    """(sensitivity, specificity) of the best cut meeting ``target``, by brute force over every possible cut."""
    rates = []
    for cut in [*np.unique(s), np.inf]:
        c = confusion(y, s, cut)
        rates.append((sensitivity(c), specificity(c)))
    if target.metric == "sensitivity":
        feasible = [r for r in rates if r[0] >= target.value]
        return max(feasible, key=lambda r: (r[1], r[0]))
    feasible = [r for r in rates if r[1] >= target.value]
    return max(feasible, key=lambda r: (r[0], r[1]))


@pytest.mark.parametrize("metric", ["sensitivity", "specificity"])
@pytest.mark.parametrize("goal", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_the_threshold_is_the_best_cut_that_meets_the_target(metric: str, goal: float) -> None:
    """It meets the target with the best other rate, and of equals the best on the target's own rate."""
    y, s = scores()
    target = Target(metric=metric, value=goal)  # type: ignore[arg-type]
    c = confusion(y, s, threshold_for(y, s, target))
    assert (sensitivity(c), specificity(c)) == best_cut(y, s, target)


@pytest.mark.parametrize("metric", ["sensitivity", "specificity"])
def test_separable_scores_get_the_gap_whatever_the_target(metric: str) -> None:
    """When every positive scores above every negative, the threshold sits in the gap: nothing is given away."""
    y = np.r_[np.ones(20, np.int64), np.zeros(20, np.int64)]
    s = np.r_[np.linspace(0.6, 1.0, 20), np.linspace(0.0, 0.4, 20)]
    assert threshold_for(y, s, Target(metric=metric, value=0.9)) == pytest.approx(0.5)  # type: ignore[arg-type]


def test_the_threshold_interval_is_seeded_and_holds_the_estimate() -> None:
    """The same seed gives the same interval; the interval holds the point estimate."""
    y, s = scores()
    target = Target(metric="sensitivity", value=0.9)
    first = bootstrap_threshold(y, s, target, n_resamples=200, seed=5)
    assert first == bootstrap_threshold(y, s, target, n_resamples=200, seed=5)
    assert first.low <= first.value <= first.high and first.low < first.high


def test_too_few_positives_cannot_be_calibrated() -> None:
    """A handful of positives gives no operating point: the error says how many there are."""
    y = np.r_[np.ones(3, np.int64), np.zeros(50, np.int64)]
    joined = Joined(tuple(str(i) for i in range(y.size)), y, np.linspace(0, 1, y.size))
    with pytest.raises(ValueError, match="3 positive"):
        calibrate(joined, Target(metric="sensitivity", value=0.9), 0.5, n_resamples=10)


# --------------------------------------------------------------------------------------- outcomes CSV


def test_outcomes_are_read_liberally(tmp_path: Path) -> None:
    """Other column names, a semicolon, a BOM, words for the labels, blank lines, repeats and contradictions."""
    path = tmp_path / "ris.csv"
    text = ("\ufeffAccession Number;Result;Date\nA1;POS;2026-11-01\nA2;Not detected;\n;;\nA3;1;\nA4;negative;\n"
            "A1;positive;\nA5;pos;\nA5;neg;\n")  # fmt: skip
    path.write_text(text, encoding="utf-8")
    found = read_outcomes(path)
    assert found.labels == {"A1": 1, "A2": 0, "A3": 1, "A4": 0}
    assert (found.rows, found.repeated, found.conflicting) == (7, 2, ("A5",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("accession_number,label\n", "no case"),
        ("patient,label\nP1,1\n", "no column for an accession"),
        ("accession_number,age\nA1,40\n", "no column for a label"),
        ("accession,label\nA1,maybe\n", "line 2: label 'maybe'"),
        ("accession,label\n,positive\n", "line 2: empty accession"),
        ("accession,label\nA1,1\nA2,\n", "line 3: label ''"),
    ],
)
def test_a_bad_outcomes_csv_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    """Each problem is one line naming the file (and the line) and what is wrong."""
    path = tmp_path / "outcomes.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as raised:
        read_outcomes(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_the_command_reports_a_bad_csv_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cxr-node calibrate`` with a bad outcomes file exits with one error line and no traceback."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "state")}}))
    bad = tmp_path / "outcomes.csv"
    bad.write_bytes(b"\x00\x01\x02binary")
    code = main(["calibrate", "--config", str(config), "--labels", str(bad), "--target", "sensitivity=0.9",
                 "--out", str(tmp_path / "cal.yaml")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and err.startswith("cxr-node: error:") and "binary" in err
    assert not (tmp_path / "cal.yaml").exists()


# ------------------------------------------------------------------------------------------- the file


def calibration_for(manifest_path: Path, **changes: object) -> SiteCalibration:
    """A calibration of the manifest's model, with ``changes`` to its model part."""
    manifest = load_manifest(manifest_path)
    model = {"name": manifest.name, "version": manifest.version, "weights_sha256": weights_checksums(manifest)}
    target = Target(metric="sensitivity", value=0.9)
    return SiteCalibration(model=CalibratedModel.model_validate({**model, **changes}), threshold=0.31, target=target,
                           date="2026-12-03", cases=40, positives=20)  # fmt: skip


def test_the_file_round_trips_and_applies_to_its_model(tmp_path: Path, tiny_manifest: Path) -> None:
    """What is saved reads back the same and is accepted for the model it names."""
    path = save_calibration(calibration_for(tiny_manifest), tmp_path / "site.yaml")
    found = load_calibration(path)
    assert found == calibration_for(tiny_manifest)
    assert found.description == "site calibration of 2026-12-03 for sensitivity 0.90"
    check_applies(found, load_manifest(tiny_manifest), path)


@pytest.mark.parametrize("change", [{"name": "other"}, {"version": "9"}, {"weights_sha256": {"lungs": "0" * 64}}])
def test_a_file_for_another_model_is_refused(tmp_path: Path, tiny_manifest: Path, change: dict[str, object]) -> None:
    """Another name, version or set of weights than the manifest's refuses, in one line naming the file."""
    path = tmp_path / "site.yaml"
    with pytest.raises(ModelError, match=r"site\.yaml") as refused:
        check_applies(calibration_for(tiny_manifest, **change), load_manifest(tiny_manifest), path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("a: [", "cannot be read"),
        ("- 1\n", "not a site calibration"),
        ("threshold: 0.3\n", "model"),
    ],
)
def test_a_broken_file_is_one_clear_error(tmp_path: Path, content: str | None, message: str) -> None:
    """A missing, unreadable or incomplete file is a one-line ModelError naming it."""
    path = tmp_path / "site.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelError, match=message) as raised:
        load_calibration(path)
    assert "site.yaml" in str(raised.value) and "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------- outputs


def findings(threshold: float, site: SiteOperatingPoint | None) -> Findings:
    """A positive result at ``threshold`` made by a node with (or without) a site operating point."""
    made_by = Provenance("cxr-demo", "1", "demo only", ("a", "b"), "0.1.0", "2.25.1", site_operating_point=site)
    image = np.zeros((32, 32), np.float32)
    summary = summary_of_analysis(threshold)
    return Findings(made_by, summary, image=image, lung_mask=np.ones((32, 32), bool))


def summary_of_analysis(threshold: float) -> Summary:
    """The summary the worker keeps of a classified analysis judged at ``threshold``."""
    image = DecodedImage(np.zeros((32, 32), np.float32), (32, 32), None, "MONOCHROME2", 12, None, 1.0, "none")
    return summary_of(image, analysis(None), ("cxr-demo", "1"), (), SiteOperatingPoint(threshold, "x"))


def test_the_worker_judges_at_the_site_operating_point() -> None:
    """With a site operating point, the kept threshold is the site's, and the decision follows it."""
    assert summary_of_analysis(0.31).threshold == 0.31
    assert summary_of_analysis(0.995).positive is False  # probability 0.99 below the site's cut


def test_the_outputs_name_the_source_of_the_operating_point() -> None:
    """The impression and the overlay's first line say "site calibration of …" or "model manifest"."""
    calibrated = findings(0.31, SITE)
    assert "operating point 0.31, site calibration of 2026-12-03 for sensitivity 0.90)" in impression(calibrated)
    assert SITE.source in banner(calibrated).lines[0]
    plain = findings(0.3, None)
    assert "operating point 0.30, model manifest)" in impression(plain)
    assert "model manifest" in banner(plain).lines[0]
    stale = findings(0.3, SITE)  # a result judged before the calibration was installed keeps its own source
    assert "model manifest" in impression(stale) and SITE.source not in impression(stale)
