"""The one codec of a result: :class:`~cxr_node.results.findings.Summary` as JSON, the writers' arrays as npz.

The JSON keeps the names of every earlier version (a job left ``inferred`` by an older node still decodes);
timings are a list of ``[step, ms]`` pairs, in the engine's order.
The lung mask is bit-packed; the heatmap is kept as uint8 on the grid the engine gives it (the mask's grid reduced
to at most :data:`HEATMAP_STORED_SIDE` a side; Grad-CAM is coarse) and decoded on that grid: the Secondary
Capture resamples it to the image only where it shows. Every backend stores what this
module produces, so results read the same whatever the database.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict
from typing import Any, Final

import numpy as np

from cxr_node.imaging.resample import HEATMAP_SIDE, resize, scaled_shape
from cxr_node.jobs.records import StoredResult
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary

HEATMAP_STORED_SIDE: Final = HEATMAP_SIDE
"""The heatmap is kept at most this many pixels a side until the outputs are written (the engine's own grid:
a heatmap given on a larger one is reduced to it)."""
NPZ_LEVEL: Final = 1
"""zlib level of the stored arrays: 1.2 ms instead of 3.6 ms at the default 6 for a 978 x 921 result, 22 kB instead
of 16 kB (the bit-packed mask and the 256-side heatmap are already small)."""
ANALYSED: Final = "analysed"
NOT_ANALYSED: Final = "not_analysed"


def encode_summary(summary: Summary) -> str:
    """Return the JSON text of ``summary`` (keys sorted, no NaN)."""
    mask = summary.lung_mask
    document = {
        "status": ANALYSED if summary.analysed else NOT_ANALYSED,
        "reason": summary.reason,
        "model": {"name": summary.model_name, "version": summary.model_version},
        "probability": summary.probability,
        "positive": summary.positive,
        "threshold": summary.threshold,
        "members": dict(summary.members),
        "lung_mask": None if mask is None else _mask_json(mask),
        "image": {
            "original_shape": list(summary.source_shape),
            "analysed_shape": None if summary.analysed_shape is None else list(summary.analysed_shape),
            "pixel_spacing_mm": None if summary.pixel_spacing_mm is None else list(summary.pixel_spacing_mm),
            "photometric": summary.photometric,
        },
        "similar": [asdict(case) for case in summary.similar],
        "timings_ms": [[step, round(ms, 2)] for step, ms in summary.timings_ms],
        "domain": _domain_json(summary),
    }
    return json.dumps(document, sort_keys=True, allow_nan=False)


def _domain_json(summary: Summary) -> dict[str, float] | None:
    """The out-of-domain score and bound (None when the image was not scored)."""
    if summary.domain_score is None or summary.domain_bound is None:
        return None
    return {"score": summary.domain_score, "bound": summary.domain_bound}


def _mask_json(mask: MaskVerdict) -> dict[str, Any]:
    return {
        "plausible": mask.plausible,
        "verdict": mask.verdict,
        "area_fraction": round(mask.area_fraction, 4),
        "components": mask.components,
    }


def decode_summary(text: str) -> Summary:
    """Return the :class:`Summary` of a stored JSON text.

    Raises
    ------
    ValueError
        When the text is not a summary (not JSON, a key missing, a value out of range).
    """
    try:
        document = json.loads(text)
        image, mask, domain = document["image"], document.get("lung_mask"), document.get("domain") or {}
        return Summary(
            model_name=document["model"]["name"],
            model_version=document["model"]["version"],
            analysed=document["status"] == ANALYSED,
            source_shape=_pair(image["original_shape"], int),
            reason=document.get("reason") or "",
            probability=document.get("probability"),
            threshold=document.get("threshold"),
            members=tuple(sorted((str(k), float(v)) for k, v in (document.get("members") or {}).items())),
            lung_mask=None if not mask else MaskVerdict(**mask),
            analysed_shape=_pair(image.get("analysed_shape"), int),
            pixel_spacing_mm=_pair(image.get("pixel_spacing_mm"), float),
            photometric=image.get("photometric") or "",
            similar=tuple(SimilarCase(**case) for case in document.get("similar") or ()),
            timings_ms=_timings(document.get("timings_ms")),
            domain_score=domain.get("score"),
            domain_bound=domain.get("bound"),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"stored result cannot be read: {type(exc).__name__}: {exc}") from exc


def _timings(stored: Any) -> tuple[tuple[str, float], ...]:
    """Steps and milliseconds in the engine's order (a list of pairs; earlier nodes wrote a dict sorted by step)."""
    pairs = stored.items() if isinstance(stored, dict) else stored or ()
    return tuple((str(step), float(ms)) for step, ms in pairs)


def _pair(values: Any, kind: type) -> Any:
    return None if values is None else (kind(values[0]), kind(values[1]))


def pack_arrays(lung_mask: np.ndarray, heatmap: np.ndarray | None) -> bytes:
    """The lung mask (bit-packed) and the heatmap (uint8, reduced) as npz bytes, deflated at :data:`NPZ_LEVEL`."""
    arrays = {"mask_shape": np.asarray(lung_mask.shape), "mask": np.packbits(lung_mask)}
    if heatmap is not None:
        grid = scaled_shape(lung_mask.shape, HEATMAP_STORED_SIDE)
        small = resize(heatmap.astype(np.float32, copy=False), grid)  # the engine's heatmaps are on it already
        arrays["heatmap"] = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)
    return _npz(arrays)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed``'s archive (one ``name.npy`` entry each, zip64 headers) at :data:`NPZ_LEVEL`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=NPZ_LEVEL) as archive:
        for name, values in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, values, allow_pickle=False)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`pack_arrays`: (bool mask, float32 heatmap on the stored grid or None).

    Reads every earlier archive alike (deflated at zlib's default level by ``np.savez_compressed``, or at
    :data:`NPZ_LEVEL`): the arrays are the same whatever the level.
    """
    with np.load(io.BytesIO(data)) as arrays:
        shape = (int(arrays["mask_shape"][0]), int(arrays["mask_shape"][1]))
        bits = np.unpackbits(arrays["mask"], count=shape[0] * shape[1]).reshape(shape)
        mask = bits.view(np.bool_)  # unpackbits gives 0 and 1: the bytes of False and True
        heatmap = None
        if "heatmap" in arrays:
            heatmap = arrays["heatmap"].astype(np.float32) / 255.0
    return mask, heatmap


def stored_arrays(findings: Findings) -> bytes | None:
    """What :func:`pack_arrays` keeps of ``findings`` for the writers (None when not analysed)."""
    if not findings.summary.analysed or findings.lung_mask is None:
        return None
    return pack_arrays(findings.lung_mask, findings.heatmap)


def findings(stored: StoredResult, image: np.ndarray | None, provenance: Provenance) -> Findings:
    """Rebuild the writers' :class:`Findings` from a stored result and the re-decoded image.

    Raises
    ------
    ValueError
        When the arrays are gone or do not match the image, or the result was made by another model.
    """
    summary = stored.summary
    if not summary.analysed:
        return Findings(provenance, summary, image=image)
    if stored.arrays is None:
        raise ValueError("the stored result has no lung mask (already written, or stored without arrays)")
    mask, heatmap = unpack_arrays(stored.arrays)
    if image is None or mask.shape != image.shape:
        raise ValueError("the stored lung mask does not match the decoded image")
    return Findings(provenance, summary, image=image, lung_mask=mask, heatmap=heatmap)
