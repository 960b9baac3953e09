"""What web viewers need of the report's structure (OHIF 3.13, docs/outputs.md "What viewers show").

OHIF reads only the measurement groups under Imaging Measurements, draws a group only if it has an image
region, and OHIF 3.13.2 draws nothing at all when one group there has none. So the report keeps exactly one
group there with a region (or the not-analysed group, alone), and the similar past cases in their own
container at the report's root.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from cxr_node.dicom import codes
from cxr_node.results.common import OutputOptions
from cxr_node.results.findings import SimilarCase
from cxr_node.results.outputs import build_dataset
from tests.dicom.test_results import CASES
from tests.dicom.test_sr_equivalence import findings_on, phantom_source


def _container(sr: Dataset, code: str) -> Dataset | None:
    return next((i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code), None)


def _groups(container: Dataset) -> list[Dataset]:
    return [i for i in container.get("ContentSequence", []) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("analysed", [True, False])
@pytest.mark.parametrize("similar", [(), CASES])
def test_imaging_measurements_hold_only_groups_a_viewer_can_draw(
    analysed: bool, similar: tuple[SimilarCase, ...]
) -> None:
    source, image, mask = phantom_source()
    sr = build_dataset(source, findings_on(image, mask, analysed=analysed, similar=similar), OutputOptions(), "sr")
    measurements = _container(sr, "126010")
    assert measurements is not None
    groups = _groups(measurements)
    assert len(groups) == 1
    if analysed:
        assert [c.ValueType for c in groups[0].ContentSequence].count("SCOORD") == 1
    cases = _container(sr, codes.SIMILAR_CASES.value)
    if similar:
        assert cases is not None
        assert len(_groups(cases)) == len(similar)
        assert all("SCOORD" not in [c.ValueType for c in g.ContentSequence] for g in _groups(cases))
    else:
        assert cases is None
