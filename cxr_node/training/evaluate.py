"""``cxr-node evaluate``: run the engine on a labelled set and report the paper's metrics with 95% CIs.

The images are read as the node reads them and analysed by :class:`~cxr_node.infer.engine.Engine`
exactly as in service (segmentation, mask check, lung region, ensemble). Images whose lung mask the engine
judges implausible are not classified: they are counted, with their reasons, and left out of the metrics.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.device import resolve_device
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import Manifest, load_manifest
from cxr_node.training.datasets import SPLIT_CSV, Row, load_split, read_image, read_rows, select
from cxr_node.training.metrics import (
    METRICS,
    Confusion,
    Interval,
    calibration_bins,
    confusion,
    metrics_with_ci,
    precision_at_k,
    roc_curve,
)
from cxr_node.training.plots import line_plot

ENSEMBLE: Final = "ensemble"
_HEADERS: Final = ("accuracy", "sensitivity", "specificity", "PPV", "NPV", "F1", "AUC")
_BATCH: Final = 16


@dataclass(frozen=True)
class ModelReport:
    """One model's (a member's or the ensemble's) results on the analysed images."""

    name: str
    threshold: float
    metrics: dict[str, Interval]
    confusion: Confusion
    scores: NDArray[np.float64]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` found."""

    manifest: str
    model: str
    data: str
    split: str
    images: int
    analysed: int
    not_analysed: dict[str, int]
    labels: NDArray[np.int64]
    models: list[ModelReport]
    precision_at_5: float
    mask_plausible_rate: float
    files: dict[str, str] = field(default_factory=dict)


def evaluate(
    manifest_path: Path,
    data_csv: Path,
    out: Path | None = None,
    *,
    split: str = "test",
    device: str = "cpu",
    n_resamples: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Analyse the images of ``data_csv`` with the manifest's models; compute metrics, plots and a report.

    Parameters
    ----------
    manifest_path : pathlib.Path
        The model manifest.
    data_csv : pathlib.Path
        A labelled set (see :mod:`cxr_node.training.datasets`).
    out : pathlib.Path, optional
        Folder for ``report.md``, ``report.json``, ``roc.png`` and ``calibration.png``.
    split : str
        ``test`` (or ``train``/``val``): that part, when the set has a split (its own ``split`` column or a
        ``split.csv`` beside it), else every row; ``all``: every row.
    device : str
        auto | cpu | cuda | cuda:N.
    n_resamples, seed : int
        Bootstrap resamples and their seed.

    Returns
    -------
    Evaluation
        Metrics with 95% CIs of each member and of the ensemble, confusion matrices at the operating
        points, precision@5 of neighbour labels, and the plausible-mask rate.
    """
    manifest = load_manifest(manifest_path)
    rows, used = split_rows(data_csv, split)
    engine = Engine.from_manifest(manifest, RuntimeOptions(device=resolve_device(device), precision="fp32"))
    analyses = _analyse(engine, rows)
    done = [(row, a) for row, a in zip(rows, analyses, strict=True) if a.analysed]
    labels = np.array([row.label for row, _ in done], dtype=np.int64)
    reports = _reports(manifest, [a for _, a in done], labels, n_resamples, seed)
    patients = [row.patient_id for row, _ in done]
    vectors = [a.embedding for _, a in done if a.embedding is not None]
    embeddings = np.stack(vectors) if vectors else np.zeros((0, 1), np.float32)
    evaluation = Evaluation(
        manifest=str(manifest_path), model=f"{manifest.name} {manifest.version}", data=str(data_csv), split=used,
        images=len(rows), analysed=len(done),
        not_analysed=dict(Counter(a.reason for a in analyses if not a.analysed).most_common()),
        labels=labels, models=reports,
        precision_at_5=precision_at_k(embeddings, labels, patients, k=5) if done else math.nan,
        mask_plausible_rate=float(np.mean([a.quality.ok for a in analyses])),
    )  # fmt: skip
    return write_report(evaluation, out) if out is not None else evaluation


def split_rows(data_csv: Path, split: str) -> tuple[list[Row], str]:
    """Return the rows to evaluate and which part they are."""
    rows = read_rows(data_csv)
    if split == "all":
        return rows, "all"
    has_split = all(row.split for row in rows) or (data_csv.parent / SPLIT_CSV).is_file()
    if not has_split:
        return rows, "all (the set has no split)"
    chosen = select(load_split(rows, data_csv.parent / SPLIT_CSV), split)
    if not chosen:
        raise ValueError(f"{data_csv}: no rows in split {split!r}")
    return chosen, split


def _analyse(engine: Engine, rows: Sequence[Row]) -> list[Analysis]:
    """Return the engine's analysis of each row's image, in order, a batch at a time."""
    analyses: list[Analysis] = []
    for start in range(0, len(rows), _BATCH):
        analyses += engine.analyse([read_image(row.path) for row in rows[start : start + _BATCH]])
    return analyses


def _reports(
    manifest: Manifest, analyses: Sequence[Analysis], labels: NDArray[np.int64], n_resamples: int, seed: int
) -> list[ModelReport]:
    """Return the ensemble's report, then each member's (at its own validation threshold when recorded)."""
    threshold = manifest.classifier.threshold
    named = [(ENSEMBLE, threshold, [a.probability or 0.0 for a in analyses])]
    for member in manifest.classifier.members:
        own = (member.metrics or {}).get("own_threshold_youden")
        named.append((member.name, float(own) if own is not None else threshold,
                      [a.member_probs[member.name] for a in analyses]))  # fmt: skip
    reports = []
    for name, at, values in named:
        scores = np.asarray(values, dtype=np.float64)
        intervals = metrics_with_ci(labels, scores, at, n_resamples=n_resamples, seed=seed) if labels.size else {}
        reports.append(ModelReport(name, at, intervals, confusion(labels, scores, at), scores))
    return reports


# ------------------------------------------------------------------------------------------ report


def _cell(interval: Interval | None) -> str:
    """Return ``0.950 (0.910-0.980)``, or ``n/a``."""
    if interval is None or not math.isfinite(interval.value):
        return "n/a"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{interval.value:.3f}"
    return f"{interval.value:.3f} ({interval.low:.3f}-{interval.high:.3f})"


def markdown_table(evaluation: Evaluation) -> str:
    """Return the metrics table (value and 95% CI of each metric, one row per model) in Markdown."""
    lines = ["| model | threshold | " + " | ".join(_HEADERS) + " |", "|---|---:|" + "---:|" * len(_HEADERS)]
    for report in evaluation.models:
        cells = [_cell(report.metrics.get(name)) for name in METRICS]
        lines.append(f"| {report.name} | {report.threshold:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(evaluation: Evaluation, out: Path) -> Evaluation:
    """Write ``report.md``, ``report.json``, ``roc.png`` and ``calibration.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"roc": str(_roc_plot(evaluation, out / "roc.png")),
             "calibration": str(_calibration_plot(evaluation, out / "calibration.png"))}  # fmt: skip
    files.update(json=str(out / "report.json"), markdown=str(out / "report.md"))
    evaluation = replace(evaluation, files=files)
    (out / "report.json").write_text(json.dumps(report_data(evaluation), indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(evaluation), encoding="utf-8")
    return evaluation


def _roc_plot(evaluation: Evaluation, path: Path) -> Path:
    """Draw every model's ROC curve."""
    series = {}
    for report in evaluation.models:
        if evaluation.labels.size:
            fpr, tpr, _ = roc_curve(evaluation.labels, report.scores)
            auc = report.metrics["auc"].value
            series[f"{report.name} (AUC {auc:.3f})"] = (fpr.tolist(), tpr.tolist())
    return line_plot(series, path, title="ROC", xlabel="1 - specificity", ylabel="sensitivity")


def _calibration_plot(evaluation: Evaluation, path: Path) -> Path:
    """Draw the ensemble's reliability diagram (10 equal-width bins)."""
    series = {}
    if evaluation.labels.size:
        bins = calibration_bins(evaluation.labels, evaluation.models[0].scores)
        series[ENSEMBLE] = ([b["predicted"] for b in bins], [b["observed"] for b in bins])
    return line_plot(series, path, title="Calibration (ensemble)", xlabel="predicted probability",
                     ylabel="observed positive rate", markers=True)  # fmt: skip


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def report_data(evaluation: Evaluation) -> dict[str, Any]:
    """Return the evaluation as JSON-ready data."""
    return {
        "manifest": evaluation.manifest, "model": evaluation.model, "data": evaluation.data,
        "split": evaluation.split, "images": evaluation.images, "analysed": evaluation.analysed,
        "not_analysed": evaluation.not_analysed, "mask_plausible_rate": evaluation.mask_plausible_rate,
        "positives": int(evaluation.labels.sum()), "precision_at_5": _finite(evaluation.precision_at_5),
        "models": {
            report.name: {
                "threshold": report.threshold,
                "metrics": {k: {n: _finite(v) for n, v in i.as_dict().items()} for k, i in report.metrics.items()},
                "confusion": report.confusion.as_dict(),
            }
            for report in evaluation.models
        },
        "files": evaluation.files,
    }  # fmt: skip


def report_markdown(evaluation: Evaluation) -> str:
    """Return the human report: the table, confusion matrices, excluded images, retrieval, plots."""
    lines = [
        f"# Evaluation of {evaluation.model}", "",
        f"- manifest: `{evaluation.manifest}`", f"- data: `{evaluation.data}` (split: {evaluation.split})",
        f"- images: {evaluation.images}; analysed: {evaluation.analysed}; positives among them: "
        f"{int(evaluation.labels.sum())}",
        f"- lung masks judged plausible: {evaluation.mask_plausible_rate:.1%}",
        f"- precision@5 of neighbour labels (cosine, other patients only): {evaluation.precision_at_5:.3f}", "",
        "## Metrics (95% bootstrap CI, 1000 resamples)", "", markdown_table(evaluation), "",
        "The ensemble is read at the manifest's operating threshold; each member at its own validation",
        "Youden threshold (recorded in the manifest). Images not analysed are excluded.", "",
        "## Confusion matrices at those thresholds", "", "| model | TP | FP | TN | FN |", "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    lines += [f"| {r.name} | {r.confusion.tp} | {r.confusion.fp} | {r.confusion.tn} | {r.confusion.fn} |"
              for r in evaluation.models]  # fmt: skip
    lines += ["", "## Not analysed", ""]
    lines += [f"- {count} x {reason}" for reason, count in evaluation.not_analysed.items()] or ["- none"]
    lines += ["", "## Plots", "", "![ROC](roc.png)", "", "![Calibration](calibration.png)", ""]
    return "\n".join(lines)
