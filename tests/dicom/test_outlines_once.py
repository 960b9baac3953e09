"""The SR's lung region and the GSPS of the same findings trace the lung outlines once, and draw the same ones."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cxr_node.imaging import masks
from cxr_node.results.common import OutputOptions
from cxr_node.results.outputs import build_dataset, build_outputs
from cxr_node.results.sr import lung_region
from tests.dicom.test_results import source_and_findings


def test_sr_and_gsps_trace_the_outlines_once(monkeypatch: pytest.MonkeyPatch) -> None:
    source, findings = source_and_findings()
    assert findings.lung_mask is not None
    monkeypatch.setattr(masks, "_kept_outlines", [])  # nothing an earlier test traced
    calls = []
    traced = masks.lung_outlines

    def counted(mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
        calls.append(target_shape)
        return traced(mask, target_shape, max_points)

    monkeypatch.setattr(masks, "lung_outlines", counted)
    built = build_outputs(source, findings, OutputOptions(), ("sr", "sc", "seg", "pr"))
    assert [item.kind for item in built] == ["sr", "sc", "seg", "pr"]
    assert len(calls) == 1
    outlines = traced(findings.lung_mask, findings.summary.source_shape)
    region = np.round(masks.convex_hull(np.vstack(outlines)), 1).astype(np.float32)
    assert np.array_equal(lung_region(findings), region)
    drawn = [
        np.asarray(item.GraphicData, dtype=np.float32)
        for item in _graphics(build_dataset(source, findings, OutputOptions(), "pr"))
    ]
    assert len(calls) == 1
    assert [outline.astype(np.float32).tobytes() for outline in outlines] == [part.tobytes() for part in drawn]


def _graphics(pr: Dataset) -> list[Dataset]:
    return [item for annotation in pr.GraphicAnnotationSequence for item in annotation.get("GraphicObjectSequence", [])]
