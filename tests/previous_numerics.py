"""The numerics as they were before the CPU cut of preprocess, statistics and the array codec (test code only).

Kept verbatim (bar names) so the tests can check, bit for bit, that the faster code gives the same values:
normalise's percentiles, mask_outside, the engine's region (mask the whole image, then crop), the image
statistics, the npz blob of a result's arrays (deflated at zlib's default level) with the unpacking that
read it, and the heatmap the engine made on the image's full grid (before it made it on the stored grid at once).
"""

from __future__ import annotations

import io

import numpy as np

from cxr_node.imaging.resample import REAL, check_array, check_finite, resize
from cxr_node.infer import preprocess
from cxr_node.jobs.codec import HEATMAP_STORED_SIDE

STAT_GRID = 128
MIN_PIXELS = 16


def normalise(img: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """The earlier normalise: numpy's percentiles of the same subsample."""
    check_array("img", img, REAL, "a real (integer or float) array")
    check_finite("img", img)
    lo, hi = np.percentile(preprocess._subsample(img), [low, high])
    if not hi > lo:
        return np.zeros(img.shape, dtype=np.float32)
    out = np.asarray(img, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def mask_outside(img: np.ndarray, mask: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """The earlier mask_outside: a copy, then the pixels outside set by boolean index."""
    out = img.copy()
    out[~mask] = fill
    return out


def region(
    image: np.ndarray, mask: np.ndarray, how: str, size: int
) -> tuple[np.ndarray, preprocess.Box, preprocess.Fit]:
    """The engine's earlier classifier region: mask the whole image, crop, copy contiguous, fit."""
    if "mask" in how:
        image = mask_outside(image, mask)
    if "crop" in how:
        crop, box = preprocess.crop_to_mask(image, mask, 0.05)
    else:
        crop, box = image, preprocess.Box(0, image.shape[0], 0, image.shape[1], source_shape=image.shape)
    canvas, placement = preprocess.fit(np.ascontiguousarray(crop, dtype=np.float32), size)
    return canvas, box, placement


def image_statistics(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The earlier domain.image_statistics."""
    small = resize(np.asarray(image, dtype=np.float32), (STAT_GRID, STAT_GRID)).astype(np.float64)
    inside = resize(mask.astype(np.float32), (STAT_GRID, STAT_GRID)) > 0.5
    outside = ~inside
    rough = np.abs(_box(small, 1) - _box(small, 4))
    lung = small[inside] if inside.sum() >= MIN_PIXELS else small.ravel()
    rest = small[outside] if outside.sum() >= MIN_PIXELS else small.ravel()
    p05, p95 = np.percentile(lung, [5, 95])
    return np.array(
        [
            inside.mean(),
            lung.mean(),
            lung.std(),
            p05,
            p95,
            rest.mean(),
            rest.std(),
            _masked_mean(rough, inside),
            _masked_mean(rough, outside),
        ],
        dtype=np.float64,
    )


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    side = 2 * radius + 1
    padded = np.pad(np.pad(image, radius, mode="edge"), ((1, 0), (1, 0)))
    table = padded.cumsum(axis=0).cumsum(axis=1)
    rows, cols = image.shape
    total = table[side:, side:] - table[:rows, side:] - table[side:, :cols] + table[:rows, :cols]
    return np.asarray(total, dtype=np.float64) / side**2


def full_heatmap(canvas: np.ndarray, placement: preprocess.Fit, box: preprocess.Box) -> np.ndarray:
    """The engine's earlier heatmap: the Grad-CAM canvas mapped back onto the crop, clipped, placed on the image."""
    crop = preprocess.unfit(canvas, placement)
    return box.paste(np.clip(crop, 0.0, 1.0, out=crop))


def _masked_mean(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.sum() >= MIN_PIXELS else float(values.mean())


def pack_arrays(lung_mask: np.ndarray, heatmap: np.ndarray | None) -> bytes:
    """The earlier codec.pack_arrays: ``np.savez_compressed`` (zlib's default level)."""
    shape, packed = np.asarray(lung_mask.shape), np.packbits(lung_mask)
    buffer = io.BytesIO()
    if heatmap is None:
        np.savez_compressed(buffer, mask_shape=shape, mask=packed)
        return buffer.getvalue()
    scale = min(1.0, HEATMAP_STORED_SIDE / max(lung_mask.shape))
    side = (max(1, round(lung_mask.shape[0] * scale)), max(1, round(lung_mask.shape[1] * scale)))
    small = resize(heatmap.astype(np.float32), side)
    levels = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)
    np.savez_compressed(buffer, mask_shape=shape, mask=packed, heatmap=levels)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """The earlier codec.unpack_arrays."""
    with np.load(io.BytesIO(data)) as arrays:
        shape = (int(arrays["mask_shape"][0]), int(arrays["mask_shape"][1]))
        mask = np.unpackbits(arrays["mask"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        heatmap = None
        if "heatmap" in arrays:
            heatmap = resize(arrays["heatmap"].astype(np.float32) / 255.0, shape).astype(np.float32)
    return mask, heatmap


def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two arrays (or two Nones) have the same dtype, shape and bytes."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
