"""The out-of-domain gate as the worker applies it: refuse, flag or ignore an image outside the model's domain.

The engine scores each classified image against the model's domain description
(:mod:`cxr_node.infer.domain`); this module turns ``domain.gate`` into what happens to its result. ``refuse``
makes it a "not analysed" result whose reason names the score and the bound (no probability, no heatmap, no
neighbours, never indexed); ``flag`` keeps the analysis and the outputs say it is outside the validated domain
(its neighbours are shown, but it is never indexed); ``off`` drops the score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from cxr_node.infer.domain import DomainDescription, DomainScore
from cxr_node.infer.engine import Analysis

GateMode = Literal["refuse", "flag", "off"]


def refusal_reason(score: DomainScore) -> str:
    """The "not analysed" reason of a refused image."""
    return f"outside the model's validated domain (score {score.score:.2f}, bound {score.bound:.2f})"


@dataclass(frozen=True)
class DomainGate:
    """What the worker does with an image's out-of-domain score.

    Parameters
    ----------
    mode : {"refuse", "flag", "off"}
        ``domain.gate``.
    bound : float or None
        The bound to judge against (``domain.pass_rate`` applied to the model's description); None: the engine's.
    """

    mode: GateMode = "refuse"
    bound: float | None = None

    @classmethod
    def for_model(cls, mode: GateMode, description: DomainDescription | None, pass_rate: float | None) -> DomainGate:
        """The gate of ``mode`` for a model with ``description`` (off without one), at ``pass_rate`` if given."""
        if description is None:
            return cls("off")
        return cls(mode, description.bound_at(pass_rate) if pass_rate is not None else None)

    def apply(self, analysis: Analysis) -> Analysis:
        """Return ``analysis`` as the gate leaves it: refused, kept (scored) or without its score."""
        if analysis.domain is None:
            return analysis
        if self.mode == "off":
            return replace(analysis, domain=None)
        score = analysis.domain if self.bound is None else DomainScore(analysis.domain.score, self.bound)
        if self.mode == "flag" or score.inside:
            return replace(analysis, domain=score)
        return replace(
            analysis,
            analysed=False,
            reason=refusal_reason(score),
            probability=None,
            member_probs={},
            positive=None,
            embedding=None,
            heatmap=None,
            domain=score,
        )

    @staticmethod
    def indexable(analysis: Analysis) -> bool:
        """Whether the neighbour index may learn ``analysis``: analysed, and not outside the domain."""
        return analysis.analysed and (analysis.domain is None or analysis.domain.inside)
