"""The synthetic chest model: :class:`Phantom`, :func:`make_phantom` and the pure-numpy drawing behind them.

A phantom is drawn in patient coordinates ``(u, v)``: ``u`` runs from the patient's right (image
left in a PA view) to the patient's left, ``v`` from head to feet, both about -1..1 across the field.
Separate random streams keep the parts apart: the anatomy (from ``anatomy_seed``), then the pose and
exposure, the lesion or distractor, and the noise (each from ``seed``), so that ``make_phantom(s, 0)``
and ``make_phantom(s, 1)`` show the same patient in the same image and differ only by the opacities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating[Any]]
_Strokes = tuple[NDArray[np.float64], float, float]  # polylines (k, m, 2), tube radius, value

PHANTOM_VERSION: Final = "1"
"""Bumped whenever a change alters the pixels or headers that a given seed produces."""

DISTRACTORS: Final = ("nodule", "catheter", "ecg_lead")
"""Findings a negative may carry that are not COVID-19 pneumonia."""

MIN_SIZE: Final = 64
MAX_SIZE: Final = 2048
_AIR_CONTRAST: Final = 0.7  # fraction of the soft-tissue attenuation that aerated lung removes
_STREAM_ANATOMY, _STREAM_POSE, _STREAM_LESION, _STREAM_NOISE = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic frontal (PA) chest radiograph and its ground truth.

    Attributes
    ----------
    image : numpy.ndarray
        ``float32``, shape ``(size, size)``, in [0, 1]; higher means more attenuation, i.e. brighter in
        a MONOCHROME2 presentation. Read-only.
    lung_mask : numpy.ndarray
        ``bool``, same shape as ``image``: both lungs, heart and hemidiaphragms excluded. Read-only.
    label : int
        1 for COVID-19 pneumonia (bilateral peripheral lower-zone ground-glass opacities), else 0.
    seed, anatomy_seed : int
        The seeds it was drawn from; ``anatomy_seed`` equals ``seed`` unless a patient was reused.
    distractor : str or None
        One of :data:`DISTRACTORS`, or None.
    extent : float
        Fraction of the lung area opacified; 0 for negatives.
    pixel_spacing_mm : float
        Detector pixel spacing (square pixels), from a 35-43 cm field.
    patient_sex : str
        ``"F"`` or ``"M"`` (female phantoms carry breast shadows).
    """

    image: Array
    lung_mask: NDArray[np.bool_]
    label: int
    seed: int
    anatomy_seed: int
    distractor: str | None
    extent: float
    pixel_spacing_mm: float
    patient_sex: str


@dataclass(frozen=True)
class _Lung:
    """Outline of one lung in its own side coordinate ``xi`` (distance from the midline, lateral > 0)."""

    apex: float  # v of the apex
    base: float  # v of the costophrenic angle
    centre: float  # xi of the apex
    lateral: float  # xi of the lateral border at the base
    medial: float  # xi of the mediastinal border at the top
    dome: float  # height of the hemidiaphragm dome above the costophrenic angle
    knob: float  # bulge of the aortic knob into the medial border
    hilum: tuple[float, float]  # (xi, v) where the vessels start


@dataclass(frozen=True)
class _Anatomy:
    """Everything that stays the same between two radiographs of one patient."""

    right: _Lung  # patient's right lung, image left (u < 0)
    left: _Lung
    heart: tuple[float, float, float, float, float]  # centre u, centre v, semi-axes a, b, tilt (rad)
    body: float  # half-width of the chest wall
    ribs: tuple[float, float, float, float, float]  # top, step, growth, rise, fall
    clavicle: float  # v of the clavicles' medial ends
    spine: float  # phase of the vertebral pattern
    breast: float  # breast shadow strength, 0 for male
    bubble: float  # gastric bubble radius, 0 when absent
    vessels: tuple[_Strokes, ...]  # polylines in (u, v), one entry per branching level


@dataclass(frozen=True)
class _Fields:
    """Per-pixel geometry of one rendering: patient coordinates and where each pixel lies in its lung."""

    u: Array
    v: Array
    margin: Array  # signed distance to the lung border, > 0 inside a lung
    t: Array  # apex (0) to costophrenic angle (1) of the nearer lung
    rel: Array  # medial (0) to lateral (1) border of the nearer lung
    right: NDArray[np.bool_]  # the nearer lung is the patient's right
    below: Array  # depth under the hemidiaphragm on this side (> 0 in the abdomen)
    heart: Array  # signed distance outside the heart (< 0 inside)
    mask: NDArray[np.bool_]  # both lungs: margin > 0, less tips thinner than three pixels


@dataclass(frozen=True)
class _Pose:
    """Positioning, exposure and detector of one acquisition."""

    angle: float  # in-plane rotation, radians
    scale: float  # patient size relative to the field
    shift: tuple[float, float]  # (x, y) of the patient centre in the field
    contrast: float  # exponent of the exposure curve
    noise: float  # standard deviation of quantum noise at mid grey
    field_mm: float  # side of the square detector field


# ---------------------------------------------------------------------------------------------- public


def make_phantom(
    seed: int,
    label: int,
    size: int = 512,
    *,
    extent: float | None = None,
    distractor: str | None = "random",
    anatomy_seed: int | None = None,
) -> Phantom:
    """Draw one synthetic PA chest radiograph with its lung mask, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Non-negative; fixes pose, exposure, noise and the lesion or distractor.
    label : int
        1 draws bilateral peripheral lower-zone ground-glass opacities, 0 none.
    size : int
        Rows and columns of the square image, 64 to 2048.
    extent : float, optional
        Positives only: target fraction of the lung area opacified, in (0, 0.8]; drawn from
        0.05-0.45 when None.
    distractor : str or None
        ``"random"`` (negatives: none, a nodule, a catheter or an ECG lead; positives: none), None,
        or one of :data:`DISTRACTORS` (for either label).
    anatomy_seed : int, optional
        Draws the patient from another seed, for several radiographs of one patient; default ``seed``.

    Returns
    -------
    Phantom
        Read-only image and mask; the same arguments give identical arrays.

    Raises
    ------
    ValueError
        If an argument is out of range, naming the argument, what was expected and what was found.
    """
    _check_args(seed, label, size, extent, distractor, anatomy_seed)
    anatomy = _draw_anatomy(np.random.default_rng([seed if anatomy_seed is None else anatomy_seed, _STREAM_ANATOMY]))
    pose = _draw_pose(np.random.default_rng([seed, _STREAM_POSE]))
    f = _lung_fields(*_grid(size, pose), anatomy, pose)
    air = np.sqrt(np.clip(f.margin / 0.05, 0, 1)) * (1 - 0.4 * _vessel_map(anatomy, pose, size))
    air *= 1 - 0.035 * _smooth_noise(np.random.default_rng([seed, _STREAM_NOISE, 1]), 256, size, 0.7)
    lesion_rng = np.random.default_rng([seed, _STREAM_LESION])
    opacity, found, kind = _lesion(lesion_rng, label, extent, distractor, f)
    air *= 1 - opacity
    att = _soft_tissue(f, anatomy) * (1 - _AIR_CONTRAST * air) + _bones(f.u, f.v, anatomy)
    att += _devices(lesion_rng, kind, pose, size)
    image = _expose(att, pose, np.random.default_rng([seed, _STREAM_NOISE]))
    return _freeze(image, f.mask, label, seed, anatomy_seed, kind, found, pose, anatomy)


# ------------------------------------------------------------------------------------------ validation


def _check_args(
    seed: int, label: int, size: int, extent: float | None, distractor: str | None, anatomy_seed: int | None
) -> None:
    """Raise ValueError for an out-of-range argument of :func:`make_phantom`."""
    _check_int("seed", seed, 0, None)
    _check_int("label", label, 0, 1)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)
    if anatomy_seed is not None:
        _check_int("anatomy_seed", anatomy_seed, 0, None)
    if distractor not in (None, "random", *DISTRACTORS):
        raise ValueError(f"distractor: expected None, 'random' or one of {DISTRACTORS}, found {distractor!r}")
    if extent is not None and (label != 1 or not isinstance(extent, float | int) or not 0 < extent <= 0.8):
        raise ValueError(f"extent: expected None, or a number in (0, 0.8] with label 1, found {extent!r}")


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) in ``[low, high]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < low
        or (high is not None and value > high)
    ):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {expected}, found {value!r}")


def _freeze(
    image: Array,
    mask: NDArray[np.bool_],
    label: int,
    seed: int,
    anatomy_seed: int | None,
    kind: str | None,
    extent: float,
    pose: _Pose,
    anatomy: _Anatomy,
) -> Phantom:
    """Build the read-only :class:`Phantom` from the rendered arrays and the draw."""
    image.setflags(write=False)
    mask.setflags(write=False)
    return Phantom(
        image=image,
        lung_mask=mask,
        label=int(label),
        seed=int(seed),
        anatomy_seed=int(seed if anatomy_seed is None else anatomy_seed),
        distractor=kind,
        extent=round(float(extent), 6),
        pixel_spacing_mm=round(pose.field_mm / image.shape[0], 6),
        patient_sex="F" if anatomy.breast > 0 else "M",
    )


# --------------------------------------------------------------------------------------------- drawing


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw a patient: lung outlines, heart, chest wall, bones and the vessel trees."""
    u = rng.uniform
    right = _draw_lung(rng, base=u(0.50, 0.62), knob=0.0)
    left = _draw_lung(rng, base=right.base + u(0.02, 0.08), knob=u(0.03, 0.06))
    heart_a = u(0.32, 0.40)
    heart = (u(0.10, 0.13), u(0.25, 0.31), heart_a, heart_a * u(0.62, 0.72), u(0.45, 0.65))
    ribs = (u(-0.86, -0.80), u(0.115, 0.13), u(0.012, 0.025), u(0.5, 0.65), u(0.85, 1.05))
    breast = u(0.10, 0.2) if rng.random() < 0.5 else 0.0
    bubble = u(0.04, 0.08) if rng.random() < 0.6 else 0.0
    vessels = _draw_vessels(rng, right, -1.0) + _draw_vessels(rng, left, 1.0)
    return _Anatomy(right, left, heart, u(0.86, 0.93), ribs, u(-0.68, -0.62), u(0, 1), breast, bubble, vessels)


def _draw_lung(rng: np.random.Generator, base: float, knob: float) -> _Lung:
    """Draw one lung outline with its costophrenic angle at ``v = base``."""
    u = rng.uniform
    apex = u(-0.80, -0.72)
    hilum = (u(0.20, 0.24), apex + (base - apex) * u(0.50, 0.56))
    return _Lung(apex, base, u(0.29, 0.35), u(0.76, 0.83), u(0.11, 0.14), u(0.15, 0.22), knob, hilum)


def _draw_vessels(rng: np.random.Generator, lung: _Lung, side: float) -> tuple[_Strokes, ...]:
    """Draw one lung's vessel tree: trunks fanning out from the hilum, each level forking in two."""
    angle = np.linspace(-1.95, 1.75, 9) + rng.normal(0, 0.15, 9)
    start = np.tile(lung.hilum, (9, 1))
    length, radius, levels = 0.2, 0.007, []
    for level in range(5):
        steps = max(round(length / 0.01), 2)
        turns = angle[:, None] + np.cumsum(rng.normal(0, 0.12, (angle.size, steps)), axis=1)
        walk = np.cumsum(np.stack([np.cos(turns), np.sin(turns)], axis=-1) * 0.01, axis=1)
        points = np.concatenate([start[:, None], start[:, None] + walk], axis=1)
        levels.append((points * [side, 1.0], radius, 1.0 - 0.16 * level))
        angle = (turns[:, -1:] + rng.uniform(0.25, 0.6, (angle.size, 2)) * [-1, 1]).ravel()
        start = np.repeat(points[:, -1], 2, axis=0)
        length, radius = length * 0.7, radius * 0.72
    return tuple(levels)


def _draw_pose(rng: np.random.Generator) -> _Pose:
    """Draw positioning, exposure and detector for one acquisition."""
    u = rng.uniform
    return _Pose(
        angle=math.radians(u(-4.0, 4.0)),
        scale=u(0.88, 1.0),
        shift=(u(-0.03, 0.03), u(-0.01, 0.06)),
        contrast=u(1.6, 2.1),
        noise=u(0.008, 0.02),
        field_mm=float(rng.choice([350.0, 380.0, 410.0, 430.0])),
    )


# ------------------------------------------------------------------------------------------- geometry


def _grid(size: int, pose: _Pose) -> tuple[Array, Array]:
    """Return the patient coordinates ``(u, v)`` of every pixel centre, each ``(size, size)`` float32."""
    x = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    xs = (x - pose.shift[0]) / pose.scale
    ys = (x - pose.shift[1]) / pose.scale
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    return cos * xs[None, :] + sin * ys[:, None], cos * ys[:, None] - sin * xs[None, :]


def _to_pixels(points: NDArray[np.float64], pose: _Pose, size: int) -> NDArray[np.float64]:
    """Map patient coordinates ``(..., 2)`` as ``(u, v)`` to pixel coordinates ``(..., 2)`` as ``(row, col)``."""
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    u, v = points[..., 0], points[..., 1]
    x = pose.scale * (cos * u - sin * v) + pose.shift[0]
    y = pose.scale * (sin * u + cos * v) + pose.shift[1]
    return np.stack([(y + 1) * size / 2 - 0.5, (x + 1) * size / 2 - 0.5], axis=-1)


def _arc(s: Array) -> Array:
    """Quarter circle from 0 at ``s <= 0`` to 1 at ``s >= 1``: the rounded apex of a lung."""
    s = np.clip(s, 0, 1)
    return np.sqrt(1 - (1 - s) ** 2)


def _diaphragm(xi: Array, lung: _Lung) -> Array:
    """Return the level ``v`` of the hemidiaphragm under a lung: a dome, lowest at the costophrenic angle."""
    z = np.clip((xi - lung.medial) / (lung.lateral - lung.medial), 0, 1)
    result: Array = lung.base - lung.dome * np.sqrt(1 - z) * (0.74 + 1.97 * z - 1.48 * z * z)
    return result


def _one_lung(u: Array, v: Array, lung: _Lung, side: float) -> tuple[Array, Array, Array]:
    """Return the signed margin (> 0 inside), apex-to-base and medial-to-lateral positions in one lung."""
    xi = side * u
    t = (v - lung.apex) / (lung.base - lung.apex)
    t1 = np.clip(t, 0, 1)
    lateral = lung.centre + (lung.lateral - lung.centre) * _arc(t / 0.55) + 0.02 * t1
    border = lung.medial + 0.05 * t1
    if lung.knob:
        border += lung.knob * np.exp(-(((v + 0.32) / 0.07) ** 2))
    medial = lung.centre - (lung.centre - border) * _arc(t / 0.2)
    margin = np.minimum(np.minimum(lateral - xi, xi - medial), _diaphragm(xi, lung) - v)
    rel = np.clip((xi - medial) / np.maximum(lateral - medial, 1e-3), 0, 1)
    return margin, t, rel


def _lung_box(lung: _Lung, side: float, pose: _Pose, size: int) -> tuple[slice, slice]:
    """Return the pixel rows and columns that can hold a lung (its bounding box, with a margin)."""
    corners = np.array([[side * x, y] for x in (0.0, lung.lateral + 0.1) for y in (lung.apex - 0.05, lung.base + 0.05)])
    pixels = _to_pixels(corners, pose, size)
    low = np.clip(np.floor(pixels.min(axis=0)).astype(int) - 2, 0, size)
    high = np.clip(np.ceil(pixels.max(axis=0)).astype(int) + 3, 0, size)
    return slice(low[0], high[0]), slice(low[1], high[1])


def _heart_margin(u: Array, v: Array, heart: tuple[float, float, float, float, float]) -> Array:
    """Return the approximate signed distance outside the heart silhouette (negative inside).

    The silhouette is a tilted ellipse whose lower half is extended straight down to the diaphragm, so
    that no pocket of lung is left between the heart and the diaphragm.
    """
    hu, hv, a, b, tilt = heart
    cos, sin = math.cos(tilt), math.sin(tilt)
    v = np.minimum(v, hv + 0.3 * b)
    p = (cos * (u - hu) + sin * (v - hv)) / a
    q = (cos * (v - hv) - sin * (u - hu)) / b
    return (np.sqrt(p * p + q * q) - 1) * b


def _lung_fields(u: Array, v: Array, anatomy: _Anatomy, pose: _Pose) -> _Fields:
    """Return the lungs' signed margin and, per pixel, its position inside the nearer lung.

    Each lung is evaluated inside its bounding box only; the margin elsewhere is -1.
    """
    margin, t, rel = np.full_like(u, -1.0), np.zeros_like(u), np.zeros_like(u)
    right = np.zeros(u.shape, bool)
    for lung, side in ((anatomy.right, -1.0), (anatomy.left, 1.0)):
        box = _lung_box(lung, side, pose, u.shape[0])
        m, t_box, rel_box = _one_lung(u[box], v[box], lung, side)
        nearer = m > margin[box]
        margin[box] = np.where(nearer, m, margin[box])
        t[box], rel[box] = np.where(nearer, t_box, t[box]), np.where(nearer, rel_box, rel[box])
        right[box] = nearer if side < 0 else right[box] & ~nearer
    heart = _heart_margin(u, v, anatomy.heart)
    below = v - np.where(u < 0, _diaphragm(-u, anatomy.right), _diaphragm(u, anatomy.left))
    margin = _smooth_min(margin, heart, 0.03)
    return _Fields(u, v, margin, t, rel, right, below, heart, _open(margin > 0))


def _open(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Return the morphological opening of ``mask`` by a 3 x 3 cross (erode, then dilate).

    The sharp costophrenic and cardiophrenic angles otherwise rasterise into stray diagonal pixels that
    are not 4-connected to their lung.
    """
    return _cross(_cross(mask, np.logical_and), np.logical_or)


def _cross(mask: NDArray[np.bool_], combine: np.ufunc) -> NDArray[np.bool_]:
    """Combine each pixel with its four neighbours (outside the image counts as False)."""
    out = mask.copy()
    for shifted, target in (
        (mask[1:], out[:-1]), (mask[:-1], out[1:]), (mask[:, 1:], out[:, :-1]), (mask[:, :-1], out[:, 1:]),
    ):  # fmt: skip
        combine(target, shifted, out=target)
    if combine is np.logical_and:
        out[0] = out[-1] = out[:, 0] = out[:, -1] = False
    return out


def _smooth_min(a: Array, b: Array, radius: float) -> Array:
    """Return ``min(a, b)`` with the corners where the two meet rounded off over ``radius``.

    Rounds the cardiophrenic angle, which would otherwise leave stray lung pixels at its tip.
    """
    h = np.maximum(radius - np.abs(a - b), 0) / radius
    return np.minimum(a, b) - h * h * (radius / 4)


# -------------------------------------------------------------------------------------------- tissues


def _soft_tissue(f: _Fields, anatomy: _Anatomy) -> Array:
    """Return the soft-tissue path length: body, mediastinum, heart, abdomen and breasts, less trachea and
    stomach air.
    """
    u, v = f.u, f.v
    half = anatomy.body + 0.04 * v + 0.1 * np.clip((-0.45 - v) / 0.5, 0, 1)
    body = np.clip(1 - (u / half) ** 2, 0, 1)
    inside = np.clip(body * 8, 0, 1)
    body = np.sqrt(np.sqrt(body))
    centre = np.clip((0.17 - np.abs(u)) / 0.06, 0, 1) * np.clip((v + 0.85) / 0.2, 0, 1)
    dense = np.maximum(np.maximum(np.clip(-f.heart / 0.06, 0, 1), centre), np.clip(f.below / 0.1, 0, 1))
    trachea = np.sqrt(np.clip(1 - (u / 0.032) ** 2, 0, 1)) * np.clip((-0.30 - v) / 0.05, 0, 1)
    body += inside * (0.14 * dense + 0.1 * np.clip(f.below / 0.3, 0, 1)) - 0.22 * trachea
    if anatomy.breast:  # denser towards a sharp, curved inferior border over the lower lungs
        xi, top = np.abs(u) - 0.52, anatomy.left.base - 0.4
        disc = np.clip(1 - (xi / 0.36) ** 2 - ((v - top) / 0.32) ** 2, 0, 1)
        body += anatomy.breast * np.sqrt(disc) * np.clip((v - top + 0.1) / 0.25, 0, 1)
    if anatomy.bubble:
        bv = anatomy.left.base - 0.02
        body -= 0.3 * np.sqrt(np.clip(1 - ((u - 0.42) ** 2 + (v - bv) ** 2) / anatomy.bubble**2, 0, 1))
    result: Array = body
    return result


def _tube(d: Array, hollow: float = 0.0) -> Array:
    """Chord length through a bone of unit radius at distance ``d`` from its axis, less a marrow cavity."""
    outer = np.sqrt(np.clip(1 - d * d, 0, 1))
    if not hollow:
        return outer
    result: Array = outer - hollow * np.sqrt(np.clip(1 - (d / 0.75) ** 2, 0, 1))
    return result


def _rib_index(level: Array, step: float, growth: float) -> Array:
    """Invert rib k's level ``step * (k + growth * k**2)`` into a continuous rib index."""
    return (np.sqrt(1 + 4 * growth * np.maximum(level, 0) / step) - 1) / (2 * growth)


def _ribs(u: Array, v: Array, anatomy: _Anatomy) -> Array:
    """Return posterior ribs (arches from the spine) and fainter anterior ribs (sloping down medially)."""
    top, step, growth, rise, fall = anatomy.ribs
    xi = np.abs(u)
    wall = anatomy.body - 0.06
    arch = -rise * xi + fall * xi * xi
    inside = np.clip((xi - 0.05) / 0.04, 0, 1) * np.clip((wall - xi) / 0.03, 0, 1)
    post = _rib_index(v - top - arch, step, growth)
    which = np.floor(post)
    band = _tube((post - which - 0.5) / 0.19, hollow=0.6) * (post < 11) * (0.8 + 0.2 * np.cos(2.7 * which))
    arch_wall = -rise * wall + fall * wall * wall
    ant = _rib_index(v - top - arch_wall - 0.12 - 0.55 * (wall - xi), step, growth)
    front = _tube((ant - np.floor(ant) - 0.5) / 0.28) * (ant < 8) * np.clip((xi - 0.3) / 0.15, 0, 1)
    return inside * (0.2 * band + 0.11 * front)


def _bones(u: Array, v: Array, anatomy: _Anatomy) -> Array:
    """Return the bone path length: ribs, clavicles and the thoracic spine."""
    xi = np.abs(u)
    clav_v = anatomy.clavicle - 0.26 * xi + 0.1 * xi * xi + 0.025 * np.sin(xi * 8.7)
    clav = _tube((v - clav_v) / (0.028 + 0.015 * np.exp(-xi / 0.08)), hollow=0.4)
    clav *= np.clip((xi - 0.03) / 0.03, 0, 1) * np.clip((0.72 - xi) / 0.04, 0, 1)
    width = 0.055 + 0.02 * np.clip((v + 1) / 2, 0, 1)
    phase = (v - anatomy.spine) / 0.085
    gap = np.exp(-(((phase - np.floor(phase) - 0.5) / 0.07) ** 2))
    spine = _tube(u / width) * (0.8 - 0.3 * gap) * np.clip((v + 0.95) / 0.1, 0, 1)
    result: Array = _ribs(u, v, anatomy) + 0.3 * clav + 0.2 * spine
    return result


# ------------------------------------------------------------------------------------ strokes and noise


def _densify(points: NDArray[np.float64], spacing: float) -> NDArray[np.float64]:
    """Subdivide ``(k, m, 2)`` polylines evenly so that no step exceeds ``spacing``; return ``(n, 2)``."""
    longest = float(np.hypot(*np.diff(points, axis=1).reshape(-1, 2).T).max(initial=0.0))
    w = np.linspace(0.0, 1.0, max(math.ceil(longest / spacing), 1), endpoint=False)[:, None]
    inner = points[:, :-1, None] * (1 - w) + points[:, 1:, None] * w
    return np.concatenate([inner.reshape(-1, 2), points[:, -1]])


@lru_cache(maxsize=64)
def _footprint(radius: float) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """Return the pixel offsets of a disc of ``radius`` pixels and the chord through a cylinder at each."""
    reach = math.ceil(radius)
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    d = np.hypot(dy, dx) / (radius + 0.5)
    keep = d < 1
    return dy[keep], dx[keep], np.sqrt(1 - d[keep] ** 2)


def _stamp(size: int, strokes: list[_Strokes]) -> Array:
    """Draw tubes along pixel-space polylines ``((k, m, 2) as (row, col), radius px, value)``.

    Overlapping tubes keep the larger value; tubes thinner than a pixel are drawn one pixel wide and
    proportionally fainter. The result is softened by a 3-tap binomial blur.
    """
    rows, cols, vals = [], [], []
    for points, radius, value in strokes:
        dense = np.rint(_densify(points, 0.5)).astype(np.intp)
        dy, dx, chord = _footprint(round(max(radius, 0.5), 1))
        rows.append((dense[:, :1] + dy).ravel())
        cols.append((dense[:, 1:] + dx).ravel())
        vals.append(np.broadcast_to(value * min(1.0, 2 * radius) * chord, (len(dense), len(chord))).ravel())
    canvas = np.zeros((size, size), np.float32)
    if rows:
        r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        np.maximum.at(canvas, (r[ok], c[ok]), w[ok].astype(np.float32))
    return _soften(canvas)


def _soften(a: Array) -> Array:
    """Blur with the separable binomial kernel (1, 2, 1) / 4; outside the array counts as 0."""
    out = a * 0.5
    out[1:] += a[:-1] * 0.25
    out[:-1] += a[1:] * 0.25
    a = out * 0.5
    a[:, 1:] += out[:, :-1] * 0.25
    a[:, :-1] += out[:, 1:] * 0.25
    return a


def _upsample(a: NDArray[np.float64], size: int) -> Array:
    """Bilinearly resample a square array to ``(size, size)`` float32 (cell centres aligned)."""
    n = a.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi, frac = np.minimum(lo + 1, n - 1), (pos - lo).astype(np.float32)
    a = a.astype(np.float32)
    rows = a[lo] * (1 - frac[:, None]) + a[hi] * frac[:, None]
    result: Array = rows[:, lo] * (1 - frac) + rows[:, hi] * frac
    return result


def _smooth_noise(rng: np.random.Generator, cells: int, size: int, sigma: float) -> Array:
    """Return Gaussian-filtered white noise drawn on a ``cells``-square grid, unit variance, at ``size``."""
    white = rng.standard_normal((cells, cells))
    freq = np.fft.fftfreq(cells)
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    smooth = np.fft.ifft2(np.fft.fft2(white) * gain).real
    return _upsample((smooth - smooth.mean()) / (smooth.std() + 1e-12), size)


def _bezier(control: NDArray[np.float64], n: int = 64) -> NDArray[np.float64]:
    """Return ``n`` points of the cubic Bezier curve with ``(4, 2)`` control points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = control
    result: NDArray[np.float64] = (
        (1 - t) ** 3 * c[0] + 3 * (1 - t) ** 2 * t * c[1] + 3 * (1 - t) * t**2 * c[2] + t**3 * c[3]
    )
    return result


# --------------------------------------------------------------------------------- vessels and lesions


def _vessel_map(anatomy: _Anatomy, pose: _Pose, size: int) -> Array:
    """Return the density of the pulmonary vessels and hila, 0..1, drawn in the image."""
    (r_xi, r_v), (l_xi, l_v) = anatomy.right.hilum, anatomy.left.hilum
    hila = np.array([[[-r_xi, r_v]] * 2, [[l_xi, l_v]] * 2])  # two one-point polylines: the hilar shadows
    strokes = [*anatomy.vessels, (hila, 0.045, 0.7)]
    return _soften(_soften(_stamp(size, [_stroke_pixels(s, pose, size) for s in strokes])))


def _pick_distractor(rng: np.random.Generator, label: int, distractor: str | None) -> str | None:
    """Resolve ``"random"``: negatives get none (40 %) or one distractor (20 % each), positives none."""
    if distractor != "random":
        return distractor
    choice = rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])
    return None if label == 1 or choice == 0 else DISTRACTORS[choice - 1]


def _lesion(
    rng: np.random.Generator,
    label: int,
    extent: float | None,
    distractor: str | None,
    f: _Fields,
) -> tuple[Array, float, str | None]:
    """Return the lung opacity (0..1, fraction of air displaced), the opacified fraction and the distractor."""
    kind = _pick_distractor(rng, label, distractor)
    opacity, found = np.zeros_like(f.margin), 0.0
    if label == 1:
        opacity, found = _ground_glass(rng, extent, f)
    if kind == "nodule":
        opacity = np.maximum(opacity, _nodule(rng, f))
    return opacity, found, kind


def _ground_glass(
    rng: np.random.Generator,
    extent: float | None,
    f: _Fields,
) -> tuple[Array, float]:
    """Return bilateral, peripheral, lower-zone patchy ground-glass opacity and its extent."""
    mask, t, rel, right, size = f.mask, f.t, f.rel, f.right, f.margin.shape[0]
    target = rng.uniform(0.05, 0.45) if extent is None else float(extent)
    prior = (0.1 + 1 / (1 + np.exp((0.55 - t) / 0.08))) * (0.1 + 1 / (1 + np.exp((0.62 - rel) / 0.08)))
    field = prior * np.exp(0.8 * _smooth_noise(rng, 48, size, 2.6))
    level = np.zeros_like(field)
    for side in (mask & right, mask & ~right):
        cut = np.quantile(field[side], 1 - min(target * rng.uniform(0.75, 1.25), 0.95))
        level[side] = 0.5 + (field[side] - cut) / (0.8 * cut)
    level = np.clip(level, 0, 1)
    found = float((level > 0.5).sum() / max(mask.sum(), 1))
    texture = 0.75 + 0.25 * np.tanh(_smooth_noise(rng, 160, size, 1.2))
    return level * texture * rng.uniform(0.4, 0.65), found


def _nodule(rng: np.random.Generator, f: _Fields) -> Array:
    """Return a solid round nodule (5-15 mm) centred at a random point well inside a lung."""
    radius = rng.uniform(0.012, 0.035)
    candidates = np.flatnonzero(f.margin > radius + 0.04)
    if candidates.size == 0:
        return np.zeros_like(f.margin)
    at = candidates[rng.integers(candidates.size)]
    return 0.75 * np.sqrt(_tube(np.sqrt((f.u - f.u.flat[at]) ** 2 + (f.v - f.v.flat[at]) ** 2) / radius))


def _devices(rng: np.random.Generator, kind: str | None, pose: _Pose, size: int) -> Array | float:
    """Return the attenuation of a central venous catheter or of ECG leads, or 0."""
    if kind == "catheter":
        strokes = _catheter(rng)
    elif kind == "ecg_lead":
        strokes = _ecg_leads(rng)
    else:
        return 0.0
    return _stamp(size, [_stroke_pixels(s, pose, size) for s in strokes])


def _stroke_pixels(strokes: _Strokes, pose: _Pose, size: int) -> _Strokes:
    """Map strokes drawn in patient coordinates to pixel coordinates and a radius in pixels."""
    points, radius, value = strokes
    return _to_pixels(points, pose, size), radius * size / 2 * pose.scale, value


def _catheter(rng: np.random.Generator) -> list[_Strokes]:
    """Draw a right-sided central venous catheter (subclavian or jugular) with its tip near the SVC."""
    tip = [rng.uniform(-0.09, -0.05), rng.uniform(-0.2, -0.05)]
    if rng.random() < 0.5:
        control = [[-1.05, rng.uniform(-1.0, -0.8)], [-0.55, -0.72], [-0.14, -0.68], tip]
    else:
        control = [[-0.22, -1.05], [-0.15, -0.8], [-0.07, -0.55], tip]
    jitter = rng.normal(0, 0.02, (4, 2)) * [[0], [1], [1], [0]]
    return [(_bezier(np.asarray(control) + jitter, 80)[None], 0.0055, 0.35)]


def _ecg_leads(rng: np.random.Generator) -> list[_Strokes]:
    """Draw one to three ECG electrodes on the chest with their lead wires running off the image."""
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        pad = np.array([rng.choice([-1, 1]) * rng.uniform(0.25, 0.8), rng.uniform(-0.8, 0.3)])
        end = np.array([np.sign(pad[0]) * 1.2, rng.uniform(-1.2, 0.6)])
        bends = pad + (end - pad) * [[0.3], [0.7]] + rng.normal(0, 0.15, (2, 2))
        strokes.append((_bezier(np.vstack([pad, bends, end]), 80)[None], 0.0025, 0.5))
        strokes.append((np.stack([pad, pad])[None], 0.012, 0.9))
    return strokes


# ------------------------------------------------------------------------------------------- exposure


def _expose(att: Array, pose: _Pose, rng: np.random.Generator) -> Array:
    """Map attenuation to a presentation image in [0, 1] with shading, heel effect and quantum noise."""
    size = att.shape[0]
    image = (1 - np.exp(-pose.contrast * att)) / (1 - math.exp(-pose.contrast * 1.6))
    image *= np.sqrt(np.maximum(image, 0))  # a gamma of 1.5: brighter bone and mediastinum
    heel = np.linspace(-0.03, 0.03, size, dtype=np.float32)[:, None]
    image *= 1 + 0.04 * _smooth_noise(rng, 6, size, 1.0) + heel
    image += rng.standard_normal((size, size), dtype=np.float32) * (pose.noise * (0.4 + 0.6 * image))
    result: Array = np.clip(image, 0, 1).astype(np.float32)
    return result
