"""The out-of-domain gate's policy (refuse, flag, off), the score in the stored result, and the flag's texts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cxr_node.config import DomainSettings, Settings
from cxr_node.infer.domain import DomainScore
from cxr_node.infer.engine import Analysis
from cxr_node.infer.segment import MaskQuality
from cxr_node.jobs import codec
from cxr_node.neighbours import NewCase
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, Summary
from cxr_node.results.sc import banner
from cxr_node.results.sr import impression
from cxr_node.work.gate import DomainGate, GateMode
from cxr_node.work.library import _analyse as library_analyse
from cxr_node.work.loop import summary_of

PROVENANCE = Provenance("cxr-demo", "1", "demo only", ("a", "b"), "0.1.0", "2.25.1")


def analysis(score: float | None, bound: float = 5.0) -> Analysis:
    """A classified analysis with a confident positive probability and the given out-of-domain score."""
    mask = np.zeros((32, 32), bool)
    mask[8:24, 4:14] = mask[8:24, 18:28] = True
    return Analysis(
        analysed=True,
        reason="",
        probability=0.99,
        member_probs={"a": 0.98, "b": 1.0},
        threshold=0.3,
        positive=True,
        embedding=np.full(4, 0.5, np.float32),
        lung_mask=mask,
        heatmap=np.zeros((32, 32), np.float32),
        quality=MaskQuality(True, "plausible", 0.3, 2),
        domain=None if score is None else DomainScore(score, bound),
    )


def test_refuse_turns_an_outside_image_into_not_analysed() -> None:
    """Refused: no probability, no heatmap, no embedding; the reason names the score and the bound."""
    refused = DomainGate("refuse").apply(analysis(12.634))
    assert not refused.analysed and refused.probability is None and refused.positive is None
    assert refused.embedding is None and refused.heatmap is None and refused.member_probs == {}
    assert refused.reason == "outside the model's validated domain (score 12.63, bound 5.00)"
    assert refused.domain == DomainScore(12.634, 5.0)
    assert not DomainGate.indexable(refused)


def test_refuse_keeps_an_inside_image() -> None:
    """An image inside the domain is analysed as before, its score kept, and may be indexed."""
    kept = DomainGate("refuse").apply(analysis(3.0))
    assert kept.analysed and kept.probability == 0.99 and kept.domain == DomainScore(3.0, 5.0)
    assert DomainGate.indexable(kept)


def test_flag_keeps_the_analysis_but_never_indexes_it() -> None:
    """Flagged: analysed and shown, the score kept, but the neighbour index does not learn it."""
    flagged = DomainGate("flag").apply(analysis(12.0))
    assert flagged.analysed and flagged.probability == 0.99 and flagged.domain == DomainScore(12.0, 5.0)
    assert not DomainGate.indexable(flagged)


def test_off_drops_the_score() -> None:
    """Off: the analysis is unchanged and carries no score."""
    ignored = DomainGate("off").apply(analysis(12.0))
    assert ignored.analysed and ignored.domain is None and DomainGate.indexable(ignored)


def test_configured_bound_replaces_the_engines() -> None:
    """A gate with its own bound (domain.pass_rate) judges against it, not the engine's."""
    assert DomainGate("refuse", bound=20.0).apply(analysis(12.0)).analysed
    assert not DomainGate("refuse", bound=2.0).apply(analysis(3.0)).analysed


def test_a_model_without_description_has_no_gate() -> None:
    """Without a description the gate is off whatever the setting."""
    assert DomainGate.for_model("refuse", None, 0.9).mode == "off"


def test_settings_default_to_refuse_and_check_the_pass_rate() -> None:
    """``domain.gate`` defaults to refuse; a pass rate outside (0, 1] is refused at load."""
    assert Settings().domain == DomainSettings(gate="refuse", pass_rate=None)
    with pytest.raises(ValueError, match="pass_rate"):
        DomainSettings(pass_rate=1.5)


def summary(score: float | None, gate: GateMode) -> Summary:
    """The summary the worker records for ``analysis(score)`` under ``gate``."""
    from cxr_node.dicom.pixels import DecodedImage

    image = DecodedImage(np.zeros((32, 32), np.float32), (64, 64), None, "MONOCHROME2", 12, None, 1.0, "none")
    return summary_of(image, DomainGate(gate).apply(analysis(score)), ("cxr-demo", "1"), ())


@pytest.mark.parametrize(("score", "gate"), [(12.0, "refuse"), (12.0, "flag"), (3.0, "refuse"), (None, "refuse")])
def test_the_score_survives_the_codec(score: float | None, gate: GateMode) -> None:
    """The score and bound are stored with the result and decode to the same summary."""
    found = summary(score, gate)
    assert (found.domain_score, found.domain_bound) == ((score, 5.0) if score is not None else (None, None))
    assert codec.decode_summary(codec.encode_summary(found)) == found


def test_a_stored_result_without_score_decodes() -> None:
    """A result stored before the gate existed (no "domain" key) decodes with no score."""
    document = json.loads(codec.encode_summary(summary(3.0, "refuse")))
    del document["domain"]
    decoded = codec.decode_summary(json.dumps(document))
    assert (decoded.domain_score, decoded.domain_bound, decoded.outside_domain) == (None, None, False)


def test_score_and_bound_go_together() -> None:
    """A summary with a score but no bound cannot be built."""
    with pytest.raises(ValueError, match="domain_score and domain_bound"):
        Summary("m", "1", False, (8, 8), reason="x", domain_score=3.0)


def test_flagged_result_says_so_in_the_impression_and_the_banner() -> None:
    """A flagged result's impression and overlay banner say it is outside the validated domain, with the score."""
    flagged = summary(12.0, "flag")
    mask = np.zeros((32, 32), bool)
    mask[8:24, 4:28] = True
    findings = Findings(PROVENANCE, flagged, np.zeros((32, 32), np.float32), mask, None)
    text = "outside the validated domain (score 12.00, bound 5.00)"
    assert impression(findings).endswith(f"; {text}")
    assert f"WARNING: {text}" in banner(findings).lines


def test_inside_result_texts_are_unchanged() -> None:
    """A result inside the domain reads as before: no domain words in the impression or the banner."""
    inside = summary(3.0, "flag")
    mask = np.zeros((32, 32), bool)
    mask[8:24, 4:28] = True
    findings = Findings(PROVENANCE, inside, np.zeros((32, 32), np.float32), mask, None)
    assert "domain" not in impression(findings)
    assert not any("domain" in line for line in banner(findings).lines)
    no_score = replace(inside, domain_score=None, domain_bound=None)
    assert impression(replace(findings, summary=no_score)) == impression(findings)


def test_mask_verdict_kept_for_refused() -> None:
    """A refused result keeps its lung-mask verdict (the mask was plausible; the image was unlike the training)."""
    assert summary(12.0, "refuse").lung_mask == MaskVerdict(True, "plausible", 0.3, 2)


class Fixed:
    """An analyser that returns the given analyses (a small real implementation of the worker's Protocol)."""

    def __init__(self, found: list[Analysis]) -> None:
        self.found = found

    @property
    def model(self) -> tuple[str, str]:
        """The model's (name, version)."""
        return ("cxr-demo", "1")

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        """The fixed analyses, one per image."""
        return self.found[: len(images)]


def test_index_import_and_rebuild_leave_outside_images_out() -> None:
    """The library's embedder gives no embedding for an image outside the domain, even under flag, and says why."""
    case = NewCase("1.2.3", "1.2", "", "", "h")
    batch = [
        (Path("in.dcm"), case, np.zeros((8, 8), np.float32)),
        (Path("out.dcm"), case, np.zeros((8, 8), np.float32)),
    ]
    for gate in (DomainGate("refuse"), DomainGate("flag")):
        inside, outside = library_analyse(Fixed([analysis(3.0), analysis(12.0)]), batch, gate)
        assert inside.embedding is not None
        assert outside.embedding is None and "outside" in outside.reason and "bound 5.00" in outside.reason
