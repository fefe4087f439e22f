"""PCA-whitening of descriptors, learned from a collection at build time (docs/design.md §8).

CNN descriptors have a few dominant, correlated directions (bursty activations,
the average "photo" appearance) that swamp cosine similarity; centring on the
collection mean and rescaling the principal directions to unit variance lets
the rarer, discriminative ones count. :meth:`PCAWhitening.fit` learns the map
from (n, d) vectors; :meth:`PCAWhitening.transform` maps (m, d) to (m, dim_out).

Eigenvalues are shrunk towards their mean, ``λ' = (1 - shrinkage)·λ +
shrinkage·mean(λ)`` (a Ledoit–Wolf-style target), so directions seen with tiny
variance in a small collection are not blown up: ``shrinkage=0`` is full
whitening, ``1`` plain PCA (rotation and centring only); default 0.8
(docs/benchmarks.md, "Whitening shrinkage"). With n <= d vectors the covariance
has rank at most n - 1, so at most ``rank`` components are kept (and at most
``dim_out`` when given): :attr:`PCAWhitening.dim_out` is the length produced.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hassod.errors import UserError
from hassod.runs import atomic_write

# Eigenvalues below this fraction of the largest are treated as zero (rank).
RANK_TOLERANCE = 1e-10


class WhiteningFileError(UserError, ValueError):
    """A whitening file that cannot be read."""


@dataclass(frozen=True)
class WhiteningSettings:
    """PCA-whitening learned from the collection at its first build.

    Attributes:
        dim: output dimension of the stored vectors; ``None`` keeps the
            descriptor's. The vectors it is learned from must span at least
            this many dimensions (about ``dim`` regions or more).
        shrinkage: eigenvalue shrinkage, 0 = full whitening .. 1 = plain PCA.
            0.8: the best of the values tried; lower ones amplify the noise of
            poorly estimated directions (docs/benchmarks.md, "Whitening shrinkage").
        sample: how many of the first build's vectors it is learned from
            (all of them when the build has fewer); they become searchable
            once it is learned.
    """

    dim: int | None = None
    shrinkage: float = 0.8
    sample: int = 50_000


@dataclass(frozen=True)
class PCAWhitening:
    """A learned whitening map ``x ↦ normalise((x - mean) @ projection)``.

    Attributes:
        mean: (d,) collection mean.
        projection: (d, k) principal directions divided by sqrt of the shrunk eigenvalues.
        eigenvalues: (k,) variances along those directions (before shrinkage).
        shrinkage: the shrinkage the map was fitted with.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    shrinkage: float

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dim_out: int | None = None, shrinkage: float = 0.8) -> "PCAWhitening":
        """Learn the whitening of (n, d) descriptors.

        Args:
            vectors: (n, d) float, n >= 2 (usually the collection's region descriptors).
            dim_out: keep this many leading components; ``None`` keeps all;
                capped at the rank of the centred data (<= min(n - 1, d)).
            shrinkage: 0..1, see the module docs.

        Raises:
            ValueError: fewer than 2 vectors, non-finite values, all vectors
                identical, or bad ``dim_out`` / ``shrinkage``.
        """
        data = np.asarray(vectors, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"whitening needs an (n >= 2, d) array of vectors, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise ValueError("whitening input contains NaN or infinite values")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if dim_out is not None and dim_out < 1:
            raise ValueError(f"dim_out must be positive, got {dim_out}")
        n, d = data.shape
        mean = data.mean(axis=0)
        # SVD of the centred data instead of eigh of the d x d covariance:
        # cheaper when n < d and no squaring of the condition number.
        _, singular, directions = np.linalg.svd(data - mean, full_matrices=False)
        eigenvalues = singular**2 / (n - 1)
        rank = int((eigenvalues > RANK_TOLERANCE * eigenvalues[0]).sum()) if eigenvalues[0] > 0 else 0
        if rank == 0:
            raise ValueError("all vectors are identical: nothing to whiten")
        keep = rank if dim_out is None else min(dim_out, rank)
        # The shrinkage target is the mean variance over all d dimensions (trace / d).
        shrunk = (1.0 - shrinkage) * eigenvalues[:keep] + shrinkage * eigenvalues.sum() / d
        projection = directions[:keep].T / np.sqrt(shrunk)
        return cls(mean=mean, projection=projection, eigenvalues=eigenvalues[:keep], shrinkage=float(shrinkage))

    def transform(self, vectors: np.ndarray, normalize: bool = True) -> np.ndarray:
        """(n, dim_in) → (n, dim_out) float32, rows L2-normalised unless ``normalize=False``."""
        data = np.asarray(vectors, dtype=np.float64)
        single = data.ndim == 1
        data = np.atleast_2d(data)
        if data.shape[1] != self.dim_in:
            raise ValueError(f"whitening expects {self.dim_in}-d vectors, got {data.shape[1]}-d")
        out = (data - self.mean) @ self.projection
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, np.finfo(np.float64).tiny)
        out = out.astype(np.float32)
        return out[0] if single else out

    def to_dict(self) -> dict[str, Any]:
        """Arrays and the shrinkage, for :meth:`from_dict` or ``np.savez``."""
        return {"mean": self.mean, "projection": self.projection, "eigenvalues": self.eigenvalues,
                "shrinkage": np.float64(self.shrinkage)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "PCAWhitening":
        return cls(mean=np.asarray(state["mean"], dtype=np.float64),
                   projection=np.asarray(state["projection"], dtype=np.float64),
                   eigenvalues=np.asarray(state["eigenvalues"], dtype=np.float64),
                   shrinkage=float(state["shrinkage"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` file atomically (a temporary file renamed over ``path``)."""
        with atomic_write(path, binary=True) as handle:
            np.savez(handle, **self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitening":
        """Read a file written by :meth:`save`; :class:`WhiteningFileError` for a damaged one."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                return cls.from_dict({key: data[key] for key in data.files})
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            # The stored vectors were whitened by it and the raw descriptors are not kept: no build repairs it.
            raise WhiteningFileError(f"the whitening file {path} is damaged ({exc}); the index's vectors were "
                                     "whitened with it: build the collection into a new --index directory") from None
