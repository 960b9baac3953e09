"""The out-of-domain gate's arithmetic: how far an image lies from the images a model was trained and validated on.

A model's *domain description* is fitted once, at training or evaluation time, on the features the engine
already computes for its training and validation images: the retrieval embedding (reduced by PCA to a few
components, plus the log of what the PCA leaves out) and a few robust statistics of the normalised image inside
and outside the lung mask (:func:`image_statistics`). The score of an image is its Mahalanobis distance to the
training images in that feature space, with the covariance shrunk towards the identity (standardised features),
so a direction the training set never varied in still counts. The bound is the ``pass_rate`` quantile of the
scores of the *validation* images (:attr:`DomainDescription.validation_scores`): by construction that share of
in-domain validation images passes. The description is one ``.npz`` file (no pickles) beside the weights,
named with its SHA-256 in the manifest (``domain:``); numpy only, no torch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.errors import ModelError
from cxr_node.imaging.resample import resize

FORMAT_VERSION: Final = 1
"""Version of the description file; a file of another version is refused."""

STAT_GRID: Final = 128
"""Image statistics are measured on the image and mask resampled to this square grid (any source size alike)."""
STATISTICS_GRID: Final = (STAT_GRID, STAT_GRID)

STATISTICS: Final = (
    "lung_area",
    "lung_mean",
    "lung_std",
    "lung_p05",
    "lung_p95",
    "outside_mean",
    "outside_std",
    "lung_texture",
    "outside_texture",
)
"""The image statistics, in the order :func:`image_statistics` returns them."""

DEFAULT_PASS_RATE: Final = 0.95
DEFAULT_COMPONENTS: Final = 16
DEFAULT_SHRINKAGE: Final = 0.1
_STD_FLOOR: Final = 1e-3
_MIN_PIXELS: Final = 16
_F64 = NDArray[np.float64]


@dataclass(frozen=True)
class DomainScore:
    """One image's distance to the model's domain and the bound it is judged against.

    Attributes
    ----------
    score : float
        Mahalanobis distance (>= 0) of the image's features to the training images.
    bound : float
        The largest score still in the domain (the validation quantile at the description's pass rate).
    """

    score: float
    bound: float

    @property
    def inside(self) -> bool:
        """Whether the image lies inside the validated domain (``score <= bound``)."""
        return self.score <= self.bound


def image_statistics(image: np.ndarray, mask: np.ndarray, reduced: np.ndarray | None = None) -> _F64:
    """Return the robust statistics :data:`STATISTICS` of a normalised image inside and outside its lung mask.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) float32 in [0, 1]: the engine's normalised image.
    mask : numpy.ndarray
        (H, W) bool: its lung mask.
    reduced : numpy.ndarray or None
        ``resize(image, STATISTICS_GRID)`` when the caller has made it already (the engine makes it with the
        segmentation's input, sharing their costly first pass: :func:`~cxr_node.imaging.resample.resize_each`).

    Returns
    -------
    numpy.ndarray
        (len(STATISTICS),) float64: area fraction, mean, std, 5th and 95th percentiles inside the mask, mean and
        std outside it, and the texture inside and outside it: the mean absolute difference of a 3x3 and a 9x9 box
        mean on the grid (a band-pass at 2-7% of the image side: structure and heavy noise, but not the pixel noise
        that depends on the source's resolution).
    """
    if image.ndim != 2 or mask.shape != image.shape:
        raise ValueError(f"image and mask must be (H, W) of one shape; found {image.shape} and {mask.shape}")
    if reduced is None:
        reduced = resize(np.asarray(image, dtype=np.float32), STATISTICS_GRID)
    elif reduced.shape != STATISTICS_GRID or reduced.dtype != np.float32:
        raise ValueError(f"reduced must be float32 {STATISTICS_GRID}; found {reduced.dtype} {reduced.shape}")
    small = reduced.astype(np.float64)
    inside = resize(mask.astype(np.float32), STATISTICS_GRID) > 0.5
    outside = ~inside
    rough = _box(small, 1)
    rough -= _box(small, 4)
    np.abs(rough, out=rough)
    lung, lung_rough = _masked(small, rough, inside)
    rest, rest_rough = _masked(small, rough, outside)
    p05, p95 = np.percentile(lung, [5, 95])
    return np.array(
        [inside.mean(), lung.mean(), lung.std(), p05, p95, rest.mean(), rest.std(), lung_rough, rest_rough],
        dtype=np.float64,
    )


def _masked(small: _F64, rough: _F64, where: NDArray[np.bool_]) -> tuple[_F64, float]:
    """The grid values where ``where`` holds and the mean texture there (everything when under _MIN_PIXELS)."""
    if np.count_nonzero(where) >= _MIN_PIXELS:
        return small[where], float(rough[where].mean())
    return small.ravel(), float(rough.mean())


def _box(image: _F64, radius: int) -> _F64:
    """The (2 radius + 1)-square box mean of ``image`` (edges repeated), by summed-area table.

    The table is built in place: a zero first row and column, then ``image`` with ``radius`` edge copies on
    each side (what ``np.pad(np.pad(image, radius, mode="edge"), ((1, 0), (1, 0)))`` makes), summed along rows,
    then columns.
    """
    side = 2 * radius + 1
    rows, cols = image.shape
    table = np.zeros((rows + side, cols + side), dtype=np.float64)
    padded = table[1:, 1:]
    middle = slice(radius, radius + cols)
    padded[radius : radius + rows, middle] = image
    padded[:radius, middle] = image[0]
    padded[radius + rows :, middle] = image[-1]
    padded[:, :radius] = padded[:, radius : radius + 1]
    padded[:, radius + cols :] = padded[:, radius + cols - 1 : radius + cols]
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    total = table[side:, side:] - table[:rows, side:]
    total -= table[side:, :cols]
    total += table[:rows, :cols]
    total /= side**2
    return total


@dataclass(frozen=True)
class DomainDescription:
    """Where a model's training and validation images lie, and how far from them an image may be.

    Build one with :func:`fit_description`; :meth:`save` and :func:`load_description` keep it in an ``.npz``.

    Attributes
    ----------
    pca_mean : numpy.ndarray
        (D,) mean training embedding.
    pca_components : numpy.ndarray
        (k, D) principal axes of the training embeddings (rows orthonormal).
    center, scale : numpy.ndarray
        (F,) per-feature standardisation (training mean and std), F = k + 1 + len(STATISTICS).
    precision : numpy.ndarray
        (F, F) inverse of the shrunk covariance of the standardised training features.
    validation_scores : numpy.ndarray
        (V,) sorted scores of the validation images: the bound at any pass rate is their quantile.
    pass_rate : float
        The share of validation images :attr:`bound` lets pass.
    shrinkage : float
        Weight of the identity in the shrunk covariance.
    training_images : int
        How many training images the description was fitted on.
    """

    pca_mean: _F64
    pca_components: _F64
    center: _F64
    scale: _F64
    precision: _F64
    validation_scores: _F64
    pass_rate: float = DEFAULT_PASS_RATE
    shrinkage: float = DEFAULT_SHRINKAGE
    training_images: int = 0

    def __post_init__(self) -> None:
        k, dim = self.pca_components.shape
        features = k + 1 + len(STATISTICS)
        if self.pca_mean.shape != (dim,):
            raise ValueError(f"pca_mean must be ({dim},); found {self.pca_mean.shape}")
        for name in ("center", "scale"):
            if getattr(self, name).shape != (features,):
                raise ValueError(f"{name} must be ({features},); found {getattr(self, name).shape}")
        if self.precision.shape != (features, features):
            raise ValueError(f"precision must be ({features}, {features}); found {self.precision.shape}")
        if self.validation_scores.ndim != 1 or self.validation_scores.size < 1:
            raise ValueError("validation_scores must hold at least one score")
        check_pass_rate(self.pass_rate)

    @property
    def embedding_dim(self) -> int:
        """The length D of the embeddings it describes."""
        return int(self.pca_mean.shape[0])

    @property
    def bound(self) -> float:
        """The bound at the description's own pass rate."""
        return self.bound_at(self.pass_rate)

    def bound_at(self, pass_rate: float) -> float:
        """The smallest score that lets at least ``pass_rate`` of the validation images pass."""
        check_pass_rate(pass_rate)
        return float(np.quantile(self.validation_scores, pass_rate, method="inverted_cdf"))

    def features(self, embeddings: np.ndarray, statistics: np.ndarray) -> _F64:
        """Return the standardised (N, F) features of (N, D) embeddings and their (N, S) image statistics."""
        e = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        s = np.atleast_2d(np.asarray(statistics, dtype=np.float64))
        if e.shape[1] != self.embedding_dim or s.shape != (e.shape[0], len(STATISTICS)):
            raise ValueError(
                f"expected (N, {self.embedding_dim}) embeddings and (N, {len(STATISTICS)}) statistics;"
                f" found {e.shape} and {s.shape}"
            )
        raw = _raw_features(e, s, self.pca_mean, self.pca_components)
        return np.asarray((raw - self.center) / self.scale, dtype=np.float64)

    def scores(self, embeddings: np.ndarray, statistics: np.ndarray) -> _F64:
        """Return the (N,) Mahalanobis distances of images given their embeddings and image statistics."""
        x = self.features(embeddings, statistics)
        squared = np.einsum("nf,fg,ng->n", x, self.precision, x)
        return np.asarray(np.sqrt(np.maximum(squared, 0.0)), dtype=np.float64)

    def judge(self, embedding: np.ndarray, statistics: np.ndarray) -> DomainScore:
        """Return one image's score against the bound at the description's pass rate."""
        return DomainScore(float(self.scores(embedding[None], statistics[None])[0]), self.bound)

    def save(self, path: str | Path) -> Path:
        """Write the description as an ``.npz`` (arrays as float32/float64, metadata as JSON text)."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            meta=np.array(json.dumps(self.metadata(), sort_keys=True)),
            pca_mean=self.pca_mean.astype(np.float32),
            pca_components=self.pca_components.astype(np.float32),
            center=self.center,
            scale=self.scale,
            precision=self.precision,
            validation_scores=self.validation_scores,
        )
        file.write_bytes(buffer.getvalue())
        return file

    def metadata(self) -> dict[str, Any]:
        """What the file says about itself: format, features, pass rate, bound, how it was fitted."""
        return {
            "format": FORMAT_VERSION,
            "statistics": list(STATISTICS),
            "components": int(self.pca_components.shape[0]),
            "embedding_dim": self.embedding_dim,
            "pass_rate": self.pass_rate,
            "bound": round(self.bound, 6),
            "shrinkage": self.shrinkage,
            "training_images": self.training_images,
            "validation_images": int(self.validation_scores.size),
        }


def check_pass_rate(pass_rate: float) -> float:
    """Return ``pass_rate`` if it lies in (0, 1]; else raise ValueError naming it."""
    if not 0.0 < pass_rate <= 1.0:
        raise ValueError(f"pass_rate must be in (0, 1]; found {pass_rate!r}")
    return pass_rate


def _raw_features(e: _F64, s: _F64, mean: _F64, components: _F64) -> _F64:
    """Unstandardised features: PCA coordinates, log PCA residual norm, image statistics."""
    centered = e - mean
    z = centered @ components.T
    residual = np.linalg.norm(centered - z @ components, axis=1)
    return np.hstack([z, np.log(residual + 1e-6)[:, None], s])


def fit_description(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    pass_rate: float = DEFAULT_PASS_RATE,
    components: int = DEFAULT_COMPONENTS,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> DomainDescription:
    """Fit a domain description on training features and calibrate its bound on validation features.

    Parameters
    ----------
    train, val : tuple of (embeddings, statistics)
        (N, D) embeddings and (N, len(STATISTICS)) image statistics of the training and validation images.
    pass_rate : float
        Share of validation images the bound lets pass, in (0, 1].
    components : int
        PCA components kept (at most N_train - 1 and D).
    shrinkage : float
        Weight of the identity in the covariance, in [0, 1).

    Raises
    ------
    ValueError
        Too few images (fewer than 3 training or 1 validation), mismatched shapes, or an argument out of range.
    """
    check_pass_rate(pass_rate)
    if not 0.0 <= shrinkage < 1.0:
        raise ValueError(f"shrinkage must be in [0, 1); found {shrinkage!r}")
    e, s = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in train)
    if e.shape[0] < 3 or s.shape != (e.shape[0], len(STATISTICS)):
        raise ValueError(
            f"need >= 3 training images with (N, {len(STATISTICS)}) statistics; found {e.shape}, {s.shape}"
        )
    if len(val[0]) < 1:
        raise ValueError("need at least one validation image to calibrate the bound")
    mean = e.mean(axis=0)
    k = max(1, min(components, e.shape[0] - 1, e.shape[1]))
    _, _, vt = np.linalg.svd(e - mean, full_matrices=False)
    basis = vt[:k]
    raw = _raw_features(e, s, mean, basis)
    center, scale = raw.mean(axis=0), np.maximum(raw.std(axis=0), _STD_FLOOR)
    standard = (raw - center) / scale
    covariance = np.cov(standard, rowvar=False)
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * np.eye(covariance.shape[0])
    precision = np.asarray(np.linalg.inv(shrunk), dtype=np.float64)
    partial = DomainDescription(mean, basis, center, scale, precision, np.zeros(1), pass_rate, shrinkage, len(e))
    scores = np.sort(partial.scores(*val))
    return DomainDescription(mean, basis, center, scale, precision, scores, pass_rate, shrinkage, len(e))


def load_description(path: str | Path, expected_sha256: str | None = None) -> DomainDescription:
    """Read a description file, after checking its SHA-256 when one is expected.

    Raises
    ------
    ModelError
        Missing or unreadable file, a checksum that differs (expected and found named), another format version,
        or arrays that do not fit together; one line naming the file.
    """
    from cxr_node.infer.registry import sha256_file

    file = Path(path)
    if not file.is_file():
        raise ModelError(f"domain description {file} not found")
    if expected_sha256 is not None:
        found = sha256_file(file)
        if found != expected_sha256.lower():
            raise ModelError(
                f"domain description {file} refused: sha256 expected {expected_sha256.lower()}, found {found}"
            )
    try:
        with np.load(file, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            if meta.get("format") != FORMAT_VERSION or list(meta.get("statistics", ())) != list(STATISTICS):
                raise ModelError(
                    f"domain description {file} was written for other features (format {meta.get('format')!r},"
                    f" statistics {meta.get('statistics')}); fit it again with `cxr-node domain fit`"
                )
            return DomainDescription(
                pca_mean=arrays["pca_mean"].astype(np.float64),
                pca_components=arrays["pca_components"].astype(np.float64),
                center=arrays["center"].astype(np.float64),
                scale=arrays["scale"].astype(np.float64),
                precision=arrays["precision"].astype(np.float64),
                validation_scores=arrays["validation_scores"].astype(np.float64),
                pass_rate=float(meta["pass_rate"]),
                shrinkage=float(meta["shrinkage"]),
                training_images=int(meta["training_images"]),
            )
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"domain description {file} cannot be read: {type(exc).__name__}: {exc}") from exc


def summarise(scores: Sequence[float], bound: float) -> dict[str, float]:
    """Pass rate, median and largest of a list of scores against ``bound`` (for reports)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return {"images": 0, "pass_rate": float("nan"), "median": float("nan"), "max": float("nan")}
    return {
        "images": int(values.size),
        "pass_rate": float(np.mean(values <= bound)),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }
